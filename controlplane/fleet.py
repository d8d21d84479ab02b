"""The control plane's in-memory view of the fleet, kept current from the store.

Placement and routing run on every request, so they read this view instead of etcd. The view is
event-driven (a watch on the store's prefix) and also reloaded in full periodically and after any watch
failure, so that an event the watch missed heals within one resync interval. Waiters (a request holding
for a replica to become ready) are woken on every change. A resync's reads may predate a change whose
watch event arrives while they are in flight: installing them after that event would roll the change back
until the next resync (a deployment made in that moment was missing from the routing table for 30 s). So
the two never interleave: a watch event waits for the resync in progress and is applied on top of what it
installed (events come in revision order, so the view converges on the store's newest state).

Load is not cluster state. What a node reports that changes with every request (its replicas' running,
queued and refused counts, when each last had a request, free RAM, the time of the report) lives in the
`LoadBoard`, written by the registry from the node's load stream (or its heartbeats, for a node with no
stream here) and never by etcd: the node record in etcd is
rewritten only when its durable part changes (see `durable_key`). The board is laid over every node record
the view takes in, from a watch event or a resync, so the view always shows the newest load, never the
stale figures the record in etcd was written with. A load-only report reaches `load_listeners` (the route
publisher), not `listeners`: the reconciler runs on its timer and on durable changes, not on every report.
A node streams its load to every control plane it was given (registry.ReportLoad), so every one of them
knows it, not only the one it heartbeats to. A control plane the node cannot reach (or an agent that
predates the stream, which reports to one control plane only) leaves the figures of the node's last durable
change, which is acceptable: load is a hint for routing and idle unload, not a decision's input that must
agree everywhere; `LoadBoard.fresh` says which it is.

A lease that lapses while its node is still heard is not the node leaving. When etcd is frozen (or the
control planes cannot reach it) no lease can be renewed, and when it answers again it expires every lease
whose TTL went by meanwhile: every node's record goes at once, although every node is serving and reporting
its load here. Taking that for the nodes leaving would empty the routing table and make the reconciler move
every replica. So a node whose record is deleted while its load stream is open here and reported within
half the TTL is kept in the view as it was (`lapsed`), for one TTL, in which its next heartbeat is told to
register again (LEASE_EXPIRED) and does, with the same replicas. A node that deregistered, whose stream
ended (a stopped or killed agent), or that was not heard lately (cut off) leaves at once, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2

from controlplane.store import KINDS, ClusterStore, StoreEvent, record_key
from fleetlm.controlplane.v1 import node_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


def durable_key(node: node_pb2.Node) -> bytes:
    """The part of a node record that is cluster state, as bytes to compare: everything but its load (the
    fields `LoadBoard` keeps). Two reports with the same key need no write to etcd."""
    durable = node_pb2.Node()
    durable.CopyFrom(node)
    durable.ClearField("last_heartbeat_at")
    durable.inventory.ram.ClearField("free_bytes")
    for replica in durable.replicas:
        replica.ClearField("running_requests")
        replica.ClearField("queued_requests")
        replica.ClearField("last_request_at")
        replica.ClearField("rejected_requests")
        replica.ClearField("load_progress")
    return durable.SerializeToString(deterministic=True)


def free_within(ram_free_bytes: int, inventory: node_pb2.Inventory) -> int:
    """Free RAM as reported, never above the node's total: a node given --inventory-override with less RAM
    than its host has (an older agent capped it at registration only) would otherwise show negative use."""
    total = inventory.ram.total_bytes
    return min(ram_free_bytes, total) if total else ram_free_bytes


@dataclass
class NodeLoad:
    """One node's last report: its replicas (by model name and whether assigned), free RAM, and when."""

    replicas: dict[tuple[str, bool], node_pb2.Replica]
    ram_free_bytes: int
    reported_at: timestamp_pb2.Timestamp
    received: float  # time.monotonic() here
    streaming: bool = False  # whether a load stream from the node is open here now


class LoadBoard:
    """The nodes' load as their last reports said, in memory only. Written by the registry.

    A report counts for `max_age_seconds` (the registry sets the lease TTL: a node reports at least four
    times in it). After that no report reaches this control plane (the node cannot reach it, or it is an
    old agent that reports to another control plane only): its record's figures stand, and `fresh` says
    this control plane does not know the node's load now."""

    def __init__(self, max_age_seconds: float = 10.0) -> None:
        self._nodes: dict[str, NodeLoad] = {}
        self._streaming: set[str] = set()  # nodes with a load stream open here (kept by the registry)
        self.max_age_seconds = max_age_seconds

    def report(
        self,
        node_id: str,
        replicas: Iterable[node_pb2.Replica],
        ram_free_bytes: int,
        reported_at: timestamp_pb2.Timestamp,
    ) -> None:
        by_replica = {(r.model.name, r.assigned): r for r in replicas}
        streaming = node_id in self._streaming
        self._nodes[node_id] = NodeLoad(by_replica, ram_free_bytes, reported_at, time.monotonic(), streaming)

    def stream_opened(self, node_id: str) -> None:
        self._streaming.add(node_id)

    def stream_closed(self, node_id: str) -> None:
        """The node's last load stream here ended: its reports are no longer a sign that it is alive."""
        self._streaming.discard(node_id)
        load = self._nodes.get(node_id)
        if load is not None:
            load.streaming = False

    def alive(self, node_id: str, within_seconds: float) -> bool:
        """Whether the node is heard now: its load stream is open here and reported within `within_seconds`."""
        load = self._nodes.get(node_id)
        return (
            load is not None
            and load.streaming
            and node_id in self._streaming
            and time.monotonic() - load.received <= within_seconds
        )

    def fresh(self, node_id: str) -> bool:
        """Whether this control plane heard the node's load within max_age_seconds. A decision that must
        not act on stale load (idle unload) checks it: a node that cannot reach this control plane, or an
        old agent reporting elsewhere, leaves it stale."""
        load = self._nodes.get(node_id)
        return load is not None and time.monotonic() - load.received <= self.max_age_seconds

    def forget(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def retain(self, node_ids: Iterable[str]) -> None:
        keep = set(node_ids)
        for node_id in [n for n in self._nodes if n not in keep]:
            del self._nodes[node_id]

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._nodes

    def overlay(self, node: node_pb2.Node) -> node_pb2.Node:
        """A copy of `node` with the load of its last report (the node itself when none is known). Only the
        load fields change: a replica's state and error come from the record, which is cluster state."""
        load = self._nodes.get(node.node_id)
        if load is None or not self.fresh(node.node_id):
            return node
        if load.reported_at.ToNanoseconds() < node.last_heartbeat_at.ToNanoseconds():
            return node  # written from a later report (a heartbeat to another control plane) than ours
        out = node_pb2.Node()
        out.CopyFrom(node)
        out.last_heartbeat_at.CopyFrom(load.reported_at)
        out.inventory.ram.free_bytes = free_within(load.ram_free_bytes, out.inventory)
        for replica in out.replicas:
            reported = load.replicas.get((replica.model.name, replica.assigned))
            if reported is None:
                continue
            replica.running_requests = reported.running_requests
            replica.queued_requests = reported.queued_requests
            replica.rejected_requests = reported.rejected_requests
            if reported.HasField("load_progress"):
                replica.load_progress = reported.load_progress
            else:
                replica.ClearField("load_progress")
            if reported.HasField("last_request_at"):
                replica.last_request_at.CopyFrom(reported.last_request_at)
            else:
                replica.ClearField("last_request_at")
        return out


class FleetView:
    def __init__(self, store: ClusterStore, resync_interval_seconds: float = 30.0) -> None:
        self._store = store
        self._resync_interval = resync_interval_seconds
        self.records: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self.synced = asyncio.Event()
        # Set once the nodes that hold assignments are back in the view (or a grace period has passed):
        # after a control-plane restart their leases may have lapsed, and until they register again the
        # view would say they are gone although they are serving. See `settle`.
        self.settled = asyncio.Event()
        self._changed = asyncio.Condition()
        self.listeners: list[Callable[[StoreEvent | None], None]] = []
        self.load = LoadBoard()
        # Told of a node whose load alone changed, with a "node" event carrying its record as the view now
        # holds it. Not woken by durable changes: those reach `listeners`.
        self.load_listeners: list[Callable[[StoreEvent], None]] = []
        # Nodes whose lease lapsed while they were still heard (see the module's docstring): node id ->
        # time.monotonic() by which they must have registered again, else they leave the view.
        self.lapsed: dict[str, float] = {}
        # Set by `settle`: until then (time.monotonic()) a lease that lapses on a node this control plane has
        # not heard yet is a lapse too, kept for `_startup_grace` (see `_lapses`); those nodes are `_unheard`.
        self._startup_until = 0.0
        self._startup_grace = 0.0
        self._unheard: set[str] = set()
        self._departing: set[str] = set()  # nodes that deregistered here: their record's deletion is a leave
        self._writing = asyncio.Lock()  # a resync, or a watch event's change: one at a time (module docstring)

    @property
    def nodes(self) -> dict[str, node_pb2.Node]:
        return self.records["node"]

    @property
    def models(self) -> dict[str, node_pb2.ModelSpec]:
        return self.records["model"]

    @property
    def deployments(self) -> dict[str, node_pb2.Deployment]:
        return self.records["deployment"]

    @property
    def assignments(self) -> dict[str, node_pb2.Assignment]:
        return self.records["assignment"]

    def scheduling(self, node_id: str) -> int:
        record = self.records["scheduling"].get(node_id)
        return record.scheduling if record is not None else node_pb2.SCHEDULING_ACTIVE

    def node_assignments(self, node_id: str) -> list[node_pb2.Assignment]:
        return [a for a in self.assignments.values() if a.node_id == node_id]

    async def resync(self) -> None:
        async with self._writing:
            await self._resync()

    async def _resync(self) -> None:
        loaded = await asyncio.gather(*(self._store.list(kind) for kind in KINDS))
        records = {
            kind: {record_key(kind, m): m for m in messages} for kind, messages in zip(KINDS, loaded, strict=True)
        }
        # The records in etcd carry the load of their last durable change: lay the reported load over them.
        records["node"] = {key: self.load.overlay(node) for key, node in records["node"].items()}
        for node_id in list(self.lapsed):  # still waiting for these to register again: keep them
            if node_id in records["node"]:
                del self.lapsed[node_id]
                self._unheard.discard(node_id)
            elif node_id in self.nodes:
                records["node"][node_id] = self.nodes[node_id]
        self.load.retain(records["node"])
        self.records = records
        self.synced.set()
        await self._notify(None)

    def departing(self, node_id: str) -> None:
        """The node deregistered: the deletion of its record that follows is the node leaving."""
        self._departing.add(node_id)

    def _lapses(self, node_id: str) -> bool:
        """Whether the deletion of this node's record is a lapsed lease (the node is heard now), not a leave.
        So is one in this control plane's startup grace on a node it has not heard from yet: when an operator
        restarts the control plane, the nodes' heartbeats fail while it stops and starts, and their leases
        can lapse a moment after the new one has read their records, before they have found it. That is not
        a node leaving either (taking it for one moved every replica)."""
        if node_id in self._departing or node_id not in self.nodes:
            return False
        if self.load.alive(node_id, self.load.max_age_seconds / 2):
            return True
        return time.monotonic() < self._startup_until and node_id not in self.load

    async def apply(self, event: StoreEvent) -> None:
        async with self._writing:
            await self._apply(event)

    async def _apply(self, event: StoreEvent) -> None:
        table = self.records[event.kind]
        if event.kind == "node":
            if event.value is None and self._lapses(event.key):
                heard = event.key in self.load
                keep = self.load.max_age_seconds if heard else self._startup_grace
                self.lapsed[event.key] = time.monotonic() + keep
                if not heard:
                    self._unheard.add(event.key)
                log.warning(
                    "node %s's lease lapsed while %s; keeping it for %gs to register again",
                    event.key,
                    "it is still reporting" if heard else "this control plane starts",
                    keep,
                )
                async with self._changed:  # waiters see the lapse; listeners see no change: the node stays
                    self._changed.notify_all()
                return
            self.lapsed.pop(event.key, None)
            self._unheard.discard(event.key)
            self._departing.discard(event.key)
        if event.value is None:
            if event.kind == "node":
                self.load.forget(event.key)
            if table.pop(event.key, None) is not None and event.kind == "node":
                log.info("node %s left the fleet", event.key)
        else:
            if event.kind == "node":
                if event.key not in table:
                    log.info("node %s joined the fleet", event.key)
                assert isinstance(event.value, node_pb2.Node)
                event = StoreEvent(event.kind, event.key, self.load.overlay(event.value))
            table[event.key] = event.value
        await self._notify(event)

    def report_load(
        self,
        node_id: str,
        replicas: Iterable[node_pb2.Replica],
        ram_free_bytes: int,
        reported_at: timestamp_pb2.Timestamp,
    ) -> None:
        """A node's load report (from its stream or a heartbeat), as the registry received it: keep its load,
        and show it on the node's record at once (the record itself changes in etcd only with its durable
        part)."""
        self.load.report(node_id, replicas, ram_free_bytes, reported_at)
        node = self.nodes.get(node_id)
        if node is None:
            return  # its record is on its way from the watch: the board is laid over it when it comes
        updated = self.load.overlay(node)
        self.nodes[node_id] = updated
        event = StoreEvent("node", node_id, updated)
        for listener in self.load_listeners:
            listener(event)

    async def _notify(self, event: StoreEvent | None) -> None:
        for listener in self.listeners:
            listener(event)
        async with self._changed:
            self._changed.notify_all()

    def missing_nodes(self) -> set[str]:
        """Nodes that hold assignments but have no live record."""
        return {a.node_id for a in self.assignments.values()} - set(self.nodes)

    async def settle(self, grace_seconds: float) -> None:
        """Wait (at most `grace_seconds`) for every node that holds an assignment to be in the view, then
        set `settled`. Until then the reconciler moves nothing and edges keep the table they have: a
        control plane that comes back must not take a node whose lease lapsed while it was away for a
        dead one."""
        await self.synced.wait()
        self._startup_until, self._startup_grace = time.monotonic() + grace_seconds, grace_seconds
        missing = self.missing_nodes()
        if missing:
            log.info("waiting up to %gs for nodes with assignments to register again: %s", grace_seconds,
                     ", ".join(sorted(missing)))  # fmt: skip
            await self.wait_for(lambda: not self.missing_nodes(), grace_seconds)
            gone = self.missing_nodes()
            if gone:
                log.warning("nodes not back after %gs, taken as gone: %s", grace_seconds, ", ".join(sorted(gone)))
        self.settled.set()

    async def wait_for(self, predicate: Callable[[], T | None], timeout: float) -> T | None:
        """The first truthy predicate() within timeout, re-checked after every change; else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a
                    # cancellation that arrives with a change, and a waiter whose caller is gone would
                    # carry on (a request waiting for a replica would then be routed, for no one).
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                except TimeoutError:
                    return predicate() or None

    async def run(self) -> None:
        """Follow the store until cancelled: watch, and resync in full on a timer and after errors."""
        await asyncio.gather(self._follow(), self._resync_periodically(), self._expire_lapsed())

    async def expire_lapsed(self) -> None:
        """Let go of the lapsed nodes that did not register again in time, or whose stream has ended. None
        goes while this control plane cannot reach the store: no node can register again then (its
        registration is a write), so each one's time to do so counts from when the store answers again.
        (After an etcd outage the control planes reached etcd again 8-14 s after it was back, and the nodes,
        kept for a TTL from the lapse, left before they could register: every replica moved.)"""
        now = time.monotonic()
        if self._store is not None and not self._store.reachable:
            for node_id, deadline in self.lapsed.items():
                self.lapsed[node_id] = max(deadline, now + self.load.max_age_seconds)
            return
        for node_id, deadline in list(self.lapsed.items()):
            # One kept as this control plane started is not heard yet: its deadline alone lets it go.
            heard_gone = node_id not in self._unheard and not self.load.alive(node_id, self.load.max_age_seconds)
            if now >= deadline or heard_gone:
                log.warning("node %s did not register again after its lease lapsed; it has left", node_id)
                self._departing.add(node_id)  # so that apply takes the deletion as a leave
                await self.apply(StoreEvent("node", node_id, None))

    async def _expire_lapsed(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self.expire_lapsed()

    async def _follow(self) -> None:
        backoff = 0.5
        while True:
            try:
                events = await self._store.watch()
                # Resync only once the watch exists, so that no change falls between the two.
                await self.resync()
                async for event in events:
                    await self.apply(event)
                    backoff = 0.5
                log.warning("store watch ended; resyncing")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("store watch failed (%s); retrying in %.1fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _resync_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval)
            try:
                await self.resync()
            except Exception as exc:
                log.warning("periodic resync failed: %s", exc)
