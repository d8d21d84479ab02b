"""Joining the fleet and staying in it: register under a lease, heartbeat, register again if it lapsed.

Heartbeats go out every interval the control plane asked for, and at once when a replica changes state
(loading -> ready), so a model becomes routable as soon as it is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import grpc

from fleetlm.controlplane.v1 import node_pb2, registry_pb2, registry_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from node_agent import inventory
from node_agent.host import ModelHost

log = logging.getLogger(__name__)

MIN_REPORT_SECONDS = 0.2


class Registration:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        node_id: str,
        address: str,
        host: ModelHost,
        collect_inventory: Callable[[], node_pb2.Inventory],
        timeout: float,
        version: str,
    ) -> None:
        self._stub = registry_pb2_grpc.NodeRegistryServiceStub(channel)
        self._node_id = node_id
        self._address = address
        self._host = host
        self._collect_inventory = collect_inventory
        self._timeout = timeout
        self._version = version
        self.lease_id = 0
        self.registered = asyncio.Event()
        # The RegisterNode call in flight, if any. Stopping the agent must not cancel it half-way: the
        # control plane may already have written the record under a new lease, and only the reply says
        # which lease to revoke, so deregister waits for it.
        self._registering: asyncio.Future[registry_pb2.RegisterNodeResponse] | None = None

    async def _register(self) -> float:
        inv = await asyncio.to_thread(self._collect_inventory)
        self._registering = asyncio.ensure_future(
            self._stub.RegisterNode(
                registry_pb2.RegisterNodeRequest(
                    node_id=self._node_id,
                    inference_address=self._address,
                    inventory=inv,
                    replicas=self._host.replicas(),
                    agent_version=self._version,
                ),
                timeout=self._timeout,
            )
        )
        reply = await asyncio.shield(self._registering)
        self.lease_id = reply.lease_id
        self.registered.set()
        log.info("registered with the control plane (lease %x, ttl %ss)", reply.lease_id, reply.lease_ttl.seconds)
        return max(0.2, reply.heartbeat_interval.ToTimedelta().total_seconds())

    async def _heartbeat(self) -> None:
        await self._stub.Heartbeat(
            registry_pb2.HeartbeatRequest(
                node_id=self._node_id,
                lease_id=self.lease_id,
                replicas=self._host.replicas(),
                ram_free_bytes=inventory.ram_free_bytes(),
            ),
            timeout=self._timeout,
        )

    async def run(self) -> None:
        """Stay registered until cancelled."""
        backoff = 0.5
        while True:
            try:
                interval = await self._register()
                backoff = 0.5
                while True:
                    self._host.changed.clear()
                    try:
                        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
                        # that arrives with a change, and the agent's shutdown would wait on this loop.
                        async with asyncio.timeout(interval):
                            await self._host.changed.wait()
                        # Report changes (load, state) promptly, but at most MIN_REPORT_SECONDS apart.
                        await asyncio.sleep(MIN_REPORT_SECONDS)
                    except TimeoutError:
                        pass
                    await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                error = FleetError.from_rpc_error(exc)
                if error.code == ErrorCode.LEASE_EXPIRED:
                    log.warning("lease expired; registering again")
                    continue
                self.registered.clear()
                log.warning("control plane unreachable (%s); retrying in %.1fs", error.message, backoff)
            # Short and jittered: a control plane that comes back waits for its nodes before it moves
            # anything (its start-up grace), so they should be back within a couple of seconds, and not all
            # in the same instant.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 2.0)

    async def deregister(self) -> None:
        registering = self._registering
        if registering is not None:
            # A registration the stop interrupted: its reply names the lease the record now lives under.
            await asyncio.wait([registering], timeout=self._timeout)
            if registering.done() and not registering.cancelled() and registering.exception() is None:
                self.lease_id = registering.result().lease_id
        if not self.lease_id:
            return
        try:
            await self._stub.DeregisterNode(
                registry_pb2.DeregisterNodeRequest(node_id=self._node_id, lease_id=self.lease_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not deregister (%s); the lease will expire", exc.code().name)
