"""Run a node agent: load the catalog's models, serve InferenceService, stay registered."""

from __future__ import annotations

import asyncio
import logging
import socket
from importlib.metadata import PackageNotFoundError, version

import grpc

from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh import logs
from mesh.catalog import CatalogError, load_catalog
from mesh.grpc_server import GrpcServer
from mesh.lifecycle import bound_address, run_until_signalled
from node_agent import assignments, inventory
from node_agent.host import ModelHost
from node_agent.inference_service import NodeInference
from node_agent.registration import Registration
from node_agent.settings import NodeSettings

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


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


async def serve(settings: NodeSettings, stop: asyncio.Event) -> None:
    entries = load_catalog(settings.catalog) if settings.catalog else []
    models_dirs = list(settings.models_dirs)
    if not models_dirs and settings.catalog:
        models_dirs = [settings.catalog.resolve().parent]

    def collect() -> node_pb2.Inventory:
        return inventory.collect(models_dirs, [e.path for e in entries], settings.inventory_override)

    gpus = (await asyncio.to_thread(collect)).gpus
    host = ModelHost([e.spec() for e in entries], settings, gpus)
    server = GrpcServer([INFERENCE_SERVICE])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(NodeInference(host, settings.node_id), server.server)
    port = await server.start(settings.listen)
    address = _advertised(settings, port)
    log.info("node %s serving InferenceService on %s", settings.node_id, bound_address(settings.listen, port))
    async with grpc.aio.insecure_channel(settings.controlplane) as channel:
        registration = Registration(
            channel, settings.node_id, address, host, collect, settings.rpc_timeout_seconds, _agent_version()
        )
        async with asyncio.TaskGroup() as tasks:
            background = [
                tasks.create_task(registration.run()),
                tasks.create_task(host.load_all()),
                tasks.create_task(assignments.follow(channel, settings.node_id, host, registration.registered)),
            ]
            await stop.wait()
            # Order: leave the fleet first so the edge stops choosing this node, then drain in-flight
            # requests, then free the engines.
            for task in background:
                task.cancel()
            await registration.deregister()
            await server.stop(settings.shutdown_grace_seconds)
    await host.close()
    log.info("node %s stopped", settings.node_id)


def main(settings: NodeSettings) -> None:
    logs.setup(f"node:{settings.node_id}"[:12], settings.log_level)
    try:
        if settings.catalog:
            load_catalog(settings.catalog)
        if settings.inventory_override:
            inventory.apply_override(node_pb2.Inventory(), settings.inventory_override)
    except (CatalogError, OSError, ValueError, TypeError) as exc:
        raise SystemExit(f"fleetlm node: {exc}") from None
    run_until_signalled(lambda stop: serve(settings, stop))
