from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import MODEL, Cluster, smollm_entry
from tests.timeout_backstop import pytest_timeout_cancel_timer, pytest_timeout_set_timer  # noqa: F401 - hooks

MISSING_MODEL = "missing-weights"


@dataclass
class Mesh:
    cluster: Cluster
    http: str  # edge OpenAI base URL, e.g. http://127.0.0.1:PORT
    grpc: str  # edge gRPC host:port
    controlplane: str
    node_address: str
    model: str = MODEL


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """etcd + control plane + one node serving SmolLM2 (and a model whose file is missing) + edge."""
    cluster = Cluster(tmp_path_factory.mktemp("mesh"))
    try:
        cluster.start_etcd()
        cluster.start_controlplane(lease_ttl=3)
        missing = smollm_entry(MISSING_MODEL, path=str(Path("/nonexistent/weights.gguf")))
        _, node_address = cluster.start_node("node-a", [smollm_entry(), missing])
        _, http, grpc_address = cluster.start_edge()
        cluster.wait_model_state(http, MODEL)
        cluster.wait_model_state(http, MISSING_MODEL, "failed")
        yield Mesh(cluster, http, grpc_address, cluster.controlplane, node_address)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name in ("mesh", "fleet", "ha"):
            cluster = getattr(item.funcargs.get(name), "cluster", None) if hasattr(item, "funcargs") else None
            if isinstance(cluster, Cluster):
                report.sections.append(("fleetlm logs", cluster.logs()))
