"""The router: which replica serves one request, scaling a deployment from zero when it has none ready.

Transport-free: `RoutingService` (routing_service.py) converts protos and awaits `Router.route`. The
index it picks from (`routing.RoutingIndex`) follows the fleet view, one node report at a time.
Explaining why a request waits never counts as routing to a replica: only the decision that is
returned adds to a replica's in-flight count.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controlplane import routing
from controlplane.fleet import FleetView
from controlplane.reconciler import Reconciler
from controlplane.store import StoreEvent
from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError

MAX_ALTERNATES = 3


@dataclass(frozen=True)
class Route:
    """The chosen replica first, then alternates to try if it refuses; and where overflow goes."""

    replicas: list[routing.ReplicaView]
    cpu_offload_model: str


class Router:
    def __init__(
        self,
        fleet: FleetView,
        reconciler: Reconciler,
        scale_from_zero: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._fleet = fleet
        self._reconciler = reconciler
        # Only the leader places replicas: with several control planes this sends the request to it
        # (Admin.ensure_replica); alone, the reconciler here does it.
        self._scale_from_zero = scale_from_zero or reconciler.ensure_one
        self._turns = itertools.count()
        self.index = routing.RoutingIndex()
        fleet.listeners.append(self._on_change)
        fleet.load_listeners.append(self._on_change)  # load-only reports too: PickReplica ranks by load

    def _draining(self, node_id: str) -> bool:
        return self._fleet.scheduling(node_id) == node_pb2.SCHEDULING_DRAINING

    def _on_change(self, event: StoreEvent | None) -> None:
        if event is None:  # a full resync: rebuild
            self.index.clear()
            for node_id, node in self._fleet.nodes.items():
                self.index.update_node(node_id, node, self._draining(node_id))
        elif event.kind in ("node", "scheduling"):
            self.index.update_node(event.key, self._fleet.nodes.get(event.key), self._draining(event.key))

    def known_specs(self) -> dict[str, node_pb2.ModelSpec]:
        specs = dict(self._fleet.models)
        specs.update({name: d.spec for name, d in self._fleet.deployments.items()})
        return specs

    def served_models(self) -> list[inference_pb2.ModelInfo]:
        """Every model the fleet knows, with its state across live nodes."""
        return routing.model_infos(self._fleet.nodes, self.known_specs())

    async def route(self, model: str, user: str = "", prefix_hash: str = "", wait_seconds: float = 0.0) -> Route:
        """The replicas for one request, best first. A deployment with no ready replica is scaled from
        zero and the call waits up to `wait_seconds` for it. Raises MODEL_NOT_FOUND, MODEL_UNAVAILABLE
        (with each replica's state and error), or the placement error when it fits nowhere."""
        if not model:
            raise FleetError(ErrorCode.MODEL_REQUIRED, "the 'model' field is required", param="model")
        turn = next(self._turns)
        count = 1 + MAX_ALTERNATES
        chosen, reasons = self.index.pick(model, user, prefix_hash, turn, count)
        deployment = self._fleet.deployments.get(model)
        if not chosen and deployment is None and not reasons and model not in self._fleet.models:
            raise routing.not_found(model, routing.known_models(self._fleet.nodes, self.known_specs()))
        if not chosen and deployment is not None:
            await self._scale_from_zero(model)  # raises if it fits nowhere
            if wait_seconds > 0:
                await self._fleet.wait_for(lambda: self._settled(model), wait_seconds)
            # Decide once the wait is over: only this pick counts against the replica it returns.
            chosen, reasons = self.index.pick(model, user, prefix_hash, turn, count)
            if not chosen:
                reasons = reasons or ["its replica is still being placed"]
        if not chosen:
            raise routing.unavailable(model, reasons)
        return Route(chosen, deployment.cpu_offload_model if deployment is not None else "")

    def _settled(self, model: str) -> bool:
        """Done waiting when a replica is ready, or when every assigned replica has failed to load (the
        node retries with backoff; the client hears why now instead of at the timeout)."""
        views = self.index.views(model)
        if any(v.ready for v in views):
            return True
        assigned = sum(1 for a in self._fleet.assignments.values() if a.model.name == model)
        return bool(views) and len(views) >= assigned and all(v.state == "failed" for v in views)
