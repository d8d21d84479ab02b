"""Scheduler benchmark: a simulated fleet of 1,000 nodes in a real etcd, the real control plane.

    .venv/bin/python -m bench.scheduler_bench [--nodes 1000] [--seconds 5] [--concurrency 32]
                                              [--heartbeat-seconds 20] [--heartbeat-rate 1]

The nodes are records only (no agents): this measures the control plane's decisions, not inference.
Prints, side by side: the placement and routing arithmetic called in-process, and the same decisions
through the control plane's gRPC API as the edge and operators make them.

Then heartbeats: as many simulated nodes again, gRPC clients of the control-plane process, register and
heartbeat `--heartbeat-rate` times a second each with changing load (running and queued requests, last
request, free RAM), and now and then a change of state (a replica READY <-> LOADING). Printed: heartbeats
and state changes sent per second, etcd puts and lease renewals per second (etcd's own counters
`etcd_mvcc_put_total`, `etcd_debugging_lease_renewed_total`), and the control plane's CPU (psutil, both
cores = 200 %). Load is not cluster state: the puts should follow the state changes, not the heartbeats.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import psutil

from controlplane import placement, routing
from controlplane.etcd_store import EtcdStore
from fleetlm.controlplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    node_pb2,
    registry_pb2,
    registry_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
)
from launcher.processes import etcd_argv
from mesh import replica_choice
from tests.cluster import free_port, grpc_serving, wait_for

GiB = 1024**3
MODEL_PATH = "/models/bench.gguf"


def simulated_node(i: int, rng: random.Random) -> node_pb2.Node:
    gpus = [
        node_pb2.Gpu(
            index=g, vendor="nvidia", name="sim", memory=node_pb2.Memory(total_bytes=rng.choice([16, 24, 80]) * GiB)
        )
        for g in range(rng.choice([0, 0, 1, 2]))
    ]
    inventory = node_pb2.Inventory(
        hostname=f"sim-{i}",
        cpu=node_pb2.Cpu(model="sim", cores=rng.choice([8, 16, 64])),
        ram=node_pb2.Memory(total_bytes=rng.choice([16, 32, 64, 256]) * GiB),
        gpus=gpus,
        model_files=[node_pb2.ModelFile(path=MODEL_PATH, size_bytes=4 * GiB, format="gguf", kv_bytes_per_token=131072)]
        if rng.random() < 0.8
        else [],
    )
    node = node_pb2.Node(
        node_id=f"sim-{i:04d}", inference_address=f"10.0.{i // 250}.{i % 250}:50061", inventory=inventory
    )
    if rng.random() < 0.5:  # half the fleet already serves the routed model
        spec = node_pb2.ModelSpec(name="routed", path=MODEL_PATH, format="gguf", engine="llamacpp", context_size=4096)
        node.replicas.append(
            node_pb2.Replica(
                model=spec,
                state=node_pb2.REPLICA_STATE_READY,
                running_requests=rng.randint(0, 3),
                queued_requests=rng.randint(0, 4),
            )
        )
    return node


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def row(name: str, samples_ms: list[float], per_second: float | None = None) -> str:
    rate = f"{per_second:>12,.0f}" if per_second is not None else f"{'':>12}"
    return f"{name:<58} {percentile(samples_ms, 50):>9.3f} {percentile(samples_ms, 99):>9.3f} {rate}"


def etcd_counts(etcd_url: str) -> tuple[float, float]:
    """etcd's own counts since it started: keys written (puts, in transactions or not), lease renewals."""
    wanted = ("etcd_mvcc_put_total", "etcd_debugging_lease_renewed_total")
    found = {}
    for line in httpx.get(f"{etcd_url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
    return found[wanted[0]], found[wanted[1]]


async def heartbeats(cp_address: str, etcd_url: str, cp_pid: int, args: argparse.Namespace) -> None:
    """`args.nodes` simulated agents register with the control plane, then heartbeat with changing load."""
    rng = random.Random(11)
    spec = node_pb2.ModelSpec(name="beating", path=MODEL_PATH, format="gguf", engine="llamacpp", context_size=4096)
    channels = [grpc.aio.insecure_channel(cp_address) for _ in range(4)]
    stubs = [registry_pb2_grpc.NodeRegistryServiceStub(c) for c in channels]
    leases: dict[str, int] = {}
    state: dict[str, int] = {}
    counts = {"heartbeats": 0, "state changes": 0, "errors": 0}
    latencies: list[float] = []
    measuring = False

    async def register(i: int) -> None:
        node_id = f"hb-{i:04d}"
        state[node_id] = node_pb2.REPLICA_STATE_READY
        reply = await stubs[i % len(stubs)].RegisterNode(
            registry_pb2.RegisterNodeRequest(
                node_id=node_id,
                inference_address=f"10.1.{i // 250}.{i % 250}:50061",
                inventory=node_pb2.Inventory(ram=node_pb2.Memory(total_bytes=64 * GiB, free_bytes=32 * GiB)),
                replicas=[node_pb2.Replica(model=spec, state=state[node_id])],
            ),
            timeout=30,
        )
        leases[node_id] = reply.lease_id

    async def beat(i: int, until: float) -> None:
        node_id, stub = f"hb-{i:04d}", stubs[i % len(stubs)]
        period = 1.0 / args.heartbeat_rate
        await asyncio.sleep(rng.uniform(0, period))  # spread the fleet over the period
        next_at = time.perf_counter()
        while (now := time.perf_counter()) < until:
            changed = rng.random() < args.state_change_share
            if changed:
                ready = state[node_id] == node_pb2.REPLICA_STATE_READY
                state[node_id] = node_pb2.REPLICA_STATE_LOADING if ready else node_pb2.REPLICA_STATE_READY
            replica = node_pb2.Replica(
                model=spec, state=state[node_id], running_requests=rng.randint(0, 4), queued_requests=rng.randint(0, 8)
            )
            replica.last_request_at.GetCurrentTime()
            request = registry_pb2.HeartbeatRequest(
                node_id=node_id,
                lease_id=leases[node_id],
                replicas=[replica],
                ram_free_bytes=rng.randint(16, 48) * GiB,
            )
            try:
                await stub.Heartbeat(request, timeout=30)
                if measuring:
                    counts["heartbeats"] += 1
                    counts["state changes"] += changed
                    latencies.append((time.perf_counter() - now) * 1000)
            except grpc.aio.AioRpcError:
                counts["errors"] += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    try:
        for chunk in range(0, args.nodes, 100):
            await asyncio.gather(*(register(i) for i in range(chunk, min(args.nodes, chunk + 100))))
        warmup = 3.0  # every node has sent a few heartbeats before the window opens
        until = time.perf_counter() + warmup + args.heartbeat_seconds
        beating = asyncio.gather(*(beat(i, until) for i in range(args.nodes)))
        await asyncio.sleep(warmup)
        process = psutil.Process(cp_pid)
        cpu_before, (puts_before, renewals_before) = sum(process.cpu_times()[:2]), etcd_counts(etcd_url)
        start = time.perf_counter()
        measuring = True
        await asyncio.sleep(args.heartbeat_seconds)
        measuring = False
        cpu_after, (puts_after, renewals_after) = sum(process.cpu_times()[:2]), etcd_counts(etcd_url)
        elapsed = time.perf_counter() - start
        await beating
    finally:
        for channel in channels:
            await channel.close()
    rate = args.heartbeat_rate
    print(f"\n{args.nodes} simulated nodes heartbeating {rate:g}/s each with changing load, "
          f"{args.state_change_share:.1%} of heartbeats a change of state, {elapsed:.0f} s measured:")  # fmt: skip
    print(
        f"{'heartbeats/s':>13} {'state changes/s':>16} {'etcd puts/s':>12} {'puts/heartbeat':>15}"
        f" {'lease renewals/s':>17}"
        f" {'cp CPU %':>9} {'hb p50 ms':>10} {'hb p99 ms':>10} {'errors':>7}"
    )
    sent = counts["heartbeats"]
    puts = puts_after - puts_before
    print(
        f"{sent / elapsed:>13,.0f} {counts['state changes'] / elapsed:>16,.1f} {puts / elapsed:>12,.1f}"
        f" {puts / max(sent, 1):>15.3f} {(renewals_after - renewals_before) / elapsed:>17,.1f}"
        f" {100 * (cpu_after - cpu_before) / elapsed:>9.0f}"
        f" {percentile(latencies, 50):>10.2f} {percentile(latencies, 99):>10.2f} {counts['errors']:>7}"
    )


async def decisions(
    cp_address: str,
    nodes: list[node_pb2.Node],
    spec: node_pb2.ModelSpec,
    policy: placement.PlacementPolicy,
    args: argparse.Namespace,
) -> None:
    """Placement and routing decisions, in-process and through the control plane's gRPC API."""
    print(f"\n{'decision (' + str(args.nodes) + ' nodes)':<58} {'p50 ms':>9} {'p99 ms':>9} {'decisions/s':>12}")
    # 1. Placement arithmetic, in-process: all filters and scorers over the whole fleet.
    snapshots = [placement.NodeSnapshot(n) for n in nodes]
    samples = []
    for _ in range(200):
        t = time.perf_counter()
        placement.place(spec, snapshots, policy)
        samples.append((time.perf_counter() - t) * 1000)
    print(row("placement, in-process (filters + scorers)", samples, 1000 / statistics.mean(samples)))

    async with grpc.aio.insecure_channel(cp_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        picker = routing_pb2_grpc.RoutingServiceStub(channel)
        request = admin_pb2.ExplainPlacementRequest(deployment=node_pb2.Deployment(spec=spec, min_replicas=1))
        samples = []
        for _ in range(200):
            t = time.perf_counter()
            await admin.ExplainPlacement(request, timeout=10)
            samples.append((time.perf_counter() - t) * 1000)
        print(row("placement via control plane (ExplainPlacement RPC)", samples, 1000 / statistics.mean(samples)))
        samples = []
        for i in range(50):
            d = node_pb2.Deployment(min_replicas=1, max_replicas=1)
            d.spec.CopyFrom(spec)
            d.spec.name = f"placed-{i}"
            t = time.perf_counter()
            await admin.DeployModel(admin_pb2.DeployModelRequest(deployment=d), timeout=10)
            samples.append((time.perf_counter() - t) * 1000)
        print(row("deploy: place + write assignment to etcd (DeployModel)", samples))

        # 2. Routing arithmetic, in-process: the shared choice (mesh.replica_choice) over the same nodes'
        # ready replicas, built per decision as PickReplica does (the edge keeps its set current instead:
        # bench/routing_bench.py).
        replicas = [
            replica_choice.Replica(n.node_id, n.inference_address, "routed", True,
                                   capacity=routing.capacity(r.model), reported=r.running_requests + r.queued_requests)
            for n in nodes
            for r in n.replicas
            if r.model.name == "routed" and r.state == node_pb2.REPLICA_STATE_READY
        ]  # fmt: skip
        ready = len(replicas)
        samples = []
        for turn in range(5000):
            t = time.perf_counter()
            replica_choice.choose(replicas, prefix_hash=f"p{turn % 50}" if turn % 2 else "", turn=turn)
            samples.append((time.perf_counter() - t) * 1000)
        rate = 1000 / statistics.mean(samples)
        print(row(f"routing, in-process ({ready} ready replicas)", samples, rate))

        # 3. Routing as the edge does it: PickReplica over gRPC, `concurrency` requests in flight.
        latencies: list[float] = []
        deadline = time.perf_counter() + args.seconds

        async def worker(w: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await picker.PickReplica(
                    routing_pb2.PickReplicaRequest(model="routed", prefix_hash=f"p{(w + n) % 50}" if n % 2 else ""),
                    timeout=10,
                )
                latencies.append((time.perf_counter() - t) * 1000)
                n += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        name = f"routing via control plane (PickReplica, {args.concurrency} in flight)"
        print(row(name, latencies, len(latencies) / elapsed))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--heartbeat-seconds", type=float, default=20.0, help="0: no heartbeat section")
    parser.add_argument("--heartbeat-rate", type=float, default=1.0, help="heartbeats a second per node")
    parser.add_argument("--state-change-share", type=float, default=0.01, help="heartbeats that change state")
    parser.add_argument("--skip-decisions", action="store_true", help="only the heartbeat section")
    args = parser.parse_args()
    rng = random.Random(7)
    nodes = [simulated_node(i, rng) for i in range(args.nodes)]
    spec = node_pb2.ModelSpec(
        name="placed", path=MODEL_PATH, format="gguf", engine="llamacpp", context_size=8192, device="any"
    )
    policy = placement.PlacementPolicy()

    with tempfile.TemporaryDirectory() as tmp:
        client_port, peer_port, cp_port = free_port(), free_port(), free_port()
        etcd_cmd = etcd_argv(Path(tmp) / "etcd", "127.0.0.1", client_port, peer_port)
        etcd = subprocess.Popen(etcd_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cp = None
        try:
            store = EtcdStore(f"http://127.0.0.1:{client_port}")
            await asyncio.sleep(1)
            await store.connect()
            start = time.perf_counter()
            for chunk in range(0, len(nodes), 100):
                await asyncio.gather(*(store.put("node", n) for n in nodes[chunk : chunk + 100]))
            print(f"wrote {len(nodes)} simulated nodes to etcd in {time.perf_counter() - start:.2f}s")
            await store.close()
            cp_address = f"127.0.0.1:{cp_port}"
            etcd_url = f"http://127.0.0.1:{client_port}"
            cp_cmd = ["controlplane", "--listen", cp_address, "--etcd", etcd_url, "--log-level", "WARNING"]
            cp = subprocess.Popen([sys.executable, "-m", "launcher", *cp_cmd])
            wait_for(lambda: grpc_serving(cp_address), 60, "control plane")

            if not args.skip_decisions:
                await decisions(cp_address, nodes, spec, policy, args)
            if args.heartbeat_seconds > 0:
                await heartbeats(cp_address, etcd_url, cp.pid, args)
        finally:
            if cp is not None:
                cp.terminate()
                cp.wait(15)
            etcd.terminate()
            etcd.wait(15)


if __name__ == "__main__":
    asyncio.run(main())
