"""Routing arithmetic over the control plane's index: pure functions, no servers."""

from __future__ import annotations

from controlplane import routing
from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2

READY, FAILED, LOADING = node_pb2.REPLICA_STATE_READY, node_pb2.REPLICA_STATE_FAILED, node_pb2.REPLICA_STATE_LOADING


def node(node_id: str, load: int = 0, state: int = READY, queued_limit: int = 4, error: str = "") -> node_pb2.Node:
    spec = node_pb2.ModelSpec(name="m", max_running_requests=1, max_queued_requests=queued_limit)
    replica = node_pb2.Replica(model=spec, state=state, running_requests=load, error=error)  # type: ignore[arg-type]
    return node_pb2.Node(node_id=node_id, inference_address=f"{node_id}:1", replicas=[replica])


def index(*nodes: node_pb2.Node, draining: set[str] = frozenset()) -> routing.RoutingIndex:  # type: ignore[assignment]
    built = routing.RoutingIndex()
    for n in nodes:
        built.update_node(n.node_id, n, n.node_id in draining)
    return built


def first(idx: routing.RoutingIndex, **kw: object) -> str:
    return idx.pick("m", **kw)[0][0].node_id  # type: ignore[arg-type]


def test_least_outstanding_first_counting_requests_routed_since_the_last_report() -> None:
    assert first(index(node("a", 3), node("b", 1), node("c", 2))) == "b"
    idx = index(node("a", 0), node("b", 1))
    picks = [first(idx) for _ in range(5)]
    assert picks[0] == "a" and picks.count("a") == 3  # loads end even: a 0+3, b 1+2
    idx.update_node("a", node("a", 0), False)  # a fresh report resets what was routed since the last one
    assert first(idx) == "a"


def test_ties_rotate() -> None:
    idx = index(node("a"), node("b"), node("c"))
    picks = set()
    for turn in range(12):
        picks.add(first(idx, turn=turn))
        idx = index(node("a"), node("b"), node("c"))  # keep loads equal
    assert picks == {"a", "b", "c"}


def test_full_and_draining_replicas_go_last() -> None:
    idx = index(node("full", load=5), node("drain"), node("ok", load=3), draining={"drain"})
    assert [v.node_id for v in idx.pick("m")[0]] == ["ok", "drain", "full"]


def test_prefix_affinity_sticks_while_the_replica_is_not_much_busier() -> None:
    def fresh(busy: str = "", load: int = 0) -> routing.RoutingIndex:
        return index(*(node(n, load if n == busy else 0) for n in "abcdef"))

    chosen = {first(fresh(), prefix_hash="system-prompt-1", turn=t) for t in range(6)}
    assert len(chosen) == 1
    favourite = chosen.pop()
    # Within the slack it keeps the prefix...
    assert first(fresh(favourite, 2), prefix_hash="system-prompt-1", slack=2) == favourite
    # ...beyond it, requests go elsewhere instead of piling onto it.
    assert first(fresh(favourite, 3), prefix_hash="system-prompt-1", slack=2) != favourite
    # Different prefixes spread over the replicas.
    assert len({first(fresh(), prefix_hash=f"prefix-{i}") for i in range(40)}) >= 4


def test_session_affinity_by_user() -> None:
    for user in ("alice", "bob", "carol"):
        assert len({first(index(node("a"), node("b"), node("c")), user=user, turn=t) for t in range(6)}) == 1


def test_no_ready_replica_gives_reasons() -> None:
    idx = index(node("x", state=FAILED, error="file not found"), node("y", state=LOADING))
    chosen, why = idx.pick("m")
    assert chosen == []
    assert sorted(why) == ["x: replica is failed: file not found", "y: replica is loading"]
    idx.update_node("x", None, False)
    assert idx.pick("m")[1] == ["y: replica is loading"]


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
