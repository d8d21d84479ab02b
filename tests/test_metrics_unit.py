"""The metrics helpers' own logic: the engine-kept histogram, an engine server's metrics link (no credentials
in it), the metrics address check."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mesh.metrics import Distribution, check_listen
from node_agent.metrics import _histogram, metrics_url


def test_distribution_counts_each_value_in_its_bucket_and_exports_cumulative_buckets() -> None:
    d = Distribution((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0, 3.0):
        d.observe(v)
    assert d.counts == [2, 1, 2]  # <= 0.1 (Prometheus' `le`), <= 1, +Inf
    assert d.total == pytest.approx(5.65)
    family = _histogram("x", "doc", "m", d)
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("x_bucket", "0.1")] == 2
    assert samples[("x_bucket", "1.0")] == 3
    assert samples[("x_bucket", "+Inf")] == 5
    assert samples[("x_count", None)] == 5
    assert samples[("x_sum", None)] == pytest.approx(5.65)


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://10.0.0.5:30000", "http://10.0.0.5:30000/metrics"),
        ("http://10.0.0.5:30000/v1/", "http://10.0.0.5:30000/metrics"),
        ("https://user:s3cret@gpu-box:8000/v1", "https://gpu-box:8000/metrics"),  # credentials left out
        ("http://[::1]:8000/v1", "http://[::1]:8000/metrics"),
    ],
)
def test_an_engine_servers_metrics_url(base_url: str, expected: str) -> None:
    attached = SimpleNamespace(config=SimpleNamespace(base_url=base_url))
    launched = SimpleNamespace(client=attached)
    assert metrics_url(attached) == expected
    assert metrics_url(launched) == expected
    assert metrics_url(SimpleNamespace(config=SimpleNamespace(path="/m.gguf"))) == ""  # in-process: no server


@pytest.mark.parametrize("listen", ["", "127.0.0.1:9400", "0.0.0.0:0", "[::1]:9401", ":9400"])
def test_metrics_addresses_that_are_accepted(listen: str) -> None:
    check_listen(listen)


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "host:"])
def test_metrics_addresses_that_are_refused_name_the_flag(listen: str) -> None:
    with pytest.raises(ValueError, match="--metrics-listen"):
        check_listen(listen)


def test_inter_token_gaps_are_timed_per_choice() -> None:
    from prometheus_client import CollectorRegistry

    from edge.metrics import Call, EdgeMetrics

    def count(metrics: EdgeMetrics, name: str) -> float:
        value = metrics.registry.get_sample_value(f"fleetlm_edge_{name}_count", {"model": "m"})
        return value or 0.0

    metrics = EdgeMetrics(SimpleNamespace(), CollectorRegistry())  # type: ignore[arg-type]  # read when scraped
    # n = 2: the choices' events interleave, as one decode step gives each choice its token.
    call = Call("/v1/chat/completions")
    metrics.serving(call, "m")
    for index in (0, 1, 0, 1, 0, 1):
        metrics.text(call, index=index)
    assert count(metrics, "time_to_first_token_seconds") == 1
    assert count(metrics, "inter_token_latency_seconds") == 4  # 2 gaps per choice, none between choices


def test_an_etcd_operations_error_count_is_exported_from_its_first_call_so_a_rate_sees_its_first_error() -> None:
    """Prometheus takes a new series' first sample as its start: an error count that appeared only with its
    first error would hide that error from rate() and the FleetlmEtcdErrors alert."""
    from controlplane.metrics import ETCD_ERRORS, etcd_call

    def errors(op: str) -> float | None:
        for metric in ETCD_ERRORS.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels == {"op": op}:
                    return sample.value
        return None

    op = "test_first_call_op"
    assert errors(op) is None
    with etcd_call(op):
        pass
    assert errors(op) == 0
    with pytest.raises(RuntimeError), etcd_call(op):
        raise RuntimeError("etcd is away")
    assert errors(op) == 1
