"""A node cut off by the network, not killed: each node agent runs in a network namespace of its own with its
own address (tests/netns.py); the control plane and the edge in the root namespace reach it over a bridge.
Under streaming load (tests/test_fleet_faults.py's Traffic, two replicas) the test takes one node's link
down, then brings it back.

A partition is the fault a kill is not: the node's process, its model and its connections stay up, but no
packet arrives either way and nothing says so (no RST, no ICMP). The edge must notice a silent connection
by itself (gRPC keepalive, mesh.channels); the control plane notices the lease lapse; when the link comes
back the node registers again with the replica it never unloaded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from fleetlm.controlplane.v1 import admin_pb2_grpc
from launcher.default_model import default_model_path
from mesh.channels import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from mesh.lifecycle import free_port
from tests import netns
from tests.cluster import START_TIMEOUT, Cluster, Proc, fleetlm, grpc_serving, wait_for
from tests.test_fleet_faults import MODEL, TTL, HaFleet, Outcomes, Traffic, assert_served_through

pytestmark = [pytest.mark.model, pytest.mark.cluster]

NODES = ("part-1", "part-2")
NODE_PORT = 50061  # each node has a namespace, so an address, of its own: any port is free there
# A silent connection is closed within keepalive time + timeout (10 s); an attempt waiting on it then fails
# over to the other replica, a stream going on it ends with an error event.
DETECT_SECONDS = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000


@dataclass
class PartitionFleet:
    ha: HaFleet
    net: netns.Network

    def node_address(self, node: str) -> str:
        return f"{self.net.address(node)}:{NODE_PORT}"

    def unreachable(self) -> list[str]:
        """The nodes the edge's circuit breakers skip now."""
        return list(httpx.get(f"{self.ha.http}/health", timeout=5).json().get("unreachable_nodes", []))


ETCD_HOST = "etcd-host"


def start_fleet(cluster: Cluster, net: netns.Network, workdir: Path, etcd_apart: bool = False) -> HaFleet:
    """etcd, the control plane and the edge in the root namespace (the control plane on the bridge's
    address, so that the namespaces reach it), a node agent in each host's namespace. With `etcd_apart`,
    etcd runs in a host's namespace of its own (ETCD_HOST), to be cut off in its turn."""
    path = default_model_path()
    catalog = workdir / "deployments.yaml"
    catalog.write_text(
        f"models:\n  - {{name: {MODEL}, path: {path}, format: gguf, context_size: 1024, "
        "min_replicas: 2, max_replicas: 2, max_running_requests: 4}\n"
    )
    if etcd_apart:
        cluster.start_etcd(net.add_host(ETCD_HOST), partial(net.argv, ETCD_HOST))
    else:
        cluster.start_etcd()
    cluster.controlplane = controlplane = f"{net.gateway}:{free_port()}"
    # The fleet's addresses are on a bridge the test made, not loopback: plaintext there must be asked for.
    argv = fleetlm("controlplane", "--listen", controlplane, "--etcd", cluster.etcd_url, "--lease-ttl", str(TTL),
                   "--deployments", str(catalog), "--insecure-plaintext")  # fmt: skip
    procs = [Proc("controlplane", argv, workdir, lambda: grpc_serving(controlplane))]
    cluster.procs.append(procs[0])
    wait_for(procs[0].ready, START_TIMEOUT, "control plane", procs[0])
    nodes: dict[str, Proc] = {}
    for node in NODES:
        net.add_host(node)
        address = f"{net.address(node)}:{NODE_PORT}"
        argv = fleetlm("node", "--node-id", node, "--listen", address, "--controlplane", controlplane,
                       "--threads", "1", "--models-dir", str(path.parent), "--insecure-plaintext")  # fmt: skip
        nodes[node] = Proc(f"node-{node}", net.argv(node, argv), workdir, lambda a=address: grpc_serving(a))
        cluster.procs.append(nodes[node])
        wait_for(nodes[node].ready, START_TIMEOUT, f"node {node} (reached over the bridge)", nodes[node])
    _, http, _ = cluster.start_edge()
    admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(controlplane))
    fleet = HaFleet(cluster, http, admin, nodes)
    wait_for(lambda: sorted(fleet.ready_nodes()) == list(NODES), 90, "two ready replicas")
    client = openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=60)
    for _ in range(4):  # both replicas in the edge's table and warm
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    return fleet


def partition_fleet(tmp_path: Path, etcd_apart: bool = False) -> Iterator[PartitionFleet]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"partition tests need network namespaces: {reason}")
    net = netns.Network()
    cluster = Cluster(tmp_path)
    try:
        yield PartitionFleet(start_fleet(cluster, net, tmp_path, etcd_apart), net)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
        net.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[PartitionFleet]:
    yield from partition_fleet(tmp_path)


@pytest.fixture
def etcd_apart(tmp_path: Path) -> Iterator[PartitionFleet]:
    """The fleet with etcd in a namespace of its own."""
    yield from partition_fleet(tmp_path, etcd_apart=True)


def outcomes_now(traffic: Traffic) -> str:
    with traffic.outcomes.lock:
        return traffic.outcomes.summary()


def ok_after(outcomes: Outcomes, moment: float) -> int:
    return sum(1 for t in outcomes.ok_at if t > moment)


def test_a_node_cut_off_loses_no_request_and_rejoins_with_its_replica(fleet: PartitionFleet) -> None:
    ha, net = fleet.ha, fleet.net
    traffic = Traffic(ha.http)
    try:
        time.sleep(2)
        net.cut("part-1")
        cut_at = time.monotonic()
        # The lease (TTL 3 s) lapses and the control plane drops the replica; 60 s fails only one that
        # never leaves.
        wait_for(lambda: ha.ready_nodes() == ["part-2"], 60, "the cut node's replica to leave the table")
        time.sleep(DETECT_SECONDS)  # the fleet serves on one replica, past any keepalive
        net.heal("part-1")
        # The node's next heartbeat after its link is back registers it again. TCP retransmits on its old
        # connection back off while the link is down (a few seconds per try by now), hence 90 s.
        node_log = ha.nodes["part-1"].log_path
        wait_for(lambda: node_log.read_text().count("registered with the control plane") >= 2, 90,
                 "the healed node to hear that it registered again")  # fmt: skip
        wait_for(lambda: sorted(ha.ready_nodes()) == list(NODES), 60, "the healed node's replica in the table")
        # And it stays: no second lapse of the new lease, no reload, for three lease TTLs. (The control plane
        # removed the assignment when the lease lapsed and assigns it again after the heal; the node keeps
        # an unassigned replica serving for a few seconds, so it carries on instead of reloading.)
        settled_until = time.monotonic() + 3 * TTL
        samples, left = 0, []
        while time.monotonic() < settled_until:
            samples += 1
            if sorted(ha.ready_nodes()) != list(NODES):
                left.append(round(settled_until - time.monotonic(), 1))
            time.sleep(0.2)
        assert samples >= 10 and left == [], f"the healed node left the view in {len(left)} of {samples} samples"
        # The edge tries it again (a half-open probe within the breaker's cooldown, at most 30 s) and it serves.
        wait_for(lambda: fleet.node_address("part-1") not in fleet.unreachable(), 60, "the edge to reach it again")
    finally:
        outcomes = traffic.stop()
    print(f"cut off and healed: {outcomes.summary()}")
    # Not one request that had not started failed, none hung (Traffic's clients count a request still going
    # after 30 s, three times DETECT_SECONDS, as hung): a stream caught on the cut node ended with an
    # explicit error event.
    assert_served_through(outcomes, allow_mid_stream=True)
    assert ok_after(outcomes, cut_at + DETECT_SECONDS) >= 10, outcomes.summary()
    # The replica was never unloaded: one load in the node's whole log.
    log = node_log.read_text()
    assert log.count(f"model {MODEL} ready") == 1, log[-3000:]

    # It serves again: cut the other node, and every request that had not started is served by part-1.
    traffic = Traffic(ha.http)
    try:
        time.sleep(1)
        net.cut("part-2")
        cut_at = time.monotonic()
        time.sleep(3 * DETECT_SECONDS)
    finally:
        outcomes = traffic.stop()
    print(f"the other node cut off: {outcomes.summary()}")
    assert_served_through(outcomes, allow_mid_stream=True)
    # No packet from part-2 reaches the edge after the cut: what ended well after it came from part-1.
    assert ok_after(outcomes, cut_at) >= 10, outcomes.summary()
    log = node_log.read_text()
    assert log.count(f"model {MODEL} ready") == 1, log[-3000:]


def test_etcd_cut_off_for_many_ttls_stops_no_traffic_and_moves_no_replica(etcd_apart: PartitionFleet) -> None:
    """etcd cut off by the network (not frozen: no packet either way, nothing says so) for ten lease TTLs,
    under streaming load. Every node's lease lapses meanwhile; the edge routes on its table, the nodes keep
    serving, and once etcd is back every node registers again with its replica: none leaves the fleet, none
    is placed again or reloaded. (Before: the control plane's connection to etcd stayed stalled for 8-14 s
    after the heal, TCP's retransmission backoff, and the lapsed nodes' grace ran out meanwhile: the nodes
    "left", every replica was placed again, and requests failed with 503 while the table was empty.)"""
    ha, net = etcd_apart.ha, etcd_apart.net
    traffic = Traffic(ha.http)
    try:
        time.sleep(2)
        net.cut(ETCD_HOST)
        time.sleep(10 * TTL)
        net.heal(ETCD_HOST)
        healed_at = time.monotonic()
        controlplane = ha.proc("controlplane")
        # etcd answers the control plane again (its connection was closed by keepalive during the cut, and it
        # dials again every 2 s at most), and both nodes register again.
        wait_for(lambda: "answers again" in controlplane.log_text(), 60, "the control plane to reach etcd again")
        wait_for(lambda: sorted(ha.ready_nodes()) == list(NODES), 60, "both replicas ready in the view")
        time.sleep(3 * TTL)  # and they stay
        assert sorted(ha.ready_nodes()) == list(NODES)
    finally:
        outcomes = traffic.stop()
    print(f"etcd cut off for {10 * TTL} s and healed: {outcomes.summary()}")
    assert_served_through(outcomes)
    assert ok_after(outcomes, healed_at) >= 5, outcomes.summary()
    log = controlplane.log_text()
    # The two placements of the start, and no other: nothing was placed again.
    assert "left the fleet" not in log and log.count(f"placed {MODEL} on") == 2, log[-4000:]
    for node in NODES:  # no replica was unloaded or loaded again
        node_log = ha.nodes[node].log_path.read_text()
        assert node_log.count(f"model {MODEL} ready") == 1 and "unloaded" not in node_log, node_log[-3000:]
