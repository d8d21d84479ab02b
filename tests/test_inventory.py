"""What a running node reports of its inventory, on a real fleet (etcd, a control plane, node agents with
--models-dir and --inventory-override): free RAM within the RAM it declares, in every report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from tests.cluster import Cluster, Proc, wait_for

pytestmark = [pytest.mark.cluster]

TTL = 3
GiB = 1024**3


@dataclass
class Fleet:
    cluster: Cluster
    admin: admin_pb2_grpc.AdminServiceStub
    dirs: dict[str, Path]
    procs: dict[str, Proc]

    def nodes(self) -> dict[str, node_pb2.Node]:
        return {n.node_id: n for n in self.admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("inventory")
    cluster = Cluster(work)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(TTL)
        dirs, procs = {}, {}
        # "small" declares 1 GiB of RAM, less than this machine has free.
        for node_id, ram in (("small", 1), ("late", 16)):
            dirs[node_id] = work / f"{node_id}-models"
            dirs[node_id].mkdir()
            procs[node_id], _ = cluster.start_node(
                node_id, models_dirs=[str(dirs[node_id])], inventory={"gpus": [], "ram_total_gib": ram}, threads=1
            )
        admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cluster.controlplane))
        fleet = Fleet(cluster, admin, dirs, procs)
        wait_for(lambda: {"small", "late"} <= set(fleet.nodes()), 60, "both nodes")
        yield fleet
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def test_free_ram_is_never_above_the_declared_ram(fleet: Fleet) -> None:
    # Registration, then several heartbeats and load reports (every second with this TTL).
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        ram = fleet.nodes()["small"].inventory.ram
        assert ram.total_bytes == 1 * GiB
        assert ram.free_bytes <= ram.total_bytes, f"free {ram.free_bytes} of {ram.total_bytes}"
        time.sleep(0.25)
    shown = subprocess.run(
        [sys.executable, "-m", "launcher", "status", "--controlplane", fleet.cluster.controlplane, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    node = next(n for n in json.loads(shown.stdout)["nodes"] if n["id"] == "small")
    assert 0 < node["ram"]["free_bytes"] <= node["ram"]["total_bytes"] == 1 * GiB
