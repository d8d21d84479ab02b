"""Choosing the replica that serves a request: pure functions over a snapshot of the fleet.

Filters keep replicas that are ready (each rejection carries a reason, which reaches the client when
nothing survives); then the replicas are ordered:
  1. not full (reported running + queued, plus requests routed since that report, under its limits);
  2. not on a draining node;
  3. prefix affinity: requests sharing a long prompt prefix go to the replica that has it cached, but
     only while that replica is within `affinity_slack` of the least loaded one, so a hot prefix never
     piles every request onto one busy replica;
  4. session affinity by the OpenAI `user` field, under the same bound;
  5. least outstanding work, ties in rotation.
The edge gets the ordered list: it tries the next replica when one refuses (full, or unreachable).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError

READY = node_pb2.REPLICA_STATE_READY
DEFAULT_MAX_RUNNING = 1  # the llama.cpp engine decodes one sequence at a time
DEFAULT_MAX_QUEUED = 16


@dataclass(frozen=True)
class Candidate:
    node: node_pb2.Node
    replica: node_pb2.Replica
    in_flight: int = 0  # routed since the node's last report
    draining: bool = False

    @property
    def outstanding(self) -> int:
        return self.replica.running_requests + self.replica.queued_requests + self.in_flight

    @property
    def capacity(self) -> int:
        spec = self.replica.model
        running = spec.max_running_requests if spec.HasField("max_running_requests") else DEFAULT_MAX_RUNNING
        queued = spec.max_queued_requests if spec.HasField("max_queued_requests") else DEFAULT_MAX_QUEUED
        return running + queued

    @property
    def full(self) -> bool:
        return self.outstanding >= self.capacity


def candidates_for(nodes: Iterable[node_pb2.Node], model: str) -> list[Candidate]:
    return [Candidate(n, r) for n in nodes for r in n.replicas if r.model.name == model]


def known_models(nodes: Mapping[str, node_pb2.Node], specs: Iterable[str]) -> set[str]:
    return set(specs) | {r.model.name for n in nodes.values() for r in n.replicas}


def ready(candidates: list[Candidate]) -> tuple[list[Candidate], list[str]]:
    kept, why = [], []
    for c in candidates:
        if c.replica.state == READY:
            kept.append(c)
        else:
            state = node_pb2.ReplicaState.Name(c.replica.state).removeprefix("REPLICA_STATE_").lower()
            why.append(f"{c.node.node_id}: replica is {state}" + (f": {c.replica.error}" if c.replica.error else ""))
    return kept, why


def _rendezvous(key: str, node_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{node_id}".encode(), digest_size=8).digest(), "big")


def order(
    candidates: list[Candidate],
    user: str = "",
    prefix_hash: str = "",
    turn: int = 0,
    affinity_slack: int = 2,
) -> list[Candidate]:
    """Ready candidates, best first (see the module docstring)."""
    if not candidates:
        return []
    usable = [c for c in candidates if not c.full and not c.draining] or [c for c in candidates if not c.full]
    least = min((c.outstanding for c in usable), default=0)
    preferred: Candidate | None = None
    for key in (prefix_hash, user):
        if key and usable:
            affine = max(usable, key=lambda c: _rendezvous(key, c.node.node_id))
            if affine.outstanding <= least + affinity_slack:
                preferred = affine
                break

    def rank(c: Candidate) -> tuple[bool, bool, int]:
        return (c.full, c.draining, c.outstanding)

    ranked = sorted(candidates, key=lambda c: (*rank(c), c.node.node_id))
    ties = [c for c in ranked if rank(c) == rank(ranked[0])]
    shift = turn % len(ties)
    ranked = ties[shift:] + ties[:shift] + ranked[len(ties) :]
    if preferred is not None:
        ranked.remove(preferred)
        ranked.insert(0, preferred)
    return ranked


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
                context_size=spec.context_size,
                state=state,
                error=error if not n_ready else "",
                ready_replicas=n_ready,
            )
        )
    return infos
