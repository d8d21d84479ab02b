"""The edge's routing table: ordering, affinity, load estimates across several edges. Pure arithmetic."""

from __future__ import annotations

import time

from edge.route_table import Replica, RouteTable


def rep(node_id: str, reported: int = 0, ready: bool = True, capacity: int = 5, draining: bool = False,
        model: str = "m", error: str = "") -> Replica:  # fmt: skip
    state = "ready" if ready else ("failed" if error else "loading")
    return Replica(node_id, f"{node_id}:1", model, ready, state, error, capacity=capacity, reported=reported,
                   draining=draining)  # fmt: skip


def table(*replicas: Replica) -> RouteTable:
    t = RouteTable()
    for r in replicas:
        t.put_node(r.node_id, [r])
    return t


def first(t: RouteTable, **kw: object) -> Replica:
    return t.pick("m", **kw)[0][0]  # type: ignore[arg-type]


def route(t: RouteTable, **kw: object) -> Replica:
    chosen = first(t, **kw)
    t.acquire(chosen)
    return chosen


def test_least_loaded_first_counting_this_edges_requests() -> None:
    assert first(table(rep("a", 3), rep("b", 1), rep("c", 2))).node_id == "b"
    t = table(rep("a", 0), rep("b", 1))
    picks = [route(t).node_id for _ in range(5)]
    assert picks[0] == "a" and picks.count("a") == 3  # loads end even: a 0+3, b 1+2


def test_a_report_replaces_the_others_share_and_keeps_this_edges_own() -> None:
    t = table(rep("a", 0), rep("b", 0))
    a = route(t)
    route(t)
    assert {r.load for r in t.replicas("m")} == {1}
    # The node reports 3: this edge's 1 plus 2 from other edges.
    t.put_node(a.node_id, [rep(a.node_id, 3)])
    [a2] = [r for r in t.replicas("m") if r.node_id == a.node_id]
    assert a2.load == 3 and a2.own == 1
    t.release(a2)  # this edge's request there ends: the others' 2 remain
    assert a2.load == 2
    assert first(t).node_id != a.node_id


def test_ties_rotate() -> None:
    t = table(rep("a"), rep("b"), rep("c"))
    assert {first(t).node_id for _ in range(12)} == {"a", "b", "c"}


def test_full_and_draining_replicas_go_last() -> None:
    t = table(rep("full", 5), rep("drain", draining=True), rep("ok", 3))
    assert [r.node_id for r in t.pick("m")[0]] == ["ok", "drain", "full"]


def test_prefix_affinity_sticks_while_the_replica_is_not_much_busier() -> None:
    def fresh(busy: str = "", load: int = 0) -> RouteTable:
        return table(*(rep(n, load if n == busy else 0) for n in "abcdef"))

    chosen = {first(fresh(), prefix_hash="system-prompt-1").node_id for _ in range(6)}
    assert len(chosen) == 1
    favourite = chosen.pop()
    assert first(fresh(favourite, 2), prefix_hash="system-prompt-1", slack=2).node_id == favourite
    assert first(fresh(favourite, 3), prefix_hash="system-prompt-1", slack=2).node_id != favourite
    spread = {first(fresh(), prefix_hash=f"prompt-{i}").node_id for i in range(40)}
    assert len(spread) >= 4  # different prefixes land on different replicas


def test_session_affinity_by_user() -> None:
    t = table(*(rep(n) for n in "abcd"))
    assert len({first(t, user="alice").node_id for _ in range(8)}) == 1


def test_no_ready_replica_gives_reasons() -> None:
    t = table(rep("a", ready=False), rep("b", ready=False, error="model file not found"))
    chosen, reasons = t.pick("m")
    assert chosen == []
    assert sorted(reasons) == ["a: replica is loading", "b: replica is failed: model file not found"]
    assert t.pick("unknown") == ([], [])


def test_a_node_that_leaves_takes_its_replicas_and_a_snapshot_replaces_all() -> None:
    t = table(rep("a"), rep("b"), rep("c", model="other"))
    t.remove_node("a")
    assert [r.node_id for r in t.pick("m")[0]] == ["b"]
    t.replace({"b": [rep("b", 2)], "d": [rep("d", 1)]})
    assert [r.node_id for r in t.pick("m")[0]] == ["d", "b"]
    assert t.models() == {"m"}


def test_a_replica_that_becomes_ready_or_fails_moves_in_and_out_of_the_candidates() -> None:
    t = table(rep("a", ready=False))
    assert t.pick("m")[0] == []
    t.put_node("a", [rep("a")])
    assert first(t).node_id == "a"
    t.put_node("a", [rep("a", ready=False, error="crashed")])
    assert t.pick("m")[0] == []


def test_a_thousand_replicas_route_fast_in_process() -> None:
    # Not a timed assertion of speed: a generous bound that catches a decision becoming O(replicas)
    # (bench/routing_bench.py measures the rate).
    t = RouteTable()
    for i in range(1000):
        t.put_node(f"n{i}", [rep(f"n{i}", i % 7, capacity=20)])
    start = time.perf_counter()
    for i in range(5000):
        chosen = first(t, user=f"u{i % 50}" if i % 2 else "")
        t.acquire(chosen)
        t.release(chosen)
    per_decision = (time.perf_counter() - start) / 5000
    assert per_decision < 0.002, per_decision
