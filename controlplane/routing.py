"""What the fleet serves, as requests and edges see it: each model's aggregate state across live nodes,
a replica's capacity, and the errors a request for a model that cannot be served hears.

Which replica serves a request is not decided here: that is `mesh.replica_choice`, shared by the edges'
routing tables and `PickReplica` (router.py).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from controlplane.store import assignment_key
from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.catalog import queue_limit, running_limit
from mesh.errors import ErrorCode, FleetError

READY = node_pb2.REPLICA_STATE_READY


def capacity(spec: node_pb2.ModelSpec) -> int:
    """Requests a replica holds (running plus queued) before it refuses more."""
    return running_limit(spec) + queue_limit(spec)


@dataclass(frozen=True)
class Candidate:
    node: node_pb2.Node
    replica: node_pb2.Replica


def routed(
    node: node_pb2.Node, deployed: Container[str] = (), assignments: Container[str] = ()
) -> list[node_pb2.Replica]:
    """The replicas of `node` that serve requests for their name: a replica the control plane placed there
    (in `assignments`, by its key: store.assignment_key), and one the node's own catalog pins (--catalog) under a name
    that is not a deployment's. A deployment's name is served by the replicas placed for it alone: a pinned
    one may have another context or other weights (it did, and a third of the requests failed with its
    context while /v1/models showed the deployment's). A replica the node says was assigned to it counts only
    while its assignment stands: what a node reports about itself cannot put it in the routes of a model it
    was never placed for (nor keep it there once its assignment is gone)."""
    return [
        r
        for r in node.replicas
        if (assignment_key(node.node_id, r.model.name) in assignments if r.assigned else r.model.name not in deployed)
    ]


def shadowed(nodes: Iterable[node_pb2.Node], deployed: Container[str]) -> set[tuple[str, str]]:
    """(node id, model) of every pinned replica `routed` leaves out."""
    return {(n.node_id, r.model.name) for n in nodes for r in n.replicas if not r.assigned and r.model.name in deployed}


def candidates_for(
    nodes: Iterable[node_pb2.Node], model: str, deployed: Container[str] = (), assignments: Container[str] = ()
) -> list[Candidate]:
    return [Candidate(n, r) for n in nodes for r in routed(n, deployed, assignments) if r.model.name == model]


def known_models(nodes: Mapping[str, node_pb2.Node], specs: Iterable[str]) -> set[str]:
    return set(specs) | {r.model.name for n in nodes.values() for r in n.replicas}


def unavailable(model: str, reasons: list[str]) -> FleetError:
    detail = "; ".join(reasons) if reasons else "no live node hosts it"
    return FleetError(
        ErrorCode.MODEL_UNAVAILABLE, f"model '{model}' has no ready replica ({detail})", retry_after_seconds=5
    )


def not_found(model: str, known: Iterable[str]) -> FleetError:
    names = sorted(known)
    return FleetError(
        ErrorCode.MODEL_NOT_FOUND,
        f"model '{model}' does not exist; available models: {', '.join(names) or 'none'}",
        param="model",
        metadata={"available_models": ",".join(names)},
    )


def model_infos(
    nodes: Mapping[str, node_pb2.Node],
    specs: Mapping[str, node_pb2.ModelSpec],
    deployed: Container[str] = (),
    assignments: Container[str] = (),
) -> list[inference_pb2.ModelInfo]:
    """Every known model with its aggregate state across live nodes (the replicas `routed` keeps, with
    the names in `deployed` and the `assignments`), sorted by name."""
    by_name: dict[str, list[node_pb2.Replica]] = {name: [] for name in specs}
    declared: dict[str, node_pb2.ModelSpec] = dict(specs)
    for node in nodes.values():
        for replica in routed(node, deployed, assignments):
            by_name.setdefault(replica.model.name, []).append(replica)
            declared.setdefault(replica.model.name, replica.model)
    infos = []
    for name in sorted(by_name):
        replicas, spec = by_name[name], declared[name]
        n_ready = sum(r.state == READY for r in replicas)
        states = {r.state for r in replicas}
        if n_ready:
            state = inference_pb2.MODEL_STATE_READY
        elif states & {node_pb2.REPLICA_STATE_LOADING, node_pb2.REPLICA_STATE_PENDING}:
            state = inference_pb2.MODEL_STATE_LOADING
        elif states == {node_pb2.REPLICA_STATE_FAILED}:
            state = inference_pb2.MODEL_STATE_FAILED
        else:
            state = inference_pb2.MODEL_STATE_UNAVAILABLE
        error = next((r.error for r in replicas if r.error), "")
        infos.append(
            inference_pb2.ModelInfo(
                name=name,
                format=spec.format,
                engine=spec.engine,
                # What a ready replica's engine says (an OpenAI-compatible server's own), else the deployment's.
                context_size=next((r.context_size for r in replicas if r.state == READY and r.context_size), 0)
                or spec.context_size,
                state=state,
                error=error if not n_ready else "",
                ready_replicas=n_ready,
            )
        )
    return infos
