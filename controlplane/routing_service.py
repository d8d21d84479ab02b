"""RoutingService, for the edges: a thin gRPC adapter over the RoutePublisher and the Router."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from controlplane.route_publisher import RoutePublisher
from controlplane.router import Router
from fleetlm.controlplane.v1 import routing_pb2, routing_pb2_grpc


class RoutingService(routing_pb2_grpc.RoutingServiceServicer):
    def __init__(self, router: Router, publisher: RoutePublisher) -> None:
        self._router = router
        self._publisher = publisher

    async def WatchRoutes(
        self, request: routing_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[routing_pb2.WatchRoutesResponse]:
        async for update in self._publisher.watch():
            yield update

    async def PickReplica(
        self, request: routing_pb2.PickReplicaRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.PickReplicaResponse:
        # Any Duration a client sends (ToTimedelta overflows past ~10^9 days): at least 0, and at most the
        # call's own deadline when it has one.
        wait = max(0.0, request.wait_for_ready.seconds + request.wait_for_ready.nanos / 1e9)
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, remaining)
        route = await self._router.route(request.model, request.user, request.prefix_hash, wait)
        best, *others = route.replicas
        return routing_pb2.PickReplicaResponse(
            node_id=best.node_id,
            inference_address=best.address,
            alternates=[routing_pb2.ReplicaEndpoint(node_id=v.node_id, inference_address=v.address) for v in others],
            cpu_offload_model=route.cpu_offload_model,
            device=best.device,
        )

    async def ListServedModels(
        self, request: routing_pb2.ListServedModelsRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.ListServedModelsResponse:
        return routing_pb2.ListServedModelsResponse(models=self._router.served_models())
