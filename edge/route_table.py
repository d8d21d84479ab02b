"""The edge's routing table: every replica of every model, and the choice of replica for one request.

The control plane publishes the table (`RoutingService.WatchRoutes`); the edge keeps its copy here and
routes from it with no round trip. If the control plane goes away the edge goes on routing from the last
table it had (and says since when it has heard nothing).

Only ready replicas are candidates (the others' states and errors are what a client hears when none is
ready). They are ordered:
  1. not full (estimated load under the replica's limits);
  2. not on a draining node;
  3. least estimated load, ties spread by rotation;
and first of all the affine replica: requests sharing a long prompt prefix go to the replica that has it
cached (else requests of the same OpenAI `user`), found on a consistent-hash ring, but only while it is
within `slack` requests of the least loaded replica and not full, so that a hot prefix never piles
every request onto one busy replica.

Load estimate. A node reports running + queued requests per replica, which includes what every edge has
sent it. This edge also knows exactly what it has in flight there now. The estimate is what the others
had there at the last report plus what this edge has now:
    max(0, reported - own_at_report) + own
so several edges each add what they routed, reports correct the drift, and with no reports (control
plane away) the estimate still follows this edge's own traffic exactly.

A decision costs O(count + distinct load levels) plus O(log n) for affinity, whatever the number of
replicas: replicas are kept in buckets by (full, draining, load), and only the buckets are ordered.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

Key = tuple[int, int, int]  # (full, draining, load): smaller is better


def ring_point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


@dataclass(eq=False)
class Replica:
    """One replica of one model on one node, as routing needs it."""

    node_id: str
    address: str
    model: str
    ready: bool
    state: str = "ready"  # pending, loading, ready, failed: for the reasons a client hears
    error: str = ""
    device: str = "cpu"
    capacity: int = 1  # running + queued requests it holds before it refuses more
    reported: int = 0  # running + queued at the node's last report
    draining: bool = False
    # Kept by the table:
    own: int = 0  # requests this edge has in flight on it now
    own_at_report: int = 0
    point: int = 0
    key: Key | None = field(default=None, repr=False)  # its bucket, while ready
    slot: int = field(default=-1, repr=False)  # its index in that bucket

    @property
    def load(self) -> int:
        return max(0, self.reported - self.own_at_report) + self.own

    def rank(self) -> Key:
        load = self.load
        return (int(load >= self.capacity), int(self.draining), load)


class _ModelReplicas:
    """The replicas of one model: all of them by node, the ready ones in ordered buckets, and the ring."""

    def __init__(self) -> None:
        self.by_node: dict[str, Replica] = {}
        self._buckets: dict[Key, list[Replica]] = {}
        self._keys: list[Key] = []  # sorted keys of non-empty buckets
        self._ring: tuple[list[int], list[str]] | None = None  # points and node ids, by point

    # --- buckets ---------------------------------------------------------------------------------------

    def _unbucket(self, replica: Replica) -> None:
        key = replica.key
        if key is None:
            return
        bucket = self._buckets[key]
        last = bucket.pop()
        if last is not replica:
            bucket[replica.slot] = last
            last.slot = replica.slot
        if not bucket:
            del self._buckets[key]
            self._keys.pop(bisect.bisect_left(self._keys, key))
        replica.key, replica.slot = None, -1

    def _bucket(self, replica: Replica) -> None:
        key = replica.rank()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = []
            bisect.insort(self._keys, key)
        replica.key, replica.slot = key, len(bucket)
        bucket.append(replica)

    def rekey(self, replica: Replica) -> None:
        if replica.ready:
            if replica.key != replica.rank():
                self._unbucket(replica)
                self._bucket(replica)
        else:
            self._unbucket(replica)

    # --- membership ------------------------------------------------------------------------------------

    def put(self, replica: Replica) -> None:
        old = self.by_node.get(replica.node_id)
        if old is not None:
            self._unbucket(old)
            replica.own = old.own  # what this edge has in flight there is still in flight
        replica.own_at_report = replica.own
        replica.point = old.point if old is not None else ring_point(replica.node_id)
        self.by_node[replica.node_id] = replica
        self.rekey(replica)
        if old is None:
            self._ring = None  # only membership moves the ring, not a new report

    def remove(self, node_id: str) -> Replica | None:
        old = self.by_node.pop(node_id, None)
        if old is not None:
            self._unbucket(old)
            self._ring = None
        return old

    # --- choosing --------------------------------------------------------------------------------------

    def best(self, count: int, turn: int) -> list[Replica]:
        out: list[Replica] = []
        for key in self._keys:
            bucket = self._buckets[key]
            n = len(bucket)
            start = turn % n
            for i in range(min(n, count - len(out))):
                out.append(bucket[(start + i) % n])
            if len(out) >= count:
                break
        return out

    def ring(self) -> tuple[list[int], list[str]]:
        if self._ring is None:
            ordered = sorted(self.by_node.values(), key=lambda r: r.point)
            self._ring = ([r.point for r in ordered], [r.node_id for r in ordered])
        return self._ring


class RouteTable:
    """Replicas by model. Written by the routing-table stream (`put_node`, `remove_node`, `replace`) and
    by this edge's own requests (`acquire`, `release`); read by `pick`."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelReplicas] = {}
        self._nodes: dict[str, set[str]] = {}  # node id -> models it hosts
        self._turn = 0

    # --- updates ---------------------------------------------------------------------------------------

    def put_node(self, node_id: str, replicas: Iterable[Replica]) -> None:
        """Replace everything known about one node with its latest report."""
        models = set()
        for replica in replicas:
            self._models.setdefault(replica.model, _ModelReplicas()).put(replica)
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
        replica.own += 1
        self._rekey(replica)

    def release(self, replica: Replica) -> None:
        replica.own = max(0, replica.own - 1)
        self._rekey(replica)

    def _rekey(self, replica: Replica) -> None:
        table = self._models.get(replica.model)
        if table is not None and table.by_node.get(replica.node_id) is replica:
            table.rekey(replica)

    # --- reads -----------------------------------------------------------------------------------------

    def replicas(self, model: str) -> list[Replica]:
        table = self._models.get(model)
        return list(table.by_node.values()) if table is not None else []

    def models(self) -> set[str]:
        return set(self._models)

    def pick(
        self, model: str, user: str = "", prefix_hash: str = "", count: int = 4, slack: int = 2
    ) -> tuple[list[Replica], list[str]]:
        """Up to `count` ready replicas, best first, and (when there is none) why each replica is not
        ready. Choosing does not count the request: the caller acquires the replica it sends to."""
        table = self._models.get(model)
        if table is None:
            return [], []
        self._turn += 1
        best = table.best(count, self._turn)
        if not best:
            return [], [
                f"{r.node_id}: replica is {r.state}" + (f": {r.error}" if r.error else "")
                for r in table.by_node.values()
            ]
        least = best[0].load
        for key in (prefix_hash, user):
            if key:
                preferred = self._affine(table, key, least, slack)
                if preferred is not None:
                    return [preferred, *[r for r in best if r is not preferred]][:count], []
        return best, []

    @staticmethod
    def _affine(table: _ModelReplicas, key: str, least: int, slack: int) -> Replica | None:
        points, node_ids = table.ring()
        start = bisect.bisect(points, ring_point(key)) % len(points)
        for step in range(min(len(points), 8)):  # the next usable replica clockwise, looking a little way
            replica = table.by_node[node_ids[(start + step) % len(points)]]
            load = replica.load
            if replica.ready and not replica.draining and load < replica.capacity:
                return replica if load <= least + slack else None
        return None
