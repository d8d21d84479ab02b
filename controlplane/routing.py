"""Choosing the replica that serves a request.

Only ready replicas are candidates (the others' states and errors reach the client when none is
ready); they are ordered:
  1. not full (reported running + queued, plus requests routed since that report, under its limits);
  2. not on a draining node;
  3. least outstanding work, ties spread by a per-request rotation;
  and first of all, the affine replica: requests sharing a long prompt prefix go to the replica that
  has it cached (then requests of the same OpenAI `user`), but only while that replica is within
  `slack` of the least loaded one and not full, so a hot prefix never piles every request onto one
  busy replica.
The edge gets the ordered list: it tries the next replica when one refuses (full, or unreachable).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
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
                context_size=spec.context_size,
                state=state,
                error=error if not n_ready else "",
                ready_replicas=n_ready,
            )
        )
    return infos


# --- the index the control plane routes with ------------------------------------------------------------


class ReplicaView:
    """One replica as routing needs it: plain numbers, computed once per node report, not per request."""

    __slots__ = (
        "address",
        "capacity",
        "device",
        "draining",
        "error",
        "in_flight",
        "node_id",
        "point",
        "ready",
        "reported",
        "state",
    )

    def __init__(self, node: node_pb2.Node, replica: node_pb2.Replica, draining: bool) -> None:
        self.node_id = node.node_id
        self.point = _point(node.node_id)  # its place on the affinity ring, and its tie-break order
        self.address = node.inference_address
        self.reported = replica.running_requests + replica.queued_requests
        self.in_flight = 0  # requests routed here since this report
        self.capacity = capacity(replica.model)
        self.draining = draining
        self.device = replica.device or "cpu"
        self.ready = replica.state == READY
        self.state = node_pb2.ReplicaState.Name(replica.state).removeprefix("REPLICA_STATE_").lower()
        self.error = replica.error


def _point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class RoutingIndex:
    """Replicas by model, updated one node at a time as reports arrive, so that a routing decision costs
    O(replicas of the model) integer comparisons plus O(log n) for affinity, whatever the fleet's size.

    Affinity uses a consistent-hash ring per model: a prefix (or user) maps to a point, and the first
    usable replica clockwise from it is the affine one. Adding or removing a replica moves only the keys
    next to it, which is what keeps a prefix on the replica that has it cached.
    """

    def __init__(self) -> None:
        self._by_model: dict[str, dict[str, ReplicaView]] = {}
        self._models_of: dict[str, set[str]] = {}
        self._rings: dict[str, tuple[list[int], list[str]]] = {}

    def update_node(self, node_id: str, node: node_pb2.Node | None, draining: bool) -> None:
        for model in self._models_of.pop(node_id, set()):
            self._by_model[model].pop(node_id, None)
            self._rings.pop(model, None)
        if node is None:
            return
        models = set()
        for replica in node.replicas:
            name = replica.model.name
            self._by_model.setdefault(name, {})[node_id] = ReplicaView(node, replica, draining)
            self._rings.pop(name, None)
            models.add(name)
        self._models_of[node_id] = models

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def views(self, model: str) -> list[ReplicaView]:
        return list(self._by_model.get(model, {}).values())

    def _ring(self, model: str) -> tuple[list[int], list[str]]:
        ring = self._rings.get(model)
        if ring is None:
            points = sorted((view.point, node_id) for node_id, view in self._by_model.get(model, {}).items())
            ring = ([p for p, _ in points], [n for _, n in points])
            self._rings[model] = ring
        return ring

    def pick(
        self, model: str, user: str = "", prefix_hash: str = "", turn: int = 0, count: int = 4, slack: int = 2
    ) -> tuple[list[ReplicaView], list[str]]:
        """Up to `count` ready replicas, best first (the module docstring's order), and why the others
        are not ready. Counts the request against the first one."""
        table = self._by_model.get(model, {})
        ready = [v for v in table.values() if v.ready]
        if not ready:
            return [], [
                f"{v.node_id}: replica is {v.state}" + (f": {v.error}" if v.error else "") for v in table.values()
            ]

        rotation = (turn * 0x9E3779B97F4A7C15) & 0xFFFFFFFF  # spreads ties, request by request

        def rank(v: ReplicaView) -> int:
            # One integer per replica, compared in C: full, then draining, then load, then the rotation.
            load = v.reported + v.in_flight
            return (
                ((load >= v.capacity) << 62)
                | (v.draining << 61)
                | (min(load, 1 << 20) << 32)
                | ((v.point ^ rotation) & 0xFFFFFFFF)
            )

        best = heapq.nsmallest(count, ready, key=rank)
        least = best[0].reported + best[0].in_flight
        preferred = None
        for key in (prefix_hash, user):
            if key:
                preferred = self._affine(model, key, table, least, slack)
                if preferred is not None:
                    break
        if preferred is not None:
            best = [preferred, *[v for v in best if v is not preferred]][:count]
        best[0].in_flight += 1
        return best, []

    def _affine(
        self, model: str, key: str, table: dict[str, ReplicaView], least: int, slack: int
    ) -> ReplicaView | None:
        points, ids = self._ring(model)
        if not points:
            return None
        start = bisect.bisect(points, _point(key)) % len(points)
        for step in range(min(len(points), 8)):  # the next usable replica clockwise, looking a little way
            view = table[ids[(start + step) % len(points)]]
            load = view.reported + view.in_flight
            if view.ready and not view.draining and load < view.capacity:
                return view if load <= least + slack else None
        return None
