"""AdminService (for operators) and PlacementService (for the edge): thin adapters over the fleet view."""

from __future__ import annotations

import itertools

import grpc

from controlplane import placement
from controlplane.fleet import FleetView
from controlplane.store import ClusterStore
from fleetlm.controlplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
)
from mesh.errors import ErrorCode, FleetError, invalid


class Admin(admin_pb2_grpc.AdminServiceServicer):
    """Reads etcd directly, not the cached view: an operator asking wants the authoritative answer."""

    def __init__(self, store: ClusterStore) -> None:
        self._store = store

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        nodes = sorted(await self._store.list_nodes(), key=lambda n: n.node_id)
        return admin_pb2.ListNodesResponse(nodes=nodes)

    async def GetNode(
        self, request: admin_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetNodeResponse:
        if not request.node_id:
            raise invalid("node_id", "node_id is required")
        node = await self._store.get_node(request.node_id)
        if node is None:
            raise FleetError(
                ErrorCode.NODE_NOT_FOUND, f"node '{request.node_id}' is not registered", param="node_id"
            )
        return admin_pb2.GetNodeResponse(node=node)

    async def ListModels(
        self, request: admin_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListModelsResponse:
        nodes = {n.node_id: n for n in await self._store.list_nodes()}
        specs = {m.name: m for m in await self._store.list_models()}
        statuses = []
        for info in placement.model_infos(nodes, specs):
            spec = specs.get(info.name) or next(
                c.replica.model for c in placement.candidates_for(nodes.values(), info.name)
            )
            replicas = [
                admin_pb2.ModelReplica(node_id=c.node.node_id, state=c.replica.state, error=c.replica.error)
                for c in placement.candidates_for(nodes.values(), info.name)
            ]
            statuses.append(admin_pb2.ModelStatus(spec=spec, info=info, replicas=replicas))
        return admin_pb2.ListModelsResponse(models=statuses)


class Placement(placement_pb2_grpc.PlacementServiceServicer):
    def __init__(self, fleet: FleetView) -> None:
        self._fleet = fleet
        self._turns = itertools.count()

    async def PickReplica(
        self, request: placement_pb2.PickReplicaRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.PickReplicaResponse:
        if not request.model:
            raise FleetError(ErrorCode.MODEL_REQUIRED, "the 'model' field is required", param="model")
        chosen = placement.pick_replica(
            self._fleet.nodes, self._fleet.models, request.model, request.user, next(self._turns)
        )
        return placement_pb2.PickReplicaResponse(
            node_id=chosen.node.node_id, inference_address=chosen.node.inference_address
        )

    async def ListServedModels(
        self, request: placement_pb2.ListServedModelsRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.ListServedModelsResponse:
        return placement_pb2.ListServedModelsResponse(
            models=placement.model_infos(self._fleet.nodes, self._fleet.models)
        )
