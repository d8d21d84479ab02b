"""The edge's routing table: how it keeps the shared choice (`mesh.replica_choice`, whose rules
test_routing_unit.py checks) current as reports and this edge's own requests come and go. Pure arithmetic."""

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


def loads(t: RouteTable) -> dict[str, int]:
    return {r.node_id: r.load for r in t.replicas("m")}


def test_this_edges_requests_count_until_they_end() -> None:
    t = table(rep("a", 0), rep("b", 1))
    picks = [route(t) for _ in range(5)]
    assert [r.node_id for r in picks].count("a") == 3  # loads end even: a 0+3, b 1+2
    assert loads(t) == {"a": 3, "b": 3}
    for replica in picks:
        t.release(replica)
    assert loads(t) == {"a": 0, "b": 1}


def test_a_report_replaces_the_others_share_and_keeps_this_edges_own() -> None:
    t = table(rep("a", 0), rep("b", 0))
    a = route(t)
    route(t)
    assert set(loads(t).values()) == {1}
    # The node reports 3: this edge's 1 plus 2 from other edges.
    t.put_node(a.node_id, [rep(a.node_id, 3)])
    [a2] = [r for r in t.replicas("m") if r.node_id == a.node_id]
    assert a2.load == 3 and a2.own == 1
    t.release(a2)  # this edge's request there ends: the others' 2 remain
    assert a2.load == 2
    assert first(t).node_id != a.node_id


def test_a_request_that_spans_a_report_comes_off_the_replica_when_it_ends() -> None:
    # The gateway releases the entry it routed with; a report has replaced that entry in the meantime.
    t = table(rep("a", 0), rep("b", 0))
    a = route(t)
    t.put_node("a", [rep("a", 1)])  # the node reports the request running
    t.release(a)  # it ends
    assert loads(t)["a"] == 0  # the others' share (1 - 1) and nothing of this edge's
    t.put_node("a", [rep("a", 0)])  # the node's next report: idle
    assert loads(t) == {"a": 0, "b": 0}
    assert {r.node_id for r in t.replicas("m") if r.own} == set()


def test_a_node_that_leaves_takes_its_replicas_and_a_snapshot_replaces_all() -> None:
    t = table(rep("a"), rep("b"), rep("c", model="other"))
    t.remove_node("a")
    assert [r.node_id for r in t.pick("m")[0]] == ["b"]
    t.replace({"b": [rep("b", 2)], "d": [rep("d", 1)]})
    assert [r.node_id for r in t.pick("m")[0]] == ["d", "b"]
    assert t.models() == {"m"}
    assert t.pick("unknown") == ([], [])


def test_a_replica_that_becomes_ready_or_fails_moves_in_and_out_of_the_candidates() -> None:
    t = table(rep("a", ready=False))
    assert t.pick("m") == ([], ["a: replica is loading"])
    t.put_node("a", [rep("a")])
    assert first(t).node_id == "a"
    t.put_node("a", [rep("a", ready=False, error="crashed")])
    assert t.pick("m") == ([], ["a: replica is failed: crashed"])


def test_idle_ties_go_to_the_warm_replica_and_concurrent_requests_spread() -> None:
    t = table(rep("a"), rep("b"), rep("c"))
    # One request at a time: the replica that served the last one serves the next (its engine is warm).
    warm = first(t).node_id
    assert {first(t).node_id for _ in range(12)} == {warm}
    # Requests in flight together spread over every replica: the busy ones score worse.
    held = [route(t) for _ in range(3)]
    assert {r.node_id for r in held} == {"a", "b", "c"}
    # When the warm one is busy the next goes elsewhere, and then sticks there.
    t2 = table(rep("a"), rep("b"), rep("c"))
    busy = route(t2)
    other = first(t2).node_id
    assert other != busy.node_id
    assert first(t2).node_id == other


def test_keys_pass_through() -> None:
    t = table(rep("a"), rep("b"), rep("c"))
    assert len({first(t, user="alice").node_id for _ in range(8)}) == 1
    assert len({first(t, prefix_hash="system-prompt").node_id for _ in range(8)}) == 1


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
