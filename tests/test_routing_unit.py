"""The choice of replica (`mesh.replica_choice`): each rule once, against the shared module; then the
control plane's wiring (`Router`, over a fleet view in memory), and that the edge and the control plane,
given the same fleet, choose alike. Pure arithmetic: no servers (test_controlplane_core.py runs the router
on a real etcd, test_route_feed.py the table on a real control plane)."""

from __future__ import annotations

import asyncio
import random

import pytest

from controlplane import routing
from controlplane.fleet import FleetView
from controlplane.route_publisher import node_routes
from controlplane.router import Router
from controlplane.store import StoreEvent
from edge.route_feed import replicas_of
from edge.route_table import RouteTable
from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError
from mesh.replica_choice import Replica, ReplicaSet, choose, score

READY, FAILED, LOADING = node_pb2.REPLICA_STATE_READY, node_pb2.REPLICA_STATE_FAILED, node_pb2.REPLICA_STATE_LOADING


def rep(node_id: str, reported: int = 0, ready: bool = True, capacity: int = 5, draining: bool = False,
        state: str = "", error: str = "", own: int = 0, own_at_report: int = 0) -> Replica:  # fmt: skip
    return Replica(node_id, f"{node_id}:1", "m", ready, state or ("ready" if ready else "loading"), error,
                   capacity=capacity, reported=reported, draining=draining, own=own,
                   own_at_report=own_at_report)  # fmt: skip


def first(replicas: list[Replica], **kw: object) -> str:
    return choose(replicas, **kw)[0][0].node_id  # type: ignore[arg-type]


# --- the rules -------------------------------------------------------------------------------------------


def test_least_estimated_load_first() -> None:
    assert first([rep("a", 3), rep("b", 1), rep("c", 2)]) == "b"
    # The estimate: the others' share at the report (reported - own_at_report) plus the caller's own now.
    assert rep("x", reported=3, own=1, own_at_report=1).load == 3
    assert rep("x", reported=3, own=0, own_at_report=1).load == 2  # one of the caller's requests ended
    assert rep("x", reported=0, own=2, own_at_report=1).load == 2  # never below the caller's own
    assert first([rep("a", 1, own=2), rep("b", 2)]) == "b"  # a: 1 + 2 routed since the report


def test_ties_rotate_with_the_turn_in_node_order_whatever_the_order_they_came_in() -> None:
    replicas = [rep("c"), rep("a"), rep("b")]
    assert [first(replicas, turn=t) for t in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert [first(replicas[::-1], turn=t) for t in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_full_and_draining_replicas_go_last() -> None:
    chosen, _ = choose([rep("full", reported=5), rep("drain", draining=True), rep("ok", reported=3)])
    assert [r.node_id for r in chosen] == ["ok", "drain", "full"]
    assert score(rep("r", reported=5)) == (True, False, 5)  # full, not draining, load 5


def test_prefix_affinity_sticks_while_the_replica_is_not_much_busier() -> None:
    def fresh(busy: str = "", load: int = 0) -> list[Replica]:
        return [rep(n, load if n == busy else 0) for n in "abcdef"]

    chosen = {first(fresh(), prefix_hash="system-prompt-1", turn=t) for t in range(6)}
    assert len(chosen) == 1
    favourite = chosen.pop()
    # Within the slack it keeps the prefix...
    assert first(fresh(favourite, 2), prefix_hash="system-prompt-1", slack=2) == favourite
    # ...beyond it, requests go by load instead of piling onto it.
    assert first(fresh(favourite, 3), prefix_hash="system-prompt-1", slack=2) != favourite
    # Different prefixes spread over the replicas.
    assert len({first(fresh(), prefix_hash=f"prefix-{i}") for i in range(40)}) >= 4


def test_an_affine_replica_that_cannot_serve_passes_its_keys_to_the_next_on_the_ring() -> None:
    replicas = [rep(n) for n in "abcdef"]
    favourite = first(replicas, prefix_hash="p")
    for unusable in (rep(favourite, ready=False), rep(favourite, draining=True), rep(favourite, reported=5)):
        others = [r if r.node_id != favourite else unusable for r in replicas]
        successor = first(others, prefix_hash="p", turn=0)
        assert successor != favourite
        assert {first(others, prefix_hash="p", turn=t) for t in range(6)} == {successor}  # not by load


def test_session_affinity_by_user_and_the_prefix_first() -> None:
    replicas = [rep(n) for n in "abcdefgh"]
    for user in ("alice", "bob", "carol"):
        assert len({first(replicas, user=user, turn=t) for t in range(6)}) == 1
    by_prefix = first(replicas, prefix_hash="p")
    user = next(u for u in (f"u{i}" for i in range(100)) if first(replicas, user=u) != by_prefix)
    assert first(replicas, user=user, prefix_hash="p") == by_prefix


def test_no_ready_replica_gives_reasons() -> None:
    replicas = [rep("x", ready=False, state="failed", error="file not found"), rep("y", ready=False)]
    assert choose(replicas) == ([], ["x: replica is failed: file not found", "y: replica is loading"])
    assert choose([]) == ([], [])


def test_a_kept_set_chooses_as_well_as_one_built_afresh() -> None:
    # The edge keeps its set for good and moves replicas between buckets as loads change; the control plane
    # builds one per request. After any sequence of reports, arrivals and departures they must agree.
    rng = random.Random(11)
    kept = ReplicaSet()
    for step in range(3000):
        node_id = f"n{rng.randrange(40)}"
        action = rng.random()
        if action < 0.1:
            kept.remove(node_id)
        elif action < 0.6:
            kept.put(rep(node_id, rng.randrange(8), ready=rng.random() < 0.9, draining=rng.random() < 0.1))
        elif node_id in kept.by_node:  # the caller's own requests come and go
            replica = kept.by_node[node_id]
            replica.own = max(0, replica.own + rng.choice((-1, 1)))
            kept.rescore(node_id)
        copies = [rep(r.node_id, r.reported, r.ready, r.capacity, r.draining, r.state, r.error, r.own)
                  for r in kept.by_node.values()]  # fmt: skip
        key = {"prefix_hash": f"p{step % 7}"} if step % 3 == 0 else {}
        kept_choice, kept_reasons = kept.choose(turn=step, **key)  # type: ignore[arg-type]
        fresh_choice, fresh_reasons = choose(copies, turn=step, **key)  # type: ignore[arg-type]
        assert [r.node_id for r in kept_choice] == [r.node_id for r in fresh_choice], step
        assert sorted(kept_reasons) == sorted(fresh_reasons)


# --- the control plane's wiring ------------------------------------------------------------------------


def node(node_id: str, load: int = 0, state: int = READY, queued_limit: int = 4, error: str = "") -> node_pb2.Node:
    spec = node_pb2.ModelSpec(name="m", max_running_requests=1, max_queued_requests=queued_limit)
    replica = node_pb2.Replica(model=spec, state=state, running_requests=load, error=error)  # type: ignore[arg-type]
    return node_pb2.Node(node_id=node_id, inference_address=f"{node_id}:1", replicas=[replica])


async def never_scaled(model: str) -> None:
    raise AssertionError(f"{model} has ready replicas: nothing to scale")


async def control_plane(*nodes: node_pb2.Node, draining: frozenset[str] = frozenset()) -> tuple[FleetView, Router]:
    """The control plane's fleet view and router, fed the events its etcd watch would give them (no store
    behind them: the router's decisions are the subject)."""
    fleet = FleetView(None)  # type: ignore[arg-type]
    router = Router(fleet, None, scale_from_zero=never_scaled)  # type: ignore[arg-type]
    for n in nodes:
        await fleet.apply(StoreEvent("node", n.node_id, n))
    for node_id in draining:
        scheduling = node_pb2.Node(node_id=node_id, scheduling=node_pb2.SCHEDULING_DRAINING)
        await fleet.apply(StoreEvent("scheduling", node_id, scheduling))
    return fleet, router


async def test_the_router_takes_replicas_from_the_fleet_view() -> None:
    _, router = await control_plane(
        node("busy", load=3),
        node("drain"),
        node("down", state=LOADING, error="still loading"),
        draining=frozenset({"drain"}),
    )
    by_node = {r.node_id: r for r in router.replicas("m")}
    assert (by_node["busy"].reported, by_node["busy"].capacity, by_node["busy"].address) == (3, 5, "busy:1")
    assert by_node["drain"].draining and not by_node["busy"].draining
    assert (by_node["down"].ready, by_node["down"].state, by_node["down"].error) == (False, "loading", "still loading")
    route = await router.route("m")
    assert [r.node_id for r in route.replicas] == ["busy", "drain"]


async def test_the_router_counts_what_it_routed_until_the_node_reports_again() -> None:
    fleet, r = await control_plane(node("a", 0), node("b", 1))
    picks = [(await r.route("m")).replicas[0].node_id for _ in range(5)]
    assert picks[0] == "a" and picks.count("a") == 3  # loads end even: a 0+3, b 1+2
    assert {x.node_id: x.own for x in r.replicas("m")} == {"a": 3, "b": 2}
    # A load-only report from a (heartbeats that change no durable state) includes what was routed there.
    fleet.report_load("a", [node("a", 1).replicas[0]], 0, node_pb2.Node().last_heartbeat_at)
    assert {x.node_id: (x.reported, x.own) for x in r.replicas("m")} == {"a": (1, 0), "b": (1, 2)}
    assert (await r.route("m")).replicas[0].node_id == "a"
    # So does a durable change of the record (its state, say).
    await fleet.apply(StoreEvent("node", "b", node("b", 0)))
    assert {x.node_id: x.own for x in r.replicas("m")} == {"a": 1, "b": 0}


async def test_the_router_says_why_a_catalog_model_has_no_ready_replica() -> None:
    _, router = await control_plane(node("x", state=FAILED, error="file not found"), node("y", state=LOADING))
    with pytest.raises(FleetError) as caught:
        await router.route("m")
    assert caught.value.code == ErrorCode.MODEL_UNAVAILABLE
    assert "x: replica is failed: file not found; y: replica is loading" in caught.value.message


async def test_the_edge_and_the_control_plane_choose_alike() -> None:
    # The same fleet reaches the edge as the published routing table and the control plane as its view;
    # the same requests, counted as each counts them, get the same replicas in the same order.
    rng = random.Random(5)
    nodes = [node(f"n{i}", load=rng.randrange(4), queued_limit=rng.randrange(1, 5)) for i in range(7)]
    draining = frozenset({"n3"})
    _, router = await control_plane(*nodes, draining=draining)
    edge = RouteTable()
    for n in nodes:
        edge.put_node(n.node_id, replicas_of(node_routes(n, n.node_id in draining)))
    for i in range(60):
        user = f"user-{i % 5}" if i % 3 == 1 else ""
        prefix = f"prefix-{i % 4}" if i % 3 == 2 else ""
        chosen, _ = edge.pick("m", user, prefix)
        edge.acquire(chosen[0])
        route = await router.route("m", user, prefix)
        assert [r.node_id for r in route.replicas] == [r.node_id for r in chosen], i


def test_model_infos_aggregate_states() -> None:
    def host(node_id: str, *replicas: tuple[str, int]) -> node_pb2.Node:
        return node_pb2.Node(
            node_id=node_id,
            replicas=[node_pb2.Replica(model=node_pb2.ModelSpec(name=m), state=s) for m, s in replicas],  # type: ignore[misc]
        )

    nodes = {"a": host("a", ("up", READY), ("broken", FAILED)), "b": host("b", ("up", LOADING))}
    infos = {i.name: i for i in routing.model_infos(nodes, {"idle": node_pb2.ModelSpec(name="idle")})}
    assert infos["up"].state == inference_pb2.MODEL_STATE_READY and infos["up"].ready_replicas == 1
    assert infos["broken"].state == inference_pb2.MODEL_STATE_FAILED
    assert infos["idle"].state == inference_pb2.MODEL_STATE_UNAVAILABLE


def test_a_models_context_is_what_its_ready_replicas_engine_reports_else_the_deployments() -> None:
    """An OpenAI-compatible server started with its own context (llama-server -c 3072) is listed with it,
    not with the deployment's (default 2048): clients size their prompts by it."""
    spec = node_pb2.ModelSpec(name="served", context_size=2048)
    loading = node_pb2.Replica(model=spec, state=LOADING)
    ready = node_pb2.Replica(model=spec, state=READY, context_size=3072)
    nodes = {"a": node_pb2.Node(node_id="a", replicas=[loading])}
    assert routing.model_infos(nodes, {"served": spec})[0].context_size == 2048
    nodes["b"] = node_pb2.Node(node_id="b", replicas=[ready])
    assert routing.model_infos(nodes, {"served": spec})[0].context_size == 3072


def test_a_replica_a_node_pins_under_a_deployments_name_is_not_routed() -> None:
    """One name, one model: a node's own catalog's replica of a deployment's name (another context here) is
    left out of the routes, the listing and the choice; an assigned one, or a pinned one of another name,
    is routed."""
    deployed = node_pb2.ModelSpec(name="m", context_size=1024)
    pinned = node_pb2.ModelSpec(name="m", context_size=256)
    nodes = {
        "a": node_pb2.Node(node_id="a", replicas=[node_pb2.Replica(model=deployed, state=READY, assigned=True)]),
        "p": node_pb2.Node(
            node_id="p",
            replicas=[
                node_pb2.Replica(model=pinned, state=READY, context_size=256),
                node_pb2.Replica(model=node_pb2.ModelSpec(name="own"), state=READY),
            ],
        ),
    }
    deployments = {"m": node_pb2.Deployment(spec=deployed)}
    assignments = {"a/m": node_pb2.Assignment(node_id="a", model=deployed)}
    assert [r.model for r in node_routes(nodes["p"], False, deployments, assignments).replicas] == ["own"]
    assert [r.model for r in node_routes(nodes["a"], False, deployments, assignments).replicas] == ["m"]
    info = next(i for i in routing.model_infos(nodes, {"m": deployed}, deployments, assignments) if i.name == "m")
    assert (info.ready_replicas, info.context_size) == (1, 1024)
    assert routing.shadowed(nodes.values(), deployments) == {("p", "m")}
    fleet = FleetView(None)  # type: ignore[arg-type]
    fleet.records["node"], fleet.records["deployment"] = nodes, deployments
    fleet.records["assignment"] = assignments
    router = Router(fleet, None, scale_from_zero=lambda name: asyncio.sleep(0))  # type: ignore[arg-type]
    assert [r.node_id for r in router.replicas("m")] == ["a"]


def test_a_replica_a_node_says_was_assigned_is_routed_only_while_the_control_plane_placed_it_there() -> None:
    """A node's report is its own word: one that says it holds an assigned replica of a deployment it was
    never placed for (a hijack: it would get that model's prompts) is left out of the routes, the listing
    and the choice, as is a replica whose assignment is gone (scaled down, undeployed) while the node
    still serves it."""
    spec = node_pb2.ModelSpec(name="m")
    nodes = {
        node_id: node_pb2.Node(node_id=node_id, replicas=[node_pb2.Replica(model=spec, state=READY, assigned=True)])
        for node_id in ("placed", "liar")
    }
    deployments = {"m": node_pb2.Deployment(spec=spec)}
    assignments = {"placed/m": node_pb2.Assignment(node_id="placed", model=spec)}
    assert [r.model for r in node_routes(nodes["placed"], False, deployments, assignments).replicas] == ["m"]
    assert node_routes(nodes["liar"], False, deployments, assignments).replicas == []
    info = next(i for i in routing.model_infos(nodes, {"m": spec}, deployments, assignments) if i.name == "m")
    assert info.ready_replicas == 1
    assert [c.node.node_id for c in routing.candidates_for(nodes.values(), "m", deployments, assignments)] == ["placed"]
    fleet = FleetView(None)  # type: ignore[arg-type]
    fleet.records["node"], fleet.records["deployment"], fleet.records["assignment"] = nodes, deployments, assignments
    router = Router(fleet, None, scale_from_zero=lambda name: asyncio.sleep(0))  # type: ignore[arg-type]
    assert [r.node_id for r in router.replicas("m")] == ["placed"]
    assert [i.ready_replicas for i in router.served_models() if i.name == "m"] == [1]
    # Once the assignment is gone (the deployment scaled down), the replica the node still serves is not routed.
    del assignments["placed/m"]
    assert router.replicas("m") == []
