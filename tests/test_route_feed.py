"""The routing table reaches the edge over WatchRoutes from a real control plane, follows the fleet, and
stays usable when the control plane goes away."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest

from edge.route_feed import RouteFeed
from tests.cluster import MODEL, Cluster, smollm_entry

pytestmark = [pytest.mark.cluster, pytest.mark.model]


async def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


async def test_the_table_follows_the_fleet_and_outlives_the_control_plane(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(lease_ttl=3)
        node_proc, node_address = cluster.start_node("feed-a", [smollm_entry()])
        async with grpc.aio.insecure_channel(cluster.controlplane) as channel:
            feed = RouteFeed([channel], "test-edge", keepalive_seconds=0.5)
            follower = asyncio.ensure_future(feed.run())
            try:
                # 60 s: the model loads on a busy 2-core machine.
                await wait_until(lambda: feed.table.pick(MODEL)[0], 60, "a ready replica in the table")
                [replica] = feed.table.pick(MODEL)[0]
                assert (replica.node_id, replica.address) == ("feed-a", node_address)
                assert feed.models[MODEL].info.ready_replicas == 1
                assert feed.stale_seconds is None

                # The node leaves cleanly: its replica leaves the table.
                node_proc.stop()
                await wait_until(lambda: not feed.table.replicas(MODEL), 30, "the node's removal")

                # The control plane dies: the table stays as it was, and the feed says it is stale.
                _, node_address = cluster.start_node("feed-b", [smollm_entry()])
                await wait_until(lambda: feed.table.pick(MODEL)[0], 60, "the new node's replica")
                cluster.procs[1].signal(signal.SIGKILL)  # procs: etcd, controlplane, ...
                await wait_until(lambda: (feed.stale_seconds or 0) > 0.5, 10, "the feed to notice")
                [replica] = feed.table.pick(MODEL)[0]
                assert replica.address == node_address
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


async def test_a_stream_its_channel_cancels_is_followed_again(tmp_path: Path) -> None:
    """grpc.aio raises CancelledError from a call that the close of its channel cancelled, as a channel
    replaced after a certificate rotation is closed (its calls with it) after a grace: the feed took that for
    its own stop and ended, silently, and the edge routed on a frozen table from then on."""
    cluster = Cluster(tmp_path)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(lease_ttl=3)
        replaced = grpc.aio.insecure_channel(cluster.controlplane)
        async with grpc.aio.insecure_channel(cluster.controlplane) as current:
            feed = RouteFeed([replaced, current], "test-edge", keepalive_seconds=0.5)
            follower = asyncio.ensure_future(feed.run())
            try:
                await wait_until(lambda: feed.connected, 30, "the table from the first channel")
                await replaced.close(0.1)  # cancels the stream on it, as the rotation's close does
                await wait_until(lambda: not feed.connected or follower.done(), 10, "the stream's end")
                await wait_until(lambda: feed.connected or follower.done(), 10, "the table again")
                assert not follower.done() and feed.connected  # followed again, on the other channel
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            assert follower.cancelled()  # and its own stop still stops it
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
