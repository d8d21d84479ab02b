"""The control plane's core in-process on a real etcd: the store, fleet view, reconciler, registry and
router are the control plane's own; the nodes are records written through the registry, as an agent's
RegisterNode and Heartbeat calls write them, so the test decides exactly when each replica is loading or
ready.

What is checked: a request counts against the replica it is routed to, once, and against nothing else,
however the fleet changes while it waits for a replica to scale from zero (issue 10, item 7), and
whenever its caller goes away; and the background loops stop when they are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from controlplane import registry as registry_module
from controlplane.admin import validate_deployment
from controlplane.etcd_store import EtcdStore
from controlplane.fleet import FleetView
from controlplane.placement import GiB, PlacementPolicy
from controlplane.reconciler import Reconciler
from controlplane.registry import NodeRegistry
from controlplane.router import Router
from controlplane.store import StoreEvent
from fleetlm.controlplane.v1 import node_pb2, registry_pb2
from mesh.errors import ErrorCode, FleetError
from tests.cluster import Cluster

pytestmark = [pytest.mark.cluster]

PATH = "/models/smol.gguf"
MODEL = "lazy"
PENDING, LOADING, READY = node_pb2.REPLICA_STATE_PENDING, node_pb2.REPLICA_STATE_LOADING, node_pb2.REPLICA_STATE_READY
# Bounds for things that take milliseconds here; generous because other test runs share the 2 cores.
SETTLE = 30.0


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = Cluster(tmp_path_factory.mktemp("router"))
    try:
        yield cluster.start_etcd()
    finally:
        cluster.close()


@dataclass
class ControlPlane:
    fleet: FleetView
    reconciler: Reconciler
    router: Router
    registry: NodeRegistry
    leases: dict[str, int]
    store: EtcdStore | None = None

    async def settle(self, predicate: Any, what: str) -> Any:
        found = await self.fleet.wait_for(predicate, SETTLE)
        assert found, f"the fleet view never showed {what}"
        return found

    async def add_node(self, node_id: str) -> None:
        inventory = node_pb2.Inventory(
            ram=node_pb2.Memory(total_bytes=16 * GiB, free_bytes=12 * GiB),
            model_files=[node_pb2.ModelFile(path=PATH, size_bytes=100_000_000, format="gguf")],
        )
        request = registry_pb2.RegisterNodeRequest(
            node_id=node_id, inference_address=f"{node_id}.test:50061", inventory=inventory
        )
        reply = await self.registry.RegisterNode(request, None)  # type: ignore[arg-type]
        self.leases[node_id] = reply.lease_id
        await self.settle(lambda: node_id in self.fleet.nodes, f"node {node_id}")

    async def report(self, node_id: str, state: int | None, running: int = 0) -> None:
        """A heartbeat from the node: its replica of MODEL in `state` (None: it has none)."""
        replicas = []
        if state is not None:
            spec = self.fleet.deployments[MODEL].spec
            replicas = [node_pb2.Replica(model=spec, state=state, assigned=True, running_requests=running)]  # type: ignore[arg-type]
        request = registry_pb2.HeartbeatRequest(node_id=node_id, lease_id=self.leases[node_id], replicas=replicas)
        await self.registry.Heartbeat(request, None)  # type: ignore[arg-type]
        await self.settle(lambda: list(self.fleet.nodes[node_id].replicas) == replicas, f"{node_id}'s report")

    async def deploy(self, max_replicas: int = 2) -> None:
        spec = node_pb2.ModelSpec(name=MODEL, path=PATH, format="gguf")
        await self.reconciler.save_deployment(
            validate_deployment(node_pb2.Deployment(spec=spec, min_replicas=0, max_replicas=max_replicas))
        )
        await self.settle(lambda: MODEL in self.fleet.deployments, "the deployment")

    def assigned_nodes(self) -> list[str]:
        return sorted(a.node_id for a in self.fleet.assignments.values() if a.model.name == MODEL)

    def in_flight(self) -> dict[str, int]:
        """Requests counted against each replica since its node's last report."""
        return {r.node_id: r.own for r in self.router.replicas(MODEL)}


def test_a_deployments_durations_out_of_range_are_refused() -> None:
    """A negative or out-of-range idle_timeout or startup_timeout is a 400 naming the field: the reconciler
    and the node read them with ToTimedelta, which overflows past Duration's range."""
    for seconds in (-1, 2**62):
        spec = node_pb2.ModelSpec(name=MODEL, path=PATH, format="gguf")
        idle = node_pb2.Deployment(spec=spec)
        idle.idle_timeout.seconds = seconds
        startup = node_pb2.Deployment(spec=spec)
        startup.spec.startup_timeout.seconds = seconds
        for deployment, field in ((idle, "deployment.idle_timeout"), (startup, "deployment.spec.startup_timeout")):
            with pytest.raises(FleetError) as refused:
                validate_deployment(deployment)
            assert refused.value.code == ErrorCode.INVALID_REQUEST and refused.value.param == field
    fine = node_pb2.Deployment(spec=node_pb2.ModelSpec(name=MODEL, path=PATH, format="gguf"))
    fine.idle_timeout.seconds = 600
    assert validate_deployment(fine).idle_timeout.seconds == 600


def test_a_deployment_cannot_offload_to_itself() -> None:
    spec = node_pb2.ModelSpec(name=MODEL, path=PATH, format="gguf")
    with pytest.raises(FleetError) as refused:
        validate_deployment(node_pb2.Deployment(spec=spec, cpu_offload_model=MODEL))
    assert refused.value.param == "deployment.cpu_offload_model"
    # Another deployment's name is taken, even one not made yet (deployments come in any order).
    assert validate_deployment(node_pb2.Deployment(spec=spec, cpu_offload_model="later-cpu")).cpu_offload_model


@contextlib.asynccontextmanager
async def control_plane(
    etcd_url: str, lease_ttl: int = 60, prefix: str = "", startup_grace: float = 0
) -> AsyncIterator[ControlPlane]:
    """A control plane's core on a fresh cluster state (or that under `prefix`: one that starts again)."""
    store = EtcdStore(etcd_url, prefix or f"/router-test-{uuid.uuid4().hex[:8]}")
    await store.connect()
    fleet = FleetView(store)
    reconciler = Reconciler(store, fleet, PlacementPolicy(), interval_seconds=0.5)
    router = Router(fleet, reconciler)
    registry = NodeRegistry(store, fleet, lease_ttl_seconds=lease_ttl)
    try:
        async with asyncio.TaskGroup() as tasks:
            running = [
                tasks.create_task(fleet.run()),
                tasks.create_task(fleet.settle(startup_grace)),
                tasks.create_task(reconciler.run()),
            ]
            await asyncio.wait_for(fleet.synced.wait(), SETTLE)
            try:
                yield ControlPlane(fleet, reconciler, router, registry, {}, store)
            finally:
                for task in running:
                    task.cancel()
    finally:
        await store.close()


async def test_a_request_that_waits_through_fleet_changes_counts_once_against_its_replica(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp:
        await cp.add_node("n1")
        await cp.add_node("n2")
        await cp.deploy()
        waiting = asyncio.create_task(cp.router.route(MODEL, wait_seconds=120))
        [chosen] = await cp.settle(cp.assigned_nodes, "a replica placed from zero")
        [other] = {"n1", "n2"} - {chosen}
        # The fleet changes several times while the request waits; each change re-checks its wait.
        for state in (PENDING, LOADING, LOADING):
            await cp.report(chosen, state)
            await cp.report(other, None)
        assert not waiting.done()
        await cp.report(chosen, READY)
        route = await asyncio.wait_for(waiting, SETTLE)
        assert route.replicas[0].node_id == chosen
        assert cp.in_flight() == {chosen: 1}

        # A second replica: the first one carries exactly the one request routed to it, so the next
        # request goes to the idle newcomer, and then they take turns.
        await cp.reconciler.save_deployment(_scaled(cp.fleet.deployments[MODEL], 2))
        await cp.reconciler.reconcile()
        assert cp.assigned_nodes() == ["n1", "n2"]
        await cp.report(other, READY)
        assert (await cp.router.route(MODEL)).replicas[0].node_id == other
        for _ in range(4):
            await cp.router.route(MODEL)
        assert cp.in_flight() == {chosen: 3, other: 3}


async def test_a_replica_that_becomes_ready_while_the_request_places_it_gets_the_request_once(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp:
        await cp.add_node("n1")
        await cp.deploy(max_replicas=1)
        # A request that does not wait (a client's PickReplica with no wait_for_ready, or an edge run with
        # --scale-from-zero-timeout 0) places a replica and hears why it cannot be served yet.
        with pytest.raises(FleetError) as first:
            await cp.router.route(MODEL)
        assert first.value.code == ErrorCode.MODEL_UNAVAILABLE and first.value.retry_after_seconds
        assert cp.assigned_nodes() == ["n1"]
        await cp.report("n1", LOADING)
        # The next request finds no ready replica, and its scale-from-zero step waits for a reconcile pass
        # in progress (the test holds the pass's lock); meanwhile the node reports the replica ready.
        async with cp.reconciler._lock:
            second = asyncio.create_task(cp.router.route(MODEL))
            await asyncio.sleep(0)  # the request has picked (no replica ready) and waits for the lock
            assert not second.done()
            await cp.report("n1", READY)
        route = await asyncio.wait_for(second, SETTLE)
        # It is served by that replica, which counts it once (routed, not just looked at for a reason).
        assert [v.node_id for v in route.replicas] == ["n1"]
        assert cp.in_flight() == {"n1": 1}


async def test_a_request_whose_caller_goes_away_as_its_replica_becomes_ready_is_not_routed(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp:
        await cp.add_node("n1")
        await cp.deploy(max_replicas=1)
        waiting = asyncio.create_task(cp.router.route(MODEL, wait_seconds=120))
        await cp.settle(cp.assigned_nodes, "a replica placed from zero")
        await cp.report("n1", LOADING)
        assert not waiting.done()
        # The caller (the edge, for a client that disconnected) cancels the wait in the same turn of the
        # event loop in which the report that the replica is ready wakes it.
        loop = asyncio.get_running_loop()

        def caller_leaves(event: StoreEvent | None) -> None:
            node = cp.fleet.nodes.get(event.key) if event is not None and event.kind == "node" else None
            if node is not None and any(r.state == READY for r in node.replicas):
                loop.call_soon(waiting.cancel)

        cp.fleet.listeners.append(caller_leaves)
        await cp.report("n1", READY)
        await asyncio.wait([waiting], timeout=SETTLE)
        assert waiting.cancelled()
        assert cp.in_flight() == {"n1": 0}  # no request was routed for a caller that is gone


async def test_the_reconciler_stops_when_cancelled_as_it_is_woken(etcd_url: str) -> None:
    store = EtcdStore(etcd_url, f"/router-test-{uuid.uuid4().hex[:8]}")
    await store.connect()
    try:
        fleet = FleetView(store)
        await fleet.resync()
        fleet.settled.set()
        reconciler = Reconciler(store, fleet, PlacementPolicy(), interval_seconds=600)
        loop_task = asyncio.create_task(reconciler.run())
        for _ in range(3):
            await asyncio.sleep(0)  # it runs up to its wait for the next change
        assert not loop_task.done()
        reconciler.kick()  # a change, and the control plane's shutdown, at the same moment
        loop_task.cancel()
        await asyncio.wait([loop_task], timeout=SETTLE)
        stopped = loop_task.cancelled()
        loop_task.cancel()  # alone this time (it always works), so that a failure leaves no loop running
        await asyncio.wait([loop_task], timeout=SETTLE)
        assert stopped
    finally:
        await store.close()


def _scaled(deployment: node_pb2.Deployment, replicas: int) -> node_pb2.Deployment:
    out = node_pb2.Deployment()
    out.CopyFrom(deployment)
    out.replicas = replicas
    return out


async def test_assignments_are_resent_on_a_fixed_period_however_busy_the_fleet_is(
    etcd_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node whose replica stopped on a permanent error loads it again when its assignment is re-delivered;
    # that must happen every RESEND_SECONDS even while other nodes report many times a second (each report
    # is a fleet event; the resend timer used to start over at every one, so it never fired).
    monkeypatch.setattr(registry_module, "RESEND_SECONDS", 0.5)
    async with control_plane(etcd_url) as cp:
        await cp.add_node("n1")
        await cp.add_node("n2")
        await cp.deploy(max_replicas=1)
        await cp.reconciler.ensure_one(MODEL)
        [owner] = await cp.settle(cp.assigned_nodes, "a replica placed")
        [other] = {"n1", "n2"} - {owner}
        stream = cp.registry.WatchAssignments(registry_pb2.WatchAssignmentsRequest(node_id=owner), None)  # type: ignore[arg-type]
        first = await asyncio.wait_for(anext(stream), SETTLE)
        assert [a.model.name for a in first.assignments] == [MODEL]
        received = 0

        async def read() -> None:
            nonlocal received
            async for _ in stream:
                received += 1

        reader = asyncio.create_task(read())
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.5
            while loop.time() < end:  # the other node reports ten times a second
                await cp.report(other, None)
                await asyncio.sleep(0.1)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await stream.aclose()
        assert received >= 2, f"resent {received} times in 2.5 s with a 0.5 s period"


class LoadStream:
    """What a live agent sends: a ReportLoad stream into the registry, reporting every 0.2 s (as under load),
    and a heartbeat every second with the replicas the view holds for it, until closed."""

    def __init__(self, cp: ControlPlane, node_id: str) -> None:
        self._closed = asyncio.Event()
        self.paused = False  # the stream stays open, but nothing comes through (a node cut off)
        self._cp, self._node_id = cp, node_id
        self.task = asyncio.create_task(cp.registry.ReportLoad(self._reports(), None))  # type: ignore[arg-type]
        self.heartbeats = asyncio.create_task(self._heartbeats())

    async def _reports(self) -> AsyncIterator[registry_pb2.ReportLoadRequest]:
        while not self._closed.is_set():
            if not self.paused:
                yield registry_pb2.ReportLoadRequest(node_id=self._node_id, lease_id=self._cp.leases[self._node_id])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await self._closed.wait()

    async def _heartbeats(self) -> None:
        while not self._closed.is_set():
            node = self._cp.fleet.nodes.get(self._node_id)
            if not self.paused and node is not None:
                request = registry_pb2.HeartbeatRequest(
                    node_id=self._node_id, lease_id=self._cp.leases[self._node_id], replicas=node.replicas
                )
                with contextlib.suppress(FleetError):  # LEASE_EXPIRED once the test has revoked it
                    await self._cp.registry.Heartbeat(request, None)  # type: ignore[arg-type]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._closed.wait()

    def stop_heartbeats(self) -> None:
        self.heartbeats.cancel()

    async def close(self) -> None:
        self._closed.set()
        self.heartbeats.cancel()
        await asyncio.gather(self.task, self.heartbeats, return_exceptions=True)


async def poll(predicate: Any, what: str) -> None:
    """Wait for a predicate on what the view does not announce (load): checked every 50 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE
    while not predicate():
        assert loop.time() < deadline, f"never saw {what}"
        await asyncio.sleep(0.05)


LAPSE_TTL = 4  # lease TTL of the lapse tests: a node heard within 2 s is kept for 4 s after its lease goes


async def test_a_node_whose_lease_lapses_while_it_reports_stays_in_the_fleet_until_it_registers_again(
    etcd_url: str,
) -> None:
    # etcd frozen past the TTL (or the control plane unable to reach it) expires every lease when it comes
    # back, while every node is serving and streaming its load: that is not the nodes leaving. Before, the
    # view dropped them all, the routing table emptied (requests: 'no live nodes') and the reconciler
    # unassigned every replica.
    async with control_plane(etcd_url, lease_ttl=LAPSE_TTL) as cp:
        await cp.add_node("n1")
        await cp.deploy(max_replicas=1)
        await cp.reconciler.ensure_one(MODEL)
        await cp.settle(cp.assigned_nodes, "a replica placed")
        await cp.report("n1", READY)
        stream = LoadStream(cp, "n1")
        try:
            await poll(lambda: cp.fleet.load.alive("n1", 1.0), "n1's load stream")
            removed: list[str] = []
            cp.fleet.listeners.append(
                lambda e: removed.append(e.key) if e is not None and e.kind == "node" and e.value is None else None
            )
            stream.stop_heartbeats()  # the lease can no longer be renewed (etcd frozen)...
            await cp.fleet._store.revoke_lease(cp.leases["n1"])  # ...and etcd expires it when it answers again
            await poll(lambda: "n1" in cp.fleet.lapsed, "n1's lapsed lease")
            await cp.reconciler.reconcile()
            assert "n1" in cp.fleet.nodes and cp.assigned_nodes() == ["n1"] and removed == []
            assert [r.node_id for r in (await cp.router.route(MODEL)).replicas] == ["n1"]
            # Its next heartbeat is told that its lease is gone; it registers again with its replica.
            with pytest.raises(FleetError) as expired:
                await cp.registry.Heartbeat(
                    registry_pb2.HeartbeatRequest(node_id="n1", lease_id=cp.leases["n1"]),
                    None,  # type: ignore[arg-type]
                )
            assert expired.value.code == ErrorCode.LEASE_EXPIRED
            old_lease = cp.leases["n1"]
            await cp.add_node("n1")
            await cp.settle(lambda: cp.fleet.nodes["n1"].lease_id != old_lease, "n1 under its new lease")
            assert [r.state for r in cp.fleet.nodes["n1"].replicas] == []  # add_node registers with none
            await cp.report("n1", READY)
            assert "n1" not in cp.fleet.lapsed and cp.assigned_nodes() == ["n1"] and removed == []
        finally:
            await stream.close()


async def _a_node_serving_then_the_control_plane_stopped(etcd_url: str, prefix: str) -> int:
    """n1 registered with a ready replica under a control plane that then stops; n1's lease (returned) is
    still alive: its heartbeats fail while no control plane runs."""
    async with control_plane(etcd_url, lease_ttl=LAPSE_TTL, prefix=prefix) as before:
        await before.add_node("n1")
        await before.deploy(max_replicas=1)
        await before.reconciler.ensure_one(MODEL)
        await before.settle(before.assigned_nodes, "a replica placed")
        await before.report("n1", READY)
        return before.leases["n1"]


STARTUP_GRACE = LAPSE_TTL + 5  # the control plane's default: lease TTL + 5 s


async def test_a_lease_that_lapses_as_a_restarted_control_plane_starts_is_no_node_leaving(etcd_url: str) -> None:
    """An operator restarts the only control plane: the nodes' leases are alive when the new one reads their
    records and lapse a moment later, before the nodes have found it. The QA pass saw every replica removed
    ("node is gone") and placed again on whichever node came back first."""
    prefix = f"/router-test-{uuid.uuid4().hex[:8]}"
    lease = await _a_node_serving_then_the_control_plane_stopped(etcd_url, prefix)
    async with control_plane(etcd_url, lease_ttl=LAPSE_TTL, prefix=prefix, startup_grace=STARTUP_GRACE) as after:
        await after.settle(lambda: "n1" in after.fleet.nodes and after.assigned_nodes(), "n1 and its replica read")
        removed: list[str] = []
        after.fleet.listeners.append(
            lambda e: removed.append(e.key) if e is not None and e.kind == "node" and e.value is None else None
        )
        await after.fleet._store.revoke_lease(lease)  # it lapses, before n1 has heartbeated here
        await poll(lambda: "n1" in after.fleet.lapsed, "n1's lapsed lease")
        await after.reconciler.reconcile()
        assert "n1" in after.fleet.nodes and after.assigned_nodes() == ["n1"] and removed == []
        assert [r.node_id for r in (await after.router.route(MODEL)).replicas] == ["n1"]
        await asyncio.sleep(LAPSE_TTL + 0.5)  # past what a node heard here would be kept for
        await after.fleet.expire_lapsed()
        assert "n1" in after.fleet.nodes and removed == []
        # Its heartbeat here is told that its lease is gone; it registers again with its replica.
        await after.add_node("n1")
        await after.report("n1", READY)
        assert "n1" not in after.fleet.lapsed and after.assigned_nodes() == ["n1"] and removed == []


async def test_a_node_whose_lease_lapses_as_the_control_plane_starts_and_never_returns_leaves_after_the_grace(
    etcd_url: str,
) -> None:
    prefix = f"/router-test-{uuid.uuid4().hex[:8]}"
    lease = await _a_node_serving_then_the_control_plane_stopped(etcd_url, prefix)
    async with control_plane(etcd_url, lease_ttl=LAPSE_TTL, prefix=prefix, startup_grace=STARTUP_GRACE) as after:
        await after.settle(lambda: "n1" in after.fleet.nodes, "n1's record read")
        loop = asyncio.get_running_loop()
        revoked_at = loop.time()
        await after.fleet._store.revoke_lease(lease)
        await poll(lambda: "n1" in after.fleet.lapsed, "n1's lapsed lease")
        await after.settle(lambda: "n1" not in after.fleet.nodes, "n1 gone")
        assert STARTUP_GRACE - 0.5 <= loop.time() - revoked_at <= STARTUP_GRACE + 5


async def test_a_lapsed_node_that_does_not_register_again_leaves_after_the_ttl(etcd_url: str) -> None:
    async with control_plane(etcd_url, lease_ttl=LAPSE_TTL) as cp:
        await cp.add_node("n1")
        stream = LoadStream(cp, "n1")
        try:
            await poll(lambda: cp.fleet.load.alive("n1", 1.0), "n1's load stream")
            loop = asyncio.get_running_loop()
            revoked_at = loop.time()
            stream.stop_heartbeats()
            await cp.fleet._store.revoke_lease(cp.leases["n1"])
            await poll(lambda: "n1" in cp.fleet.lapsed, "n1's lapsed lease")
            await cp.settle(lambda: "n1" not in cp.fleet.nodes, "n1 gone")
            assert loop.time() - revoked_at >= LAPSE_TTL - 0.5  # kept for the TTL, though still reporting
        finally:
            await stream.close()


@pytest.mark.parametrize("how", ["stream closed", "deregistered", "not heard lately"])
async def test_a_node_that_left_is_not_kept_as_lapsed(etcd_url: str, how: str) -> None:
    async with control_plane(etcd_url, lease_ttl=LAPSE_TTL) as cp:
        await cp.add_node("n1")
        stream = LoadStream(cp, "n1")
        try:
            await poll(lambda: cp.fleet.load.alive("n1", 1.0), "n1's load stream")
            stream.stop_heartbeats()
            if how == "stream closed":  # a stopped or killed agent: its stream ends, then its lease
                await stream.close()
                await cp.fleet._store.revoke_lease(cp.leases["n1"])
            elif how == "deregistered":  # its streams may still be open here when another control plane
                # (or this one) takes its deregistration
                await cp.registry.DeregisterNode(
                    registry_pb2.DeregisterNodeRequest(node_id="n1", lease_id=cp.leases["n1"]),
                    None,  # type: ignore[arg-type]
                )
            else:  # cut off: the stream is open, but nothing has come through it for more than TTL/2
                stream.paused = True
                await asyncio.sleep(LAPSE_TTL / 2 + 0.5)
                await cp.fleet._store.revoke_lease(cp.leases["n1"])
            await cp.settle(lambda: "n1" not in cp.fleet.nodes, "n1 gone")
            assert "n1" not in cp.fleet.lapsed
        finally:
            await stream.close()


async def test_a_change_the_watch_brings_during_a_full_resync_is_not_rolled_back(etcd_url: str) -> None:
    """A resync reads every record, then installs what it read. A deployment written while those reads were
    in flight, whose watch event came before the install, was rolled back by it until the next resync, 30 s
    later (the project's CI saw a deployment missing from the edges' routing table that long). The resync's
    reads are held here, on a real etcd, while the deployment is written and its event delivered."""
    store = EtcdStore(etcd_url, f"/router-test-{uuid.uuid4().hex[:8]}")
    await store.connect()
    fleet = FleetView(store, resync_interval_seconds=600)
    following = asyncio.create_task(fleet.run())
    try:
        await asyncio.wait_for(fleet.synced.wait(), SETTLE)
        read, release = asyncio.Event(), asyncio.Event()
        listed = store.list

        async def held(kind: str) -> list[Any]:
            records = await listed(kind)  # read now: before the deployment is written
            read.set()
            await release.wait()
            return records

        store.list = held  # type: ignore[method-assign]
        resync = asyncio.create_task(fleet.resync())
        await asyncio.wait_for(read.wait(), SETTLE)
        spec = node_pb2.ModelSpec(name=MODEL, path=PATH, format="gguf")
        await store.put("deployment", node_pb2.Deployment(spec=spec, min_replicas=0, max_replicas=1))
        await asyncio.sleep(0.5)  # its watch event arrives meanwhile (and, fixed, waits for the resync)
        release.set()
        await asyncio.wait_for(resync, SETTLE)
        store.list = listed  # type: ignore[method-assign]
        deadline = asyncio.get_running_loop().time() + 5
        while MODEL not in fleet.deployments and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert MODEL in fleet.deployments, "the resync rolled back a deployment the watch had brought"
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await store.close()
