"""Routing decisions in-process with many replicas of one model, made by the one choice the edge and the
control plane share (`mesh.replica_choice`), as each of them makes it:

- the edge's `RouteTable`, which keeps a `ReplicaSet` per model current and routes every request from it;
- the control plane's `PickReplica` (scale from zero, a model the edge's table does not know, an edge with
  no table yet), which builds the set from its fleet view for each request (`replica_choice.choose`).

    .venv/bin/python -m bench.routing_bench [--replicas 1000] [--decisions 50000]

Each decision picks the best replica and 3 alternates, then counts the request against the first one
and (for the edge, which knows when its requests end) releases it. Half the decisions carry a user for
session affinity. Loads are random, as reported by nodes, and a report replaces one replica's load every
10 decisions. The control plane's rows take its replicas as `Router.replicas` hands them over (converted
from the fleet view's records beforehand: that conversion is not timed).

Before the shared choice (issue 11, same machine, 1,000 replicas, 50,000 decisions): the edge's own
RouteTable 4.1 µs p50, 10.4 µs p99, 225,614 decisions/s; the control plane's own RoutingIndex (kept
current per node report, a heap over every ready replica per decision) 223.1 µs p50, 485.7 µs p99, 3,971
decisions/s. Target: at least 20,000 decisions/s at the edge with 1,000 replicas.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from edge.route_table import RouteTable
from mesh.replica_choice import Replica, choose


def replica(i: int, load: int) -> Replica:
    return Replica(f"n{i}", f"10.0.{i // 250}.{i % 250}:1", "m", True, capacity=20, reported=load)


def run_edge(n: int, decisions: int, rng: random.Random) -> list[float]:
    table = RouteTable()
    for i in range(n):
        table.put_node(f"n{i}", [replica(i, rng.randint(0, 7))])
    times = []
    for d in range(decisions):
        if d % 10 == 0:
            i = rng.randrange(n)
            table.put_node(f"n{i}", [replica(i, rng.randint(0, 7))])
        user = f"user-{d % 97}" if d % 2 else ""
        start = time.perf_counter()
        chosen, _ = table.pick("m", user=user)
        table.acquire(chosen[0])
        table.release(chosen[0])
        times.append(time.perf_counter() - start)
    return times


def run_controlplane(n: int, decisions: int, rng: random.Random) -> list[float]:
    replicas = [replica(i, rng.randint(0, 7)) for i in range(n)]
    times = []
    for d in range(decisions):
        if d % 10 == 0:
            i = rng.randrange(n)
            replicas[i] = replica(i, rng.randint(0, 7))
        user = f"user-{d % 97}" if d % 2 else ""
        start = time.perf_counter()
        chosen, _ = choose(replicas, user=user, turn=d)
        chosen[0].own += 1  # routed since the node's report, as the router counts it
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
    # PickReplica is rare now, and each call builds its set: fewer decisions give its figures just as well.
    runs = (
        ("edge RouteTable (kept current)", run_edge, args.decisions),
        ("control plane PickReplica (built per call)", run_controlplane, max(1, args.decisions // 25)),
    )
    rows = []
    for name, fn, decisions in runs:
        fn(args.replicas, min(2000, decisions), random.Random(1))  # warm-up
        rows.append((*row(name, fn(args.replicas, decisions, random.Random(2))), decisions))
    print(f"\nrouting decisions, in-process, {args.replicas} ready replicas of one model (mesh.replica_choice)")
    print(f"{'':46}{'decisions':>10}{'p50 us':>10}{'p99 us':>10}{'decisions/s':>14}")
    for name, p50, p99, rate, decisions in rows:
        print(f"{name:46}{decisions:10}{p50:10.1f}{p99:10.1f}{rate:14,.0f}")
    print("\nbefore (separate implementations): edge 225,614/s (p50 4.1 us, p99 10.4 us);")
    print("control plane's RoutingIndex 3,971/s (p50 223.1 us, p99 485.7 us)")


if __name__ == "__main__":
    main()
