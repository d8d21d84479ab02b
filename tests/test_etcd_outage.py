"""etcd unreachable (frozen with SIGSTOP) under a real control plane and a real node agent serving SmolLM2:
every RPC that needs etcd answers UNAVAILABLE with the fleet's BACKEND_UNAVAILABLE saying etcd is
unreachable (never INTERNAL, never a traceback in the log), the control plane says so once as a warning,
`fleetlm status` prints one line saying so, and the node keeps its replica and keeps serving; once etcd
answers again, so does everything else, with no replica loaded again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2, registry_pb2, registry_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from tests.cluster import MODEL, Cluster, Proc, smollm_entry, wait_for

pytestmark = [pytest.mark.model, pytest.mark.cluster]

TTL = 3
# The store's own deadline on an etcd call is 5 s: a frozen etcd makes each call wait that long.
CALL_TIMEOUT = 20


@dataclass
class Fleet:
    cluster: Cluster
    etcd: Proc
    controlplane: Proc
    node: Proc
    node_address: str

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(self.cluster.controlplane))

    def ready(self) -> bool:
        nodes = self.admin().ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes
        return any(r.model.name == MODEL and r.state == node_pb2.REPLICA_STATE_READY for n in nodes for r in n.replicas)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(TTL)
        node, address = cluster.start_node("n1", [smollm_entry(context_size=512)], threads=1)
        procs = {p.name: p for p in cluster.procs}
        fleet = Fleet(cluster, procs["etcd"], procs["controlplane"], node, address)
        wait_for(fleet.ready, 120, "the node's replica to be ready")
        yield fleet
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def refusal(call: grpc.RpcError) -> FleetError:
    assert isinstance(call, grpc.RpcError)
    assert call.code() == grpc.StatusCode.UNAVAILABLE, (call.code(), call.details())
    sent = FleetError.sent_by_peer(call)
    assert sent is not None, call.details()
    assert sent.code == ErrorCode.BACKEND_UNAVAILABLE and sent.retry_after_seconds == 1, sent
    assert "etcd" in sent.message and "unreachable" in sent.message, sent.message
    return sent


def generate(address: str) -> inference_pb2.GenerateResult:
    request = inference_pb2.GenerateRequest(model=MODEL)
    request.chat.messages.add(role="user", content="Name a colour.")
    request.sampling.max_tokens = 4
    with grpc.insecure_channel(address) as channel:
        events = list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=60))
    assert events[-1].HasField("result"), events[-1]
    return events[-1].result


def test_etcd_frozen_rpcs_answer_unavailable_and_the_node_keeps_serving(fleet: Fleet) -> None:
    cp_log, node_log = fleet.controlplane.log_path, fleet.node.log_path
    cp_from, node_from = cp_log.stat().st_size, node_log.stat().st_size
    fleet.etcd.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        # An operator's read (ListNodes reads etcd, not the cached view).
        with pytest.raises(grpc.RpcError) as listed:
            fleet.admin().ListNodes(admin_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT)
        refusal(listed.value)
        # A heartbeat whose lease must be renewed in etcd.
        registry = registry_pb2_grpc.NodeRegistryServiceStub(grpc.insecure_channel(fleet.cluster.controlplane))
        with pytest.raises(grpc.RpcError) as beat:
            registry.Heartbeat(registry_pb2.HeartbeatRequest(node_id="probe", lease_id=0x1234), timeout=CALL_TIMEOUT)
        refusal(beat.value)
        # fleetlm status: one line saying so.
        done = subprocess.run(
            [sys.executable, "-m", "launcher", "status", "--once", "--controlplane", fleet.cluster.controlplane],
            capture_output=True,
            text=True,
            timeout=60,
        )
        print(done.stderr)
        assert done.returncode == 1 and done.stdout == "", (done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "etcd" in done.stderr and "unreachable" in done.stderr and "INTERNAL" not in done.stderr, done.stderr
        # The node has been heartbeating into the outage all along, and still serves.
        wait_for(lambda: "heartbeat failed" in node_log.read_text()[node_from:], 30, "a failed heartbeat")
        assert generate(fleet.node_address).usage.completion_tokens > 0
        print(f"etcd frozen for {time.monotonic() - frozen_at:.1f}s")
    finally:
        fleet.etcd.signal(signal.SIGCONT)

    # etcd back: the control plane answers again, and the node's replica was never dropped or loaded again.
    wait_for(fleet.ready, 60, "ListNodes to answer with the ready replica again")
    assert generate(fleet.node_address).usage.completion_tokens > 0
    cp_text, node_text = cp_log.read_text()[cp_from:], node_log.read_text()
    print(cp_text[-3000:])
    assert "Traceback" not in cp_text and "unhandled error in /" not in cp_text, cp_text[-3000:]
    assert cp_text.count("is unreachable") == 1, cp_text[-3000:]  # once for the outage, not once a call
    assert "answers again" in cp_text, cp_text[-3000:]
    assert node_text.count(f"model {MODEL} ready") == 1 and "unloaded" not in node_text, node_text[-3000:]
