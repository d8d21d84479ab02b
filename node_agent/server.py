"""Run a node agent: load the catalog's models, serve InferenceService, stay registered."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Awaitable
from importlib.metadata import PackageNotFoundError, version

from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc, multiplex_pb2, multiplex_pb2_grpc
from mesh import logs, tracing
from mesh import metrics as metrics_port
from mesh.auth import CallerKinds
from mesh.catalog import CatalogError, load_catalog
from mesh.controlplane_addresses import controlplane_addresses, controlplane_target, each_record
from mesh.errors import ErrorCode, FleetError
from mesh.fleet_ca import CONTROLPLANE_DNS_NAME, check_identity_name
from mesh.grpc_server import GrpcServer
from mesh.lifecycle import bound_address, cut_after, run_until_signalled
from mesh.tls import TlsFiles, keep_ssl_context_current, refuse_exposed_plaintext, server_credentials
from node_agent import assignments, inventory, llama_logs
from node_agent.controlplanes import ControlPlanes
from node_agent.host import ModelHost
from node_agent.identity import JoinError, keep_renewed, node_identity, renews
from node_agent.inference_service import NodeInference
from node_agent.load_reports import ChangeFeed, report_load
from node_agent.metrics import NodeMetrics
from node_agent.multiplex_service import NodeMultiplex
from node_agent.registration import Registration, RegistrationRefused
from node_agent.settings import NodeSettings

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
MULTIPLEX_SERVICE = multiplex_pb2.DESCRIPTOR.services_by_name["MultiplexService"].full_name


def _agent_version() -> str:
    try:
        return version("fleetlm")
    except PackageNotFoundError:
        return "dev"


def _advertised(settings: NodeSettings, port: int) -> str:
    if settings.advertise:
        return settings.advertise
    host = settings.listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"


async def _first_failure(stop: asyncio.Event, background: list[asyncio.Task[None]]) -> str:
    """Wait for a stop signal, or for a background task to end, which is a failure (they run until
    cancelled); return what failed, or "" on a stop signal."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([stopped, *background], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    for task in background:
        if task in done:
            error = task.exception() if not task.cancelled() else None
            if isinstance(error, RegistrationRefused):  # the reason is all there is to say: no traceback
                log.error("%s; shutting down", error)
                return str(error)
            log.error("the agent's %s task ended: %r; shutting down", task.get_name(), error, exc_info=error)
            return f"the agent's {task.get_name()} task failed: {error!r}"
    return ""


async def _step(what: str, work: Awaitable[None]) -> None:
    """One shutdown step; its failure is logged and does not skip the next steps."""
    try:
        await work
    except Exception:
        log.exception("shutdown: %s failed", what)


async def serve(settings: NodeSettings, stop: asyncio.Event) -> None:
    entries = load_catalog(settings.catalog) if settings.catalog else []
    models_dirs = list(settings.models_dirs)
    if not models_dirs and settings.catalog:
        models_dirs = [settings.catalog.resolve().parent]

    # One scanner for the agent's life: a heartbeat lists the model files again, reading only new headers.
    files = inventory.ModelFiles([e.path for e in entries], models_dirs)

    def collect() -> node_pb2.Inventory:
        return inventory.collect(models_dirs, [e.path for e in entries], settings.inventory_override, files)

    target = controlplane_target(settings.controlplane)
    # A DNS name with several records: each is a control plane of its own, as if they had been listed.
    spread = await each_record(settings.controlplane)
    # Control planes dialled by address (several given, or a name's records) are verified by the name every
    # control plane's certificate from the fleet CA carries; one given by name, by that name.
    by_fleet_name = CONTROLPLANE_DNS_NAME if target.startswith(("ipv4:", "ipv6:")) or spread else None
    try:
        tls = await node_identity(settings, target, by_fleet_name)
    except JoinError as exc:
        raise SystemExit(f"fleetlm node: {exc}") from None
    gpus = (await asyncio.to_thread(collect)).gpus
    host = ModelHost([e.spec() for e in entries], settings, gpus)
    metrics = NodeMetrics(host) if settings.metrics_listen else None
    # Beyond loopback the metrics port speaks HTTPS with the node's certificate (Prometheus given the fleet CA).
    scraped = metrics_port.start("node", settings.metrics_listen, tls, metrics.registry) if metrics else None
    # With TLS, only fleet components (the edge) and operators with a certificate from the fleet CA may call
    # this node: another node's certificate is refused (mesh.auth.CallerKinds).
    callers = {INFERENCE_SERVICE: ("edge", "admin"), MULTIPLEX_SERVICE: ("edge", "admin")}
    server = GrpcServer(
        [INFERENCE_SERVICE, MULTIPLEX_SERVICE], check_caller=CallerKinds("node", callers) if tls else None
    )
    servicer = NodeInference(host, settings.node_id, metrics.served if metrics else None)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server.server)
    # The edge's Generate calls come over one stream each (node_agent.multiplex_service), counted alike.
    multiplex = NodeMultiplex(servicer)
    if metrics:
        metrics.count_multiplex(multiplex)
    multiplex_pb2_grpc.add_MultiplexServiceServicer_to_server(multiplex, server.server)
    port = await server.start(settings.listen, server_credentials(tls, True) if tls else None)
    address = _advertised(settings, port)
    log.info("node %s serving InferenceService on %s", settings.node_id, bound_address(settings.listen, port))
    failure = ""
    try:
        # Each control plane once, by address (a name's records were resolved above already).
        controlplanes = spread[:-1] or await asyncio.to_thread(controlplane_addresses, settings.controlplane)
        # Several given: one at a time, each by its address; a name's several records, each, then the name
        # (resolved again: a control plane that moved); one address: as it is.
        in_turn = spread or (controlplanes if by_fleet_name else [target])
        async with ControlPlanes(in_turn, tls, by_fleet_name) as using:
            feed = ChangeFeed(host)
            registration = Registration(
                using,
                settings.node_id,
                address,
                host,
                feed,
                collect,
                files.scan,
                settings.rpc_timeout_seconds,
                _agent_version(),
            )
            host.start()
            background = [
                asyncio.create_task(feed.run(), name="change feed"),
                asyncio.create_task(registration.run(), name="registration"),
                asyncio.create_task(
                    assignments.follow(using, settings.node_id, host, registration.registered), name="assignments"
                ),
            ]
            # The load streams dial each control plane by its resolved address (load_reports.py).
            by_name = CONTROLPLANE_DNS_NAME if tls else None
            streams = report_load(controlplanes, registration, host, feed, tls, by_name)
            background.append(asyncio.create_task(streams, name="load streams"))
            if tls is not None and renews(settings):
                renewal = keep_renewed(settings, tls, target, by_fleet_name)
                background.append(asyncio.create_task(renewal, name="certificate renewal"))
            if tls is not None and scraped is not None and scraped.ssl_context is not None:
                # The metrics port's HTTPS takes a renewed certificate too.
                rotating = keep_ssl_context_current(scraped.ssl_context, tls)
                background.append(asyncio.create_task(rotating, name="metrics certificate"))
            try:
                failure = await _first_failure(stop, background)
            finally:
                # Whatever ended it (a signal, a failed task, a cancellation), in this order: leave the
                # fleet so the edge stops choosing this node, drain in-flight requests, then (below) free
                # the engines.
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await _step("deregistering", registration.deregister())
                multiplex.close()  # its streams take no new call; each ends once its calls have
                grace = settings.shutdown_grace_seconds
                cutting = asyncio.ensure_future(_cut_calls_after(multiplex, settings.node_id, cut_after(grace)))
                try:
                    await _step("stopping the gRPC server", server.stop(grace))
                finally:
                    cutting.cancel()
    finally:
        await host.close()
        if scraped is not None:
            scraped.close()
        log.info("node %s stopped", settings.node_id)
    if failure:
        raise SystemExit(f"fleetlm node: {failure}")


async def _cut_calls_after(multiplex: NodeMultiplex, node_id: str, seconds: float) -> None:
    """When the shutdown grace is nearly spent, the edge's calls still running end with this node's own
    retryable error: the edge runs a reply its client waits for whole again on another replica, continues a
    stream whose deployment opts in, and tells any other stream's client that the node is shutting down."""
    await asyncio.sleep(seconds)
    error = FleetError(
        ErrorCode.BACKEND_UNAVAILABLE,
        f"node {node_id} is shutting down and its grace for running requests ran out",
        retry_after_seconds=1,
    )
    ended = multiplex.cut(error)
    if ended:
        log.info("shutdown grace nearly spent: %d request(s) still running end with 'node is shutting down'", ended)


def _log_to_a_copy_of_stderr() -> None:
    """While llama-cpp-python loads a model it points fd 2 at /dev/null (process-wide); lines the agent
    logs meanwhile from its other threads would be lost. They go to a copy of fd 2 made now."""
    stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, errors="backslashreplace")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(stream)


def main(settings: NodeSettings) -> None:
    logs.setup(f"node:{settings.node_id}"[:12], settings.log_level, settings.log_format)
    _log_to_a_copy_of_stderr()
    llama_logs.route()  # llama.cpp's lines in the node's format too (--log-format json)
    try:
        if settings.catalog:
            load_catalog(settings.catalog)
        if settings.inventory_override:
            inventory.apply_override(node_pb2.Inventory(), settings.inventory_override)
        controlplane_target(settings.controlplane)  # a bad address list fails here, not in the background
        if settings.join_token is not None:
            # Joining gets a certificate naming the node (<id>.node.fleetlm): Join refuses an id that cannot
            # be a DNS name.
            check_identity_name("node", settings.node_id)
        # A node that will join has TLS once it has joined.
        given = TlsFiles.of(settings.tls_cert, settings.tls_key, settings.tls_ca)
        if given is not None:
            given.read()  # PEM files, and a key that is the certificate's
        # (or one that joined on an earlier start: it uses the certificate its state directory kept).
        tls = given is not None or bool(settings.join_token) or renews(settings)
        metrics_port.check_listen(settings.metrics_listen)
        exposed = [settings.listen, *([settings.metrics_listen] if settings.metrics_listen else [])]
        refuse_exposed_plaintext("the node", exposed, tls, settings.insecure_plaintext)
        traces = tracing.setup("node")
    except (CatalogError, OSError, ValueError, TypeError) as exc:
        raise SystemExit(f"fleetlm node: {exc}") from None
    try:
        run_until_signalled(lambda stop: serve(settings, stop), settings.shutdown_grace_seconds)
    finally:
        if traces is not None:
            traces.shutdown()  # after the server and the engines stopped: the last requests' spans are flushed
