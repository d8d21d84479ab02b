"""RoutingService, for the edges: a thin gRPC adapter over the RoutePublisher and the Router."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from controlplane.route_publisher import RoutePublisher
from controlplane.router import Route, Router
from fleetlm.controlplane.v1 import routing_pb2, routing_pb2_grpc
from mesh import request_context, tracing
from mesh.errors import FleetError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _picking(model: str, metadata: Any, knows: Callable[[str], bool]) -> Iterator[dict[str, Any]]:
    """One PickReplica as the control plane serves it: the request's id bound (the edge sends it, so every
    line logged meanwhile, a placement included, carries it) and, with tracing on, a span that is a child of
    the edge's request span. Yields the span's attributes, for the caller to add the outcome to. The span is
    `PickReplica {model}` only for a model the fleet knows (`knows`): a name a client invents must not become
    a span name (it stays in gen_ai.request.model)."""
    pairs = tuple(metadata or ())
    request_id = request_context.from_metadata(pairs)
    attributes: dict[str, Any] = {"gen_ai.request.model": model}
    with request_context.bound(request_id) if request_id else contextlib.nullcontext():
        if tracing.TRACER is None:
            yield attributes
            return
        if request_id:
            attributes["fleetlm.request_id"] = request_id
        span = tracing.ServerSpan("PickReplica", tracing.carrier_from(pairs), attributes)
        error: tuple[str, str] | None = None
        try:
            with tracing.current(span):
                yield attributes
        except FleetError as failed:
            error = (str(failed.code), failed.message)
            raise
        finally:
            span.end(f"PickReplica {model}" if model and knows(model) else "PickReplica", error=error)


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
        with _picking(request.model, context.invocation_metadata(), self._router.knows) as attributes:
            route: Route = await self._router.route(request.model, request.user, request.prefix_hash, wait)
            attributes["fleetlm.node.id"] = route.replicas[0].node_id
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
