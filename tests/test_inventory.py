"""What a running node reports of its inventory, on a real fleet (etcd, a control plane, node agents with
--models-dir and --inventory-override): free RAM within the RAM it declares, in every report; weights copied
into (or removed from) its models directory while it runs, seen within seconds, and placed on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.default_model import default_model_path
from mesh.errors import ErrorCode, FleetError
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

    def files(self, node_id: str) -> set[str]:
        return {f.path for f in self.nodes()[node_id].inventory.model_files}

    def deploy(self, name: str, path: Path, replicas: int = 1) -> admin_pb2.DeployModelResponse:
        spec = node_pb2.ModelSpec(name=name, path=str(path), format="gguf", device="cpu", context_size=512)
        deployment = node_pb2.Deployment(spec=spec, min_replicas=1, max_replicas=replicas)
        return self.admin.DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), timeout=30)

    def assigned(self, name: str) -> list[str]:
        listed = self.admin.ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=5).deployments
        return sorted(a.node_id for d in listed if d.deployment.spec.name == name for a in d.assignments)

    def undeploy(self, name: str) -> None:
        """Removed, if it is there (a test that failed before deploying it leaves none)."""
        try:
            self.admin.UndeployModel(admin_pb2.UndeployModelRequest(name=name), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("inventory")
    cluster = Cluster(work)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(TTL)
        dirs, procs = {}, {}
        # "small" declares 1 GiB of RAM, less than this machine has free (and too little for any replica);
        # "late" and "other" share a models directory that starts empty.
        shared = work / "shared-models"
        shared.mkdir()
        for node_id, ram in (("small", 1), ("late", 16), ("other", 16)):
            dirs[node_id] = shared if node_id != "small" else work / "small-models"
            dirs[node_id].mkdir(exist_ok=True)
            procs[node_id], _ = cluster.start_node(
                node_id, models_dirs=[str(dirs[node_id])], inventory={"gpus": [], "ram_total_gib": ram}, threads=1
            )
        admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cluster.controlplane))
        fleet = Fleet(cluster, admin, dirs, procs)
        wait_for(lambda: set(dirs) <= set(fleet.nodes()), 60, "the nodes")
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


def deploy_refused(fleet: Fleet, name: str, path: Path) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        fleet.deploy(name, path)
    error = FleetError.from_rpc_error(refused.value)  # type: ignore[arg-type]
    assert error.code == ErrorCode.NO_CAPACITY, error.message
    return error.message


def test_weights_copied_to_a_running_node_are_deployable_within_seconds(fleet: Fleet) -> None:
    path = fleet.dirs["late"] / "copied.gguf"
    assert f"late: model file not present on the node: {path}" in deploy_refused(fleet, "copied", path)
    # As an operator copies weights: under another name, then renamed (a link here, the same to a scan).
    os.symlink(default_model_path(), fleet.dirs["late"] / "copied.gguf.part")
    os.rename(fleet.dirs["late"] / "copied.gguf.part", path)
    copied = time.monotonic()
    try:
        # Heartbeats go every second with this TTL (TTL/4, at least 1 s): a couple of them at most.
        wait_for(lambda: str(path) in fleet.files("late") and str(path) in fleet.files("other"), 10, "the file seen")
        seen = time.monotonic() - copied
        placed = fleet.deploy("copied", path)
        assert [a.node_id for a in placed.assignments] in (["late"], ["other"])
        assert seen < 5, f"the copied file was seen after {seen:.1f}s"
        node = fleet.nodes()["late"]
        reported = next(f for f in node.inventory.model_files if f.path == str(path))
        assert reported.size_bytes == default_model_path().stat().st_size
        assert reported.format == "gguf" and reported.kv_bytes_per_token > 0  # its header was read
    finally:
        fleet.undeploy("copied")
        path.unlink()
    # Removed: gone from the node's record as soon.
    gone = lambda: not {str(path)} & (fleet.files("late") | fleet.files("other"))  # noqa: E731
    wait_for(gone, 10, "the removed file gone from the records")
    assert f"late: model file not present on the node: {path}" in deploy_refused(fleet, "copied", path)


def test_a_deployment_waiting_for_its_weights_is_placed_when_they_appear(fleet: Fleet) -> None:
    path = fleet.dirs["late"] / "waiting.gguf"
    os.symlink(default_model_path(), path)
    try:
        wait_for(lambda: str(path) in fleet.files("late") and str(path) in fleet.files("other"), 10, "the file seen")
        first = [a.node_id for a in fleet.deploy("waiting", path, replicas=2).assignments]
        assert len(first) == 1
        path.unlink()
        wait_for(lambda: not {str(path)} & (fleet.files("late") | fleet.files("other")), 10, "the file gone")
        fleet.admin.ScaleDeployment(admin_pb2.ScaleDeploymentRequest(name="waiting", replicas=2), timeout=30)
        time.sleep(2)  # several reconciler passes: the second replica has nowhere to go
        assert fleet.assigned("waiting") == first
        os.symlink(default_model_path(), path)
        back = time.monotonic()
        wait_for(lambda: fleet.assigned("waiting") == ["late", "other"], 15, "the waiting replica placed")
        assert time.monotonic() - back < 8
    finally:
        fleet.undeploy("waiting")
        path.unlink(missing_ok=True)
