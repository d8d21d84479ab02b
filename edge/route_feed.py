"""The edge's copy of the routing table, kept current from the control plane's `WatchRoutes` stream.

The feed is the table's only writer for what the control plane publishes (the gateway adds only its own
in-flight counts). When the stream breaks, the table stays as it was and the edge goes on routing from
it; the feed reconnects with jittered backoff, trying each control-plane address in turn, and a snapshot
replaces the table when it is back. `stale_seconds` says how long the edge has heard nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

import grpc

from edge.route_table import Replica, RouteTable
from fleetlm.controlplane.v1 import node_pb2, routing_pb2, routing_pb2_grpc
from fleetlm.inference.v1 import inference_pb2
from mesh.lifecycle import cancelled_by_caller

log = logging.getLogger(__name__)

READY = node_pb2.REPLICA_STATE_READY


def _state_name(state: int) -> str:
    """A replica state's name; a number this edge does not know (a newer node, a bad report) is "unknown",
    never an exception that ends the routing feed and the edge with it."""
    if state not in node_pb2.ReplicaState.values():
        return "unknown"
    return node_pb2.ReplicaState.Name(state).removeprefix("REPLICA_STATE_").lower()


def replicas_of(node: routing_pb2.NodeRoutes) -> list[Replica]:
    return [
        Replica(
            node_id=node.node_id,
            address=node.inference_address,
            model=r.model,
            ready=r.state == READY,
            state=_state_name(r.state),
            error=r.error,
            device=r.device or "cpu",
            capacity=max(1, r.capacity),
            reported=r.running_requests + r.queued_requests,
            draining=node.draining,
            load_progress=r.load_progress if r.HasField("load_progress") else None,
        )
        for r in node.replicas
    ]


class RouteFeed:
    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        edge_id: str,
        keepalive_seconds: float = 2.0,
        table: RouteTable | None = None,
    ) -> None:
        self.table = table or RouteTable()
        self.models: dict[str, routing_pb2.ModelRoute] = {}
        self.synced = asyncio.Event()  # set once a first snapshot has arrived
        self._channels = list(channels)
        self._edge_id = edge_id
        # An update (or keepalive) is expected at least this often; silence for 3x means the stream is
        # dead even if TCP has not noticed yet.
        self._silence = 3 * keepalive_seconds
        self._heard_at = 0.0  # monotonic time of the last message, 0 before the first
        self.connected = False
        self._changed = asyncio.Event()  # set (and replaced) by every update: see `changed`

    # --- state for callers -------------------------------------------------------------------------------

    @property
    def edge_id(self) -> str:
        """The id this edge follows the routing table under (and names itself by to the control planes)."""
        return self._edge_id

    @property
    def heard_at(self) -> float:
        """Monotonic time the control plane was last heard (an update or a keepalive); 0 before the first."""
        return self._heard_at

    @property
    def stale_seconds(self) -> float | None:
        """Seconds since the control plane was last heard while disconnected; None while connected and
        fresh (and before the first snapshot, when there is no table to be stale)."""
        if not self._heard_at:
            return None
        age = time.monotonic() - self._heard_at
        return None if self.connected and age < self._silence else age

    def changed(self) -> asyncio.Event:
        """An event set by the next update of the table (for a caller that follows a replica's progress)."""
        return self._changed

    def model_infos(self) -> list[inference_pb2.ModelInfo]:
        return [self.models[name].info for name in sorted(self.models)]

    # --- applying updates --------------------------------------------------------------------------------

    def apply(self, update: routing_pb2.WatchRoutesResponse) -> None:
        self._heard_at = time.monotonic()
        if update.nodes or update.removed_node_ids or update.models or update.removed_models or update.snapshot:
            self._changed.set()
            self._changed = asyncio.Event()
        if update.snapshot:
            self.table.replace({n.node_id: replicas_of(n) for n in update.nodes})
            self.models = {m.info.name: m for m in update.models}
            self.synced.set()
            return
        for node_id in update.removed_node_ids:
            self.table.remove_node(node_id)
        for node in update.nodes:
            self.table.put_node(node.node_id, replicas_of(node))
        for name in update.removed_models:
            self.models.pop(name, None)
        for model in update.models:
            self.models[model.info.name] = model

    # --- following the stream ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the stream until cancelled, moving to the next control plane when one goes away."""
        backoff = 0.1
        turn = 0
        while True:
            channel = self._channels[turn % len(self._channels)]
            turn += 1
            try:
                await self._follow(channel)
                backoff = 0.1
            except asyncio.CancelledError:
                if cancelled_by_caller():
                    raise
                log.warning("routing-table stream cancelled by its channel's close; routing on the last table")
            except grpc.aio.AioRpcError as exc:
                if self.connected or backoff <= 0.1:
                    log.warning("routing-table stream lost (%s); routing on the last table", exc.code().name)
            except TimeoutError:
                log.warning("routing-table stream silent for %.0fs; reconnecting", self._silence)
            finally:
                self.connected = False
            # Jitter keeps a fleet of edges from reconnecting in step after a control plane restarts.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 5.0)

    async def _follow(self, channel: grpc.aio.Channel) -> None:
        stub = routing_pb2_grpc.RoutingServiceStub(channel)
        call = stub.WatchRoutes(routing_pb2.WatchRoutesRequest(edge_id=self._edge_id))
        try:
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that arrives
                # with the message, and the feed would outlive the edge's shutdown.
                async with asyncio.timeout(self._silence):
                    update = await call.read()
                if update is grpc.aio.EOF:
                    return
                if update.snapshot and not self.connected:
                    log.info("routing table received: %d nodes, %d models", len(update.nodes), len(update.models))
                self.connected = True
                self.apply(update)
        finally:
            call.cancel()
