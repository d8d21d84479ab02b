"""Following the control plane's assignments for this node: a server stream of the whole desired set,
re-opened with backoff whenever it breaks. Each message replaces the previous one entirely, so a lost
message costs nothing once the next arrives."""

from __future__ import annotations

import asyncio
import logging

import grpc

from fleetlm.controlplane.v1 import registry_pb2, registry_pb2_grpc
from node_agent.host import ModelHost

log = logging.getLogger(__name__)


async def follow(channel: grpc.aio.Channel, node_id: str, host: ModelHost, registered: asyncio.Event) -> None:
    stub = registry_pb2_grpc.NodeRegistryServiceStub(channel)
    backoff = 0.5
    while True:
        await registered.wait()
        try:
            call = stub.WatchAssignments(registry_pb2.WatchAssignmentsRequest(node_id=node_id))
            async for message in call:
                backoff = 0.5
                names = sorted(a.model.name for a in message.assignments)
                log.debug("assignments: %s", names)
                host.apply_assignments(message.assignments)
        except grpc.aio.AioRpcError as exc:
            log.warning("assignment stream broke (%s); reopening in %.1fs", exc.code().name, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 10.0)
