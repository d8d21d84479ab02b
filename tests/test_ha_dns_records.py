"""Control planes found by one DNS name with several records, with real processes: a real etcd, two
`fleetlm controlplane` processes on 127.0.0.2 and 127.0.0.3 (one port), and a node agent and an edge given
only `--controlplane cp.fleet.test:PORT`. The name resolves to both addresses in the node's and the edge's
own /etc/hosts: each runs in a mount namespace of its own (`unshare --mount`) with a hosts file bind-mounted
over /etc/hosts, so the machine's resolver is untouched and the traffic stays on loopback.

The control plane they use first is SIGSTOPped for longer than the node's lease: its connection stays open
and silent. One gRPC channel to the name (pick_first over its records) stays stuck to it, so the node's
lease lapsed and the edge's routing table went stale for as long as the freeze lasted. Each record is now a
control plane of its own, as a list of addresses is: asserted, the node's lease is renewed through the other
control plane while the first is frozen and never lapses, and the edge hears a fresh routing table from the
other one before the freeze ends.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from mesh.lifecycle import free_port
from tests.cluster import START_TIMEOUT, Cluster, Proc, fleetlm, grpc_serving, wait_for

pytestmark = [pytest.mark.cluster]

NAME = "cp.fleet.test"
ADDRESSES = ("127.0.0.2", "127.0.0.3")
NODE = "dns-n1"
LEASE_TTL = 10  # the node lease's default
FROZEN_SECONDS = 12  # longer than the lease: a node that does not move on loses it


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a mount namespace of its own (unshare --mount) needs root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def _port_free_on_both() -> int:
    """A port free on 127.0.0.2 and 127.0.0.3 alike (the name's records carry one port)."""
    for _ in range(50):
        port = free_port()
        try:
            for host in ADDRESSES:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on both addresses")


def with_own_hosts(hosts: Path) -> Callable[[list[str]], list[str]]:
    """An argv wrapper: the component runs in a mount namespace where `hosts` is its /etc/hosts."""

    def wrap(argv: list[str]) -> list[str]:
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, str(hosts), *argv]

    return wrap


@dataclass
class DnsFleet:
    cluster: Cluster
    controlplanes: dict[str, Proc]  # address -> process
    node: Proc
    http: str

    def admin(self, address: str) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.cluster.channel(address))

    def routing_table(self) -> str:
        health = httpx.get(f"{self.http}/health", timeout=2, verify=self.cluster.http_verify())
        return str(health.json()["routing_table"])

    def lease_seconds_left(self, lease_id: int) -> int:
        reply = httpx.post(f"{self.cluster.etcd_url}/v3/lease/timetolive", json={"ID": str(lease_id)}, timeout=2)
        return int(reply.json().get("TTL", -1))

    def first_used(self, proc: Proc) -> str:
        """The address a component dials first: the first record its log names."""
        found = re.search(r"has 2 addresses, each used in turn: (\S+?),", proc.log_path.read_text())
        assert found, f"{proc.name} did not say it uses each of {NAME}'s records"
        return found.group(1)


@pytest.fixture(params=["plaintext", "tls"])
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DnsFleet]:
    """Under TLS no certificate carries the name or the records' addresses as the node and the edge dial
    them (each control plane's carries its own address, for the test's admin calls): they verify
    `controlplane.fleetlm`, which every control-plane certificate from the fleet CA carries."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    cluster = Cluster(tmp_path, tls=request.param == "tls")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {NAME}\n" for a in ADDRESSES))
    try:
        cluster.start_etcd()
        port = _port_free_on_both()
        controlplanes = {}
        for i, host in enumerate(ADDRESSES):
            address = f"{host}:{port}"
            tls = cluster.issue(f"controlplane-{i}", f"controlplane/cp{i}", ips=(host,)) if cluster.tls else []
            argv = fleetlm("controlplane", "--listen", address, "--etcd", cluster.etcd_url,
                           "--lease-ttl", str(LEASE_TTL), *tls)  # fmt: skip
            ready = partial(grpc_serving, address, credentials=cluster.credentials())
            controlplanes[address] = cluster._start(f"controlplane-{i}", argv, ready)
        for proc in controlplanes.values():
            wait_for(proc.ready, START_TIMEOUT, proc.name, proc)
        cluster.controlplane = f"{NAME}:{port}"
        cluster.wrap = with_own_hosts(hosts)
        node, _ = cluster.start_node(NODE, extra=tuple(cluster.issue(NODE, f"node/{NODE}")) if cluster.tls else ())
        _, http, _ = cluster.start_edge()
        cluster.wrap = None
        yield DnsFleet(cluster, controlplanes, node, http)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def test_each_record_of_a_control_plane_name_is_a_control_plane_of_its_own(fleet: DnsFleet) -> None:
    used = fleet.first_used(fleet.node)
    assert fleet.first_used(fleet.cluster.procs[-1]) == used  # the edge, started last: the same order
    [other] = [a for a in fleet.controlplanes if a != used]
    frozen = fleet.controlplanes[used]
    listed = wait_for(
        lambda: next((n for n in fleet.admin(other).ListNodes(admin_pb2.ListNodesRequest(), timeout=2).nodes
                      if n.node_id == NODE), None),
        30, "the node registered",
    )  # fmt: skip
    lease = listed.lease_id
    wait_for(lambda: fleet.routing_table() == "fresh", 30, "the edge's routing table")
    time.sleep(2 * LEASE_TTL / 4)  # a couple of heartbeats through `used`
    edge_log = fleet.cluster.procs[-1].log_path
    snapshots = edge_log.read_text().count("routing table received")

    left, tables, missing = [], [], []
    frozen.signal(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        while (at := time.monotonic() - stopped_at) < FROZEN_SECONDS:
            nodes = fleet.admin(other).ListNodes(admin_pb2.ListNodesRequest(), timeout=2).nodes
            if not any(n.node_id == NODE and n.lease_id == lease for n in nodes):
                missing.append(round(at, 1))
            left.append((round(at, 1), fleet.lease_seconds_left(lease)))
            tables.append((round(at, 1), fleet.routing_table()))
            time.sleep(0.25)
        snapshots_while_frozen = edge_log.read_text().count("routing table received") - snapshots
    finally:
        frozen.signal(signal.SIGCONT)
    print(f"lease {lease:x}, seconds left (time since the SIGSTOP, ttl): {left}")
    print(f"the edge's routing table: {tables}")
    assert len(left) >= 20, left
    renewed = any(later > earlier for (_, earlier), (_, later) in itertools.pairwise(left))
    assert renewed, f"lease {lease:x} was not renewed while the control plane the node used was frozen: {left}"
    assert all(ttl > 0 for _, ttl in left), f"lease {lease:x} lapsed: {left}"
    assert missing == [], f"the node was out of ListNodes (or under another lease) at {missing} s"
    assert "lease expired" not in fleet.node.log_path.read_text()
    # The edge's routing stream fell silent, and the edge followed the other control plane's table before
    # the freeze ended: a new snapshot, and a fresh table at the end.
    assert snapshots_while_frozen >= 1, f"no routing table from the other control plane while frozen: {tables}"
    assert tables[-1][1] == "fresh", tables
