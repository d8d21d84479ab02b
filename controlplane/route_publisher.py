"""Publishes the routing table to edges (`RoutingService.WatchRoutes`): the edges route on their own copy.

An edge that subscribes gets the whole table, then only what changed: the nodes whose reports or
scheduling changed and the models whose aggregate state changed, gathered for `interval` seconds so that a
busy fleet sends one update per interval, not one per report. When nothing changes, an empty update goes
out every `keepalive` seconds, so that an edge can tell a quiet table from a control plane that is gone.
A subscriber that falls behind is sent the whole table again instead of a backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Container

from controlplane import routing
from controlplane.fleet import FleetView
from controlplane.store import StoreEvent, assignment_node
from fleetlm.controlplane.v1 import node_pb2, routing_pb2
from mesh.lifecycle import until_set

log = logging.getLogger(__name__)

MAX_BACKLOG = 64  # updates a slow subscriber may have waiting before it is sent a snapshot instead


def node_routes(
    node: node_pb2.Node, draining: bool, deployed: Container[str] = (), assignments: Container[str] = ()
) -> routing_pb2.NodeRoutes:
    return routing_pb2.NodeRoutes(
        node_id=node.node_id,
        inference_address=node.inference_address,
        draining=draining,
        replicas=[
            routing_pb2.ReplicaRoute(
                model=r.model.name,
                state=r.state,
                error=r.error,
                device=r.device or "cpu",
                running_requests=r.running_requests,
                queued_requests=r.queued_requests,
                capacity=routing.capacity(r.model),
                load_progress=r.load_progress if r.HasField("load_progress") else None,
            )
            for r in routing.routed(node, deployed, assignments)
        ],
    )


class _Subscriber:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[routing_pb2.WatchRoutesResponse | None] = asyncio.Queue()
        self.behind = False  # next: a snapshot


class RoutePublisher:
    def __init__(self, fleet: FleetView, interval: float = 0.05, keepalive: float = 2.0) -> None:
        self._fleet = fleet
        self._interval = interval
        self._keepalive = keepalive
        self._subscribers: set[_Subscriber] = set()
        self._dirty_nodes: set[str] = set()
        self._models_dirty = False
        self._everything_dirty = False
        self._wake = asyncio.Event()
        self._models: dict[str, routing_pb2.ModelRoute] = {}
        self._closed = asyncio.Event()  # set by close: every stream ends, also one opened after it
        self._shadowed: set[tuple[str, str]] = set()  # pinned replicas left out of the routes, warned of
        fleet.listeners.append(self._on_change)
        fleet.load_listeners.append(self._on_load)

    def close(self) -> None:
        """End every stream now (at shutdown: the edges move to another control plane at once)."""
        self._closed.set()

    # --- what changed ------------------------------------------------------------------------------------

    def _on_change(self, event: StoreEvent | None) -> None:
        if event is None:
            self._everything_dirty = True
        elif event.kind in ("node", "scheduling"):
            self._dirty_nodes.add(event.key)
            self._models_dirty = True  # a node's report changes its models' ready counts and states
        elif event.kind == "assignment":  # its replica is routed from now on, or no longer (routing.routed)
            self._dirty_nodes.add(assignment_node(event.key))
            self._models_dirty = True
        elif event.kind in ("deployment", "model"):
            self._models_dirty = True
            if event.kind == "deployment":  # a pinned replica of that name is routed, or no longer is
                self._dirty_nodes.update(
                    n.node_id for n in self._fleet.nodes.values() for r in n.replicas if r.model.name == event.key
                )
        else:
            return
        self._wake.set()

    def _on_load(self, event: StoreEvent) -> None:
        # Load alone changes no model's ready count or state: only the node's routes are sent again.
        self._dirty_nodes.add(event.key)
        self._wake.set()

    def _draining(self, node_id: str) -> bool:
        return self._fleet.scheduling(node_id) == node_pb2.SCHEDULING_DRAINING

    def _node_routes(self, node: node_pb2.Node) -> routing_pb2.NodeRoutes:
        return node_routes(node, self._draining(node.node_id), self._fleet.deployments, self._fleet.assignments)

    def _warn_shadowed(self) -> None:
        """Once per node and model: a node's own catalog pins the name of a deployment, and its replica is
        left out of the routes (routing.routed)."""
        shadowed = routing.shadowed(self._fleet.nodes.values(), self._fleet.deployments)
        for node_id, model in sorted(shadowed - self._shadowed):
            log.warning(
                "node %s pins a model named '%s' from its own catalog (--catalog), which is also a deployment:"
                " its replica is not routed; requests for '%s' go to the deployment's replicas (remove it from"
                " that catalog)",
                node_id,
                model,
                model,
            )
        self._shadowed = shadowed

    def _model_routes(self) -> dict[str, routing_pb2.ModelRoute]:
        fleet = self._fleet
        specs = dict(fleet.models)
        specs.update({name: d.spec for name, d in fleet.deployments.items()})
        out = {}
        for info in routing.model_infos(fleet.nodes, specs, fleet.deployments, fleet.assignments):
            deployment = fleet.deployments.get(info.name)
            out[info.name] = routing_pb2.ModelRoute(
                info=info,
                deployed=deployment is not None,
                cpu_offload_model=deployment.cpu_offload_model if deployment is not None else "",
                continue_on_failure=deployment is not None and deployment.continue_on_failure,
            )
        return out

    def snapshot(self) -> routing_pb2.WatchRoutesResponse:
        """The whole table as it is now."""
        update = routing_pb2.WatchRoutesResponse(
            snapshot=True,
            nodes=[self._node_routes(n) for n in self._fleet.nodes.values()],
            models=list(self._model_routes().values()),
        )
        update.published_at.GetCurrentTime()
        return update

    def _delta(self) -> routing_pb2.WatchRoutesResponse:
        update = routing_pb2.WatchRoutesResponse()
        nodes = self._fleet.nodes
        for node_id in sorted(self._dirty_nodes):
            node = nodes.get(node_id)
            if node is None:
                update.removed_node_ids.append(node_id)
            else:
                update.nodes.append(self._node_routes(node))
        if self._models_dirty:
            models = self._model_routes()
            update.models.extend(m for name, m in models.items() if self._models.get(name) != m)
            update.removed_models.extend(sorted(set(self._models) - set(models)))
            self._models = models
        update.published_at.GetCurrentTime()
        return update

    # --- publishing --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Send what changed to every subscriber, at most once per interval; a keepalive when quiet."""
        await self._fleet.settled.wait()
        while True:
            try:
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives with a
                # wake-up, and this loop would outlive the control plane's shutdown.
                async with asyncio.timeout(self._keepalive):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._everything_dirty or self._models_dirty:
                self._warn_shadowed()
            if self._everything_dirty:
                update = self.snapshot()
                self._models = {m.info.name: m for m in update.models}
            else:
                update = self._delta()
            self._dirty_nodes.clear()
            self._models_dirty = self._everything_dirty = False
            for subscriber in list(self._subscribers):
                if subscriber.behind:
                    continue
                if update.snapshot or subscriber.queue.qsize() < MAX_BACKLOG:
                    subscriber.queue.put_nowait(update)
                else:
                    subscriber.behind = True
                    subscriber.queue.put_nowait(None)  # wakes it to take a snapshot
            await asyncio.sleep(self._interval)  # gather the next changes

    async def watch(self) -> AsyncIterator[routing_pb2.WatchRoutesResponse]:
        """One edge's stream: the table, then its changes, until the edge goes away. Not before the fleet has
        settled: an edge keeps routing on the table it has rather than take one that lacks nodes which are
        still registering again. A stream opened after `close` (the server still takes calls during its stop's
        grace), or one still waiting for the fleet to settle, ends at once, as the open ones do, instead of
        holding the stop for that grace."""
        async for update in until_set(self._closed, self._updates()):
            yield update

    async def _updates(self) -> AsyncIterator[routing_pb2.WatchRoutesResponse]:
        await self._fleet.settled.wait()
        subscriber = _Subscriber()
        self._subscribers.add(subscriber)
        try:
            yield self.snapshot()
            while True:
                update = await subscriber.queue.get()
                if update is None or subscriber.behind:
                    while not subscriber.queue.empty():
                        subscriber.queue.get_nowait()
                    subscriber.behind = False
                    update = self.snapshot()
                yield update
        finally:
            self._subscribers.discard(subscriber)
