"""Leader election and fenced writes, in-process on a real etcd: two Leaderships (as two control planes
would hold) on one store. A leader whose election key is gone (its lease lapsed while it was paused; here
the lease is revoked from outside, which etcd treats the same way) cannot write with its old fence, and
steps down; the other control plane leads."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from controlplane.etcd_store import EtcdStore
from controlplane.fleet import FleetView
from controlplane.leader import ELECTION, Leadership
from controlplane.placement import PlacementPolicy
from controlplane.reconciler import Reconciler
from controlplane.store import FencedOut
from fleetlm.controlplane.v1 import node_pb2
from tests.cluster import Cluster

# Waits for what a 2 s TTL decides: generous (a busy 2-core machine), they end as soon as the state is seen.
BOUND = 20.0


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = Cluster(tmp_path_factory.mktemp("ha-fencing"))
    try:
        yield cluster.start_etcd()
    finally:
        cluster.close()


async def until(predicate: object, what: str) -> None:
    async with asyncio.timeout(BOUND):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


def deployment(name: str) -> node_pb2.Deployment:
    return node_pb2.Deployment(spec=node_pb2.ModelSpec(name=name, path="/m.gguf", format="gguf"), replicas=1)


async def test_one_leader_and_a_leader_whose_key_is_gone_cannot_write(etcd_url: str) -> None:
    store = EtcdStore(etcd_url, f"/ha-{uuid.uuid4().hex[:8]}")
    await store.connect()
    a = Leadership(store, "cp-a:1", ttl_seconds=2)
    b = Leadership(store, "cp-b:1", ttl_seconds=2)
    reconciler_a = Reconciler(store, FleetView(store), PlacementPolicy(), leadership=a)
    try:
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(a.run())]
            await until(lambda: a.is_leader, "a to lead")
            running.append(tasks.create_task(b.run()))
            await until(lambda: b.leader_address == "cp-a:1", "b to follow a")
            assert a.is_leader and not b.is_leader
            with pytest.raises(FencedOut):
                b.fence()  # a follower has no token to write with

            # A fenced write while the leadership holds goes through.
            await reconciler_a.save_deployment(deployment("before"))
            assert await store.get("deployment", "before") is not None

            # a's key goes as if a had been paused past its TTL; b takes over with a newer token.
            stale = a.fence()
            holder = await store.holder(ELECTION)
            assert holder is not None and holder.revision == stale.revision
            found = await store._client.get(stale.key.encode())
            await store.revoke_lease(found.lease)
            await until(lambda: b.is_leader, "b to lead")
            assert b.fence().revision > stale.revision

            # Whatever a decided before: its writes with the old token are refused, and nothing is written.
            with pytest.raises(FencedOut):
                await store.put("deployment", deployment("stale"), fence=stale)
            with pytest.raises(FencedOut):
                await store.delete("deployment", "before", fence=stale)
            assert await store.get("deployment", "stale") is None
            assert await store.get("deployment", "before") is not None
            # a steps down by itself (its lease is gone); its reconciler's writes are refused meanwhile too.
            with pytest.raises(FencedOut):
                await reconciler_a.save_deployment(deployment("stale-too"))
            await until(lambda: not a.is_leader, "a to step down")
            await until(lambda: a.leader_address == "cp-b:1", "a to follow b")
            assert await store.get("deployment", "stale-too") is None

            # Exactly one leader throughout the rest: b, whose writes go through.
            await store.put("deployment", deployment("after"), fence=b.fence())
            assert await store.get("deployment", "after") is not None
            for task in running:
                task.cancel()
    finally:
        await store.close()


async def test_a_leader_that_stops_hands_over_at_once(etcd_url: str) -> None:
    """Cancelling the election (a clean shutdown) revokes the lease: the follower leads without waiting for
    a TTL (30 s here, so only the revocation can explain a quick takeover)."""
    store = EtcdStore(etcd_url, f"/ha-{uuid.uuid4().hex[:8]}")
    await store.connect()
    a = Leadership(store, "cp-a:1", ttl_seconds=30)
    b = Leadership(store, "cp-b:1", ttl_seconds=30)
    try:
        async with asyncio.TaskGroup() as tasks:
            electing_a = tasks.create_task(a.run())
            await until(lambda: a.is_leader, "a to lead")
            electing_b = tasks.create_task(b.run())
            await until(lambda: b.leader_address == "cp-a:1", "b to follow a")
            electing_a.cancel()
            loop = asyncio.get_running_loop()
            started = loop.time()
            await until(lambda: b.is_leader, "b to lead")
            took = loop.time() - started
            print(f"handover after a clean stop: {took:.2f}s")
            assert took < 15, "b waited for the TTL instead of the revocation"
            electing_b.cancel()
    finally:
        await store.close()
