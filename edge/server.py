"""Run the edge: uvicorn (HTTP) and grpc.aio (gRPC) on one event loop, over one Gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from edge.breaker import Breakers
from edge.gateway import Gateway
from edge.grpc_service import EdgeInference
from edge.http_app import create_app
from edge.settings import EdgeSettings
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh import logs
from mesh.grpc_server import GrpcServer
from mesh.lifecycle import bound_address, run_until_signalled

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals belong to the process's one shutdown sequence (mesh.lifecycle), not to uvicorn.
        yield


async def serve(settings: EdgeSettings, stop: asyncio.Event) -> None:
    gateway = Gateway(
        settings.controlplane.split(","),
        settings.request_timeout_seconds,
        settings.placement_timeout_seconds,
        settings.scale_from_zero_timeout_seconds,
        edge_id=settings.edge_id or f"{socket.gethostname()}:{settings.grpc_listen.rsplit(':', 1)[-1]}",
        breakers=Breakers(settings.breaker_failures, settings.breaker_cooldown_seconds),
        failover_seconds=settings.failover_seconds,
    )
    grpc_server = GrpcServer([INFERENCE_SERVICE])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(EdgeInference(gateway), grpc_server.server)
    host, port = settings.http_listen.rsplit(":", 1)
    http = _Uvicorn(
        uvicorn.Config(
            create_app(gateway),
            host=host,
            port=int(port),
            log_level=settings.log_level.lower(),
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        )
    )
    grpc_port = await grpc_server.start(settings.grpc_listen)
    try:
        async with asyncio.TaskGroup() as tasks:
            routing = tasks.create_task(gateway.run())
            http_task = tasks.create_task(http.serve())
            while not http.started and not http_task.done():
                await asyncio.sleep(0.05)
            if http_task.done():
                raise SystemExit(f"fleetlm edge: cannot serve HTTP on {settings.http_listen}")
            http_port = http.servers[0].sockets[0].getsockname()[1]
            log.info(
                "edge serving OpenAI HTTP on http://%s and gRPC on %s (control plane %s)",
                bound_address(settings.http_listen, http_port),
                bound_address(settings.grpc_listen, grpc_port),
                settings.controlplane,
            )
            await stop.wait()
            # Order: stop both front doors (draining in-flight requests), then close node channels.
            http.should_exit = True
            await grpc_server.stop(settings.shutdown_grace_seconds)
            routing.cancel()
    finally:
        await gateway.close()
    log.info("edge stopped")


def main(settings: EdgeSettings) -> None:
    logs.setup("edge", settings.log_level)
    run_until_signalled(lambda stop: serve(settings, stop))
