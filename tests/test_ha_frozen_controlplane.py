"""A node's control plane frozen for less than the node's lease, with real processes: a real etcd, three
`fleetlm controlplane` processes on it (node lease TTL 10 s, the default), one node agent given all three
addresses and serving the real SmolLM2 model. The control plane the node heartbeats to (the leader, listed
first) is SIGSTOPped for 7 s: its connection stays open and silent, so only a deadline shows the node that it
has stopped answering. Asserted: the node moves to another control plane soon enough that its etcd lease is
renewed while its own is frozen (nothing else could renew it), the lease never lapses (the same lease all
along, the node listed by the healthy control planes at every sample), and its replica stays loaded where it
was, loaded once."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.default_model import default_model_path
from tests.cluster import Cluster, Proc, start_controlplanes, wait_for

pytestmark = [pytest.mark.model, pytest.mark.cluster]

MODEL = "smol-frozen"
NODE = "frozen-n1"
LEASE_TTL = 10  # the node lease's default
FROZEN_SECONDS = 7  # less than the lease: a node that moves on in time keeps it
READY_BOUND = 90.0  # a replica loading on a busy 2-core machine
LEADER_BOUND = 15.0


@dataclass
class Frozen:
    cluster: Cluster
    controlplanes: list[tuple[Proc, str]]  # the node's current one (the leader) first
    node: Proc
    stubs: dict[str, admin_pb2_grpc.AdminServiceStub] = field(default_factory=dict)

    def admin(self, address: str) -> admin_pb2_grpc.AdminServiceStub:
        if address not in self.stubs:
            self.stubs[address] = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(address))
        return self.stubs[address]

    def listed(self, address: str) -> node_pb2.Node | None:
        nodes = self.admin(address).ListNodes(admin_pb2.ListNodesRequest(), timeout=2).nodes
        return next((n for n in nodes if n.node_id == NODE), None)

    def ready_on(self, address: str) -> list[str]:
        listed = self.admin(address).ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=5).deployments
        status = next((d for d in listed if d.deployment.spec.name == MODEL), None)
        return [] if status is None else [r.node_id for r in status.replicas if r.state == node_pb2.REPLICA_STATE_READY]

    def lease_seconds_left(self, lease_id: int) -> int:
        """What etcd says is left of the lease (its JSON gateway); -1 once it has lapsed."""
        reply = httpx.post(f"{self.cluster.etcd_url}/v3/lease/timetolive", json={"ID": str(lease_id)}, timeout=2)
        return int(reply.json().get("TTL", -1))


def leader_among(fleet_admin: dict[str, admin_pb2_grpc.AdminServiceStub]) -> str | None:
    leaders = [
        a for a, stub in fleet_admin.items() if stub.GetLeader(admin_pb2.GetLeaderRequest(), timeout=2).is_leader
    ]
    return leaders[0] if len(leaders) == 1 else None


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Frozen]:
    cluster = Cluster(tmp_path)
    catalog = tmp_path / "deployments.yaml"
    path = default_model_path()
    catalog.write_text(
        f"models:\n  - {{name: {MODEL}, path: {path}, format: gguf, context_size: 512, min_replicas: 1}}\n"
    )
    try:
        cluster.start_etcd()
        controlplanes = start_controlplanes(cluster, 3, LEASE_TTL, "--deployments", str(catalog))
        stubs = {a: admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(a)) for _, a in controlplanes}
        leading = wait_for(lambda: leader_among(stubs), LEADER_BOUND, "one leader")
        # The leader first: the node uses the first control plane that answers, and freezing the leader also
        # makes the others elect a new one meanwhile (the harder case, as the QA report found it).
        controlplanes.sort(key=lambda started: started[1] != leading)
        cluster.controlplane = ",".join(a for _, a in controlplanes)
        node, _ = cluster.start_node(NODE, models_dirs=[str(path.parent)], threads=1)
        result = Frozen(cluster, controlplanes, node, stubs)
        wait_for(lambda: result.ready_on(controlplanes[1][1]) == [NODE], READY_BOUND, "the replica ready")
        yield result
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def test_a_frozen_control_plane_does_not_let_the_node_lease_lapse(fleet: Frozen) -> None:
    (frozen, used), *others = fleet.controlplanes
    healthy = [a for _, a in others]
    # The node registered with the one it uses: the first address, the leader.
    assert f"registered node {NODE}" in frozen.log_path.read_text()
    before = fleet.listed(healthy[0])
    assert before is not None and before.lease_id
    lease = before.lease_id
    time.sleep(2 * LEASE_TTL / 4)  # a couple of heartbeats through `used`: the node is settled on it

    samples, missing, other_lease, left = 0, [], [], []
    frozen.signal(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        # While it is frozen, and for a lease's TTL after it resumes (a lapse may show only then): sampled.
        while time.monotonic() - stopped_at < FROZEN_SECONDS + LEASE_TTL:
            if frozen.popen.poll() is None and time.monotonic() - stopped_at >= FROZEN_SECONDS:
                frozen.signal(signal.SIGCONT)
            at = round(time.monotonic() - stopped_at, 1)
            listed = fleet.listed(healthy[samples % 2])
            if listed is None:
                missing.append(at)
            elif listed.lease_id != lease:
                other_lease.append((at, f"{listed.lease_id:x}"))
            left.append((at, fleet.lease_seconds_left(lease)))
            samples += 1
            time.sleep(0.2)
    finally:
        frozen.signal(signal.SIGCONT)

    while_frozen = [ttl for at, ttl in left if at < FROZEN_SECONDS]
    renewed = any(later > earlier for earlier, later in itertools.pairwise(while_frozen))
    print(f"etcd's seconds left of lease {lease:x} (time since the SIGSTOP, ttl): {left}")
    assert samples >= 20, samples
    # Only the frozen control plane had renewed the lease so far: a renewal while it is frozen means the node
    # moved to another one in time.
    assert renewed, f"lease {lease:x} was not renewed while the node's control plane was frozen: {while_frozen}"
    assert all(ttl > 0 for _, ttl in left), f"lease {lease:x} lapsed: {left}"
    assert missing == [], f"the node was out of ListNodes at {missing} (s after the SIGSTOP)"
    assert other_lease == [], f"the node registered again under another lease: {other_lease}"
    node_log = fleet.node.log_path.read_text()
    assert "lease expired" not in node_log
    # Its replica stayed where it was, loaded once: not re-placed, not reloaded.
    assert fleet.ready_on(healthy[0]) == [NODE]
    assert fleet.ready_on(healthy[1]) == [NODE]
    assert node_log.count(f"model {MODEL} ready") == 1
    assert "unloaded" not in node_log
    wait_for(lambda: fleet.ready_on(used) == [NODE], 30, "the resumed control plane to see the replica too")
