"""Which ready replica serves a request, best first: the one rule the edge and the control plane share.

The edge routes each request from its routing table (`edge.route_table`); the control plane's
`PickReplica` answers the few the edge cannot route itself (scale from zero, a model its table does not
know, no table yet). Both decide here, so the two cannot drift apart. Pure: no I/O, no protos, no clock.

The rule, written as placement is (`controlplane.placement`): a filter, scorers, then a preference.
  filter      only ready replicas are candidates; why each other one is not (`not_ready`) is what a
              client hears when none is ready.
  scorers     in order of precedence, smaller first (`score`): full (estimated load at or over its
              capacity), on a draining node, estimated load. Ties are spread by a rotation that moves
              with every request.
  preference  the affine replica goes first: requests sharing a long prompt prefix go to the replica
              that has it cached (else requests of the same OpenAI `user`), found on a consistent-hash
              ring, but only while it is not full, not draining and within `slack` requests of the least
              loaded candidate, so that a hot prefix never piles every request onto one busy replica.

Load estimate. A node reports running + queued requests per replica, which includes what every caller
has sent it; the caller also knows what it has sent there itself (`own`). The estimate is what the
others had there at the report plus the caller's own now:
    max(0, reported - own_at_report) + own
The edge counts its requests in flight, so several edges each add what they routed, reports correct the
drift, and with no reports the estimate still follows the edge's own traffic exactly. The control plane
counts what it routed since the node's last report (it does not see requests end).

Cost. A `ReplicaSet` keeps one model's candidates in buckets by score and orders only the buckets, so a
choice costs O(count + distinct scores), plus O(log n) for affinity, whatever the number of replicas. The
edge keeps one set per model and updates it as reports and its own requests change a replica's score;
the control plane builds one from its fleet view for each `PickReplica` (`choose`).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

Score = tuple[bool, bool, int]  # (full, draining, load): smaller is better
AFFINITY_REACH = 8  # replicas looked at clockwise from a key's point for a usable affine one


@dataclass(eq=False)
class Replica:
    """One replica of one model on one node, as the choice needs it."""

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
    own: int = 0  # requests the caller counts against it now (see the load estimate)
    own_at_report: int = 0  # `own` when the report was taken in
    load_progress: float | None = None  # while loading, the fraction loaded, when the engine can tell

    @property
    def load(self) -> int:
        return max(0, self.reported - self.own_at_report) + self.own


# --- the filter, the scorers, the preference ---------------------------------------------------------------


def not_ready(replica: Replica) -> str | None:
    """The filter: None for a candidate, else why the replica is not one."""
    if replica.ready:
        return None
    return f"{replica.node_id}: replica is {replica.state}" + (f": {replica.error}" if replica.error else "")


def score(replica: Replica) -> Score:
    """The scorers, most important first; smaller is better."""
    load = replica.load
    return (load >= replica.capacity, replica.draining, load)


def takes_affinity(replica: Replica, least: int, slack: int) -> bool | None:
    """The preference's condition for the affine replica: True to put it first, False to put nothing first
    (it is too busy: the request goes by load), None when it cannot serve at all (look further round)."""
    load = replica.load
    if not replica.ready or replica.draining or load >= replica.capacity:
        return None
    return load <= least + slack


def ring_point(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


# --- one model's replicas, kept ordered --------------------------------------------------------------------


class _Bucket:
    """Replicas of one score, sorted by node id (kept beside them, so that bisect compares strings in C)."""

    __slots__ = ("node_ids", "replicas")

    def __init__(self) -> None:
        self.node_ids: list[str] = []
        self.replicas: list[Replica] = []

    def add(self, replica: Replica) -> None:
        i = bisect.bisect_left(self.node_ids, replica.node_id)
        self.node_ids.insert(i, replica.node_id)
        self.replicas.insert(i, replica)

    def discard(self, node_id: str) -> None:
        i = bisect.bisect_left(self.node_ids, node_id)  # a set holds one replica per node: it is there
        del self.node_ids[i]
        del self.replicas[i]


class ReplicaSet:
    """The replicas of one model: all of them by node, the candidates in buckets by score, and the
    affinity ring (every replica's node on it, so that a replica that is briefly not ready keeps its keys)."""

    def __init__(self, replicas: Iterable[Replica] = ()) -> None:
        self.by_node: dict[str, Replica] = {}
        self._buckets: dict[Score, _Bucket] = {}
        self._scores: list[Score] = []  # the scores of non-empty buckets, sorted
        self._bucket_of: dict[str, Score] = {}  # node id -> the score of the bucket its replica is in
        self._ring: tuple[list[int], list[str]] | None = None  # points and node ids, by point
        # What the last `choose` went by, for the edge's metrics: prefix_affinity, user_affinity or
        # least_load; "" when no replica was a candidate.
        self.decided = ""
        for replica in replicas:
            self.put(replica)

    def put(self, replica: Replica) -> Replica | None:
        """Take in `replica` in place of the node's previous one, which is returned."""
        old = self.by_node.get(replica.node_id)
        if old is not None:
            self._unbucket(old)
        else:
            self._ring = None  # only membership moves the ring, not a new report
        self.by_node[replica.node_id] = replica
        self.rescore(replica.node_id)
        return old

    def remove(self, node_id: str) -> Replica | None:
        old = self.by_node.pop(node_id, None)
        if old is not None:
            self._unbucket(old)
            self._ring = None
        return old

    def rescore(self, node_id: str) -> None:
        """Move the node's replica to the bucket of its score now (after its load changed), or out of the
        buckets if it is no longer a candidate."""
        replica = self.by_node[node_id]
        if replica.ready:
            new = score(replica)
            if self._bucket_of.get(replica.node_id) != new:
                self._unbucket(replica)
                self._bucket(replica, new)
        else:
            self._unbucket(replica)

    def choose(
        self, user: str = "", prefix_hash: str = "", count: int = 4, turn: int = 0, slack: int = 2, warm: str = ""
    ) -> tuple[list[Replica], list[str]]:
        """Up to `count` candidates, best first, and (when there is none) why each replica is not one.
        Among the best ties, `warm` (the node the caller chose last) comes first when it is one of them:
        an engine that served the previous request answers sooner than one that sat idle (measured on
        llama.cpp with 2 replicas: 6-9 ms more to the first token when ties alternated, as fast as one
        replica when they stuck). Load still spreads the work: a replica with a request in flight scores
        worse. Other ties rotate with `turn`. Choosing counts nothing: the caller adds the request to the
        `own` of the replica it sends it to."""
        best = self._best(count, turn, warm)
        if not best:
            self.decided = ""
            return [], [reason for r in self.by_node.values() if (reason := not_ready(r)) is not None]
        least = best[0].load
        for key, why in ((prefix_hash, "prefix_affinity"), (user, "user_affinity")):
            if key:
                preferred = self._affine(key, least, slack)
                if preferred is not None:
                    self.decided = why
                    return [preferred, *[r for r in best if r is not preferred]][:count], []
        self.decided = "least_load"
        return best, []

    # --- buckets ---------------------------------------------------------------------------------------
    # A bucket holds the candidates of one score in node order, so that ties are broken the same way
    # whichever order reports and requests came in: the edge's long-lived set and the control plane's
    # set built for one request choose alike.

    def _bucket(self, replica: Replica, key: Score) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            bisect.insort(self._scores, key)
        bucket.add(replica)
        self._bucket_of[replica.node_id] = key

    def _unbucket(self, replica: Replica) -> None:
        key = self._bucket_of.pop(replica.node_id, None)
        if key is None:
            return
        bucket = self._buckets[key]
        bucket.discard(replica.node_id)
        if not bucket.replicas:
            del self._buckets[key]
            self._scores.pop(bisect.bisect_left(self._scores, key))

    def _best(self, count: int, turn: int, warm: str = "") -> list[Replica]:
        out: list[Replica] = []
        for key in self._scores:
            bucket = self._buckets[key]
            replicas = bucket.replicas
            n = len(replicas)
            start = turn % n  # the rotation that spreads ties
            if warm and not out:
                i = bisect.bisect_left(bucket.node_ids, warm)
                if i < n and bucket.node_ids[i] == warm:
                    start = i
            for i in range(min(n, count - len(out))):
                out.append(replicas[(start + i) % n])
            if len(out) >= count:
                break
        return out

    # --- affinity --------------------------------------------------------------------------------------

    def _affine(self, key: str, least: int, slack: int) -> Replica | None:
        if self._ring is None:
            ordered = sorted((ring_point(node_id), node_id) for node_id in self.by_node)
            self._ring = ([p for p, _ in ordered], [n for _, n in ordered])
        points, node_ids = self._ring
        start = bisect.bisect(points, ring_point(key)) % len(points)
        for step in range(min(len(points), AFFINITY_REACH)):  # the next usable replica clockwise
            replica = self.by_node[node_ids[(start + step) % len(points)]]
            verdict = takes_affinity(replica, least, slack)
            if verdict is not None:
                return replica if verdict else None
        return None


def choose(
    replicas: Iterable[Replica],
    user: str = "",
    prefix_hash: str = "",
    count: int = 4,
    turn: int = 0,
    slack: int = 2,
    warm: str = "",
) -> tuple[list[Replica], list[str]]:
    """The choice among `replicas` (all of one model, one per node) for one request, keeping nothing: for a
    caller that decides too rarely to keep a `ReplicaSet` current."""
    return ReplicaSet(replicas).choose(user, prefix_hash, count, turn, slack, warm)
