"""Choosing the replica that serves a request: pure functions over a snapshot of the fleet.

Routing is a chain of filters, each returning the survivors and why the others were dropped, then a
scorer. The reasons reach the client when nothing survives (MODEL_UNAVAILABLE says *why*), and operators
can read them in the control plane's log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError

READY = node_pb2.REPLICA_STATE_READY


@dataclass(frozen=True)
class Candidate:
    node: node_pb2.Node
    replica: node_pb2.Replica

    @property
    def outstanding(self) -> int:
        return self.replica.running_requests + self.replica.queued_requests


Rejection = tuple[str, str]  # (node id, reason)
Filter = Callable[[list[Candidate]], tuple[list[Candidate], list[Rejection]]]


def replica_ready(candidates: list[Candidate]) -> tuple[list[Candidate], list[Rejection]]:
    kept, dropped = [], []
    for c in candidates:
        if c.replica.state == READY:
            kept.append(c)
        else:
            state = node_pb2.ReplicaState.Name(c.replica.state).removeprefix("REPLICA_STATE_").lower()
            why = f"replica is {state}" + (f": {c.replica.error}" if c.replica.error else "")
            dropped.append((c.node.node_id, why))
    return kept, dropped


ROUTING_FILTERS: tuple[Filter, ...] = (replica_ready,)


def candidates_for(nodes: Iterable[node_pb2.Node], model: str) -> list[Candidate]:
    return [Candidate(n, r) for n in nodes for r in n.replicas if r.model.name == model]


def known_models(nodes: Mapping[str, node_pb2.Node], specs: Mapping[str, node_pb2.ModelSpec]) -> set[str]:
    return set(specs) | {r.model.name for n in nodes.values() for r in n.replicas}


def _affinity(user: str, node_id: str) -> int:
    # Rendezvous hashing: a user keeps landing on the same node while it stays among the least loaded.
    return int.from_bytes(hashlib.blake2b(f"{user}|{node_id}".encode(), digest_size=8).digest(), "big")


def choose(candidates: list[Candidate], user: str = "", turn: int = 0) -> Candidate:
    """Least outstanding work first; among equals, the user's affine node, else round robin."""
    least = min(c.outstanding for c in candidates)
    best = sorted((c for c in candidates if c.outstanding == least), key=lambda c: c.node.node_id)
    if user:
        return max(best, key=lambda c: _affinity(user, c.node.node_id))
    return best[turn % len(best)]


def pick_replica(
    nodes: Mapping[str, node_pb2.Node],
    specs: Mapping[str, node_pb2.ModelSpec],
    model: str,
    user: str = "",
    turn: int = 0,
) -> Candidate:
    """The replica to serve one request, or the FleetError that explains why there is none."""
    candidates = candidates_for(nodes.values(), model)
    if not candidates:
        known = sorted(known_models(nodes, specs))
        if model not in known:
            raise FleetError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model '{model}' does not exist; available models: {', '.join(known) or 'none'}",
                param="model",
                metadata={"available_models": ",".join(known)},
            )
        raise FleetError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"model '{model}' is known but no live node hosts it",
            retry_after_seconds=5,
        )
    rejections: list[Rejection] = []
    for keep in ROUTING_FILTERS:
        candidates, dropped = keep(candidates)
        rejections += dropped
    if not candidates:
        reasons = "; ".join(f"{node}: {why}" for node, why in rejections)
        raise FleetError(
            ErrorCode.MODEL_UNAVAILABLE,
            f"model '{model}' has no ready replica ({reasons})",
            retry_after_seconds=5,
        )
    return choose(candidates, user, turn)


def model_infos(
    nodes: Mapping[str, node_pb2.Node], specs: Mapping[str, node_pb2.ModelSpec]
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
        ready = sum(r.state == READY for r in replicas)
        states = {r.state for r in replicas}
        if ready:
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
                context_size=spec.context_size,
                state=state,
                error=error if not ready else "",
                ready_replicas=ready,
            )
        )
    return infos
