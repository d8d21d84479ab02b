"""Deployments as operators change them, on a real fleet: etcd, a control plane given a deployments file
(`--deployments`), and two node agents with the model's weights in their models directory.

Each test uses names of its own, so the tests stand alone and in any order; one restarts the control plane.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2, routing_pb2, routing_pb2_grpc
from launcher.default_model import default_model_path
from mesh.errors import FleetError
from tests.cluster import Cluster, Proc, smollm_entry, wait_for, write_catalog

pytestmark = [pytest.mark.model, pytest.mark.cluster]

TTL = 3
MODEL_PATH = str(default_model_path())
FILE_MODEL = "smol-b"  # the deployments file's one entry


@dataclass
class Fleet:
    cluster: Cluster
    controlplane: Proc
    deployments_file: Path
    admin: admin_pb2_grpc.AdminServiceStub

    def deployment(self, name: str, context_size: int = 1024, **fields: Any) -> node_pb2.Deployment:
        spec = node_pb2.ModelSpec(name=name, path=MODEL_PATH, format="gguf", context_size=context_size)
        return node_pb2.Deployment(spec=spec, **fields)

    def deploy(self, deployment: node_pb2.Deployment) -> admin_pb2.DeployModelResponse:
        return self.admin.DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), timeout=30)

    def deployments(self) -> dict[str, admin_pb2.DeploymentStatus]:
        listed = self.admin.ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=5).deployments
        return {d.deployment.spec.name: d for d in listed}

    def log(self) -> str:
        return self.controlplane.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("deployments")
    cluster = Cluster(workdir)
    models = write_catalog(workdir / "models.yaml", [smollm_entry(FILE_MODEL, context_size=512)])
    try:
        cluster.start_etcd()
        cluster.start_controlplane(TTL, "--deployments", str(models))
        for node_id in ("big1", "big2"):
            cluster.start_node(node_id, models_dirs=[str(default_model_path().parent)], threads=1)
        admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cluster.controlplane))
        wait_for(lambda: len(admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes) == 2, 60, "2 nodes")
        yield Fleet(cluster, cluster.procs[1], models, admin)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def test_sending_the_same_deployment_again_keeps_its_replicas(fleet: Fleet) -> None:
    deployment = fleet.deployment("smol-a", min_replicas=1, max_replicas=3)
    assert fleet.deploy(deployment).deployment.replicas == 1  # a new deployment starts at min_replicas
    scaled = fleet.admin.ScaleDeployment(admin_pb2.ScaleDeploymentRequest(name="smol-a", replicas=2), timeout=30)
    assert scaled.deployment.replicas == 2

    again = fleet.deploy(deployment)
    assert again.deployment.replicas == 2, again
    assert sorted(a.node_id for a in again.assignments) == ["big1", "big2"]
    assert "removed smol-a" not in fleet.log()

    # A new max below the count: the count is moved into the new bounds.
    lowered = fleet.deploy(fleet.deployment("smol-a", min_replicas=1, max_replicas=1))
    assert lowered.deployment.replicas == 1
    assert len(lowered.assignments) == 1
    fleet.admin.UndeployModel(admin_pb2.UndeployModelRequest(name="smol-a"), timeout=30)


def _restarted(fleet: Fleet, logged: str) -> str:
    """Restart the control plane (same flags, same file); its log from then on, once it says `logged`."""
    start = len(fleet.log())
    fleet.controlplane = fleet.cluster.restart(fleet.controlplane)
    nodes = lambda: len(fleet.admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes) == 2  # noqa: E731
    wait_for(nodes, 60, "the nodes registered again")
    return wait_for(lambda: logged in fleet.log()[start:] and fleet.log()[start:], 60, f"'{logged}' logged")  # type: ignore[no-any-return]


def test_an_undeploy_of_a_file_deployment_outlives_a_restart_until_its_entry_changes(fleet: Fleet) -> None:
    wait_for(lambda: FILE_MODEL in fleet.deployments(), 30, f"{FILE_MODEL} from the file")
    fleet.admin.UndeployModel(admin_pb2.UndeployModelRequest(name=FILE_MODEL), timeout=30)

    # The same file, unchanged (before the fix: "deployment smol-b loaded from models.yaml", and it was back).
    logged = _restarted(fleet, f"deployment {FILE_MODEL} ")
    assert "kept undeployed" in logged, logged
    assert FILE_MODEL not in fleet.deployments()

    # The file's entry for it changes: the file deploys it again.
    write_catalog(fleet.deployments_file, [smollm_entry(FILE_MODEL, context_size=768)])
    logged = _restarted(fleet, f"deployment {FILE_MODEL} loaded from")
    assert fleet.deployments()[FILE_MODEL].deployment.spec.context_size == 768


def _routes(fleet: Fleet) -> routing_pb2.WatchRoutesResponse:
    """The routing table the control plane publishes to edges, as a new edge gets it."""
    with grpc.insecure_channel(fleet.cluster.controlplane) as channel:
        stream = routing_pb2_grpc.RoutingServiceStub(channel).WatchRoutes(routing_pb2.WatchRoutesRequest(), timeout=10)
        snapshot = next(stream)
        stream.cancel()
    return snapshot  # type: ignore[no-any-return]


def test_a_model_a_node_pins_under_a_deployments_name_is_not_routed_for_it(fleet: Fleet) -> None:
    name = "smol-pin"
    deployment = fleet.deployment(name, context_size=1024, min_replicas=1, max_replicas=1)
    placed = fleet.deploy(deployment).assignments
    assert [a.node_id for a in placed] != ["pinner"]
    # A node whose own catalog pins the same name with a smaller context registers afterwards.
    proc, _ = fleet.cluster.start_node("pinner", [smollm_entry(name, context_size=256)], threads=1)
    try:

        def pinned_ready() -> bool:
            node = fleet.admin.GetNode(admin_pb2.GetNodeRequest(node_id="pinner"), timeout=5).node
            return any(r.model.name == name and r.state == node_pb2.REPLICA_STATE_READY for r in node.replicas)

        wait_for(pinned_ready, 60, "the pinned replica ready")
        wait_for(lambda: fleet.deployments()[name].replicas[0].state == node_pb2.REPLICA_STATE_READY, 60, "placed")

        # Only the deployment's replica is routed under its name, and the name shows the deployment's context
        # (before the fix: the pinned one was routed too, and 3 of 8 requests failed with its context of 256).
        routes = _routes(fleet)
        routed = {n.node_id: [r.model for r in n.replicas] for n in routes.nodes}
        assert name not in routed["pinner"]
        assert [node_id for node_id, models in routed.items() if name in models] == [placed[0].node_id]
        info = next(m.info for m in routes.models if m.info.name == name)
        assert (info.context_size, info.ready_replicas) == (1024, 1)
        listed = fleet.admin.ListModels(admin_pb2.ListModelsRequest(), timeout=5).models
        assert [r.node_id for m in listed if m.spec.name == name for r in m.replicas] == [placed[0].node_id]
        warning = f"node pinner pins a model named '{name}'"
        wait_for(lambda: warning in fleet.log(), 10, "the warning")
        assert fleet.log().count(warning) == 1  # said once, not at every report

        # A deployment of a name a live node pins with another spec is refused, naming the node.
        with pytest.raises(grpc.RpcError) as refused:
            fleet.deploy(deployment)
        error = FleetError.from_rpc_error(refused.value)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node pinner" in error.message and "context_size 256, not 1024" in error.message, error.message
    finally:
        proc.stop()
        fleet.admin.UndeployModel(admin_pb2.UndeployModelRequest(name=name), timeout=30)
