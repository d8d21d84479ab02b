"""Routing decisions in-process with many replicas of one model: the edge's RouteTable (where routing
runs now) beside the control plane's RoutingIndex (where it ran before), in the same run.

    .venv/bin/python -m bench.routing_bench [--replicas 1000] [--decisions 50000]

Each decision picks the best replica and 3 alternates, then counts the request against the first one
and (for the edge, which knows when its requests end) releases it. Half the decisions carry a user for
session affinity. Loads are random, as reported by nodes, and a report replaces one replica's load every
10 decisions.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from controlplane import routing
from edge.route_table import Replica, RouteTable
from fleetlm.controlplane.v1 import node_pb2


def edge_table(n: int, rng: random.Random) -> RouteTable:
    table = RouteTable()
    for i in range(n):
        table.put_node(f"n{i}", [Replica(f"n{i}", f"10.0.0.{i}:1", "m", True, capacity=20, reported=rng.randint(0, 7))])
    return table


def node(i: int, load: int) -> node_pb2.Node:
    spec = node_pb2.ModelSpec(name="m", max_running_requests=4, max_queued_requests=16)
    replica = node_pb2.Replica(model=spec, state=node_pb2.REPLICA_STATE_READY, running_requests=load)
    return node_pb2.Node(node_id=f"n{i}", inference_address=f"10.0.0.{i}:1", replicas=[replica])


def controlplane_index(n: int, rng: random.Random) -> routing.RoutingIndex:
    index = routing.RoutingIndex()
    for i in range(n):
        index.update_node(f"n{i}", node(i, rng.randint(0, 7)), False)
    return index


def run_edge(n: int, decisions: int, rng: random.Random) -> list[float]:
    table = edge_table(n, rng)
    times = []
    for d in range(decisions):
        if d % 10 == 0:
            i = rng.randrange(n)
            table.put_node(f"n{i}", [Replica(f"n{i}", f"10.0.0.{i}:1", "m", True, capacity=20,
                                             reported=rng.randint(0, 7))])  # fmt: skip
        user = f"user-{d % 97}" if d % 2 else ""
        start = time.perf_counter()
        chosen, _ = table.pick("m", user=user)
        table.acquire(chosen[0])
        table.release(chosen[0])
        times.append(time.perf_counter() - start)
    return times


def run_controlplane(n: int, decisions: int, rng: random.Random) -> list[float]:
    index = controlplane_index(n, rng)
    times = []
    for d in range(decisions):
        if d % 10 == 0:
            i = rng.randrange(n)
            index.update_node(f"n{i}", node(i, rng.randint(0, 7)), False)
        user = f"user-{d % 97}" if d % 2 else ""
        start = time.perf_counter()
        index.pick("m", user=user, turn=d)
        times.append(time.perf_counter() - start)
    return times


def row(name: str, times: list[float]) -> tuple[str, float, float, float]:
    ordered = sorted(times)
    p50 = statistics.median(ordered) * 1e6
    p99 = ordered[int(len(ordered) * 0.99)] * 1e6
    return name, p50, p99, len(times) / sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=50_000)
    args = parser.parse_args()
    rows = []
    for name, fn in (
        ("edge RouteTable (routing now)", run_edge),
        ("control plane RoutingIndex (before)", run_controlplane),
    ):
        fn(args.replicas, 2000, random.Random(1))  # warm-up
        rows.append(row(name, fn(args.replicas, args.decisions, random.Random(2))))
    print(f"\nrouting decisions, in-process, {args.replicas} ready replicas of one model, {args.decisions} decisions")
    print(f"{'':40}{'p50 us':>10}{'p99 us':>10}{'decisions/s':>14}")
    for name, p50, p99, rate in rows:
        print(f"{name:40}{p50:10.1f}{p99:10.1f}{rate:14,.0f}")
    print(f"\nedge / before: {rows[0][3] / rows[1][3]:.1f}x the decisions per second")


if __name__ == "__main__":
    main()
