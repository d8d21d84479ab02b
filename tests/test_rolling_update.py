"""A changed deployment replaces its replicas a few at a time, on the control plane's core in-process on a
real etcd (the harness of test_controlplane_core): the nodes are records written through the registry, so
the test decides when each new replica is loading, ready or failed, and checks after every step how many
replicas serve. Every old replica used to be dropped in the pass that saw the change, and the model
served nothing until new ones had loaded.
"""

from __future__ import annotations

import asyncio

import pytest

from controlplane.admin import validate_deployment
from fleetlm.controlplane.v1 import node_pb2, registry_pb2
from tests.test_controlplane_core import MODEL, PATH, ControlPlane, control_plane, etcd_url

pytestmark = [pytest.mark.cluster]
__all__ = ["etcd_url"]  # the module's etcd fixture, shared

LOADING, READY, FAILED = node_pb2.REPLICA_STATE_LOADING, node_pb2.REPLICA_STATE_READY, node_pb2.REPLICA_STATE_FAILED
# Reconcile passes run every 0.5 s here: a step that must not happen is waited for this long.
QUIET = 2.0


def spec(context_size: int) -> node_pb2.ModelSpec:
    """As the deployment holds it, defaults filled in (a node reports the very spec it was assigned)."""
    given = node_pb2.ModelSpec(name=MODEL, path=PATH, format="gguf", context_size=context_size)
    return validate_deployment(node_pb2.Deployment(spec=given)).spec


async def deploy(cp: ControlPlane, replicas: int, context_size: int) -> None:
    deployment = node_pb2.Deployment(spec=spec(context_size), min_replicas=replicas, max_replicas=replicas)
    await cp.reconciler.save_deployment(validate_deployment(deployment))
    cp.reconciler.kick()


async def report(cp: ControlPlane, node_id: str, context_size: int, state: int) -> None:
    """The node's heartbeat: its replica of MODEL, with this spec, in this state."""
    replicas = [node_pb2.Replica(model=spec(context_size), state=state, assigned=True)]  # type: ignore[arg-type]
    request = registry_pb2.HeartbeatRequest(node_id=node_id, lease_id=cp.leases[node_id], replicas=replicas)
    await cp.registry.Heartbeat(request, None)  # type: ignore[arg-type]
    await cp.settle(lambda: list(cp.fleet.nodes[node_id].replicas) == replicas, f"{node_id}'s report")
    cp.reconciler.kick()


def assigned(cp: ControlPlane) -> dict[str, int]:
    """node id -> the context size of the spec its assignment of MODEL holds."""
    return {a.node_id: a.model.context_size for a in cp.fleet.assignments.values() if a.model.name == MODEL}


def serving(cp: ControlPlane) -> set[str]:
    """Nodes whose assignment of MODEL is served: the node reports that very spec ready."""
    out = set()
    for node_id, size in assigned(cp).items():
        node = cp.fleet.nodes.get(node_id)
        if node and any(r.state == READY and r.model.context_size == size for r in node.replicas):
            out.add(node_id)
    return out


async def started(cp: ControlPlane, nodes: list[str], replicas: int) -> None:
    for node_id in nodes:
        await cp.add_node(node_id)
    await deploy(cp, replicas, 1024)
    await cp.settle(lambda: len(assigned(cp)) == replicas, f"{replicas} replicas assigned")
    for node_id in assigned(cp):
        await report(cp, node_id, 1024, READY)


async def new_replica_placed(cp: ControlPlane, done: set[str]) -> str:
    """The node given the next replica of the new spec (512)."""
    found = await cp.settle(
        lambda: [n for n, size in assigned(cp).items() if size == 512 and n not in done] or None, "a new replica"
    )
    assert len(found) == 1, f"more than one replica replaced at once: {assigned(cp)}"
    return str(found[0])


async def test_with_no_room_beside_them_replicas_are_replaced_one_at_a_time(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp:
        await started(cp, ["a", "b", "c"], 3)  # a replica on every node: none can start beside the old
        await deploy(cp, 3, 512)
        done: set[str] = set()
        for _ in range(3):
            node_id = await new_replica_placed(cp, done)
            await asyncio.sleep(QUIET)  # passes run: none replaces another while this one loads
            assert [n for n, size in assigned(cp).items() if size == 512 and n not in done] == [node_id]
            assert len(serving(cp)) == 2, f"serving while {node_id} loads: {serving(cp)}"
            await report(cp, node_id, 512, LOADING)
            await report(cp, node_id, 512, READY)
            done.add(node_id)
        await cp.settle(lambda: assigned(cp) == {"a": 512, "b": 512, "c": 512}, "every replica replaced")
        assert serving(cp) == {"a", "b", "c"}


async def test_with_room_beside_them_new_replicas_start_first_and_an_old_one_goes_when_one_serves(
    etcd_url: str,
) -> None:
    async with control_plane(etcd_url) as cp:
        await started(cp, ["a", "b", "c"], 2)
        old = set(assigned(cp))
        [free] = {"a", "b", "c"} - old
        await deploy(cp, 2, 512)
        assert await new_replica_placed(cp, set()) == free  # beside the old ones
        await asyncio.sleep(QUIET)
        assert {n for n, size in assigned(cp).items() if size == 1024} == old, "an old replica left too soon"
        await report(cp, free, 512, READY)
        # One old replica goes now that a new one serves; the next new one takes the place it left.
        second = await new_replica_placed(cp, {free})
        assert second in old
        assert len(serving(cp)) == 2, serving(cp)
        await report(cp, second, 512, READY)
        await cp.settle(lambda: sorted(assigned(cp).values()) == [512, 512], "every replica replaced")
        assert serving(cp) == {free, second}


async def test_a_new_replica_that_fails_to_load_stops_the_change_and_the_old_ones_go_on_serving(
    etcd_url: str,
) -> None:
    async with control_plane(etcd_url) as cp:
        await started(cp, ["a", "b"], 2)
        await deploy(cp, 2, 512)
        node_id = await new_replica_placed(cp, set())
        await report(cp, node_id, 512, FAILED)  # a context size the engine refuses, say
        await asyncio.sleep(QUIET)
        assert sorted(assigned(cp).values()) == [512, 1024], assigned(cp)
        assert len(serving(cp)) == 1  # the other old replica still serves: the model is not dark
        # Changed back: the old spec is current again, and the failed replica is replaced by it.
        await deploy(cp, 2, 1024)
        await cp.settle(lambda: sorted(assigned(cp).values()) == [1024, 1024], "the change undone")


async def test_an_old_replica_that_does_not_serve_is_replaced_at_once(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp:
        await started(cp, ["a", "b"], 2)
        await report(cp, "a", 1024, LOADING)  # still loading (or failed): nothing is lost without it
        await deploy(cp, 2, 512)
        await cp.settle(lambda: assigned(cp).get("a") == 512, "the replica that did not serve replaced")
        assert assigned(cp)["b"] == 1024


async def test_a_draining_replica_goes_once_its_replacement_serves(etcd_url: str) -> None:
    """2 replicas on a and b, c free; a drains: its replacement is placed on c and a's replica stays until
    c's serves, so two replicas serve throughout. (It went as soon as b's served: one replica served while
    c loaded.)"""
    async with control_plane(etcd_url) as cp:
        await started(cp, ["a", "b", "c"], 2)
        draining = sorted(assigned(cp))[0]
        [free] = {"a", "b", "c"} - set(assigned(cp))
        assert cp.store is not None
        await cp.store.put("scheduling", node_pb2.Node(node_id=draining, scheduling=node_pb2.SCHEDULING_DRAINING))
        await cp.settle(lambda: free in assigned(cp), "the replacement placed")
        await asyncio.sleep(QUIET)
        assert draining in assigned(cp), "the draining replica left before its replacement served"
        await report(cp, free, 1024, READY)
        await cp.settle(lambda: draining not in assigned(cp), "the draining replica removed")
        assert len(serving(cp)) == 2


async def test_a_draining_replica_with_no_room_for_a_replacement_goes_once_another_serves(etcd_url: str) -> None:
    async with control_plane(etcd_url) as cp:
        await started(cp, ["a", "b"], 2)
        assert cp.store is not None
        await cp.store.put("scheduling", node_pb2.Node(node_id="a", scheduling=node_pb2.SCHEDULING_DRAINING))
        await cp.settle(lambda: set(assigned(cp)) == {"b"}, "the draining replica removed")
