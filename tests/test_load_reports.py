"""Load is not cluster state (issue 11, item 2), on a real etcd with the control plane's core in-process.

A heartbeat carries the node's replicas and load. Only a change to the durable part (a replica's state,
error, device; a replica appearing or going) is written to etcd; a load-only report only refreshes the
lease. Writes are counted by a real etcd watcher of the node's key, independent of the control plane. The
load still reaches everyone who uses it: the fleet view (also across a full resync from etcd, whose record
holds older figures), the reconciler's idle unload, and the routing table published to edges.

Load also travels on a stream of its own (`ReportLoad`, over a real gRPC server and channel here), to every
control plane, not only to the one the node heartbeats to; a report that is not the node's own
registration's is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aetcd
import grpc
import httpx
import pytest
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from controlplane.admin import validate_deployment
from controlplane.etcd_store import EtcdStore
from controlplane.fleet import FleetView
from controlplane.placement import GiB, PlacementPolicy
from controlplane.reconciler import Reconciler
from controlplane.registry import NodeRegistry
from controlplane.route_publisher import RoutePublisher
from controlplane.store import StoreEvent
from fleetlm.controlplane.v1 import node_pb2, registry_pb2, registry_pb2_grpc, routing_pb2
from mesh.errors import ErrorCode, FleetError
from mesh.grpc_server import GrpcServer
from tests.cluster import Cluster

pytestmark = [pytest.mark.cluster]

PATH = "/models/load.gguf"
LOADING, READY = node_pb2.REPLICA_STATE_LOADING, node_pb2.REPLICA_STATE_READY
# Bounds for things that take milliseconds here; generous because other test runs share the 2 cores.
SETTLE = 30.0
LEASE_TTL = 60


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = Cluster(tmp_path_factory.mktemp("load"))
    try:
        yield cluster.start_etcd()
    finally:
        cluster.close()


def stamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


@dataclass
class NodeWrites:
    """Every put and delete of one key, as a separate etcd client watching it sees them."""

    puts: list[node_pb2.Node] = field(default_factory=list)

    async def wait_for(self, predicate: Any, what: str) -> None:
        async with asyncio.timeout(SETTLE):
            while not predicate(self.puts):
                await asyncio.sleep(0.01)


@dataclass
class ControlPlane:
    prefix: str
    fleet: FleetView
    reconciler: Reconciler
    publisher: RoutePublisher
    registry: NodeRegistry
    leases: dict[str, int] = field(default_factory=dict)
    fleet_events: list[StoreEvent | None] = field(default_factory=list)  # what wakes the reconciler

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
        assert await self.fleet.wait_for(lambda: node_id in self.fleet.nodes, SETTLE)

    async def report(self, node_id: str, *replicas: node_pb2.Replica, ram_free: int = 12 * GiB) -> None:
        request = registry_pb2.HeartbeatRequest(
            node_id=node_id, lease_id=self.leases[node_id], replicas=replicas, ram_free_bytes=ram_free
        )
        await self.registry.Heartbeat(request, None)  # type: ignore[arg-type]

    def node_events(self, node_id: str) -> int:
        return sum(1 for e in self.fleet_events if e is not None and e.kind == "node" and e.key == node_id)


@contextlib.asynccontextmanager
async def control_plane(etcd_url: str, prefix: str = "") -> AsyncIterator[ControlPlane]:
    prefix = prefix or f"/load-test-{uuid.uuid4().hex[:8]}"  # a fresh cluster state per test
    store = EtcdStore(etcd_url, prefix)
    await store.connect()
    fleet = FleetView(store)
    reconciler = Reconciler(store, fleet, PlacementPolicy(), interval_seconds=600)  # passes run when a test asks
    publisher = RoutePublisher(fleet, interval=0.05, keepalive=600)
    cp = ControlPlane(prefix, fleet, reconciler, publisher, NodeRegistry(store, fleet, lease_ttl_seconds=LEASE_TTL))
    fleet.listeners.append(cp.fleet_events.append)
    try:
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(fleet.run()), tasks.create_task(fleet.settle(0))]
            running.append(tasks.create_task(publisher.run()))
            async with asyncio.timeout(SETTLE):
                await fleet.synced.wait()
            try:
                yield cp
            finally:
                publisher.close()
                for task in running:
                    task.cancel()
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def node_writes(etcd_url: str, key: str) -> AsyncIterator[NodeWrites]:
    host, port = etcd_url.removeprefix("http://").split(":")
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    writes = NodeWrites()
    watch = await client.watch(key.encode())

    async def follow() -> None:
        async for event in watch:
            if event.kind == aetcd.rtypes.EventKind.PUT:
                writes.puts.append(json_format.Parse(event.kv.value, node_pb2.Node(), ignore_unknown_fields=True))

    follower = asyncio.create_task(follow())
    try:
        yield writes
    finally:
        follower.cancel()
        await watch.cancel()
        await client.close()


def etcd_counter(etcd_url: str, name: str) -> float:
    """One of etcd's own counters from its /metrics."""
    for line in httpx.get(f"{etcd_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in etcd's /metrics")


def replica(name: str, state: int, running: int = 0, queued: int = 0, **kw: Any) -> node_pb2.Replica:
    spec = node_pb2.ModelSpec(name=name, path=PATH, format="gguf", engine="llamacpp")
    return node_pb2.Replica(model=spec, state=state, running_requests=running, queued_requests=queued, **kw)  # type: ignore[arg-type]


async def test_load_only_reports_write_nothing_to_etcd_and_a_state_change_writes_once(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp, node_writes(etcd_url, f"{cp.prefix}/nodes/n1") as writes:
        await cp.add_node("n1")
        await cp.report("n1", replica("m", LOADING))
        await writes.wait_for(
            lambda puts: bool(puts and puts[-1].replicas) and puts[-1].replicas[0].state == LOADING,
            "the loading replica",
        )
        assert await cp.fleet.wait_for(
            lambda: bool(cp.fleet.nodes["n1"].replicas) and cp.fleet.nodes["n1"].replicas[0].state == LOADING, SETTLE
        )
        puts_before, events_before = len(writes.puts), cp.node_events("n1")

        # 100 reports in which only load changes: each is in the view at once, none is an etcd write, and
        # none is a fleet event (those wake the reconciler). Nor a lease renewal each: one per TTL/4 at most.
        renewals_before, started = etcd_counter(etcd_url, "etcd_debugging_lease_renewed_total"), time.monotonic()
        now = time.time()
        for i in range(100):
            load = {"running": i % 4, "queued": i % 7, "rejected_requests": i, "last_request_at": stamp(now + i)}
            report = replica("m", LOADING, **load)
            await cp.report("n1", report, ram_free=(10 + i % 3) * GiB)
            shown = cp.fleet.nodes["n1"]
            assert (shown.replicas[0].running_requests, shown.replicas[0].queued_requests) == (i % 4, i % 7)
            assert shown.replicas[0].rejected_requests == i and shown.inventory.ram.free_bytes == (10 + i % 3) * GiB
            assert shown.replicas[0].last_request_at == stamp(now + i)
        renewals = etcd_counter(etcd_url, "etcd_debugging_lease_renewed_total") - renewals_before
        assert renewals <= 1 + (time.monotonic() - started) // (LEASE_TTL / 4)

        # Then one change of state, and one of error: one write each. The watcher sees writes in order, so
        # when it sees the change, it has seen every write the load reports made before it.
        await cp.report("n1", replica("m", READY, running=1))
        await writes.wait_for(
            lambda puts: bool(puts and puts[-1].replicas) and puts[-1].replicas[0].state == READY, "the ready replica"
        )
        assert len(writes.puts) - puts_before == 1
        await cp.report("n1", replica("m", READY, running=2, error="engine restarted"))
        await writes.wait_for(
            lambda puts: bool(puts and puts[-1].replicas) and puts[-1].replicas[0].error, "the replica's error"
        )
        assert len(writes.puts) - puts_before == 2
        assert await cp.fleet.wait_for(
            lambda: bool(cp.fleet.nodes["n1"].replicas) and cp.fleet.nodes["n1"].replicas[0].error, SETTLE
        )
        assert cp.node_events("n1") - events_before == 2
        # The durable write came back through the watch with the newest load laid over it.
        assert cp.fleet.nodes["n1"].replicas[0].running_requests == 2

        # A replica that appears is a durable change too.
        await cp.report("n1", replica("m", READY, error="engine restarted"), replica("other", LOADING))
        await writes.wait_for(lambda puts: len(puts[-1].replicas) == 2, "the second replica")
        assert len(writes.puts) - puts_before == 3


def _idle_deployment() -> node_pb2.Deployment:
    spec = node_pb2.ModelSpec(name="idle", path=PATH, format="gguf")
    deployment = node_pb2.Deployment(
        spec=spec, min_replicas=0, max_replicas=1, idle_timeout=duration_pb2.Duration(seconds=60)
    )
    return validate_deployment(deployment)


def ready(cp: Any, node_id: str) -> bool:
    """The node's first replica is ready in the view (False until its report has arrived at all)."""
    replicas = cp.fleet.nodes[node_id].replicas
    return bool(replicas) and replicas[0].state == READY


async def test_idle_unload_uses_the_reported_load_also_after_a_resync_from_etcd(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp:
        await cp.add_node("n1")
        await cp.reconciler.save_deployment(_idle_deployment())
        await cp.reconciler.ensure_one("idle")
        spec = cp.fleet.deployments["idle"].spec
        long_ago = stamp(time.time() - 3600)

        def report(running: int) -> node_pb2.Replica:
            out = node_pb2.Replica(model=spec, state=READY, assigned=True, running_requests=running)
            out.last_request_at.CopyFrom(long_ago)
            return out

        def assigned() -> bool:
            return any(a.model.name == "idle" for a in cp.fleet.assignments.values())

        # Ready and idle for an hour: that is what etcd's record says (the write of the state change).
        await cp.report("n1", report(running=0))
        assert await cp.fleet.wait_for(lambda: ready(cp, "n1"), SETTLE)
        # Then the node reports two requests running: load only, kept in memory. A full resync from etcd
        # (as the view does periodically) must not put back the idle figures of the record.
        await cp.report("n1", report(running=2))
        await cp.fleet.resync()
        assert cp.fleet.nodes["n1"].replicas[0].running_requests == 2
        await cp.reconciler.reconcile()
        assert assigned(), "a busy replica was unloaded as idle"

        # Idle again: the next pass unloads it, from the load in memory.
        await cp.report("n1", report(running=0))
        await cp.fleet.resync()
        await cp.reconciler.reconcile()
        assert not assigned()
        assert cp.fleet.deployments["idle"].replicas == 0


async def test_the_published_routing_table_carries_load_only_reports(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp:
        await cp.add_node("n1")
        await cp.report("n1", replica("m", READY))
        assert await cp.fleet.wait_for(lambda: ready(cp, "n1"), SETTLE)
        stream = cp.publisher.watch()
        first = await asyncio.wait_for(anext(stream), SETTLE)
        assert first.snapshot and first.nodes[0].replicas[0].running_requests == 0

        async def routes_with(running: int, queued: int) -> routing_pb2.ReplicaRoute:
            async with asyncio.timeout(SETTLE):
                while True:
                    update = await anext(stream)
                    for node in update.nodes:
                        if node.node_id == "n1":
                            route = node.replicas[0]
                            if (route.running_requests, route.queued_requests) == (running, queued):
                                return route

        events_before = cp.node_events("n1")
        for running, queued in ((1, 0), (3, 2), (0, 0)):
            await cp.report("n1", replica("m", READY, running=running, queued=queued))
            route = await routes_with(running, queued)
            assert route.state == READY
        assert cp.node_events("n1") == events_before  # the reconciler was not woken by any of them
        await stream.aclose()


async def test_a_routes_stream_opened_after_the_publisher_closed_ends_at_once(etcd_url: str) -> None:
    """At a stop the publisher ends every edge's stream (the edges move to another control plane), and the
    server still takes calls for its grace: a stream that opens then, or that was waiting for the fleet to
    settle, ends at once too, instead of staying open and holding the server's stop for its whole grace."""
    async with control_plane(etcd_url) as cp:
        async with asyncio.timeout(SETTLE):
            await cp.fleet.settled.wait()
        cp.publisher.close()
        async with asyncio.timeout(5):
            late = [update async for update in cp.publisher.watch()]
    assert late == []
    store = EtcdStore(etcd_url, f"/load-test-{uuid.uuid4().hex[:8]}")
    await store.connect()
    try:
        publisher = RoutePublisher(FleetView(store))  # a fleet that never settles: its view is not even read
        waiting = asyncio.ensure_future(anext(publisher.watch()))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # it waits for the fleet to settle, as it should
        publisher.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 5)
    finally:
        await store.close()


async def test_a_node_that_moves_to_another_control_plane_is_not_shown_with_the_load_it_left_behind(
    etcd_url: str,
) -> None:
    # Two control planes on one etcd. Each knows the load of the nodes that report to it; the other sees
    # the figures of the node's last durable write, never a report it received before the node moved.
    prefix = f"/load-test-{uuid.uuid4().hex[:8]}"
    async with control_plane(etcd_url, prefix) as a, control_plane(etcd_url, prefix) as b:
        await a.add_node("n1")
        b.leases["n1"] = a.leases["n1"]
        await a.report("n1", replica("m", READY, running=3))
        assert await b.fleet.wait_for(lambda: "n1" in b.fleet.nodes and b.fleet.nodes["n1"].replicas, SETTLE)
        # a's view takes the record in from its own watch of etcd, which may come after b's (CI saw it later).
        assert await a.fleet.wait_for(lambda: a.fleet.nodes["n1"].replicas, SETTLE)
        assert a.fleet.nodes["n1"].replicas[0].running_requests == 3 and a.fleet.load.fresh("n1")

        # The node now reports to b (a went away for it, say), load only. b has never written its record,
        # so it writes it once; a takes in that record, with b's figures, not its own older report.
        await b.report("n1", replica("m", READY, running=1))
        assert b.fleet.nodes["n1"].replicas[0].running_requests == 1
        assert await a.fleet.wait_for(lambda: a.fleet.nodes["n1"].replicas[0].running_requests == 1, SETTLE)
        # Reports to b only: a stops taking its own last report as the node's load after max_age_seconds.
        a.fleet.load.max_age_seconds = 0.2
        await asyncio.sleep(0.3)  # at least max_age_seconds: a lower bound, not a race
        assert not a.fleet.load.fresh("n1") and b.fleet.load.fresh("n1")


@contextlib.asynccontextmanager
async def registry_server(cp: ControlPlane) -> AsyncIterator[registry_pb2_grpc.NodeRegistryServiceStub]:
    """The control plane's NodeRegistryService on a real gRPC server on a free port, and a stub for it."""
    server = GrpcServer(["fleetlm.controlplane.v1.NodeRegistryService"])
    registry_pb2_grpc.add_NodeRegistryServiceServicer_to_server(cp.registry, server.server)
    port = await server.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield registry_pb2_grpc.NodeRegistryServiceStub(channel)
    finally:
        await server.stop(0)


class Reports:
    """A ReportLoad stream the test feeds report by report."""

    def __init__(self, stub: registry_pb2_grpc.NodeRegistryServiceStub) -> None:
        self.queue: asyncio.Queue[registry_pb2.ReportLoadRequest | None] = asyncio.Queue()
        self.call = stub.ReportLoad(self._requests())

    async def _requests(self) -> AsyncIterator[registry_pb2.ReportLoadRequest]:
        while (report := await self.queue.get()) is not None:
            yield report

    def send(self, node_id: str, lease_id: int, *replicas: node_pb2.Replica, ram_free: int = 12 * GiB) -> None:
        self.queue.put_nowait(
            registry_pb2.ReportLoadRequest(
                node_id=node_id, lease_id=lease_id, replicas=replicas, ram_free_bytes=ram_free
            )
        )

    async def refusal(self) -> tuple[grpc.StatusCode, FleetError]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with asyncio.timeout(SETTLE):
                await self.call
        return refused.value.code(), FleetError.from_rpc_error(refused.value)


async def until(predicate: Any) -> bool:
    """Polls: a load report changes the view without waking the view's waiters (only durable changes do)."""
    async with asyncio.timeout(SETTLE):
        while not predicate():
            await asyncio.sleep(0.01)
    return True


def running(cp: ControlPlane, node_id: str) -> int:
    node = cp.fleet.nodes.get(node_id)
    return node.replicas[0].running_requests if node is not None and node.replicas else -1


async def test_a_load_stream_reaches_a_control_plane_the_node_does_not_heartbeat_to(etcd_url: str) -> None:
    # Two control planes on one etcd. The node registers and heartbeats through a only; its load stream to b
    # is all b hears of it: b's view, its freshness and its routing table follow the stream.
    prefix = f"/load-test-{uuid.uuid4().hex[:8]}"
    async with control_plane(etcd_url, prefix) as a, control_plane(etcd_url, prefix) as b, registry_server(b) as b_stub:
        await a.add_node("n1")
        lease = a.leases["n1"]
        await a.report("n1", replica("m", READY))  # the durable change: b sees it through etcd
        assert await b.fleet.wait_for(lambda: "n1" in b.fleet.nodes and ready(b, "n1"), SETTLE)
        assert not b.fleet.load.fresh("n1")  # nothing reported to b yet

        stream = b.publisher.watch()
        await asyncio.wait_for(anext(stream), SETTLE)  # the snapshot
        events_before = b.node_events("n1")
        reports = Reports(b_stub)
        for load in (3, 1, 4):
            reports.send("n1", lease, replica("m", READY, running=load))
            assert await until(lambda load=load: running(b, "n1") == load)
            async with asyncio.timeout(SETTLE):
                while not any(
                    n.node_id == "n1" and n.replicas[0].running_requests == load for n in (await anext(stream)).nodes
                ):
                    pass
        assert b.fleet.load.fresh("n1")
        assert running(a, "n1") == 0  # a heard none of it: the stream went to b alone
        # Load only: no node event (none wakes a reconciler; none was written to etcd).
        assert b.node_events("n1") == events_before
        reports.queue.put_nowait(None)
        async with asyncio.timeout(SETTLE):
            assert await reports.call == registry_pb2.ReportLoadResponse()
        await stream.aclose()


async def test_while_a_stream_is_open_heartbeats_carry_no_load_and_say_so(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp, registry_server(cp) as stub:
        await cp.add_node("n1")
        lease = cp.leases["n1"]
        heartbeat = registry_pb2.HeartbeatRequest(
            node_id="n1", lease_id=lease, replicas=[replica("m", READY, running=2)]
        )
        assert not (await stub.Heartbeat(heartbeat, timeout=SETTLE)).load_streamed
        assert await until(lambda: running(cp, "n1") == 2)

        reports = Reports(stub)
        reports.send("n1", lease, replica("m", READY, running=5))
        assert await until(lambda: running(cp, "n1") == 5)
        # A heartbeat sent before the last report may arrive after it: its figures do not undo the stream's.
        heartbeat.replicas[0].running_requests = 1
        assert (await stub.Heartbeat(heartbeat, timeout=SETTLE)).load_streamed
        assert running(cp, "n1") == 5

        # The stream closed: heartbeats are the node's load reports here again (as from an older agent).
        reports.queue.put_nowait(None)
        async with asyncio.timeout(SETTLE):
            await reports.call
        async with asyncio.timeout(SETTLE):
            while (await stub.Heartbeat(heartbeat, timeout=SETTLE)).load_streamed:
                await asyncio.sleep(0.01)  # the stream's end reaches the server a moment after the client's
        assert running(cp, "n1") == 1


async def test_only_a_nodes_own_registration_may_report_its_load(
    etcd_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane import registry

    monkeypatch.setattr(registry, "VIEW_LAG_SECONDS", 0.5)  # how long a refusal waits for the view
    async with control_plane(etcd_url) as cp, registry_server(cp) as stub:
        await cp.add_node("n1")
        lease = cp.leases["n1"]
        await cp.report("n1", replica("m", READY))
        assert await cp.fleet.wait_for(lambda: ready(cp, "n1"), SETTLE)

        # A node this control plane does not know, and a lease that is not the node's: NOT_FOUND, with the
        # reason that makes the node check its registration. The load goes nowhere.
        for node_id, lease_id in (("ghost", lease), ("n1", lease + 1)):
            reports = Reports(stub)
            reports.send(node_id, lease_id, replica("m", READY, running=7))
            code, error = await reports.refusal()
            assert code == grpc.StatusCode.NOT_FOUND and error.code == ErrorCode.LEASE_EXPIRED, error
            assert node_id in error.message
        assert "ghost" not in cp.fleet.nodes and running(cp, "n1") == 0

        # One stream is one node's: a report for another node on it is refused, as are reports that name
        # no node or no lease. Each says which field.
        reports = Reports(stub)
        reports.send("n1", lease, replica("m", READY, running=1))
        reports.send("n2", lease, replica("m", READY, running=7))
        code, error = await reports.refusal()
        assert code == grpc.StatusCode.INVALID_ARGUMENT and error.param == "node_id", error
        assert running(cp, "n1") == 1
        for node_id, lease_id, param in (("", lease, "node_id"), ("n1", 0, "lease_id")):
            reports = Reports(stub)
            reports.send(node_id, lease_id)
            code, error = await reports.refusal()
            assert code == grpc.StatusCode.INVALID_ARGUMENT and error.param == param, error

        # A node that registers again under a new lease is accepted under it, as soon as the view has the
        # new record (a report waits for it).
        monkeypatch.setattr(registry, "VIEW_LAG_SECONDS", SETTLE)
        await cp.add_node("n1")
        await cp.report("n1", replica("m", READY))  # a registration of no replicas, then the replica again
        reports = Reports(stub)
        reports.send("n1", cp.leases["n1"], replica("m", READY, running=3))
        assert await until(lambda: running(cp, "n1") == 3)
        reports.queue.put_nowait(None)
        async with asyncio.timeout(SETTLE):
            await reports.call


async def test_an_assignment_made_while_the_first_message_goes_out_is_sent_at_once(
    etcd_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node that registers again after a partition opens its assignment stream; the first message says
    # "nothing" (the reconciler has not placed its replica again yet), and the placement lands while that
    # message is on its way. It must go out at once, not at the next periodic resend: the node unloads an
    # unassigned replica after a few seconds (the flaw the partition test saw: a reload after the heal).
    from controlplane import registry

    monkeypatch.setattr(registry, "RESEND_SECONDS", 600.0)  # a lost change would wait this long
    async with control_plane(etcd_url) as cp:
        await cp.add_node("n1")
        stream = cp.registry.WatchAssignments(registry_pb2.WatchAssignmentsRequest(node_id="n1"), None)  # type: ignore[arg-type]
        first = await asyncio.wait_for(anext(stream), SETTLE)
        assert list(first.assignments) == []
        # The stream is suspended at its yield (the message being sent) while the assignment is written.
        spec = node_pb2.ModelSpec(name="m", path=PATH, format="gguf", engine="llamacpp")
        writer = EtcdStore(etcd_url, cp.prefix)  # as the leader writes it, from its own etcd client
        await writer.connect()
        try:
            await writer.put("assignment", node_pb2.Assignment(node_id="n1", model=spec))
        finally:
            await writer.close()
        assert await cp.fleet.wait_for(lambda: cp.fleet.node_assignments("n1"), SETTLE)
        second = await asyncio.wait_for(anext(stream), SETTLE)
        assert [a.model.name for a in second.assignments] == ["m"]
        await stream.aclose()


def test_load_and_load_progress_leave_the_durable_signature_equal() -> None:
    """What makes a node heartbeat at once is a change of its durable state: a new load fraction while a
    replica loads (5 % steps) or a new request count is load, which the load stream carries."""
    from fleetlm.controlplane.v1 import node_pb2
    from node_agent.load_reports import durable_signature

    loading = node_pb2.Replica(
        model=node_pb2.ModelSpec(name="m"), state=node_pb2.REPLICA_STATE_LOADING, load_progress=0.05
    )
    further = node_pb2.Replica(
        model=node_pb2.ModelSpec(name="m"), state=node_pb2.REPLICA_STATE_LOADING, load_progress=0.45
    )
    busier = node_pb2.Replica(
        model=node_pb2.ModelSpec(name="m"), state=node_pb2.REPLICA_STATE_LOADING, running_requests=3
    )
    assert durable_signature([loading]) == durable_signature([further]) == durable_signature([busier])
    ready = node_pb2.Replica(model=node_pb2.ModelSpec(name="m"), state=node_pb2.REPLICA_STATE_READY)
    assert durable_signature([ready]) != durable_signature([loading])
