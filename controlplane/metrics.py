"""The control plane's Prometheus metrics, served on its metrics port (`--metrics-listen`, mesh.metrics).

Counted where the event happens, in module-level series (one control plane per process):
  placement_seconds                   one placement decision (controlplane.placement.place)
  placement_failures_total{reason}    format (no node could ever run it), capacity (none can now), no_nodes
  reconcile_passes_total              passes of the reconciler (on the leader only)
  etcd_request_seconds{op}, etcd_errors_total{op}   every etcd call of the store, by operation
Read from the fleet view and the election when scraped (`registry`), so they cost nothing between scrapes:
  nodes{state}                        live nodes by scheduling state (active, cordoned, draining), and
                                      `missing`: nodes that hold assignments but have no live record
  replicas{model,state}               replicas the nodes report, by state (pending, loading, ready, failed)
  deployment_replicas{model}          replicas each deployment asks for
  is_leader                           1 on the control plane that leads (always 1 when it runs alone)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetlm.controlplane.v1 import node_pb2
from mesh.metrics import FAST_BUCKETS, PREFIX, new_registry

if TYPE_CHECKING:
    from controlplane.fleet import FleetView
    from controlplane.leader import Leadership

P = f"{PREFIX}_controlplane_"

# Not in any registry of their own: each control plane's `registry` serves them (a process may build several).
PLACEMENT_SECONDS = Histogram(
    P + "placement_seconds", "one placement decision over the fleet's nodes", buckets=FAST_BUCKETS, registry=None
)
PLACEMENT_FAILURES = Counter(
    P + "placement_failures",
    "placements that found no node: format (no node could ever run it), capacity (none can now), no_nodes",
    ["reason"],
    registry=None,
)
RECONCILE_PASSES = Counter(P + "reconcile_passes", "passes of the reconciler (the leader's)", registry=None)
ETCD_SECONDS = Histogram(
    P + "etcd_request_seconds", "etcd calls of the store, by operation", ["op"], buckets=FAST_BUCKETS, registry=None
)
ETCD_ERRORS = Counter(P + "etcd_errors", "etcd calls that failed, by operation", ["op"], registry=None)
_COUNTED = (PLACEMENT_SECONDS, PLACEMENT_FAILURES, RECONCILE_PASSES, ETCD_SECONDS, ETCD_ERRORS)


@contextlib.contextmanager
def etcd_call(op: str, refused: type[BaseException] | None = None) -> Iterator[None]:
    """Time one etcd call; an exception counts as an error of `op` (but `refused`: a fenced transaction that
    etcd answered, which is not etcd failing). `op`'s error count is exported from its first call, at 0, so
    that a rate over it sees its first error too (Prometheus takes a new series' first sample as its start)."""
    errors = ETCD_ERRORS.labels(op)
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        if refused is None or not isinstance(exc, refused):
            errors.inc()
        raise
    finally:
        ETCD_SECONDS.labels(op).observe(time.perf_counter() - started)


def _state(state: int) -> str:
    if state not in node_pb2.ReplicaState.values():
        return "unknown"
    return node_pb2.ReplicaState.Name(state).removeprefix("REPLICA_STATE_").lower()  # type: ignore[arg-type]


_SCHEDULING: dict[int, str] = {
    node_pb2.SCHEDULING_UNSPECIFIED: "active",
    node_pb2.SCHEDULING_ACTIVE: "active",
    node_pb2.SCHEDULING_CORDONED: "cordoned",
    node_pb2.SCHEDULING_DRAINING: "draining",
}


class _FleetCollector(Collector):
    """Nodes, replicas and the leadership, read from the fleet view when scraped (on the metrics port's
    thread: the view's tables are copied before they are iterated)."""

    def __init__(self, fleet: FleetView, leadership: Leadership | None) -> None:
        self._fleet = fleet
        self._leadership = leadership

    def collect(self) -> Iterable[Metric]:
        fleet = self._fleet
        nodes = list(fleet.nodes.values())
        by_state = dict.fromkeys(("active", "cordoned", "draining"), 0)
        replicas: dict[tuple[str, str], int] = {}
        for node in nodes:
            by_state[_SCHEDULING.get(fleet.scheduling(node.node_id), "active")] += 1
            for replica in node.replicas:
                key = (replica.model.name, _state(replica.state))
                replicas[key] = replicas.get(key, 0) + 1
        live = {n.node_id for n in nodes}
        missing = {a.node_id for a in list(fleet.assignments.values())} - live
        family = GaugeMetricFamily(P + "nodes", "nodes by state", labels=["state"])
        for state, count in [*by_state.items(), ("missing", len(missing))]:
            family.add_metric([state], count)
        yield family
        family = GaugeMetricFamily(P + "replicas", "replicas the nodes report, by state", labels=["model", "state"])
        for (model, state), count in sorted(replicas.items()):
            family.add_metric([model, state], count)
        yield family
        family = GaugeMetricFamily(P + "deployment_replicas", "replicas a deployment asks for", labels=["model"])
        for deployment in list(fleet.deployments.values()):
            family.add_metric([deployment.spec.name], deployment.replicas)
        yield family
        leading = self._leadership is None or self._leadership.is_leader
        yield GaugeMetricFamily(P + "is_leader", "1 on the control plane that leads", value=float(leading))


class _Counted(Collector):
    def collect(self) -> Iterable[Metric]:
        for metric in _COUNTED:
            yield from metric.collect()


def registry(fleet: FleetView, leadership: Leadership | None) -> CollectorRegistry:
    """What one control plane's metrics port serves."""
    registry = new_registry()
    registry.register(_Counted())
    registry.register(_FleetCollector(fleet, leadership))
    return registry
