"""Routing arithmetic over a snapshot: pure functions, no servers."""

from __future__ import annotations

import pytest

from controlplane import placement
from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError

READY, FAILED, LOADING = (
    node_pb2.REPLICA_STATE_READY,
    node_pb2.REPLICA_STATE_FAILED,
    node_pb2.REPLICA_STATE_LOADING,
)


def node(node_id: str, *replicas: tuple[str, int, int]) -> node_pb2.Node:
    return node_pb2.Node(
        node_id=node_id,
        inference_address=f"{node_id}:1",
        replicas=[
            node_pb2.Replica(model=node_pb2.ModelSpec(name=m), state=state, running_requests=load)  # type: ignore[arg-type]
            for m, state, load in replicas
        ],
    )


def fleet(*nodes: node_pb2.Node) -> dict[str, node_pb2.Node]:
    return {n.node_id: n for n in nodes}


def test_least_outstanding_wins() -> None:
    nodes = fleet(node("a", ("m", READY, 3)), node("b", ("m", READY, 1)), node("c", ("m", READY, 2)))
    assert placement.pick_replica(nodes, {}, "m").node.node_id == "b"


def test_ties_rotate_and_users_stick() -> None:
    nodes = fleet(node("a", ("m", READY, 0)), node("b", ("m", READY, 0)))
    assert {placement.pick_replica(nodes, {}, "m", turn=t).node.node_id for t in range(4)} == {"a", "b"}
    picks = {placement.pick_replica(nodes, {}, "m", user="alice", turn=t).node.node_id for t in range(4)}
    assert len(picks) == 1


def test_unknown_model_lists_known_ones() -> None:
    nodes = fleet(node("a", ("m1", READY, 0)))
    specs = {"m2": node_pb2.ModelSpec(name="m2")}
    with pytest.raises(FleetError) as caught:
        placement.pick_replica(nodes, specs, "zzz")
    assert caught.value.code == ErrorCode.MODEL_NOT_FOUND
    assert caught.value.metadata["available_models"] == "m1,m2"


def test_known_model_without_ready_replica_says_why() -> None:
    nodes = fleet(node("a", ("m", FAILED, 0)), node("b", ("m", LOADING, 0)))
    nodes["a"].replicas[0].error = "file not found"
    with pytest.raises(FleetError) as caught:
        placement.pick_replica(nodes, {}, "m")
    assert caught.value.code == ErrorCode.MODEL_UNAVAILABLE
    assert "a: replica is failed: file not found" in caught.value.message
    assert "b: replica is loading" in caught.value.message
    with pytest.raises(FleetError) as caught:
        placement.pick_replica({}, {"m": node_pb2.ModelSpec(name="m")}, "m")
    assert caught.value.code == ErrorCode.MODEL_UNAVAILABLE


def test_model_infos_aggregate_states() -> None:
    nodes = fleet(node("a", ("up", READY, 0), ("broken", FAILED, 0)), node("b", ("up", LOADING, 0)))
    specs = {"idle": node_pb2.ModelSpec(name="idle")}
    infos = {i.name: i for i in placement.model_infos(nodes, specs)}
    assert infos["up"].state == inference_pb2.MODEL_STATE_READY and infos["up"].ready_replicas == 1
    assert infos["broken"].state == inference_pb2.MODEL_STATE_FAILED
    assert infos["idle"].state == inference_pb2.MODEL_STATE_UNAVAILABLE
