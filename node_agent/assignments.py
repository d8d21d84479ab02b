"""Following the control plane's assignments for this node: a server stream of the whole desired set,
re-opened with backoff whenever it breaks. Each message replaces the previous one entirely, so a lost
message costs nothing once the next arrives.

The stream goes to the control plane the registration uses (controlplanes.py): when the registration moves
to another, because the one it used stopped answering, the stream is opened again there at once. One that
breaks for want of an answer moves them both, as a failed heartbeat does."""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from fleetlm.controlplane.v1 import registry_pb2, registry_pb2_grpc
from node_agent.controlplanes import ControlPlanes, answered
from node_agent.host import ModelHost

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 2.0


async def follow(controlplanes: ControlPlanes, node_id: str, host: ModelHost, registered: asyncio.Event) -> None:
    backoff = 0.5

    async def stream(channel: grpc.aio.Channel) -> None:
        nonlocal backoff
        call = registry_pb2_grpc.NodeRegistryServiceStub(channel).WatchAssignments(
            registry_pb2.WatchAssignmentsRequest(node_id=node_id)
        )
        try:
            async for message in call:
                backoff = 0.5
                names = sorted(a.model.name for a in message.assignments)
                log.debug("assignments: %s", names)
                host.apply_assignments(message.assignments)
        finally:
            call.cancel()  # when the agent moved to another control plane: not left open on this one

    while True:
        await registered.wait()
        turn, channel = controlplanes.current()
        try:
            if await controlplanes.until_moved(turn, stream(channel)):
                log.info("assignment stream moves to control plane %s", controlplanes.address(controlplanes.turn))
                continue  # at once: the registration is there already
        except grpc.aio.AioRpcError as exc:
            log.warning("assignment stream broke (%s); reopening in %.1fs", exc.code().name, backoff)
            if not answered(exc):
                controlplanes.move_on(turn)  # no answer there: the registration moves with it
        await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
        # At most 2 s, as registration retries: a node whose network comes back after a partition heard its
        # assignments up to 10 s after it had registered again when this backed off to 10 s.
        backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
