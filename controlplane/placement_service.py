"""PlacementService, for the edge: which replica serves a request, scaling a deployment from zero."""

from __future__ import annotations

import itertools
from collections import Counter

import grpc

from controlplane import routing
from controlplane.fleet import FleetView
from controlplane.reconciler import Reconciler
from controlplane.store import StoreEvent
from fleetlm.controlplane.v1 import node_pb2, placement_pb2, placement_pb2_grpc
from mesh.errors import ErrorCode, FleetError

MAX_ALTERNATES = 3


class Placement(placement_pb2_grpc.PlacementServiceServicer):
    def __init__(self, fleet: FleetView, reconciler: Reconciler) -> None:
        self._fleet = fleet
        self._reconciler = reconciler
        self._turns = itertools.count()
        # Requests routed to (node, model) since that node's last report: reports lag by up to a heartbeat
        # interval, and without this a burst would all go to the replica that looked idle.
        self._in_flight: Counter[tuple[str, str]] = Counter()
        fleet.listeners.append(self._on_change)

    def _on_change(self, event: StoreEvent | None) -> None:
        if event is None:
            self._in_flight.clear()
        elif event.kind == "node":
            for key in [k for k in self._in_flight if k[0] == event.key]:
                del self._in_flight[key]

    def _candidates(self, model: str) -> list[routing.Candidate]:
        draining = node_pb2.SCHEDULING_DRAINING
        return [
            routing.Candidate(
                c.node,
                c.replica,
                in_flight=self._in_flight[(c.node.node_id, model)],
                draining=self._fleet.scheduling(c.node.node_id) == draining,
            )
            for c in routing.candidates_for(self._fleet.nodes.values(), model)
        ]

    def known_specs(self) -> dict[str, node_pb2.ModelSpec]:
        specs = dict(self._fleet.models)
        specs.update({name: d.spec for name, d in self._fleet.deployments.items()})
        return specs

    async def PickReplica(
        self, request: placement_pb2.PickReplicaRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.PickReplicaResponse:
        model = request.model
        if not model:
            raise FleetError(ErrorCode.MODEL_REQUIRED, "the 'model' field is required", param="model")
        deployment = self._fleet.deployments.get(model)
        candidates = self._candidates(model)
        if not candidates and deployment is None and model not in self._fleet.models:
            raise routing.not_found(model, routing.known_models(self._fleet.nodes, self.known_specs()))
        ready, reasons = routing.ready(candidates)
        if not ready and deployment is not None:
            await self._reconciler.ensure_one(model)  # scale from zero; raises if it fits nowhere
            wait = request.wait_for_ready.ToTimedelta().total_seconds()
            if wait > 0:
                found = await self._fleet.wait_for(lambda: routing.ready(self._candidates(model))[0], wait)
                ready = found or []
            if not ready:
                reasons = routing.ready(self._candidates(model))[1] or ["its replica is still being placed"]
        if not ready:
            raise routing.unavailable(model, reasons)
        ordered = routing.order(ready, request.user, request.prefix_hash, next(self._turns))
        best = ordered[0]
        self._in_flight[(best.node.node_id, model)] += 1
        return placement_pb2.PickReplicaResponse(
            node_id=best.node.node_id,
            inference_address=best.node.inference_address,
            alternates=[
                placement_pb2.ReplicaEndpoint(node_id=c.node.node_id, inference_address=c.node.inference_address)
                for c in ordered[1 : 1 + MAX_ALTERNATES]
            ],
            cpu_offload_model=deployment.cpu_offload_model if deployment is not None else "",
            device=best.replica.device or "cpu",
        )

    async def ListServedModels(
        self, request: placement_pb2.ListServedModelsRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.ListServedModelsResponse:
        return placement_pb2.ListServedModelsResponse(models=routing.model_infos(self._fleet.nodes, self.known_specs()))
