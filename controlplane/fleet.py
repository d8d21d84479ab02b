"""The control plane's in-memory view of the fleet, kept current from the store.

Placement runs on every request, so it reads this snapshot instead of etcd. The view is event-driven (a
watch on the store's prefix) and also reloaded in full periodically and after any watch failure, so an
event the watch missed heals within one resync interval.
"""

from __future__ import annotations

import asyncio
import logging

from controlplane.store import ClusterStore, StoreEvent
from fleetlm.controlplane.v1 import node_pb2

log = logging.getLogger(__name__)


class FleetView:
    def __init__(self, store: ClusterStore, resync_interval_seconds: float = 30.0) -> None:
        self._store = store
        self._resync_interval = resync_interval_seconds
        self.nodes: dict[str, node_pb2.Node] = {}
        self.models: dict[str, node_pb2.ModelSpec] = {}
        self.synced = asyncio.Event()

    async def resync(self) -> None:
        nodes, models = await asyncio.gather(self._store.list_nodes(), self._store.list_models())
        self.nodes = {n.node_id: n for n in nodes}
        self.models = {m.name: m for m in models}
        self.synced.set()

    def apply(self, event: StoreEvent) -> None:
        if event.kind == "node":
            if event.node is None:
                if self.nodes.pop(event.key, None) is not None:
                    log.info("node %s left the fleet", event.key)
            else:
                if event.key not in self.nodes:
                    log.info("node %s joined the fleet", event.key)
                self.nodes[event.key] = event.node
        elif event.kind == "model":
            if event.model is None:
                self.models.pop(event.key, None)
            else:
                self.models[event.key] = event.model

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
                    self.apply(event)
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
