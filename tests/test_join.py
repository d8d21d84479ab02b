"""Nodes join the fleet with a join token: the real `fleetlm join-token` command, real node processes, a real
control plane with mutual TLS on a real etcd. A valid token gives the node a certificate for its own id and it
registers; a wrong CA pin, an expired, revoked or unknown token are refused, and no secret reaches a log."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from google.protobuf import duration_pb2

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, identity_pb2, identity_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.fleet_ca import fingerprint, uri_identities
from mesh.lifecycle import free_port
from tests.cluster import START_TIMEOUT, Cluster, Proc, fleetlm, wait_for

pytestmark = [pytest.mark.cluster]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("join"), tls=True)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(lease_ttl=3)
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def join_token(fleet: Cluster, *args: str) -> tuple[str, str, str]:
    """(token, CA fingerprint, the whole output) of `fleetlm join-token create`."""
    out = subprocess.run(
        fleetlm("join-token", "create", "--etcd", fleet.etcd_url, "--ca-dir", str(fleet.ca_dir), *args),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    token = re.search(r"join token \(shown once\): (\S+)", out)
    pin = re.search(r"--ca-fingerprint (sha256:[0-9a-f]{64})", out)
    assert token and pin, out
    return token.group(1), pin.group(1), out


def node_ids(fleet: Cluster) -> set[str]:
    with fleet.channel(fleet.controlplane) as channel:
        nodes = admin_pb2_grpc.AdminServiceStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=10).nodes
    return {n.node_id for n in nodes}


def joining_node(fleet: Cluster, node_id: str, token: str | None, pin: str, state: str = "") -> Proc:
    """A node that joins with `token` (None: it starts with what its state directory kept, no token)."""
    argv = fleetlm(
        "node",
        "--node-id",
        node_id,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--controlplane",
        fleet.controlplane,
        "--threads",
        "1",
        "--state-dir",
        str(fleet.dir / (state or f"state-{node_id}")),
        "--join-address",
        fleet.join_address,
        "--ca-fingerprint",
        pin,
    )
    # The token through the environment, as an operator should pass it (not in `ps`).
    env = {"FLEETLM_NODE_JOIN_TOKEN": token} if token is not None else {}
    proc = Proc(f"node-{node_id}-{len(fleet.procs)}", argv, fleet.dir, env=env)
    fleet.procs.append(proc)
    return proc


def refused(proc: Proc) -> str:
    """The node's log once it has exited, which it must: a node that cannot join does not start."""
    proc.popen.wait(START_TIMEOUT)
    assert proc.popen.returncode != 0
    return proc.log_text()


def test_a_node_joins_with_a_token_and_registers_as_itself(fleet: Cluster) -> None:
    token, pin, _ = join_token(fleet, "--ttl", "600")
    proc = joining_node(fleet, "joined-1", token, pin)
    wait_for(lambda: "joined-1" in node_ids(fleet), START_TIMEOUT, "the joined node to register", proc)
    identity = fleet.dir / "state-joined-1" / "identity"
    cert = x509.load_pem_x509_certificate((identity / "node.crt").read_bytes())
    assert uri_identities(cert) == ["spiffe://fleetlm/node/joined-1"]
    assert stat.S_IMODE((identity / "node.key").stat().st_mode) == 0o600
    secret = token.split(".", 1)[1]
    assert secret not in proc.log_text() and secret not in fleet.procs[1].log_text()
    # The token is in etcd only as a hash.
    dump = subprocess.run(
        [*fleetlm("join-token", "list", "--etcd", fleet.etcd_url)], capture_output=True, text=True, timeout=60
    ).stdout
    assert secret not in dump and "valid" in dump
    proc.stop()


def test_a_wrong_pin_an_expired_a_revoked_or_an_unknown_token_is_refused(fleet: Cluster) -> None:
    good, pin, _ = join_token(fleet, "--ttl", "600")
    expired, _, _ = join_token(fleet, "--ttl", "1")
    revoked, _, _ = join_token(fleet, "--ttl", "600")
    subprocess.run(
        fleetlm("join-token", "revoke", revoked.split(".")[0], "--etcd", fleet.etcd_url), check=True, timeout=60
    )
    time.sleep(1.5)  # the 1 s token is past its expiry (checked against the wall clock by the control plane)
    unknown = good.split(".")[0] + ".not-the-secret"
    wrong_pin = "sha256:" + "0" * 64
    cases = {
        "wrong pin": joining_node(fleet, "bad-pin", good, wrong_pin),
        "expired": joining_node(fleet, "bad-expired", expired, pin),
        "revoked": joining_node(fleet, "bad-revoked", revoked, pin),
        "unknown": joining_node(fleet, "bad-unknown", unknown, pin),
        # An id its certificate could not carry as a DNS name (the edge dials a node by it).
        "bad id": joining_node(fleet, "bad id!", good, pin),
    }
    logs = {case: refused(proc) for case, proc in cases.items()}
    assert "the node id 'bad id!' must be ASCII letters" in logs["bad id"], logs["bad id"]
    assert "does not present the pinned CA" in logs["wrong pin"]
    for case in ("expired", "revoked", "unknown"):
        assert "UNAUTHENTICATED" in logs[case], logs[case]
    for token in (good, expired, revoked, unknown):
        secret = token.split(".", 1)[1]
        assert all(secret not in text for text in logs.values())
        assert secret not in fleet.procs[1].log_text()
    assert not node_ids(fleet) & {"bad-pin", "bad-expired", "bad-revoked", "bad-unknown"}


def test_join_token_create_refuses_a_ttl_it_cannot_keep(fleet: Cluster) -> None:
    """`fleetlm join-token create` with a ttl that is not a positive number, or ends after the year 9999,
    says so and stores nothing (NaN compared as never expired; a far expiry could not be listed)."""

    def listed() -> str:
        argv = fleetlm("join-token", "list", "--etcd", fleet.etcd_url)
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout

    before = listed()
    for ttl, message in [("nan", "positive"), ("-5", "positive"), ("0", "positive"), ("1e12", "year 10000")]:
        argv = fleetlm("join-token", "create", "--etcd", fleet.etcd_url, "--ca-dir", str(fleet.ca_dir), "--ttl", ttl)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, (ttl, done)
        assert "join token" not in done.stdout
    assert listed() == before


def test_joining_is_refused_over_plaintext_and_the_join_port_serves_nothing_else(fleet: Cluster) -> None:
    with grpc.insecure_channel(fleet.join_address) as channel, pytest.raises(grpc.RpcError) as plaintext:
        admin_pb2_grpc.AdminServiceStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=10)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    ca = (fleet.ca_dir / "ca.crt").read_bytes()
    with (
        grpc.secure_channel(fleet.join_address, grpc.ssl_channel_credentials(ca)) as channel,
        pytest.raises(grpc.RpcError) as other,
    ):
        admin_pb2_grpc.AdminServiceStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=10)
    assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no AdminService without a client certificate


def test_a_revoked_node_is_refused_and_leaves_the_fleet(fleet: Cluster) -> None:
    token, pin, _ = join_token(fleet, "--ttl", "600")
    proc = joining_node(fleet, "revoked-1", token, pin)
    wait_for(lambda: "revoked-1" in node_ids(fleet), START_TIMEOUT, "the joined node to register", proc)
    subprocess.run(fleetlm("ca", "revoke", "--node", "revoked-1", "--etcd", fleet.etcd_url), check=True, timeout=60)
    # Its next heartbeat is refused (the registry re-reads revocations every 2 s), then its 3 s lease lapses:
    # a few seconds; 30 s is for a busy machine.
    wait_for(lambda: "revoked-1" not in node_ids(fleet), 30, "the revoked node to leave the fleet")
    assert "node revoked-1 refused: node revoked-1 is revoked" in fleet.procs[1].log_text()
    time.sleep(5)  # it keeps trying to register again: every attempt is refused
    assert "revoked-1" not in node_ids(fleet)
    proc.stop()
    assert "the control plane refuses this node: node revoked-1 is revoked" in proc.log_text()
    # A join token does not let it back in, even with a new key (its state directory wiped): a revocation stands
    # until an operator lifts it.
    shutil.copytree(fleet.dir / "state-revoked-1", fleet.dir / "state-revoked-1-old")
    shutil.rmtree(fleet.dir / "state-revoked-1")
    log = refused(joining_node(fleet, "revoked-1", token, pin))
    assert "PERMISSION_DENIED" in log and "fleetlm ca readmit --node revoked-1" in log, log
    assert "revoked-1" not in node_ids(fleet)
    subprocess.run(fleetlm("ca", "readmit", "--node", "revoked-1", "--etcd", fleet.etcd_url), check=True, timeout=60)
    # Readmitted, it joins again with a token; the certificate it held before the revocation stays refused.
    stolen = joining_node(fleet, "revoked-1", None, pin, state="state-revoked-1-old")
    wait_for(lambda: "the control plane refuses this node" in stolen.log_text(), 30, "the old certificate refused")
    assert "revoked-1" not in node_ids(fleet)
    stolen.stop()
    again = joining_node(fleet, "revoked-1", token, pin)
    wait_for(lambda: "revoked-1" in node_ids(fleet), START_TIMEOUT, "the readmitted node to register", again)
    again.stop()
    # Not revoked any more: readmitting it again says so.
    twice = subprocess.run(fleetlm("ca", "readmit", "--node", "revoked-1", "--etcd", fleet.etcd_url),
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert twice.returncode != 0 and "is not revoked" in twice.stderr


def test_a_second_node_cannot_join_under_the_id_of_a_running_one(fleet: Cluster) -> None:
    """Two hosts of one name (the default node id) or a token holder: a join under a running node's id would
    lock that node out (its certificate superseded). It is refused, and the running node serves on."""
    token, pin, _ = join_token(fleet, "--ttl", "600")
    first = joining_node(fleet, "twin-1", token, pin)
    wait_for(lambda: "twin-1" in node_ids(fleet), START_TIMEOUT, "the first node to register", first)
    log = refused(joining_node(fleet, "twin-1", token, pin, state="state-twin-1-b"))
    assert "ALREADY_EXISTS" in log and "another --node-id" in log, log
    time.sleep(3)  # the first one's heartbeats go on being accepted
    assert "twin-1" in node_ids(fleet) and "refuses this node" not in first.log_text()
    first.stop()


def test_a_node_that_joined_starts_again_without_its_token(fleet: Cluster) -> None:
    """The token is for joining: a node started again without it uses the certificate its state directory
    kept (and renews it); one whose kept certificate is not its own says so and does not start."""
    token, pin, _ = join_token(fleet, "--ttl", "600")
    proc = joining_node(fleet, "kept-1", token, pin)
    wait_for(lambda: "kept-1" in node_ids(fleet), START_TIMEOUT, "the joined node to register", proc)
    proc.stop()  # a clean stop deregisters at once
    wait_for(lambda: "kept-1" not in node_ids(fleet), 30, "the node to deregister")
    again = joining_node(fleet, "kept-1", None, pin)
    wait_for(
        lambda: "kept-1" in node_ids(fleet), START_TIMEOUT, "the node to register with its kept certificate", again
    )
    assert "uses the certificate it was given when it joined" in again.log_text()
    again.stop()
    log = refused(joining_node(fleet, "kept-2", None, pin, state="state-kept-1"))
    assert "is not node kept-2's" in log and "join again with a join token" in log, log


def test_join_tokens_through_admin_service_with_real_grpcurl(fleet: Cluster) -> None:
    tls = [
        "-cacert",
        str(fleet.ca_dir / "ca.crt"),
        "-cert",
        str(fleet.dir / "admin.crt"),
        "-key",
        str(fleet.dir / "admin.key"),
    ]

    def grpcurl(method: str, body: str = "{}") -> dict[str, object]:
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "grpcurl"),
                *tls,
                "-d",
                body,
                fleet.controlplane,
                f"fleetlm.controlplane.v1.AdminService/{method}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    def field(message: dict[str, object], name: str) -> object:
        """A field by its proto name, which grpcurl prints, or by its lowerCamel JSON name."""
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
        return message[name] if name in message else message[camel]

    created = grpcurl("CreateJoinToken", '{"ttl": "600s", "description": "rack 7"}')
    token, pin = str(created["token"]), str(field(created, "ca_fingerprint"))
    assert token.startswith("fljt_") and pin == fingerprint((fleet.ca_dir / "ca.crt").read_bytes())
    token_id = token.removeprefix("fljt_").split(".")[0]
    listed = field(grpcurl("ListJoinTokens"), "join_tokens")
    assert isinstance(listed, list)
    mine = [t for t in listed if t["id"] == token_id]
    assert mine and mine[0]["state"] == "JOIN_TOKEN_STATE_VALID" and mine[0]["description"] == "rack 7"
    assert token.split(".", 1)[1] not in json.dumps(listed)  # never the secret again
    # The token works: a node joins with it. Then it is revoked, and the next node is refused.
    proc = joining_node(fleet, "grpcurl-joined", token, pin)
    wait_for(lambda: "grpcurl-joined" in node_ids(fleet), START_TIMEOUT, "the joined node to register", proc)
    revoked = grpcurl("RevokeJoinToken", json.dumps({"id": token_id}))
    assert field(revoked, "join_token")["state"] == "JOIN_TOKEN_STATE_REVOKED"  # type: ignore[index]
    assert "UNAUTHENTICATED" in refused(joining_node(fleet, "grpcurl-late", token, pin))
    proc.stop()
    # A ttl outside Duration's range (grpcurl's JSON refuses one; another client may send it) is
    # INVALID_ARGUMENT naming ttl, not an internal error.
    admin = grpc.ssl_channel_credentials(
        (fleet.ca_dir / "ca.crt").read_bytes(), (fleet.dir / "admin.key").read_bytes(),
        (fleet.dir / "admin.crt").read_bytes(),
    )  # fmt: skip
    with grpc.secure_channel(fleet.controlplane, admin) as channel, pytest.raises(grpc.RpcError) as huge:
        admin_pb2_grpc.AdminServiceStub(channel).CreateJoinToken(
            admin_pb2.CreateJoinTokenRequest(ttl=duration_pb2.Duration(seconds=2**62)), timeout=10
        )
    assert huge.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl" in str(huge.value.details())
    # A ttl inside Duration's range that ends after the year 9999 (the last time a Timestamp holds) is
    # refused the same way, before a token is stored: one stored would break every ListJoinTokens after it.
    with grpc.secure_channel(fleet.controlplane, admin) as channel, pytest.raises(grpc.RpcError) as late:
        admin_pb2_grpc.AdminServiceStub(channel).CreateJoinToken(
            admin_pb2.CreateJoinTokenRequest(ttl=duration_pb2.Duration(seconds=300_000_000_000)), timeout=10
        )
    assert late.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl" in str(late.value.details())
    assert len(field(grpcurl("ListJoinTokens"), "join_tokens")) == len(listed)  # type: ignore[arg-type]
    # Plaintext, or TLS without the admin's certificate, does not reach AdminService.
    with grpc.insecure_channel(fleet.controlplane) as channel, pytest.raises(grpc.RpcError) as plain:
        admin_pb2_grpc.AdminServiceStub(channel).CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=10)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE


def test_join_and_join_token_refusals_carry_the_vocabularys_error_info(fleet: Cluster) -> None:
    """JoinService and the join-token RPCs refused with context.abort: the status code alone, with no
    google.rpc.ErrorInfo. Each refusal now has the code it had and the ErrorInfo (reason, `param`)."""

    def refused_by(method: object, request: object) -> tuple[grpc.StatusCode, FleetError | None]:
        with pytest.raises(grpc.RpcError) as caught:
            method(request, timeout=30)  # type: ignore[operator]
        return caught.value.code(), FleetError.sent_by_peer(caught.value)

    ca = (fleet.ca_dir / "ca.crt").read_bytes()
    with grpc.secure_channel(fleet.join_address, grpc.ssl_channel_credentials(ca)) as channel:
        join = identity_pb2_grpc.JoinServiceStub(channel).Join
        code, error = refused_by(join, identity_pb2.JoinRequest(token="fljt_nope.nope", node_id="x-1", csr_pem=b"-"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and error is not None
        assert error.code == ErrorCode.UNAUTHENTICATED and "join token" in error.message
        code, error = refused_by(join, identity_pb2.JoinRequest(token="fljt_nope.nope", node_id="not ok!"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and error is not None
        assert (error.code, error.param) == (ErrorCode.INVALID_REQUEST, "node_id")
    with fleet.channel(fleet.controlplane) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        code, error = refused_by(
            admin.CreateJoinToken, admin_pb2.CreateJoinTokenRequest(ttl=duration_pb2.Duration(seconds=2**62))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and error is not None
        assert (error.code, error.param) == (ErrorCode.INVALID_REQUEST, "ttl")
        code, error = refused_by(admin.RevokeJoinToken, admin_pb2.RevokeJoinTokenRequest())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and error is not None
        assert (error.code, error.param) == (ErrorCode.INVALID_REQUEST, "id")
