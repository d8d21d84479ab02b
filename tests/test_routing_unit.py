"""Routing arithmetic over a snapshot: pure functions, no servers."""

from __future__ import annotations

from controlplane import routing
from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2

READY, FAILED, LOADING = node_pb2.REPLICA_STATE_READY, node_pb2.REPLICA_STATE_FAILED, node_pb2.REPLICA_STATE_LOADING


def candidate(
    node_id: str, load: int = 0, state: int = READY, queued_limit: int = 4, **kw: object
) -> routing.Candidate:
    spec = node_pb2.ModelSpec(name="m", max_running_requests=1, max_queued_requests=queued_limit)
    replica = node_pb2.Replica(model=spec, state=state, running_requests=load)  # type: ignore[arg-type]
    return routing.Candidate(node_pb2.Node(node_id=node_id), replica, **kw)  # type: ignore[arg-type]


def ids(ordered: list[routing.Candidate]) -> list[str]:
    return [c.node.node_id for c in ordered]


def test_least_outstanding_first_counting_requests_routed_since_the_last_report() -> None:
    assert ids(routing.order([candidate("a", 3), candidate("b", 1), candidate("c", 2)]))[0] == "b"
    assert ids(routing.order([candidate("a", 0, in_flight=2), candidate("b", 1)]))[0] == "b"


def test_ties_rotate() -> None:
    picks = {ids(routing.order([candidate("a"), candidate("b"), candidate("c")], turn=t))[0] for t in range(6)}
    assert picks == {"a", "b", "c"}


def test_full_and_draining_replicas_go_last() -> None:
    full = candidate("full", load=5)  # 1 running + 4 queued
    assert full.full
    ordered = ids(routing.order([full, candidate("drain", draining=True), candidate("ok", load=3)]))
    assert ordered == ["ok", "drain", "full"]


def test_prefix_affinity_sticks_while_the_replica_is_not_much_busier() -> None:
    replicas = [candidate("a"), candidate("b"), candidate("c")]
    chosen = {ids(routing.order(replicas, prefix_hash="system-prompt-1", turn=t))[0] for t in range(5)}
    assert len(chosen) == 1
    favourite = chosen.pop()
    # The favourite gets busy: within the slack it keeps the prefix...
    busier = [candidate(n, 2 if n == favourite else 0) for n in "abc"]
    assert ids(routing.order(busier, prefix_hash="system-prompt-1", affinity_slack=2))[0] == favourite
    # ...beyond it, requests go elsewhere instead of piling onto it.
    overloaded = [candidate(n, 3 if n == favourite else 0) for n in "abc"]
    assert ids(routing.order(overloaded, prefix_hash="system-prompt-1", affinity_slack=2))[0] != favourite


def test_session_affinity_by_user() -> None:
    replicas = [candidate("a"), candidate("b"), candidate("c")]
    for user in ("alice", "bob", "carol"):
        assert len({ids(routing.order(replicas, user=user, turn=t))[0] for t in range(5)}) == 1


def test_ready_filter_gives_reasons() -> None:
    failed = candidate("x", state=FAILED)
    failed.replica.error = "file not found"
    kept, why = routing.ready([failed, candidate("y", state=LOADING), candidate("z")])
    assert ids(kept) == ["z"]
    assert why == ["x: replica is failed: file not found", "y: replica is loading"]


def test_model_infos_aggregate_states() -> None:
    def node(node_id: str, *replicas: tuple[str, int]) -> node_pb2.Node:
        return node_pb2.Node(
            node_id=node_id,
            replicas=[node_pb2.Replica(model=node_pb2.ModelSpec(name=m), state=s) for m, s in replicas],  # type: ignore[misc]
        )

    nodes = {"a": node("a", ("up", READY), ("broken", FAILED)), "b": node("b", ("up", LOADING))}
    infos = {i.name: i for i in routing.model_infos(nodes, {"idle": node_pb2.ModelSpec(name="idle")})}
    assert infos["up"].state == inference_pb2.MODEL_STATE_READY and infos["up"].ready_replicas == 1
    assert infos["broken"].state == inference_pb2.MODEL_STATE_FAILED
    assert infos["idle"].state == inference_pb2.MODEL_STATE_UNAVAILABLE
