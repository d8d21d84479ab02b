"""AdminService's refusals on a real control plane and etcd: each is a status code plus a google.rpc
ErrorInfo from the one vocabulary, and a request that is wrong (an empty required name, a value no engine
has, an explicit 0 an `optional` field cannot take) is INVALID_ARGUMENT naming the field, never NOT_FOUND
for '' or a silent default."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from mesh.errors import ErrorCode, FleetError
from tests.cluster import Cluster

pytestmark = [pytest.mark.cluster]


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    """etcd and one control plane, with no node: every refusal here comes before placement."""
    cluster = Cluster(tmp_path_factory.mktemp("admin-errors"))
    try:
        cluster.start_etcd()
        cluster.start_controlplane(3)
        with cluster.channel(cluster.controlplane) as channel:
            yield admin_pb2_grpc.AdminServiceStub(channel)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def refusal(method: Any, request: Any) -> tuple[grpc.StatusCode, FleetError]:
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=30)
    sent = FleetError.sent_by_peer(caught.value)
    assert sent is not None, f"no ErrorInfo: {caught.value.code()} {caught.value.details()}"
    return caught.value.code(), sent


def deployment(**spec: Any) -> node_pb2.Deployment:
    fields = {"name": "m", "path": "/models/m.gguf", "format": "gguf"} | spec
    return node_pb2.Deployment(spec=node_pb2.ModelSpec(**fields), min_replicas=1, max_replicas=1)


def test_an_empty_required_name_is_invalid_argument_naming_the_field(
    admin: admin_pb2_grpc.AdminServiceStub,
) -> None:
    cases = [
        (admin.ScaleDeployment, admin_pb2.ScaleDeploymentRequest(), "name"),
        (admin.UndeployModel, admin_pb2.UndeployModelRequest(), "name"),
        (admin.EnsureReplica, admin_pb2.EnsureReplicaRequest(), "name"),
        (admin.AcquireQuota, admin_pb2.AcquireQuotaRequest(edge_id="e"), "key_id"),
        (admin.CordonNode, admin_pb2.CordonNodeRequest(), "node_id"),
        (admin.GetNode, admin_pb2.GetNodeRequest(), "node_id"),
        (admin.RevokeApiKey, admin_pb2.RevokeApiKeyRequest(), "id"),
        (admin.RevokeJoinToken, admin_pb2.RevokeJoinTokenRequest(), "id"),
    ]
    for method, request, param in cases:
        code, error = refusal(method, request)
        expected = (grpc.StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_REQUEST, param)
        assert (code, error.code, error.param) == expected, (type(request).__name__, error)
        assert f"{param} is required" in error.message


def test_a_name_that_is_not_there_is_still_not_found(admin: admin_pb2_grpc.AdminServiceStub) -> None:
    code, error = refusal(admin.ScaleDeployment, admin_pb2.ScaleDeploymentRequest(name="nope", replicas=1))
    assert (code, error.code) == (grpc.StatusCode.NOT_FOUND, ErrorCode.MODEL_NOT_FOUND)


def test_a_bad_value_in_the_spec_is_invalid_argument_naming_the_field(
    admin: admin_pb2_grpc.AdminServiceStub,
) -> None:
    """An unknown engine is a bad value in the request, as an unknown format or device is (it was
    FAILED_PRECONDITION FORMAT_NOT_SUPPORTED, the code for a format no node can run)."""
    for spec, param in [
        ({"engine": "vllm"}, "deployment.spec.engine"),
        ({"format": "onnx"}, "deployment.spec.format"),
        ({"device": "tpu"}, "deployment.spec.device"),
        # Nodes report weights by absolute paths: a relative one was NO_CAPACITY on every node, retried for ever.
        ({"path": "models/m.gguf"}, "deployment.spec.path"),
    ]:
        code, error = refusal(admin.DeployModel, admin_pb2.DeployModelRequest(deployment=deployment(**spec)))
        assert (code, error.code, error.param) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_REQUEST, param)
    # A known engine that cannot run on what is asked is still the fleet's limit, not a bad value.
    code, error = refusal(
        admin.DeployModel,
        admin_pb2.DeployModelRequest(deployment=deployment(format="awq", engine="sglang", device="cpu")),
    )
    assert (code, error.code) == (grpc.StatusCode.FAILED_PRECONDITION, ErrorCode.FORMAT_NOT_SUPPORTED)


def test_an_explicit_zero_an_optional_field_cannot_take_is_refused(admin: admin_pb2_grpc.AdminServiceStub) -> None:
    """`optional` fields: set means set. A 0 that the engine's default used to replace silently is
    INVALID_ARGUMENT naming the field; max_queued_requests 0 (no queue) is a real value and is not refused
    for it."""
    for spec, param in [
        ({"max_running_requests": 0}, "deployment.spec.max_running_requests"),
        ({"gpu_count": 0}, "deployment.spec.gpu_count"),
        ({"gpu_count": 65}, "deployment.spec.gpu_count"),
        ({"startup_timeout": duration_pb2.Duration()}, "deployment.spec.startup_timeout"),
    ]:
        code, error = refusal(admin.DeployModel, admin_pb2.DeployModelRequest(deployment=deployment(**spec)))
        assert (code, error.code, error.param) == (grpc.StatusCode.INVALID_ARGUMENT, ErrorCode.INVALID_REQUEST, param)
    # Past validation: refused only because no node holds the file (there is no node here at all).
    code, error = refusal(admin.DeployModel, admin_pb2.DeployModelRequest(deployment=deployment(max_queued_requests=0)))
    assert error.code != ErrorCode.INVALID_REQUEST, error


def test_what_this_control_plane_was_not_started_with_is_failed_precondition_not_configured(
    admin: admin_pb2_grpc.AdminServiceStub,
) -> None:
    """No fleet CA (--ca-dir) and no fleet secret (--auth-secret-file) here: the join-token RPCs had no
    ErrorInfo at all, and CreateApiKey said FORMAT_NOT_SUPPORTED (a format no node can run)."""
    for method, request in [
        (admin.CreateJoinToken, admin_pb2.CreateJoinTokenRequest()),
        (admin.ListJoinTokens, admin_pb2.ListJoinTokensRequest()),
        (admin.RevokeJoinToken, admin_pb2.RevokeJoinTokenRequest(id="nope")),
        (admin.CreateApiKey, admin_pb2.CreateApiKeyRequest(name="x")),
    ]:
        code, error = refusal(method, request)
        assert (code, error.code) == (grpc.StatusCode.FAILED_PRECONDITION, ErrorCode.NOT_CONFIGURED), error
        assert "--ca-dir" in error.message or "--auth-secret-file" in error.message
