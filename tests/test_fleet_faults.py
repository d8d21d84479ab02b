"""The fleet keeps serving when one component fails: a real etcd, control plane, two node agents and an
edge as processes, a model with two replicas, four clients streaming chat requests in a loop through the
edge, then one fault at a time. Each outcome is counted and asserted: requests that failed before their
first token, failed mid-stream, or hung."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.default_model import default_model_path
from tests.cluster import Cluster, Proc, start_controlplanes, wait_for

pytestmark = [pytest.mark.model, pytest.mark.cluster]

TTL = 3
MODEL = "smol-ha"
CLIENTS = 4
HUNG_SECONDS = 30  # a request still going after this long is counted as hung (a normal one takes ~1 s)


@dataclass
class Outcomes:
    ok: int = 0
    before_first_token: list[str] = field(default_factory=list)
    mid_stream: list[str] = field(default_factory=list)
    hung: int = 0
    ok_at: list[float] = field(default_factory=list)  # when each successful request ended
    failed_at: list[float] = field(default_factory=list)  # when each failed request started
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> str:
        return (
            f"{self.ok} ok, {len(self.before_first_token)} failed before the first token, "
            f"{len(self.mid_stream)} failed mid-stream, {self.hung} hung; "
            f"first failures: {(self.before_first_token + self.mid_stream)[:3]}"
        )


class Traffic:
    """CLIENTS threads streaming short chat requests in a loop until stopped, counting outcomes."""

    def __init__(self, http: str) -> None:
        self.outcomes = Outcomes()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(http, i), daemon=True) for i in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _run(self, http: str, i: int) -> None:
        client = openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=HUNG_SECONDS)
        n = 0
        while not self._stop.is_set():
            n += 1
            started = False
            began = time.monotonic()
            try:
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Client {i}, request {n}: name a colour."}],
                    max_tokens=12,
                    temperature=0,
                    stream=True,
                )
                finished = False
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        started = True
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finished = True
                with self.outcomes.lock:
                    if finished:
                        self.outcomes.ok += 1
                        self.outcomes.ok_at.append(time.monotonic())
                    else:
                        self.outcomes.mid_stream.append("stream ended without a finish_reason")
                        self.outcomes.failed_at.append(began)
            except (openai.APITimeoutError, httpx.TimeoutException):
                with self.outcomes.lock:
                    self.outcomes.hung += 1
                    self.outcomes.failed_at.append(began)
            except (openai.APIError, httpx.HTTPError) as exc:
                with self.outcomes.lock:
                    (self.outcomes.mid_stream if started else self.outcomes.before_first_token).append(str(exc)[:200])
                    self.outcomes.failed_at.append(began)
                time.sleep(0.05)

    def stop(self) -> Outcomes:
        self._stop.set()
        for thread in self._threads:
            thread.join(HUNG_SECONDS + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread did not stop"
        return self.outcomes


@dataclass
class HaFleet:
    cluster: Cluster
    http: str
    admin: admin_pb2_grpc.AdminServiceStub
    nodes: dict[str, Proc]

    def ready_nodes(self) -> list[str]:
        listed = self.admin.ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=5).deployments
        status = next((d for d in listed if d.deployment.spec.name == MODEL), None)
        return [] if status is None else [r.node_id for r in status.replicas if r.state == node_pb2.REPLICA_STATE_READY]

    def proc(self, name: str) -> Proc:
        return next(p for p in self.cluster.procs if p.name == name)


def start_ha_fleet(cluster: Cluster, workdir: Path, controlplanes: int = 1) -> HaFleet:
    """etcd, a control plane (or several, one leading) deploying MODEL with two replicas, two nodes and an
    edge given every control-plane address, warmed up."""
    catalog = workdir / "deployments.yaml"
    path = default_model_path()
    catalog.write_text(
        f"models:\n  - {{name: {MODEL}, path: {path}, format: gguf, context_size: 1024, "
        "min_replicas: 2, max_replicas: 2, max_running_requests: 4}\n"
    )
    cluster.start_etcd()
    if controlplanes == 1:
        cluster.start_controlplane(TTL, "--deployments", str(catalog))
    else:
        start_controlplanes(cluster, controlplanes, TTL, "--deployments", str(catalog))
    nodes = {}
    for node_id in ("ha-1", "ha-2"):
        nodes[node_id], _ = cluster.start_node(node_id, models_dirs=[str(path.parent)], threads=1)
    _, http, _ = cluster.start_edge()
    admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cluster.controlplane.split(",")[0]))
    fleet = HaFleet(cluster, http, admin, nodes)
    wait_for(lambda: len(fleet.ready_nodes()) == 2, 90, "two ready replicas")
    # Both replicas are in the edge's table once a request has been served by each (warm-up).
    client = openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=60)
    for _ in range(4):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    return fleet


@contextlib.contextmanager
def running_ha_fleet(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[HaFleet]:
    """`start_ha_fleet` with `env` added to its processes' environment; its logs printed if it fails to
    start, every process stopped at the end."""
    cluster = Cluster(tmp_path)
    try:
        with cluster.env_added(env):
            yield start_ha_fleet(cluster, tmp_path)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[HaFleet]:
    with running_ha_fleet(tmp_path) as fleet:
        yield fleet


def back_to_normal_after(outcomes: Outcomes, fault_at: float) -> float:
    """Seconds from the fault until every request succeeds again: the start of the last request that
    failed after it (0 when none failed)."""
    return max(0.0, max(outcomes.failed_at) - fault_at) if outcomes.failed_at else 0.0


def recovery_after(outcomes: Outcomes, fault_at: float) -> float | None:
    """Seconds from the fault to the first request that succeeded after it."""
    later = [t for t in outcomes.ok_at if t > fault_at]
    return min(later) - fault_at if later else None


def run_fault(ha: HaFleet, fault: Any, after_seconds: float = 6.0) -> tuple[Outcomes, float]:
    traffic = Traffic(ha.http)
    try:
        time.sleep(2)
        fault_at = time.monotonic()
        fault()
        time.sleep(after_seconds)
    finally:
        outcomes = traffic.stop()
    print(f"outcomes: {outcomes.summary()}; first success {recovery_after(outcomes, fault_at)}s after the fault")
    return outcomes, fault_at


def assert_served_through(outcomes: Outcomes, allow_mid_stream: bool = False) -> None:
    assert outcomes.before_first_token == [], outcomes.summary()
    assert outcomes.hung == 0, outcomes.summary()
    if not allow_mid_stream:
        assert outcomes.mid_stream == [], outcomes.summary()
    for failure in outcomes.mid_stream:  # a cut stream is said, never a silent truncation
        assert "without a finish_reason" not in failure, outcomes.summary()
    assert outcomes.ok >= 10, outcomes.summary()


def test_a_node_killed_loses_no_request_that_had_not_started(ha: HaFleet) -> None:
    outcomes, _ = run_fault(ha, lambda: ha.nodes["ha-1"].signal(signal.SIGKILL))
    assert_served_through(outcomes, allow_mid_stream=True)


def test_a_node_stopped_in_order_loses_no_request(ha: HaFleet) -> None:
    """SIGTERM: the node leaves the fleet, refuses new calls on the edge's stream (the edge tries the other
    replica), lets the streams it is serving finish, then stops; no client sees an error."""
    node = ha.nodes["ha-1"]
    outcomes, _ = run_fault(ha, lambda: node.signal(signal.SIGTERM))
    assert_served_through(outcomes)
    assert node.popen.wait(30) == 0
    log = node.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_the_control_plane_killed_and_restarted_stops_no_traffic(ha: HaFleet) -> None:
    controlplane = ha.proc("controlplane")

    def fault() -> None:
        controlplane.signal(signal.SIGKILL)
        time.sleep(TTL * 3)  # past the nodes' lease TTL: their etcd records expire meanwhile
        ha.cluster.restart(controlplane)

    outcomes, _ = run_fault(ha, fault, after_seconds=8)
    assert_served_through(outcomes)
    # No healthy replica was moved: both still ready, on the same nodes, never reloaded.
    wait_for(lambda: sorted(ha.ready_nodes()) == ["ha-1", "ha-2"], 30, "both replicas reported again")
    for node in ("ha-1", "ha-2"):
        assert ha.proc(f"node-{node}").log_path.read_text().count(f"model {MODEL} ready") == 1


def test_the_control_plane_stopped_and_started_again_at_once_moves_no_replica(ha: HaFleet) -> None:
    """An operator's restart (SIGTERM, then the same command at once): the nodes' leases are still alive when
    the new control plane starts and lapse a moment later, before the nodes have found it. That is no node
    leaving: nothing is moved or loaded again (the QA pass saw every replica removed and placed again)."""
    controlplane = ha.proc("controlplane")

    stopped_after: list[float] = []

    def fault() -> None:
        signalled = time.monotonic()
        controlplane.signal(signal.SIGTERM)
        assert controlplane.popen.wait(30) == 0
        stopped_after.append(time.monotonic() - signalled)
        ha.cluster.restart(controlplane)

    outcomes, _ = run_fault(ha, fault, after_seconds=TTL * 3)
    assert_served_through(outcomes)
    wait_for(lambda: sorted(ha.ready_nodes()) == ["ha-1", "ha-2"], 30, "both replicas reported again")
    # The nodes' and the edge's streams ended at the stop: the server did not wait out its 5 s grace for
    # them (it did, refusing the nodes' heartbeats meanwhile).
    assert stopped_after[0] < 5, stopped_after
    time.sleep(TTL)  # a removal would have been decided by now
    log = ha.proc("controlplane").log_path.read_text()
    assert "removed" not in log and "left the fleet" not in log, log[-4000:]
    for node in ("ha-1", "ha-2"):
        assert ha.proc(f"node-{node}").log_path.read_text().count(f"model {MODEL} ready") == 1


def test_etcd_frozen_stops_no_traffic(ha: HaFleet) -> None:
    etcd = ha.proc("etcd")

    def fault() -> None:
        etcd.signal(signal.SIGSTOP)
        time.sleep(15)
        etcd.signal(signal.SIGCONT)

    outcomes, _ = run_fault(ha, fault, after_seconds=5)
    assert_served_through(outcomes)
    # etcd expired the nodes' leases when it came back, while both kept reporting: they were kept in the
    # fleet (not taken for gone), registered again, and no replica was moved or loaded again.
    wait_for(lambda: sorted(ha.ready_nodes()) == ["ha-1", "ha-2"], 30, "both replicas reported again")
    for node in ("ha-1", "ha-2"):
        assert ha.proc(f"node-{node}").log_path.read_text().count(f"model {MODEL} ready") == 1


def test_etcd_restarted_stops_no_traffic(ha: HaFleet) -> None:
    etcd = ha.proc("etcd")

    def fault() -> None:
        etcd.stop()
        time.sleep(3)
        ha.cluster.restart(etcd)

    outcomes, _ = run_fault(ha, fault, after_seconds=8)
    assert_served_through(outcomes)
