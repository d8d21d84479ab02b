"""PlacementService, for the edge: which replica serves a request, scaling a deployment from zero."""

from __future__ import annotations

import itertools

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
        self.index = routing.RoutingIndex()
        fleet.listeners.append(self._on_change)

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

    async def PickReplica(
        self, request: placement_pb2.PickReplicaRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.PickReplicaResponse:
        model = request.model
        if not model:
            raise FleetError(ErrorCode.MODEL_REQUIRED, "the 'model' field is required", param="model")
        turn = next(self._turns)
        chosen, reasons = self.index.pick(model, request.user, request.prefix_hash, turn, 1 + MAX_ALTERNATES)
        deployment = self._fleet.deployments.get(model)
        if not chosen and deployment is None and not reasons and model not in self._fleet.models:
            raise routing.not_found(model, routing.known_models(self._fleet.nodes, self.known_specs()))
        if not chosen and deployment is not None:
            await self._reconciler.ensure_one(model)  # scale from zero; raises if it fits nowhere
            wait = request.wait_for_ready.ToTimedelta().total_seconds()

            def settled() -> tuple[list[routing.ReplicaView], list[str]] | None:
                # Done waiting when a replica is ready, or when every assigned replica has failed to load
                # (the node retries with backoff; the client hears why now instead of at the timeout).
                chosen, why = self.index.pick(model, request.user, request.prefix_hash, turn, 1 + MAX_ALTERNATES)
                views = self.index.views(model)
                assigned = sum(1 for a in self._fleet.assignments.values() if a.model.name == model)
                if chosen or (views and len(views) >= assigned and all(v.state == "failed" for v in views)):
                    return chosen, why
                return None

            outcome = await self._fleet.wait_for(settled, wait) if wait > 0 else None
            chosen, reasons = outcome or ([], [])
            if not chosen:
                reasons = reasons or self.index.pick(model)[1] or ["its replica is still being placed"]
        if not chosen:
            raise routing.unavailable(model, reasons)
        best = chosen[0]
        return placement_pb2.PickReplicaResponse(
            node_id=best.node_id,
            inference_address=best.address,
            alternates=[
                placement_pb2.ReplicaEndpoint(node_id=v.node_id, inference_address=v.address) for v in chosen[1:]
            ],
            cpu_offload_model=deployment.cpu_offload_model if deployment is not None else "",
            device=best.device,
        )

    async def ListServedModels(
        self, request: placement_pb2.ListServedModelsRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.ListServedModelsResponse:
        return placement_pb2.ListServedModelsResponse(models=routing.model_infos(self._fleet.nodes, self.known_specs()))
