"""The fleet under faults: one fault at a time under steady streaming load, the issue's table.

    .venv/bin/python -m bench.fault_bench [--only NAME ...] [--down-seconds 60]

Each row starts a fresh fleet of real processes (etcd, control plane(s), two node agents with the real
model, an edge), deploys a model with two replicas, runs four clients streaming short chat requests in a
loop through the edge (tests/test_fleet_faults.py's Traffic), applies one fault, keeps the load going
for a while after it, and counts what the clients saw: requests served, failed before their first token,
failed mid-stream, hung (over 30 s), and the time from the fault until every request succeeds again
(the start of the last request that failed). The partition row needs root and iproute2 (network
namespaces); the leader row runs three control planes.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from tests import netns
from tests.cluster import Cluster
from tests.test_fleet_faults import HaFleet, Outcomes, Traffic, back_to_normal_after, start_ha_fleet
from tests.test_partition import start_fleet as start_partition_fleet

Fault = Callable[[HaFleet], None]


def leader_fleet(cluster: Cluster, workdir: Path) -> HaFleet:
    return start_ha_fleet(cluster, workdir, controlplanes=3)


FAILOVER: list[float] = []  # seconds from killing the leader to another control plane leading


def _leads(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = admin_pb2_grpc.AdminServiceStub(channel).GetLeader(admin_pb2.GetLeaderRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(reply.is_leader)


def kill_leader(fleet: HaFleet) -> None:
    """SIGKILL the leader, then time the failover: until another control plane says it leads (polled
    every 50 ms for at most 60 s)."""
    addresses = {
        proc.name: proc.argv[proc.argv.index("--listen") + 1]
        for proc in fleet.cluster.procs
        if proc.name.startswith("controlplane-")
    }
    leader = next((name for name, address in addresses.items() if _leads(address)), None)
    if leader is None:
        raise RuntimeError("no leader found")
    fleet.proc(leader).signal(signal.SIGKILL)
    killed_at = time.monotonic()
    others = [address for name, address in addresses.items() if name != leader]
    while time.monotonic() - killed_at < 60:
        if any(_leads(address) for address in others):
            FAILOVER.append(time.monotonic() - killed_at)
            return
        time.sleep(0.05)
    raise RuntimeError("no control plane took over within 60 s")


def run(name: str, start: Callable[[Cluster, Path], HaFleet], fault: Fault, after: float) -> tuple[Outcomes, float]:
    with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            fleet = start(cluster, Path(tmp))
            traffic = Traffic(fleet.http)
            try:
                time.sleep(3)
                fault_at = time.monotonic()
                fault(fleet)
                time.sleep(after)
            finally:
                outcomes = traffic.stop()
            return outcomes, back_to_normal_after(outcomes, fault_at)
        finally:
            cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these rows (by the names in the table)")
    parser.add_argument("--down-seconds", type=float, default=60, help="how long every control plane is down")
    args = parser.parse_args()
    down = args.down_seconds
    net_holder: list[netns.Network] = []

    def partition_fleet(cluster: Cluster, workdir: Path) -> HaFleet:
        net = netns.Network()
        net_holder.append(net)
        return start_partition_fleet(cluster, net, workdir)

    def cp_down(fleet: HaFleet) -> None:
        cp = fleet.proc("controlplane")
        cp.signal(signal.SIGKILL)
        time.sleep(down)
        fleet.cluster.restart(cp)

    def etcd_frozen(fleet: HaFleet) -> None:
        fleet.proc("etcd").signal(signal.SIGSTOP)
        time.sleep(15)
        fleet.proc("etcd").signal(signal.SIGCONT)

    def etcd_restarted(fleet: HaFleet) -> None:
        etcd = fleet.proc("etcd")
        etcd.stop()
        time.sleep(3)
        fleet.cluster.restart(etcd)

    rows: list[tuple[str, Callable[[Cluster, Path], HaFleet], Fault, float]] = [
        ("node SIGKILLed", start_ha_fleet, lambda f: f.nodes["ha-1"].signal(signal.SIGKILL), 10),
        ("node cut off by a partition", partition_fleet, lambda f: net_holder[-1].cut("part-1"), 20),
        ("leader control plane SIGKILLed", leader_fleet, kill_leader, 10),
        (f"all control planes down {down:g} s", start_ha_fleet, cp_down, 10),
        ("etcd frozen (SIGSTOP) 15 s", start_ha_fleet, etcd_frozen, 5),
        ("etcd restarted", start_ha_fleet, etcd_restarted, 10),
    ]
    if netns.unavailable() is not None:
        print(f"skipping the partition row: {netns.unavailable()}")
        rows = [r for r in rows if "partition" not in r[0]]
    if args.only:
        rows = [r for r in rows if any(o in r[0] for o in args.only)]
    results = []
    for name, start, fault, after in rows:
        print(f"running: {name} ...", flush=True)
        try:
            outcomes, back = run(name, start, fault, after)
        finally:
            while net_holder:
                net_holder.pop().close()
        results.append((name, outcomes, back))
    print("\nfault (2 replicas, 4 clients streaming)      ok  failed before 1st token  failed mid-stream  hung  "
          "back to normal")  # fmt: skip
    for name, o, back in results:
        print(f"{name:42}{o.ok:>5}{len(o.before_first_token):>25}{len(o.mid_stream):>19}{o.hung:>6}"
              f"{back:>14.2f} s")  # fmt: skip
    if FAILOVER:
        print(f"\nleader failover: another control plane led {FAILOVER[0]:.2f} s after the leader was killed "
              "(default --leader-ttl 3)")  # fmt: skip


if __name__ == "__main__":
    main()
