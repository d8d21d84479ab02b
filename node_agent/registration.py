"""Joining the fleet and staying in it: register under a lease, heartbeat, register again if it lapsed.

Heartbeats go out every interval the control plane asked for, and within MIN_REPORT_SECONDS when a replica
changes state (loading -> ready), so a model becomes routable as soon as it is loaded. A change of load
alone goes to every control plane over the load streams (load_reports.py), not in a heartbeat, unless the
control plane this node heartbeats to does not hear those streams (an older version, or a stream being
opened again: HeartbeatResponse.load_streamed says): then heartbeats carry the load promptly, as before.
Before every heartbeat the agent lists its model files again (a directory listing and a stat per file), and
a heartbeat carries them when they changed since the last call that did: weights copied to a running node,
or removed, reach its record (and placement) within an interval. Every report's free RAM is the host's,
never more than the RAM the node registered with (an --inventory-override may declare less).

Given several control planes, the agent heartbeats to one at a time (controlplanes.py). A heartbeat's deadline
is half of what is left of the lease at the least (heartbeat_deadline), and one that gets no answer in time
moves the agent to the next control plane at once: a control plane that froze is given up while the lease
still has time for another to renew it. A control plane's answer about the request itself is not retried
elsewhere: a registration refused as invalid (INVALID_ARGUMENT) at start stops the agent with the reason.
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
from node_agent.controlplanes import ControlPlanes, answered
from node_agent.host import ModelHost
from node_agent.load_reports import MIN_REPORT_SECONDS, ChangeFeed, durable_signature

log = logging.getLogger(__name__)

# A control plane that refuses the node's certificate is asked again this often (an operator must act first).
REFUSED_RETRY_SECONDS = 30.0
# After a call that got no answer, the next control plane is asked after about this long (jittered, so that
# the nodes of a control plane that froze do not all arrive in the same instant); once every one has failed
# in a row, with backoff.
MOVE_SECONDS = 0.1
# A heartbeat is given at least this long: a busy control plane that answers slowly is not given up at once.
MIN_DEADLINE_SECONDS = 1.0


class RegistrationRefused(Exception):
    """The control plane refused the node's first registration as invalid: no retry changes that."""


def heartbeat_deadline(left: float, ttl: float, timeout: float, several: bool) -> float:
    """How long a heartbeat may wait for its answer when the lease cannot lapse for `left` seconds yet. With
    other control planes to move to, half of that: one that froze is given up while the other half is left
    for the next one to renew the lease. With none, all of it: asking the same one again is no better than
    waiting. Never more than half the TTL or `timeout` (--rpc-timeout-seconds), nor less than
    MIN_DEADLINE_SECONDS (within `timeout`)."""
    share = left / 2 if several else left
    return min(timeout, max(MIN_DEADLINE_SECONDS, min(ttl / 2, share)))


def _files_changed(before: list[node_pb2.ModelFile], after: list[node_pb2.ModelFile]) -> str:
    """What changed between two lists of model files, for the log."""
    old = {f.path: f.size_bytes for f in before}
    new = {f.path: f.size_bytes for f in after}
    parts = [f"+{p}" for p in sorted(new.keys() - old.keys())] + [f"-{p}" for p in sorted(old.keys() - new.keys())]
    parts += [f"~{p}" for p in sorted(new.keys() & old.keys()) if new[p] != old[p]]
    return " ".join(parts) or "(their metadata)"


class Registration:
    def __init__(
        self,
        controlplanes: ControlPlanes,
        node_id: str,
        address: str,
        host: ModelHost,
        feed: ChangeFeed,
        collect_inventory: Callable[[], node_pb2.Inventory],
        scan_files: Callable[[], list[node_pb2.ModelFile]],
        timeout: float,
        version: str,
    ) -> None:
        self._controlplanes = controlplanes
        self._stubs: dict[int, registry_pb2_grpc.NodeRegistryServiceStub] = {}
        self._turn = 0  # the control planes' turn of the last call made (whose failure moves to the next)
        self.node_id = node_id
        self._address = address
        self._host = host
        self._collect_inventory = collect_inventory
        self._scan_files = scan_files
        # The model files the last registration or heartbeat carried: weights copied into the models
        # directories (or removed) after the node registered are seen at the next heartbeat's scan.
        self._files: list[node_pb2.ModelFile] = []
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
        # The RAM the last registration declared (--inventory-override may declare less than the host has):
        # no report says more of it is free.
        self._ram_total = 0
        # The event loop's time before which the lease cannot have lapsed, as far as the agent knows.
        self._lease_until = 0.0
        self._ever_registered = False
        self._backoff = 0.25
        self._failures = 0  # calls in a row that got no answer
        # The RegisterNode call in flight, if any. Stopping the agent must not cancel it half-way: the
        # control plane may already have written the record under a new lease, and only the reply says
        # which lease to revoke, so deregister waits for it.
        self._registering: asyncio.Future[registry_pb2.RegisterNodeResponse] | None = None

    def _stub(self) -> registry_pb2_grpc.NodeRegistryServiceStub:
        """The stub of the control plane in use; remembers its turn for a failure to name."""
        self._turn, channel = self._controlplanes.current()
        index = self._turn % len(self._controlplanes.addresses)
        if index not in self._stubs:
            self._stubs[index] = registry_pb2_grpc.NodeRegistryServiceStub(channel)
        return self._stubs[index]

    def _answered(self) -> None:
        self._backoff, self._failures = 0.25, 0

    def ram_free_bytes(self) -> int:
        """The host's free RAM, never more than the RAM the node registered with (an override may declare
        less than the host has)."""
        free = inventory.ram_free_bytes()
        return min(free, self._ram_total) if self._ram_total else free

    def check_now(self) -> None:
        """Heartbeat at once (a control plane refused a load report: the lease may be gone)."""
        self._check = True
        self._changed.set()

    async def _register(self) -> bytes:
        """Register under a new lease; returns the durable signature of the replicas it carried."""
        inv = await asyncio.to_thread(self._collect_inventory)
        self._ram_total = inv.ram.total_bytes
        files = list(inv.model_files)
        replicas = self._host.replicas()
        sent_at = asyncio.get_running_loop().time()
        self._registering = asyncio.ensure_future(
            self._stub().RegisterNode(
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
        self._lease_until = sent_at + self._ttl  # granted after the request was sent
        self._ever_registered = True
        self._answered()
        self.load_streamed = False  # its streams send the new lease from now on; the next heartbeat says
        self.registered.set()
        log.info("registered with the control plane (lease %x, ttl %ss)", reply.lease_id, reply.lease_ttl.seconds)
        self._sent = durable_signature(replicas)
        self._files = files
        return self._sent

    def _due(self, sent: bytes) -> bool:
        """Whether a change calls for a heartbeat before the interval is up: a check was asked for, a durable
        change (that only a heartbeat writes), or any change while the control plane hears no load stream."""
        return self._check or not self.load_streamed or durable_signature(self._host.replicas()) != sent

    async def _heartbeats(self, sent: bytes, at_once: bool = False) -> None:
        """Heartbeat every interval, and within MIN_REPORT_SECONDS of a change that is due, until a call fails;
        the first one `at_once` (the last one failed: the lease is waiting for it)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # A fixed deadline, not one that starts over at every change of load. asyncio.timeout, not
                # wait_for: on Python 3.11 wait_for swallows a cancellation that arrives with a change, and
                # the agent's shutdown would wait on this loop.
                async with asyncio.timeout_at(loop.time() + (0 if at_once else self.interval)):
                    while not (self._changed.is_set() and self._due(sent)):
                        self._changed.clear()
                        await self._changed.wait()
                    # Report changes promptly, but at most MIN_REPORT_SECONDS apart.
                    await asyncio.sleep(MIN_REPORT_SECONDS)
            except TimeoutError:
                pass
            at_once = False
            self._changed.clear()
            self._check = False
            # A directory listing and a stat per file (a header is read only for a file new or changed).
            files = await asyncio.to_thread(self._scan_files)
            changed_files = registry_pb2.ModelFiles(files=files) if files != self._files else None
            if changed_files is not None:
                log.info("model files changed: %s", _files_changed(self._files, files))
            replicas = self._host.replicas()
            sent_at = loop.time()
            deadline = heartbeat_deadline(
                self._lease_until - sent_at, self._ttl, self._timeout, self._controlplanes.several
            )
            reply = await self._stub().Heartbeat(
                registry_pb2.HeartbeatRequest(
                    node_id=self.node_id,
                    lease_id=self.lease_id,
                    replicas=replicas,
                    ram_free_bytes=self.ram_free_bytes(),
                    model_files=changed_files,
                ),
                # A share of what is left of the lease: a heartbeat stuck on a control plane that froze, or
                # on a connection that died silently, is given up while the lease still has time for
                # another try (on another control plane), not after it has lapsed.
                timeout=deadline,
            )
            # The control plane renews the lease at most every TTL/4: it was renewed TTL/4 before this
            # heartbeat was sent at the earliest.
            self._lease_until = sent_at + self._ttl * 3 / 4
            self._answered()
            self.load_streamed = reply.load_streamed
            self._sent = sent = durable_signature(replicas)
            self._files = files

    async def run(self) -> None:
        """Stay registered until cancelled.

        A heartbeat that fails for want of an answer (the control plane or the network away) is tried
        again at once under the same lease, on the next control plane when there are several: the lease may
        well be alive (another control plane can renew it), and only a control plane can tell that it is not
        (LEASE_EXPIRED), which is the one reason to register again. Registering again after any failure put
        the record under a new lease each time, and a registration whose reply was lost left a lease the
        agent did not know of holding its record."""
        sent: bytes | None = None  # None: not registered (or the lease is gone)
        retry = False  # the last heartbeat failed: the next goes at once
        while True:
            try:
                if sent is None:
                    sent = await self._register()
                await self._heartbeats(sent, at_once=retry)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                retry = False
                error = FleetError.from_rpc_error(exc)
                what = "registration" if sent is None else "heartbeat"
                if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
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
                else:
                    sent = self._sent
                retry = sent is not None
                if not answered(exc):
                    await asyncio.sleep(self._after_no_answer(what, error.message))
                    continue
                # An answer about the request itself: every control plane would give the same one.
                code = exc.code().name
                if sent is None and not self._ever_registered and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RegistrationRefused(
                        f"the control plane refused to register this node ({code}): {error.message}"
                    ) from None
                # A heartbeat's lease is at stake: it is asked again after the backoff; a registration,
                # which no retry soon changes, after the time the control plane names (its node id in use by
                # a node whose lease may be lapsing: the lease's TTL), else REFUSED_RETRY_SECONDS.
                delay = self._backoff if sent is not None else float(error.retry_after_seconds or REFUSED_RETRY_SECONDS)
                self._backoff = min(self._backoff * 2, 2.0)
                log.error("the control plane refused the node's %s (%s: %s); asking again in %.1fs", what, code,
                          error.message, delay)  # fmt: skip
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    def _after_no_answer(self, what: str, why: str) -> float:
        """A call got no answer (or the control plane failed to serve it): move to the next control plane,
        and return how long to wait before the next call. Each is asked at once in turn; once all have
        failed in a row, with backoff (short and jittered: a control plane that comes back waits for its
        nodes before it moves anything, its start-up grace, so they should be back within a couple of
        seconds, and not all in the same instant)."""
        controlplanes, failed = self._controlplanes, self._turn
        self._failures += 1
        moved = controlplanes.move_on(failed) or controlplanes.turn != failed  # or moved already
        if moved and self._failures < len(controlplanes.addresses):
            log.warning(
                "%s failed at control plane %s (%s); trying %s",
                what,
                controlplanes.address(failed),
                why,
                controlplanes.address(controlplanes.turn),
            )
            return MOVE_SECONDS * random.uniform(0.5, 1.5)
        self._failures = 0
        delay, self._backoff = self._backoff, min(self._backoff * 2, 2.0)
        where = f" (next: {controlplanes.address(controlplanes.turn)})" if moved else ""
        log.warning("%s failed (%s); trying again in %.1fs%s", what, why, delay, where)
        return delay * random.uniform(0.5, 1.5)

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
            await self._stub().DeregisterNode(
                registry_pb2.DeregisterNodeRequest(node_id=self.node_id, lease_id=self.lease_id),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not deregister (%s); the lease will expire", exc.code().name)
