"""What a running node reports of its inventory, on a real fleet (etcd, a control plane, node agents with
--models-dir and --inventory-override): free RAM within the RAM it declares, in every report; weights copied
into (or removed from) its models directory while it runs, seen within seconds, and placed on; a node that
comes back with less RAM than its replicas were placed with, said and shown, its excess moved when another
node has room."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.default_model import default_model_path
from mesh.errors import ErrorCode, FleetError
from tests.cluster import Cluster, Proc, wait_for

pytestmark = [pytest.mark.cluster]

# Long enough for a node killed and started again to be back before its lease lapses (its record and its
# assignments are then kept): a restart, not a departure.
TTL = 10
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


def status_json(fleet: Fleet) -> dict[str, Any]:
    shown = subprocess.run(
        [sys.executable, "-m", "launcher", "status", "--controlplane", fleet.cluster.controlplane, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(shown.stdout)  # type: ignore[no-any-return]


def test_free_ram_is_never_above_the_declared_ram(fleet: Fleet) -> None:
    # Registration, then several heartbeats and load reports (every 2 s with this TTL).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ram = fleet.nodes()["small"].inventory.ram
        assert ram.total_bytes == 1 * GiB
        assert ram.free_bytes <= ram.total_bytes, f"free {ram.free_bytes} of {ram.total_bytes}"
        time.sleep(0.25)
    node = next(n for n in status_json(fleet)["nodes"] if n["id"] == "small")
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
        # Heartbeats go every 2 s with this TTL (TTL/4): a couple of them at most.
        wait_for(lambda: str(path) in fleet.files("late") and str(path) in fleet.files("other"), 10, "the file seen")
        seen = time.monotonic() - copied
        placed = fleet.deploy("copied", path)
        assert [a.node_id for a in placed.assignments] in (["late"], ["other"])
        assert seen < 6, f"the copied file was seen after {seen:.1f}s"
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


def controlplane_log(fleet: Fleet) -> str:
    return next(p for p in fleet.cluster.procs if p.name == "controlplane").log_path.read_text()


def ready_on(fleet: Fleet, name: str) -> list[str]:
    listed = fleet.admin.ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=5).deployments
    return sorted(
        r.node_id
        for d in listed
        if d.deployment.spec.name == name
        for r in d.replicas
        if r.state == node_pb2.REPLICA_STATE_READY
    )


@pytest.mark.model
def test_a_node_back_with_less_ram_than_its_replicas_need_says_so_and_its_excess_moves(fleet: Fleet) -> None:
    path = fleet.dirs["late"] / "shrink.gguf"
    os.symlink(default_model_path(), path)
    override = fleet.cluster.dir / "late-inventory.yaml"
    cordon = admin_pb2.CordonNodeRequest(node_id="other")
    try:
        wait_for(lambda: str(path) in fleet.files("late"), 10, "the file seen")
        fleet.admin.CordonNode(cordon, timeout=5)  # both on "late" ("small" has no room for any)
        first = fleet.deploy("first", path).assignments[0]
        fleet.deploy("second", path)
        assert fleet.assigned("first") == fleet.assigned("second") == ["late"]
        wait_for(lambda: ready_on(fleet, "first") == ready_on(fleet, "second") == ["late"], 60, "both ready")
        # "late" comes back with room for one of them: 2 GiB (the reserve) and half as much again as one.
        ram = (2 * GiB + 1.5 * first.memory_bytes) / GiB
        override.write_text(yaml.safe_dump({"gpus": [], "ram_total_gib": ram}))
        fleet.procs["late"].signal(signal.SIGKILL)
        fleet.procs["late"].popen.wait()
        fleet.procs["late"] = fleet.cluster.restart(fleet.procs["late"])

        def overcommitted() -> str:
            node = fleet.nodes()["late"]
            return node.overcommitted if node.inventory.ram.total_bytes == int(ram * GiB) else ""

        reason = wait_for(overcommitted, 20, "late over-committed")
        assert reason.endswith("more than fits (second)"), reason  # the last placed is the one to move
        # No other node has room: both stay, and the operator is told, in the log and by `fleetlm status`.
        time.sleep(2)
        assert fleet.assigned("first") == fleet.assigned("second") == ["late"]
        assert f"node late is over-committed: {reason}" in controlplane_log(fleet)
        shown = next(n for n in status_json(fleet)["nodes"] if n["id"] == "late")
        assert shown["overcommitted"] == reason
        # Room elsewhere: the excess moves there (placed, ready, then removed from "late"); the other stays.
        fleet.admin.UncordonNode(admin_pb2.UncordonNodeRequest(node_id="other"), timeout=5)
        wait_for(lambda: fleet.assigned("second") == ["other"], 60, "second moved to other")
        assert ready_on(fleet, "second") == ["other"]
        assert fleet.assigned("first") == ["late"]
        assert fleet.nodes()["late"].overcommitted == ""
        assert "node late is no longer over-committed" in controlplane_log(fleet)
    finally:
        fleet.admin.UncordonNode(admin_pb2.UncordonNodeRequest(node_id="other"), timeout=5)
        fleet.undeploy("first")
        fleet.undeploy("second")
        path.unlink(missing_ok=True)
        override.write_text(yaml.safe_dump({"gpus": [], "ram_total_gib": 16}))
        fleet.procs["late"] = fleet.cluster.restart(fleet.procs["late"])
