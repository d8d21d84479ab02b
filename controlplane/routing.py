"""What the fleet serves, as requests and edges see it: each model's aggregate state across live nodes,
a replica's capacity, and the errors a request for a model that cannot be served hears.

Which replica serves a request is not decided here: that is `mesh.replica_choice`, shared by the edges'
routing tables and `PickReplica` (router.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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


def candidates_for(nodes: Iterable[node_pb2.Node], model: str) -> list[Candidate]:
    return [Candidate(n, r) for n in nodes for r in n.replicas if r.model.name == model]


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
) -> list[inference_pb2.ModelInfo]:
    """Every known model with its aggregate state across live nodes, sorted by name."""
    by_name: dict[str, list[node_pb2.Replica]] = {name: [] for name in specs}
    declared: dict[str, node_pb2.ModelSpec] = dict(specs)
    for node in nodes.values():
        for replica in node.replicas:
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
