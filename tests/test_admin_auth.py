"""The admin credential across two control planes on a real etcd: a write sent to the follower is forwarded
to the leader with the caller's own credential (refused there if it is wrong), and the edge credential (derived
from the fleet secret) opens only the two RPCs edges call."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from mesh.auth import create_secret_file, edge_credential, read_secret_file
from tests.cluster import Cluster, start_controlplanes, wait_for

pytestmark = [pytest.mark.cluster]


def _stub(address: str) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(address))


@pytest.fixture(scope="module")
def two_controlplanes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str, str]]:
    """(leader, follower, admin token, edge credential)"""
    workdir = tmp_path_factory.mktemp("admin-auth")
    secret_file, token_file = workdir / "fleet.secret", workdir / "admin.token"
    create_secret_file(secret_file)
    create_secret_file(token_file)
    cluster = Cluster(workdir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEETLM_CP_AUTH_SECRET_FILE", str(secret_file))
        patch.setenv("FLEETLM_CP_ADMIN_TOKEN_FILE", str(token_file))
        try:
            cluster.start_etcd()
            addresses = [a for _, a in start_controlplanes(cluster, 2)]
            token = token_file.read_text().strip()
            metadata = (("authorization", f"Bearer {token}"),)

            def leader() -> str:
                reply = _stub(addresses[0]).GetLeader(admin_pb2.GetLeaderRequest(), metadata=metadata, timeout=5)
                return str(reply.leader_address)

            lead = wait_for(leader, 30, "a leader")
            follower = next(a for a in addresses if a != lead)
            yield lead, follower, token, edge_credential(read_secret_file(secret_file))
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            cluster.close()


def test_a_write_through_the_follower_is_made_by_the_leader_with_the_callers_credential(
    two_controlplanes: tuple[str, str, str, str],
) -> None:
    lead, follower, token, _ = two_controlplanes
    good = (("authorization", f"Bearer {token}"),)
    request = admin_pb2.CreateApiKeyRequest(name="via-follower")
    created = _stub(follower).CreateApiKey(request, metadata=good, timeout=30)
    assert created.secret.startswith("flk-")
    listed = _stub(lead).ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=good, timeout=30)
    assert created.key.id in [k.id for k in listed.keys]
    with pytest.raises(grpc.RpcError) as refused:
        _stub(follower).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(name="x"), metadata=(("authorization", "Bearer " + "x" * 43),), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details().endswith("; the credential sent is not valid"), refused.value.details()
    # The token without "Bearer " was answered "no credential was sent".
    for metadata, why in (((("authorization", token),), "is not 'Bearer <token>'"), ((), "no credential was sent")):
        with pytest.raises(grpc.RpcError) as refused:
            _stub(lead).ListNodes(admin_pb2.ListNodesRequest(), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in refused.value.details()
        assert token not in refused.value.details()


def test_the_edge_credential_opens_only_the_edge_rpcs(two_controlplanes: tuple[str, str, str, str]) -> None:
    lead, follower, token, edge = two_controlplanes
    key = (
        _stub(lead)
        .CreateApiKey(
            admin_pb2.CreateApiKeyRequest(name="edge-rpc"), metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )
        .key
    )
    as_edge = (("authorization", f"Bearer {edge}"),)
    for address in (lead, follower):  # the follower forwards AcquireQuota to the leader, credential and all
        grant = _stub(address).AcquireQuota(
            admin_pb2.AcquireQuotaRequest(edge_id="e", key_id=key.id, requests=1), metadata=as_edge, timeout=30
        )
        assert grant.requests_granted == 1
    stream = _stub(follower).WatchApiKeys(admin_pb2.WatchApiKeysRequest(edge_id="e"), metadata=as_edge, timeout=30)
    # The follower reads etcd every second: its stream brings the key then (bounded by the call's timeout).
    update = next(u for u in stream if key.id in [r.key.id for r in u.keys])
    assert all(len(r.hash) == 32 for r in update.keys)
    stream.cancel()
    for call in (
        lambda: _stub(lead).ListNodes(admin_pb2.ListNodesRequest(), metadata=as_edge, timeout=30),
        lambda: _stub(lead).ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=as_edge, timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(("seconds", "nanos"), [(-(10**15), 0), (10**15, 0), (2**40, -1), (1, 0)])
def test_create_with_a_bad_expiry_is_a_400_naming_it(
    two_controlplanes: tuple[str, str, str, str], seconds: int, nanos: int
) -> None:
    lead, _, token, _ = two_controlplanes
    request = admin_pb2.CreateApiKeyRequest(name="bad-expiry")
    request.expires_at.seconds, request.expires_at.nanos = seconds, nanos
    with pytest.raises(grpc.RpcError) as refused:
        _stub(lead).CreateApiKey(request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expires_at" in (refused.value.details() or "")
