"""Load and replica progress, streamed to every control plane (`NodeRegistryService.ReportLoad`).

The agent heartbeats to one control plane (registration.py), but every control plane publishes a routing
table to the edges that follow it and decides idle unloads: each needs every node's load. So the agent keeps
one ReportLoad stream open to each control-plane address it was given and sends its replicas and free RAM
on every change (at most every MIN_REPORT_SECONDS) and at least every heartbeat interval, so that an idle
node stays fresh. A stream that breaks is opened again with jittered backoff. A control plane that refuses
a report as not from the node's current registration (NOT_FOUND) makes the registration heartbeat at once,
which registers again if the lease is gone. One that predates the stream (UNIMPLEMENTED) is asked again
now and then; meanwhile the heartbeats carry the node's load to it, as before (HeartbeatResponse.
load_streamed tells the registration whether its control plane hears the stream). Under TLS the streams are
mutual TLS with the node's own certificate (the one it registers with), verified against the control planes'
fleet name when they are dialled by address.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Protocol

import grpc

from fleetlm.controlplane.v1 import node_pb2, registry_pb2, registry_pb2_grpc
from mesh.channels import CHANNEL_OPTIONS
from mesh.errors import ErrorCode, FleetError
from mesh.tls import TlsFiles, secure_channel
from node_agent.host import ModelHost

log = logging.getLogger(__name__)

# Changes are reported promptly but gathered for this long, so a busy replica (every request changes its
# load twice) costs a few reports a second, not one per request.
MIN_REPORT_SECONDS = 0.2
# A control plane that answered UNIMPLEMENTED (an older version) is asked again after this long: it may
# have been upgraded meanwhile.
UNIMPLEMENTED_RETRY_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 5.0


def durable_signature(replicas: Iterable[node_pb2.Replica]) -> bytes:
    """What of the replicas is cluster state (the control plane writes it to etcd): everything but their
    load. A change of load alone leaves it equal."""
    out = []
    for replica in replicas:
        durable = node_pb2.Replica()
        durable.CopyFrom(replica)
        for name in ("running_requests", "queued_requests", "last_request_at", "rejected_requests", "load_progress"):
            durable.ClearField(name)
        out.append(durable.SerializeToString(deterministic=True))
    return b"\0".join(out)


class ChangeFeed:
    """The host's one `changed` event, fanned out: every subscriber has an event of its own that the feed
    sets on every change. (One shared event cleared by one consumer would hide a change from the others.)"""

    def __init__(self, host: ModelHost) -> None:
        self._host = host
        self._subscribers: list[asyncio.Event] = []

    def subscribe(self) -> asyncio.Event:
        event = asyncio.Event()
        self._subscribers.append(event)
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.remove(event)

    async def run(self) -> None:
        while True:
            await self._host.changed.wait()
            self._host.changed.clear()
            for event in self._subscribers:
                event.set()


class Registered(Protocol):
    """What a load stream needs of the registration: the lease, the interval, a way to ask for a check, and the
    free RAM to report (within what the node registered with)."""

    node_id: str
    lease_id: int
    interval: float
    registered: asyncio.Event

    def check_now(self) -> None: ...

    def ram_free_bytes(self) -> int: ...


async def report_load(
    addresses: Sequence[str],
    registration: Registered,
    host: ModelHost,
    feed: ChangeFeed,
    tls: TlsFiles | None = None,
    server_name: str | None = None,
) -> None:
    """One stream to each control plane, until cancelled; over mutual TLS with `tls`, checking that the server
    carries `server_name` (when it is not the address's own name)."""
    async with asyncio.TaskGroup() as tasks:
        for address in addresses:
            tasks.create_task(LoadStream(address, registration, host, feed, tls, server_name).run())


class LoadStream:
    def __init__(
        self,
        address: str,
        registration: Registered,
        host: ModelHost,
        feed: ChangeFeed,
        tls: TlsFiles | None = None,
        server_name: str | None = None,
    ) -> None:
        self.address = address
        self._tls = tls
        self._server_name = server_name
        self._registration = registration
        self._host = host
        self._feed = feed
        self._failing = False  # the last attempt failed: say so again only once it has worked

    async def _reports(self, changed: asyncio.Event) -> AsyncIterator[registry_pb2.ReportLoadRequest]:
        registration = self._registration
        loop = asyncio.get_running_loop()
        while True:
            changed.clear()
            yield registry_pb2.ReportLoadRequest(
                node_id=registration.node_id,
                lease_id=registration.lease_id,
                replicas=self._host.replicas(),
                ram_free_bytes=registration.ram_free_bytes(),
            )
            # The next report when something changes (after MIN_REPORT_SECONDS, gathering what else does),
            # else one interval after this one. asyncio.timeout, not wait_for (see registration.py).
            try:
                async with asyncio.timeout_at(loop.time() + registration.interval):
                    await changed.wait()
                    await asyncio.sleep(MIN_REPORT_SECONDS)
            except TimeoutError:
                pass

    async def run(self) -> None:
        """Keep the stream open until cancelled."""
        backoff = 0.5
        async with secure_channel(self.address, self._tls, CHANNEL_OPTIONS, self._server_name) as channel:
            stub = registry_pb2_grpc.NodeRegistryServiceStub(channel)
            while True:
                await self._registration.registered.wait()
                changed = self._feed.subscribe()
                opened = asyncio.get_running_loop().time()
                delay = backoff
                try:
                    await stub.ReportLoad(self._reports(changed))
                    delay = backoff = 0.5  # the control plane ended it (a shutdown): reconnect soon
                    self._failing = False
                except grpc.aio.AioRpcError as exc:
                    if asyncio.get_running_loop().time() - opened > self._registration.interval:
                        backoff, self._failing = 0.5, False  # it worked for a while: a new failure
                    delay, backoff = self._after(exc, backoff)
                    self._failing = True
                finally:
                    self._feed.unsubscribe(changed)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))

    def _after(self, exc: grpc.aio.AioRpcError, backoff: float) -> tuple[float, float]:
        """How long to wait before the next stream, and the backoff after it."""
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            log.info(
                "control plane %s predates load streams; it hears this node's load in heartbeats only if they"
                " go to it (asking again in %.0fs)",
                self.address,
                UNIMPLEMENTED_RETRY_SECONDS,
            )
            return UNIMPLEMENTED_RETRY_SECONDS, 0.5
        error = FleetError.from_rpc_error(exc)
        if error.code == ErrorCode.LEASE_EXPIRED:
            # This control plane has no record of the node under its lease: the lease may be gone.
            log.warning("control plane %s refused a load report (%s); checking the registration", self.address,
                        error.message)  # fmt: skip
            self._registration.check_now()
        else:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "load stream to %s broke (%s); opening it again in about %.1fs", self.address,
                    error.message, backoff)  # fmt: skip
        return backoff, min(backoff * 2, MAX_BACKOFF_SECONDS)
