"""Joining the fleet and staying in it: register under a lease, heartbeat, register again if it lapsed.

Heartbeats go out every interval the control plane asked for, and within MIN_REPORT_SECONDS when a replica
changes state (loading -> ready), so a model becomes routable as soon as it is loaded. A change of load
alone goes to every control plane over the load streams (load_reports.py), not in a heartbeat, unless the
control plane this node heartbeats to does not hear those streams (an older version, or a stream being
opened again: HeartbeatResponse.load_streamed says): then heartbeats carry the load promptly, as before.
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
from node_agent.load_reports import MIN_REPORT_SECONDS, ChangeFeed, durable_signature

log = logging.getLogger(__name__)

# A control plane that refuses the node's certificate is asked again this often (an operator must act first).
REFUSED_RETRY_SECONDS = 30.0


class Registration:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        node_id: str,
        address: str,
        host: ModelHost,
        feed: ChangeFeed,
        collect_inventory: Callable[[], node_pb2.Inventory],
        timeout: float,
        version: str,
    ) -> None:
        self._stub = registry_pb2_grpc.NodeRegistryServiceStub(channel)
        self.node_id = node_id
        self._address = address
        self._host = host
        self._collect_inventory = collect_inventory
        self._timeout = timeout
        self._version = version
        self.lease_id = 0
        self.interval = 1.0  # between heartbeats (and load reports), as the control plane says when registering
        self.registered = asyncio.Event()
        # Whether the control plane this node heartbeats to hears its load stream (its last heartbeat reply).
        self.load_streamed = False
        self._changed = feed.subscribe()
        self._check = False  # a load stream was refused: heartbeat now, to learn whether the lease is gone
        self._ttl = 2 * timeout  # the lease's time-to-live, as the control plane says when registering
        self._sent = b""  # the durable signature of the replicas the last registration or heartbeat carried
        # The RegisterNode call in flight, if any. Stopping the agent must not cancel it half-way: the
        # control plane may already have written the record under a new lease, and only the reply says
        # which lease to revoke, so deregister waits for it.
        self._registering: asyncio.Future[registry_pb2.RegisterNodeResponse] | None = None

    def check_now(self) -> None:
        """Heartbeat at once (a control plane refused a load report: the lease may be gone)."""
        self._check = True
        self._changed.set()

    async def _register(self) -> bytes:
        """Register under a new lease; returns the durable signature of the replicas it carried."""
        inv = await asyncio.to_thread(self._collect_inventory)
        replicas = self._host.replicas()
        self._registering = asyncio.ensure_future(
            self._stub.RegisterNode(
                registry_pb2.RegisterNodeRequest(
                    node_id=self.node_id,
                    inference_address=self._address,
                    inventory=inv,
                    replicas=replicas,
                    agent_version=self._version,
                ),
                timeout=self._timeout,
            )
        )
        reply = await asyncio.shield(self._registering)
        self.lease_id = reply.lease_id
        self.interval = max(0.2, reply.heartbeat_interval.ToTimedelta().total_seconds())
        self._ttl = reply.lease_ttl.ToTimedelta().total_seconds() or self._timeout * 2
        self.load_streamed = False  # its streams send the new lease from now on; the next heartbeat says
        self.registered.set()
        log.info("registered with the control plane (lease %x, ttl %ss)", reply.lease_id, reply.lease_ttl.seconds)
        self._sent = durable_signature(replicas)
        return self._sent

    def _due(self, sent: bytes) -> bool:
        """Whether a change calls for a heartbeat before the interval is up: a check was asked for, a durable
        change (that only a heartbeat writes), or any change while the control plane hears no load stream."""
        return self._check or not self.load_streamed or durable_signature(self._host.replicas()) != sent

    async def _heartbeats(self, sent: bytes) -> None:
        """Heartbeat every interval, and within MIN_REPORT_SECONDS of a change that is due, until a call fails."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # A fixed deadline, not one that starts over at every change of load. asyncio.timeout, not
                # wait_for: on Python 3.11 wait_for swallows a cancellation that arrives with a change, and
                # the agent's shutdown would wait on this loop.
                async with asyncio.timeout_at(loop.time() + self.interval):
                    while not (self._changed.is_set() and self._due(sent)):
                        self._changed.clear()
                        await self._changed.wait()
                    # Report changes promptly, but at most MIN_REPORT_SECONDS apart.
                    await asyncio.sleep(MIN_REPORT_SECONDS)
            except TimeoutError:
                pass
            self._changed.clear()
            self._check = False
            replicas = self._host.replicas()
            reply = await self._stub.Heartbeat(
                registry_pb2.HeartbeatRequest(
                    node_id=self.node_id,
                    lease_id=self.lease_id,
                    replicas=replicas,
                    ram_free_bytes=inventory.ram_free_bytes(),
                ),
                # At most half the lease: a heartbeat stuck on a connection that died silently is given up
                # while the lease still has time for another try, not after it has lapsed.
                timeout=min(self._timeout, max(0.5, self._ttl / 2)),
            )
            self.load_streamed = reply.load_streamed
            self._sent = sent = durable_signature(replicas)

    async def run(self) -> None:
        """Stay registered until cancelled.

        A heartbeat that fails for want of an answer (the control plane or the network away) is tried
        again under the same lease: the lease may well be alive (another control plane can renew it), and
        only the control plane can tell that it is not (LEASE_EXPIRED), which is the one reason to register
        again. Registering again after any failure put the record under a new lease each time, and a
        registration whose reply was lost left a lease the agent did not know of holding its record."""
        backoff = 0.25
        sent: bytes | None = None  # None: not registered (or the lease is gone)
        while True:
            try:
                if sent is None:
                    sent = await self._register()
                backoff = 0.25
                await self._heartbeats(sent)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                error = FleetError.from_rpc_error(exc)
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    # The control plane refuses this node's certificate (revoked, or another node joined under
                    # its id since): no retry soon changes that, only an operator.
                    self.registered.clear()
                    sent = None
                    log.error(
                        "the control plane refuses this node: %s. An operator must act (fleetlm ca readmit, or"
                        " another --node-id and a new join); asking again in %.0fs",
                        exc.details(),
                        REFUSED_RETRY_SECONDS,
                    )
                    await asyncio.sleep(REFUSED_RETRY_SECONDS * random.uniform(0.8, 1.2))
                    continue
                if error.code == ErrorCode.LEASE_EXPIRED:
                    log.warning("lease expired; registering again")
                    sent = None
                    self.registered.clear()
                    continue
                if sent is None:
                    self.registered.clear()
                    log.warning("control plane unreachable (%s); registering again in %.1fs", error.message, backoff)
                else:
                    sent = self._sent
                    log.warning("heartbeat failed (%s); trying again in %.1fs", error.message, backoff)
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
                registry_pb2.DeregisterNodeRequest(node_id=self.node_id, lease_id=self.lease_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not deregister (%s); the lease will expire", exc.code().name)
