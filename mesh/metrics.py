"""Prometheus metrics: the names, label rules and histogram buckets all three services share, and the
metrics port of the control plane and the node.

Names are `fleetlm_<component>_...`; buckets follow vLLM's and OpenTelemetry GenAI's (`gen_ai.server.
time_to_first_token`, `time_per_output_token`), with finer low buckets because a CPU replica of a small model
answers in milliseconds. Histograms are labelled by model (and node where it means something), never by API
key or user: their series count must stay bounded by the fleet's size, not by its clients.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from mesh.tls import TlsFiles

log = logging.getLogger(__name__)

PREFIX = "fleetlm"

# Seconds. Time to first token: OpenTelemetry GenAI's advice, from 1 ms to 10 s, then vLLM's long tail
# (vllm/v1/metrics/loggers.py) to 2560 s: a scale from zero waits up to minutes, a request up to its timeout.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# Time per output token (inter-token latency): OpenTelemetry GenAI's, with 1 ms and 5 ms below it, then
# vLLM's tail to 80 s (a stream that stalls, on a replica's failover say).
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# End-to-end request latency: vLLM's.
E2E_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
# Tokens per request (prompt or completion): powers of 4 up to a long context.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
# Short internal operations (a routing decision, an etcd call, a decode step): 100 us to 10 s.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Sequences in one decode step (continuous batching).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Distribution:
    """A histogram kept by the code that observes (an engine's decode thread), with no Prometheus object and
    no lock: one writer; a scrape reads `counts` and `total`, which may be one observation apart. The node's
    collector turns it into a histogram with `buckets`."""

    __slots__ = ("buckets", "counts", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # per bucket (not cumulative), the last one +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value


def new_registry() -> CollectorRegistry:
    """A component's own registry (several components, or test fleets, may share a process), with the process
    metrics every Prometheus client exports (CPU, memory, file descriptors, GC, Python version)."""
    # No `<name>_created` series beside each counter and histogram (prometheus_client's default): a time
    # series of its own per labelled child, which Prometheus' text format does not need (it sees resets).
    # A switch of the process, read when a registry is scraped, so every component's registries drop them.
    disable_created_metrics()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def check_listen(listen: str) -> None:
    """A metrics address is "" (no port) or host:port; ValueError, naming the setting, otherwise."""
    _, sep, port = listen.rpartition(":")
    if listen and (not sep or not port.isdigit() or int(port) > 65535):
        raise ValueError(f"--metrics-listen {listen!r} is not host:port (or '' for no metrics port)")


@dataclass
class MetricsServer:
    """The HTTP server of a metrics port (a thread of prometheus_client's); `close()` stops it."""

    server: Any
    thread: Any
    port: int

    @property
    def ssl_context(self) -> Any:
        """The SSLContext of an HTTPS port (None for HTTP): keep it current when certificates are renewed
        (mesh.tls.keep_ssl_context_current), as the component's other ports are."""
        return getattr(self.server.socket, "context", None)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(listen: str, tls: TlsFiles | None = None, registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve `registry` at http(s)://listen/metrics (`host:0` picks a free port). With the component's TLS
    files the port speaks HTTPS with its fleet certificate; a client certificate is asked for but not
    required, so a Prometheus server given the fleet CA (tls_config.ca_file) can scrape it."""
    host, _, port = listen.rpartition(":")
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"certfile": str(tls.cert), "keyfile": str(tls.key), "client_cafile": str(tls.ca)}
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry, **options)
    bound = server.server_address[1]
    log.info("metrics on %s://%s:%d/metrics", "https" if tls else "http", host or "0.0.0.0", bound)
    return MetricsServer(server, thread, bound)


def start(component: str, listen: str, tls: TlsFiles | None, registry: CollectorRegistry) -> MetricsServer | None:
    """A component's metrics port, or None when `listen` is ""; a port it cannot bind ends the component with
    a message that says which and what to do (a scrape target that never answers would be found much later)."""
    if not listen:
        return None
    try:
        return serve(listen, tls, registry)
    except OSError as exc:
        raise SystemExit(
            f"fleetlm {component}: cannot serve metrics on {listen}: {exc.strerror or exc}"
            " (--metrics-listen HOST:PORT for another port, '' for none)"
        ) from None
