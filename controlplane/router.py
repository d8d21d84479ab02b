"""The router behind `PickReplica`: which replica serves one request, scaling a deployment from zero when
it has none ready.

Edges route on their own copy of the routing table; they ask here only for a model with no ready replica,
a model their table does not know, or before they have a table. So nothing is kept for routing: each call
takes the model's replicas from the fleet view and makes the choice every edge makes
(`mesh.replica_choice`). The one thing kept is the control plane's own share of the load estimate, the
requests it routed to each replica since the node's last report (the report counts them from then on).
Explaining why a request waits never counts as routing: only the decision that is returned is counted.

Transport-free: `RoutingService` (routing_service.py) converts protos and awaits `Router.route`.
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
from mesh import replica_choice
from mesh.errors import ErrorCode, FleetError
from mesh.replica_choice import Replica

MAX_ALTERNATES = 3
READY, FAILED = node_pb2.REPLICA_STATE_READY, node_pb2.REPLICA_STATE_FAILED


@dataclass(frozen=True)
class Route:
    """The chosen replica first, then alternates to try if it refuses; and where overflow goes."""

    replicas: list[Replica]
    cpu_offload_model: str


class Router:
    def __init__(
        self,
        fleet: FleetView,
        reconciler: Reconciler,
        scale_from_zero: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._fleet = fleet
        # Only the leader places replicas: with several control planes this sends the request to it
        # (Admin.ensure_replica); alone, the reconciler here does it.
        self._scale_from_zero = scale_from_zero or reconciler.ensure_one
        self._turns = itertools.count()
        self._warm: dict[str, str] = {}  # model -> the node chosen first last time (ties go to it, as at the edge)
        self._routed: dict[str, dict[str, int]] = {}  # node id -> model -> requests since its report
        fleet.listeners.append(self._on_report)
        fleet.load_listeners.append(self._on_report)  # a load-only report counts the requests as well

    def _on_report(self, event: StoreEvent | None) -> None:
        if event is None:  # a full resync: every record is as reported
            self._routed.clear()
        elif event.kind == "node":
            self._routed.pop(event.key, None)

    def replicas(self, model: str) -> list[Replica]:
        """Every replica of `model` in the fleet view, as the choice takes them."""
        fleet = self._fleet
        out = []
        for node_id, node in fleet.nodes.items():
            for replica in routing.routed(node, fleet.deployments, fleet.assignments):
                if replica.model.name != model:
                    continue
                out.append(
                    Replica(
                        node_id=node_id,
                        address=node.inference_address,
                        model=model,
                        ready=replica.state == READY,
                        state=node_pb2.ReplicaState.Name(replica.state).removeprefix("REPLICA_STATE_").lower(),
                        error=replica.error,
                        device=replica.device or "cpu",
                        capacity=routing.capacity(replica.model),
                        reported=replica.running_requests + replica.queued_requests,
                        draining=fleet.scheduling(node_id) == node_pb2.SCHEDULING_DRAINING,
                        own=self._routed.get(node_id, {}).get(model, 0),
                    )
                )
        return out

    def known_specs(self) -> dict[str, node_pb2.ModelSpec]:
        specs = dict(self._fleet.models)
        specs.update({name: d.spec for name, d in self._fleet.deployments.items()})
        return specs

    def knows(self, model: str) -> bool:
        """Whether the fleet knows `model`: a deployment, a model a node declared, or a replica of it."""
        return model in routing.known_models(self._fleet.nodes, self.known_specs())

    def served_models(self) -> list[inference_pb2.ModelInfo]:
        """Every model the fleet knows, with its state across live nodes."""
        return routing.model_infos(
            self._fleet.nodes, self.known_specs(), self._fleet.deployments, self._fleet.assignments
        )

    async def route(self, model: str, user: str = "", prefix_hash: str = "", wait_seconds: float = 0.0) -> Route:
        """The replicas for one request, best first. A deployment with no ready replica is scaled from
        zero and the call waits up to `wait_seconds` for it. Raises MODEL_NOT_FOUND, MODEL_UNAVAILABLE
        (with each replica's state and error), or the placement error when it fits nowhere."""
        if not model:
            raise FleetError(ErrorCode.MODEL_REQUIRED, "the 'model' field is required", param="model")
        turn = next(self._turns)
        count = 1 + MAX_ALTERNATES
        warm = self._warm.get(model, "")
        chosen, reasons = replica_choice.choose(self.replicas(model), user, prefix_hash, count, turn, warm=warm)
        deployment = self._fleet.deployments.get(model)
        if not chosen and deployment is None and not reasons and model not in self._fleet.models:
            raise routing.not_found(model, routing.known_models(self._fleet.nodes, self.known_specs()))
        if not chosen and deployment is not None:
            await self._scale_from_zero(model)  # raises if it fits nowhere
            if wait_seconds > 0:
                await self._fleet.wait_for(lambda: self._settled(model), wait_seconds)
            # Decide once the wait is over, on the fleet as it is then.
            chosen, reasons = replica_choice.choose(self.replicas(model), user, prefix_hash, count, turn, warm=warm)
            if not chosen:
                reasons = reasons or ["its replica is still being placed"]
        if not chosen:
            raise routing.unavailable(model, reasons)
        best = chosen[0]
        self._warm[model] = best.node_id
        by_model = self._routed.setdefault(best.node_id, {})
        by_model[model] = by_model.get(model, 0) + 1
        return Route(chosen, deployment.cpu_offload_model if deployment is not None else "")

    def _settled(self, model: str) -> bool:
        """Done waiting when a replica is ready, or when every assigned replica has failed to load (the
        node retries with backoff; the client hears why now instead of at the timeout)."""
        fleet = self._fleet
        states = [
            r.state
            for n in fleet.nodes.values()
            for r in routing.routed(n, fleet.deployments, fleet.assignments)
            if r.model.name == model
        ]
        if READY in states:
            return True
        assigned = sum(1 for a in self._fleet.assignments.values() if a.model.name == model)
        return bool(states) and len(states) >= assigned and all(s == FAILED for s in states)
