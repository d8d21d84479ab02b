"""Run the edge: uvicorn (HTTP) and grpc.aio (gRPC) on one event loop, over one Gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge.breaker import Breakers
from edge.gateway import Gateway
from edge.grpc_service import EdgeInference
from edge.http_app import create_app
from edge.http_limits import HttpLimits, uvicorn_options
from edge.metrics import EdgeMetrics
from edge.settings import EdgeSettings, cors_origins
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh import logs, tracing
from mesh.auth import read_secret_file
from mesh.controlplane_addresses import each_record
from mesh.fleet_ca import CONTROLPLANE_DNS_NAME
from mesh.grpc_server import BindError, GrpcServer, unbindable
from mesh.lifecycle import bound_address, cut_after, run_until_signalled
from mesh.tls import (
    TlsFiles,
    keep_ssl_context_current,
    refuse_exposed_plaintext,
    server_credentials,
)

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals belong to the process's one shutdown sequence (mesh.lifecycle), not to uvicorn.
        yield


async def _served_http(http: _Uvicorn, listen: str) -> None:
    """uvicorn's serving; it exits the process (SystemExit 1) when it cannot bind, as when the address was
    taken after the edge's check: a BindError instead."""
    try:
        await http.serve()
    except SystemExit:
        why = unbindable(listen) or "in use, or not an address of this machine"
        raise BindError(f"cannot serve HTTP on {listen}: {why}") from None


class EdgeTlsSettings(BaseSettings):
    """The edge's TLS files (FLEETLM_EDGE_TLS_*). Interim home: they belong in EdgeSettings."""

    model_config = SettingsConfigDict(env_prefix="FLEETLM_EDGE_", extra="ignore")

    tls_cert: Path | None = Field(
        None,
        description="the edge's certificate (PEM): HTTPS and gRPC with it (clients need no certificate of their"
        " own), and mutual TLS with it to control planes and nodes; files are re-read when they change",
    )
    tls_key: Path | None = Field(None, description="private key (PEM) of --tls-cert; never logged")
    tls_ca: Path | None = Field(None, description="the fleet CA (PEM) control planes and nodes are verified with")
    insecure_plaintext: bool = Field(
        False, description="serve plaintext HTTP and gRPC on non-loopback addresses (refused without it unless TLS)"
    )


async def serve(settings: EdgeSettings, stop: asyncio.Event, tls_settings: EdgeTlsSettings | None = None) -> None:
    t = tls_settings or EdgeTlsSettings(**{})  # from the environment alone
    tls = TlsFiles.of(t.tls_cert, t.tls_key, t.tls_ca)
    edge_id = settings.edge_id or f"{socket.gethostname()}:{settings.grpc_listen.rsplit(':', 1)[-1]}"
    # A DNS name with several records: each is a control plane of its own (the routing stream moves on from
    # one that goes silent), verified by the name every control plane's certificate carries.
    spread = await each_record(settings.controlplane)
    args = (
        spread or settings.controlplane.split(","),
        settings.request_timeout_seconds,
        settings.placement_timeout_seconds,
        settings.scale_from_zero_timeout_seconds,
    )
    options: dict[str, Any] = {
        "edge_id": edge_id,
        "breakers": Breakers(settings.breaker_failures, settings.breaker_cooldown_seconds),
        "failover_seconds": settings.failover_seconds,
        "tls": tls,
        "node_streams": settings.node_streams,
        "controlplane_name": CONTROLPLANE_DNS_NAME if spread else None,
    }
    gateway = Gateway(*args, **options)
    metrics = EdgeMetrics(gateway) if settings.metrics else None
    gateway.metrics = metrics
    grpc_server = GrpcServer([INFERENCE_SERVICE])
    servicer = EdgeInference(gateway)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(
        metrics.grpc_servicer(servicer) if metrics else servicer, grpc_server.server
    )
    host, port = settings.http_listen.rsplit(":", 1)
    # Body size and deadlines; the header deadline and keep-alive are on the connection (uvicorn_options).
    limits = HttpLimits(
        max_body_bytes=settings.max_body_bytes,
        body_timeout_seconds=settings.body_timeout_seconds,
        header_timeout_seconds=settings.header_timeout_seconds,
        keep_alive_seconds=settings.keep_alive_seconds,
    )
    app = create_app(gateway, limits, cors_origins(settings.cors_origins))
    config = uvicorn.Config(
        metrics.asgi(app) if metrics else app,
        **uvicorn_options(limits),
        host=host,
        port=int(port),
        log_level=settings.log_level.lower(),
        access_log=False,  # the edge writes its own (edge.access_log)
        log_config=None,  # uvicorn's lines go through the root logger (mesh.logs): --log-format holds for them
        lifespan="off",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
    )
    config.load()  # builds the SSLContext now, so that it can be kept current below
    http = _Uvicorn(config)
    # The public front doors: TLS with the edge's certificate, no client certificate asked for.
    # InferenceService is NOT_SERVING in grpc.health.v1 until the edge has a routing table (then it routes,
    # from a stale table too, while the control plane is away), as /health is 503 with no table to route on.
    credentials = server_credentials(tls, False) if tls else None
    why = unbindable(settings.http_listen)  # uvicorn would log its own lines and exit 1: the operator reads one
    if why:
        raise BindError(f"cannot serve HTTP on {settings.http_listen}: {why}")
    grpc_port = await grpc_server.start(settings.grpc_listen, credentials, not_yet=[INFERENCE_SERVICE])

    async def serving_once_routed() -> None:
        await gateway.feed.synced.wait()
        await grpc_server.serving(INFERENCE_SERVICE)

    ending: asyncio.Future[None] | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            routing = tasks.create_task(gateway.run())
            said = tasks.create_task(serving_once_routed())
            rotating = tasks.create_task(keep_ssl_context_current(config.ssl, tls)) if tls and config.ssl else None
            http_task = tasks.create_task(_served_http(http, settings.http_listen))
            while not http.started and not http_task.done():
                await asyncio.sleep(0.05)
            if http_task.done():
                await http_task  # its BindError, which the command line says in one line
                raise BindError(f"cannot serve HTTP on {settings.http_listen}")
            http_port = http.servers[0].sockets[0].getsockname()[1]
            log.info(
                "edge serving OpenAI HTTP on %s://%s and gRPC on %s (control plane %s)",
                "https" if tls else "http",
                bound_address(settings.http_listen, http_port),
                bound_address(settings.grpc_listen, grpc_port),
                settings.controlplane,
            )
            await stop.wait()
            # Order: stop both front doors (draining in-flight requests), then close node channels. Requests
            # still running when the grace is nearly spent are ended by the edge itself, each with a clear
            # error (HTTP 503, or an error event on a stream that has started), before the servers cut them.
            http.should_exit = True
            grace = settings.shutdown_grace_seconds
            ending = asyncio.ensure_future(_end_requests_after(gateway, cut_after(grace)))  # not awaited by the group
            await grpc_server.stop(grace)
            routing.cancel()
            said.cancel()
            if rotating is not None:
                rotating.cancel()
    finally:
        if ending is not None:
            ending.cancel()
        await gateway.close()
    log.info("edge stopped")


async def _end_requests_after(gateway: Gateway, seconds: float) -> None:
    await asyncio.sleep(seconds)
    if gateway.stopping.is_set():
        return
    gateway.stopping.set()
    log.info("shutdown grace nearly spent: requests still running end with 'this edge is shutting down'")


def main(settings: EdgeSettings, tls_settings: EdgeTlsSettings | None = None) -> None:
    logs.setup("edge", settings.log_level, settings.log_format)
    t = tls_settings or EdgeTlsSettings(**{})  # from the environment alone
    try:
        tls = TlsFiles.of(t.tls_cert, t.tls_key, t.tls_ca)
        if tls is not None:
            tls.read()  # PEM files, and a key that is the certificate's
        refuse_exposed_plaintext(
            "the edge", [settings.http_listen, settings.grpc_listen], tls is not None, t.insecure_plaintext
        )
        if settings.require_api_key and settings.auth_secret_file is None:
            raise ValueError("--require-api-key needs --auth-secret-file")
        if settings.auth_secret_file is not None:  # readable and long enough; its content is never shown
            read_secret_file(settings.auth_secret_file, "auth secret")
        traces = tracing.setup("edge")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fleetlm edge: {exc}") from None
    try:
        run_until_signalled(lambda stop: serve(settings, stop, t), settings.shutdown_grace_seconds)
    finally:
        if traces is not None:
            traces.shutdown()  # after the servers stopped: the last requests' spans are flushed
