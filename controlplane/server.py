"""Run the control plane: etcd store, fleet view, and the registry, placement and admin gRPC services."""

from __future__ import annotations

import asyncio
import logging

from controlplane.admin import Admin, Placement
from controlplane.etcd_store import EtcdStore
from controlplane.fleet import FleetView
from controlplane.registry import NodeRegistry
from controlplane.settings import ControlPlaneSettings
from fleetlm.controlplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from mesh import logs
from mesh.grpc_server import GrpcServer
from mesh.lifecycle import bound_address, run_until_signalled

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    registry_pb2.DESCRIPTOR.services_by_name["NodeRegistryService"].full_name,
    placement_pb2.DESCRIPTOR.services_by_name["PlacementService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
]


async def serve(settings: ControlPlaneSettings, stop: asyncio.Event) -> None:
    store = EtcdStore(settings.etcd, settings.etcd_prefix)
    await store.connect()
    fleet = FleetView(store, settings.resync_interval_seconds)
    server = GrpcServer(SERVICE_NAMES)
    registry_pb2_grpc.add_NodeRegistryServiceServicer_to_server(
        NodeRegistry(store, fleet, settings.lease_ttl_seconds), server.server
    )
    placement_pb2_grpc.add_PlacementServiceServicer_to_server(Placement(fleet), server.server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(Admin(store), server.server)
    try:
        async with asyncio.TaskGroup() as tasks:
            follower = tasks.create_task(fleet.run())
            await asyncio.wait_for(fleet.synced.wait(), timeout=30)
            port = await server.start(settings.listen)
            log.info(
                "control plane listening on %s (etcd %s)", bound_address(settings.listen, port), settings.etcd
            )
            await stop.wait()
            # Order: stop taking RPCs and drain them first, then stop following etcd, then close it.
            await server.stop(settings.shutdown_grace_seconds)
            follower.cancel()
    finally:
        await store.close()
    log.info("control plane stopped")


def main(settings: ControlPlaneSettings) -> None:
    logs.setup("controlplane", settings.log_level)
    run_until_signalled(lambda stop: serve(settings, stop))
