"""The edge's routing table: every replica of every model, and the choice of replica for one request.

The control plane publishes the table (`RoutingService.WatchRoutes`); the edge keeps its copy here and
routes from it with no round trip. If the control plane goes away the edge goes on routing from the last
table it had (and says since when it has heard nothing).

The choice itself is `mesh.replica_choice`, the rule the control plane's `PickReplica` follows too: ready
replicas only; not full, not draining, least estimated load, ties rotated; the prefix's (else the user's)
affine replica first while it is within `slack` of the least loaded. What the table adds is keeping one
`ReplicaSet` per model current, so that a decision costs O(count + distinct load levels) whatever the
number of replicas: the reports replace a node's replicas, and this edge's own requests (`acquire`,
`release`) move a replica between buckets.

What this edge has in flight on a replica is counted by node and model, not on the entry a request was
routed with: a report replaces the entry while requests are still running there, and the request that
ends must come off the entry that is current then. Each entry's `own` mirrors that count, so the estimate
is the other edges' share at the report plus this edge's own now.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from mesh.replica_choice import Replica, ReplicaSet

__all__ = ["Replica", "RouteTable"]


class RouteTable:
    """Replicas by model. Written by the routing-table stream (`put_node`, `remove_node`, `replace`) and
    by this edge's own requests (`acquire`, `release`); read by `pick`."""

    def __init__(self) -> None:
        self._models: dict[str, ReplicaSet] = {}
        self._nodes: dict[str, set[str]] = {}  # node id -> models it hosts
        self._in_flight: dict[tuple[str, str], int] = {}  # (node id, model) -> this edge's requests there
        self._turns = itertools.count()
        self._warm: dict[str, str] = {}  # model -> the node chosen first last time (ties go to it: warm)
        self.decided = ""  # what the last `pick` went by (ReplicaSet.decided), for the edge's metrics

    # --- updates ---------------------------------------------------------------------------------------

    def put_node(self, node_id: str, replicas: Iterable[Replica]) -> None:
        """Replace everything known about one node with its latest report."""
        models = set()
        for replica in replicas:
            table = self._models.get(replica.model)
            if table is None:
                table = self._models[replica.model] = ReplicaSet()
            # What this edge has in flight there is still in flight, and the report may count it already.
            replica.own = replica.own_at_report = self._in_flight.get((replica.node_id, replica.model), 0)
            table.put(replica)
            models.add(replica.model)
        for gone in self._nodes.get(node_id, set()) - models:
            self._drop(gone, node_id)
        self._nodes[node_id] = models

    def remove_node(self, node_id: str) -> None:
        for model in self._nodes.pop(node_id, set()):
            self._drop(model, node_id)

    def replace(self, nodes: dict[str, list[Replica]]) -> None:
        """A full snapshot: what this edge has in flight is carried over to replicas that remain."""
        for node_id in set(self._nodes) - set(nodes):
            self.remove_node(node_id)
        for node_id, replicas in nodes.items():
            self.put_node(node_id, replicas)

    def _drop(self, model: str, node_id: str) -> None:
        table = self._models.get(model)
        if table is not None:
            table.remove(node_id)
            if not table.by_node:
                del self._models[model]

    # --- this edge's requests ----------------------------------------------------------------------------

    def acquire(self, replica: Replica) -> None:
        """Count one request of this edge on `replica` (the entry it was picked as, or an older one)."""
        key = (replica.node_id, replica.model)
        self._count(key, self._in_flight.get(key, 0) + 1)

    def release(self, replica: Replica) -> None:
        """The request counted by `acquire` has ended, on whichever entry is the replica's now."""
        key = (replica.node_id, replica.model)
        self._count(key, max(0, self._in_flight.get(key, 0) - 1))

    def _count(self, key: tuple[str, str], n: int) -> None:
        if n:
            self._in_flight[key] = n
        else:
            self._in_flight.pop(key, None)
        table = self._models.get(key[1])
        current = table.by_node.get(key[0]) if table is not None else None
        if table is not None and current is not None:
            current.own = n
            table.rescore(current.node_id)

    # --- reads -----------------------------------------------------------------------------------------

    def replicas(self, model: str) -> list[Replica]:
        table = self._models.get(model)
        return list(table.by_node.values()) if table is not None else []

    def models(self) -> set[str]:
        return set(self._models)

    def has_address(self, address: str) -> bool:
        """Whether any replica in the table is served at `address`."""
        return any(r.address == address for table in self._models.values() for r in table.by_node.values())

    def pick(
        self, model: str, user: str = "", prefix_hash: str = "", count: int = 4, slack: int = 2
    ) -> tuple[list[Replica], list[str]]:
        """Up to `count` ready replicas, best first, and (when there is none) why each replica is not
        ready. Choosing does not count the request: the caller acquires the replica it sends to."""
        table = self._models.get(model)
        if table is None:
            self.decided = ""
            return [], []
        chosen, reasons = table.choose(user, prefix_hash, count, next(self._turns), slack, self._warm.get(model, ""))
        self.decided = table.decided
        if chosen:
            self._warm[model] = chosen[0].node_id
        return chosen, reasons
