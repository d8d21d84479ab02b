"""The control plane's in-memory view of the fleet, kept current from the store.

Placement and routing run on every request, so they read this view instead of etcd. The view is
event-driven (a watch on the store's prefix) and also reloaded in full periodically and after any watch
failure, so that an event the watch missed heals within one resync interval. Waiters (a request holding
for a replica to become ready) are woken on every change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from controlplane.store import KINDS, ClusterStore, StoreEvent, record_key
from fleetlm.controlplane.v1 import node_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        loaded = await asyncio.gather(*(self._store.list(kind) for kind in KINDS))
        self.records = {
            kind: {record_key(kind, m): m for m in messages} for kind, messages in zip(KINDS, loaded, strict=True)
        }
        self.synced.set()
        await self._notify(None)

    async def apply(self, event: StoreEvent) -> None:
        table = self.records[event.kind]
        if event.value is None:
            if table.pop(event.key, None) is not None and event.kind == "node":
                log.info("node %s left the fleet", event.key)
        else:
            if event.kind == "node" and event.key not in table:
                log.info("node %s joined the fleet", event.key)
            table[event.key] = event.value
        await self._notify(event)

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
        await asyncio.gather(self._follow(), self._resync_periodically())

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
