"""TLS on the fleet's links, with real certificates from a real fleet CA: the control plane speaks only TLS
(read from the handshake bytes), requires a client certificate from the fleet CA, lets a node act only as
the node its certificate names, and picks up a rotated certificate without a restart."""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetlm.controlplane.v1 import node_pb2, registry_pb2, registry_pb2_grpc
from mesh.channels import CHANNEL_OPTIONS
from mesh.errors import FleetError
from mesh.fleet_ca import FleetCA, fingerprint, identity_uri, node_dns_name, uri_identities, write_private, write_public
from mesh.grpc_server import GrpcServer
from mesh.tls import TlsFiles, secure_channel, server_credentials
from tests.cluster import Cluster, fleetlm

pytestmark = [pytest.mark.cluster]

# A rotation is seen by the next handshake after the files change; generous for a busy 2-core machine.
ROTATION_BOUND = 30


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("tls"), tls=True)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(lease_ttl=3)
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def test_fleet_ca_signs_identities_and_keeps_keys_private(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        FleetCA.create(tmp_path / "ca")  # never replaced: every certificate it signed would break
    cert_pem, key_pem = ca.issue(identity_uri("node", "n1"), ips=["127.0.0.1"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    assert uri_identities(cert) == ["spiffe://fleetlm/node/n1"]
    dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert node_dns_name("n1") in dns.get_values_for_type(x509.DNSName)
    assert b"PRIVATE KEY" in key_pem and key_pem not in cert_pem
    # The pin is the SHA-256 of the CA certificate's DER, as `openssl x509 -fingerprint -sha256` prints it.
    der = ssl.PEM_cert_to_DER_cert(ca.cert_pem.decode())
    assert fingerprint(ca.cert_pem) == "sha256:" + __import__("hashlib").sha256(der).hexdigest()
    assert FleetCA.load(tmp_path / "ca").fingerprint == ca.fingerprint


def test_ca_issue_refuses_a_lifetime_it_cannot_give(tmp_path: Path) -> None:
    """`fleetlm ca issue --days` that is not a positive number, is beyond any date or outlives the fleet CA
    is an error line naming the lifetime, and writes nothing; a lifetime the CA covers is issued."""
    ca_dir = tmp_path / "ca"
    subprocess.run(fleetlm("ca", "init", "--dir", str(ca_dir)), check=True, capture_output=True, timeout=60)
    for days, message in [("nan", "positive"), ("inf", "positive"), ("0", "positive"), ("-1", "positive"),
                          ("1e9", "beyond any date"), ("4000", "would outlive the fleet CA")]:  # fmt: skip
        out = tmp_path / f"e{days}"
        argv = fleetlm("ca", "issue", "--dir", str(ca_dir), "--identity", "edge/e1", "--days", days, "--out", str(out))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, (days, done)
        assert not out.with_suffix(".crt").exists() and not out.with_suffix(".key").exists()
    argv = fleetlm(
        "ca", "issue", "--dir", str(ca_dir), "--identity", "edge/e1", "--days", "365", "--out", str(tmp_path / "ok")
    )
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    cert = x509.load_pem_x509_certificate((tmp_path / "ok.crt").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=365)


def test_ca_issue_refuses_names_a_certificate_cannot_carry(tmp_path: Path) -> None:
    """A --dns that is not a DNS name and an identity id that is not a host name are an error line naming
    them, and nothing is written; a CA directory with no CA says how to make one."""
    ca_dir = tmp_path / "ca"
    out = tmp_path / "x"

    def issue(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = fleetlm("ca", "issue", "--dir", str(ca_dir), "--out", str(out), *flags)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    none = issue("--identity", "edge/e1")
    assert none.returncode != 0 and f"fleetlm ca init --dir {ca_dir}" in none.stderr, none
    subprocess.run(fleetlm("ca", "init", "--dir", str(ca_dir)), check=True, capture_output=True, timeout=60)
    for flags, named in [
        (["--identity", "edge/e1", "--dns", "bad host!"], "'bad host!' is not a DNS name"),
        (["--identity", "edge/e1", "--dns", "a..b"], "'a..b' is not a DNS name"),
        (["--identity", "edge/e1", "--dns", "x" * 64 + ".com"], "is not a DNS name"),
        (["--identity", "edge/my edge"], "the edge id 'my edge' must be"),
        (["--identity", "node/*.n"], "the node id '*.n' must be"),
    ]:
        done = issue(*flags)
        assert done.returncode != 0 and named in done.stderr and "Traceback" not in done.stderr, (flags, done)
        assert not out.with_suffix(".crt").exists() and not out.with_suffix(".key").exists()
    assert (
        issue("--identity", "node/gpu-1.rack_2", "--dns", "*.example.com", "--dns", "cp-1.example.com").returncode == 0
    )
    names = x509.load_pem_x509_certificate(out.with_suffix(".crt").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert set(names.value.get_values_for_type(x509.DNSName)) == {
        "*.example.com",
        "cp-1.example.com",
        node_dns_name("gpu-1.rack_2"),
    }


def _server_hello(address: str) -> bytes:
    """The first bytes the server answers a real TLS ClientHello with, read off the socket."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(outgoing.read())
        return raw.recv(5 + 4)


def _answer_to_plaintext_http2(address: str) -> bytes:
    """What the server answers a plaintext HTTP/2 connection preface and an empty SETTINGS frame with."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        raw.settimeout(10)
        try:
            return raw.recv(64)
        except (ConnectionResetError, TimeoutError):
            return b""


def test_the_control_plane_speaks_tls_and_refuses_plaintext(fleet: Cluster) -> None:
    hello = _server_hello(fleet.controlplane)
    # A TLS record of type handshake (22), version 3.x, whose first message is a ServerHello (2).
    assert hello[0] == 0x16 and hello[1] == 3 and hello[5] == 0x02, hello
    answer = _answer_to_plaintext_http2(fleet.controlplane)
    # A plaintext HTTP/2 server answers with its SETTINGS frame (type 4 at byte 3); this one does not speak it.
    assert not (len(answer) >= 4 and answer[3] == 4), answer
    with grpc.insecure_channel(fleet.controlplane) as channel, pytest.raises(grpc.RpcError) as refused:
        registry_pb2_grpc.NodeRegistryServiceStub(channel).RegisterNode(
            registry_pb2.RegisterNodeRequest(node_id="plain", inference_address="127.0.0.1:1"), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def _register(fleet: Cluster, credentials: grpc.ChannelCredentials, node_id: str) -> grpc.StatusCode:
    """The call's status code; a refusal by the control plane must also carry the vocabulary's ErrorInfo with
    the same code (the handshake's own failures, UNAVAILABLE, carry none)."""
    with grpc.secure_channel(fleet.controlplane, credentials) as channel:
        stub = registry_pb2_grpc.NodeRegistryServiceStub(channel)
        try:
            reply = stub.RegisterNode(
                registry_pb2.RegisterNodeRequest(
                    node_id=node_id, inference_address="127.0.0.1:1", inventory=node_pb2.Inventory()
                ),
                timeout=10,
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                sent = FleetError.sent_by_peer(exc)
                assert sent is not None and sent.grpc_code == exc.code(), (exc.code(), exc.details())
            return exc.code()  # type: ignore[no-any-return]
        stub.DeregisterNode(registry_pb2.DeregisterNodeRequest(node_id=node_id, lease_id=reply.lease_id), timeout=10)
        return grpc.StatusCode.OK


def test_a_node_acts_only_as_the_node_its_certificate_names(fleet: Cluster, tmp_path: Path) -> None:
    ca_pem = (fleet.ca_dir / "ca.crt").read_bytes()
    fleet.issue("node-a", "node/node-a")
    fleet.issue("an-edge", "edge/e1")
    stranger = FleetCA.create(tmp_path / "other-ca")
    cert, key = stranger.issue(identity_uri("node", "node-a"), ips=["127.0.0.1"])
    outcomes = {
        "no client certificate": _register(fleet, grpc.ssl_channel_credentials(ca_pem), "node-a"),
        "another CA's certificate for node-a": _register(
            fleet, grpc.ssl_channel_credentials(ca_pem, key, cert), "node-a"
        ),
        "node-a's certificate as node-b": _register(fleet, fleet.credentials("node-a"), "node-b"),  # type: ignore[arg-type]
        "an edge's certificate as node-a": _register(fleet, fleet.credentials("an-edge"), "node-a"),  # type: ignore[arg-type]
        "node-a's certificate as node-a": _register(fleet, fleet.credentials("node-a"), "node-a"),  # type: ignore[arg-type]
    }
    assert outcomes == {
        "no client certificate": grpc.StatusCode.UNAVAILABLE,  # the handshake itself fails
        "another CA's certificate for node-a": grpc.StatusCode.UNAVAILABLE,
        "node-a's certificate as node-b": grpc.StatusCode.PERMISSION_DENIED,
        "an edge's certificate as node-a": grpc.StatusCode.UNAUTHENTICATED,
        "node-a's certificate as node-a": grpc.StatusCode.OK,
    }


def _served_certificate(address: str, ca: Path) -> x509.Certificate:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False  # the chain is verified; the name is not what this test is about
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_rotated_certificate_is_served_without_a_restart(fleet: Cluster) -> None:
    ca_file = fleet.ca_dir / "ca.crt"
    before = _served_certificate(fleet.controlplane, ca_file)
    fleet.issue("controlplane", "controlplane/cp", days=7)  # the same files, rewritten (os.replace)
    rotated = x509.load_pem_x509_certificate((fleet.dir / "controlplane.crt").read_bytes())
    assert rotated.serial_number != before.serial_number
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=ROTATION_BOUND)
    seen = before
    while seen.serial_number != rotated.serial_number and datetime.datetime.now() < deadline:
        seen = _served_certificate(fleet.controlplane, ca_file)
    assert seen.serial_number == rotated.serial_number
    controlplane = fleet.procs[-1]
    assert controlplane.popen.poll() is None  # the same process: no restart
    assert _register(fleet, fleet.credentials("node-a"), "node-a") == grpc.StatusCode.OK  # type: ignore[arg-type]


async def test_the_edge_dials_a_node_by_its_identity(tmp_path: Path) -> None:
    """The edge's channel to a node (mesh.tls.secure_channel with the node's name, as the edge opens it)
    accepts only the certificate of the node the routing table names: a fleet certificate of another node
    at that address is refused in the handshake."""
    ca = FleetCA.create(tmp_path / "ca")

    def files(name: str, identity: str) -> TlsFiles:
        cert, key = ca.issue(identity, ips=["127.0.0.1"])
        write_public(tmp_path / f"{name}.crt", cert)
        write_private(tmp_path / f"{name}.key", key)
        return TlsFiles(tmp_path / f"{name}.crt", tmp_path / f"{name}.key", tmp_path / "ca" / "ca.crt")

    server = GrpcServer([])
    port = await server.start("127.0.0.1:0", server_credentials(files("b", identity_uri("node", "node-b")), True))
    edge = files("edge", identity_uri("edge", "e1"))
    outcomes = {}
    try:
        for expected in ("node-a", "node-b"):
            async with secure_channel(f"127.0.0.1:{port}", edge, CHANNEL_OPTIONS, node_dns_name(expected)) as channel:
                try:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                    outcomes[expected] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    outcomes[expected] = exc.code()
    finally:
        await server.stop(0)
    assert outcomes == {"node-a": grpc.StatusCode.UNAVAILABLE, "node-b": grpc.StatusCode.OK}


def test_fleetlm_keys_names_what_is_wrong_with_its_tls(fleet: Cluster, tmp_path: Path) -> None:
    # An operator's mistakes against a control plane serving mutual TLS: each is one line saying what to fix,
    # not "UNAVAILABLE: Socket closed".
    other = FleetCA.create(tmp_path / "other-ca")
    cert, key = other.issue(identity_uri("admin", ""), [], ["127.0.0.1"], 30)
    write_public(tmp_path / "stranger.crt", cert)
    write_private(tmp_path / "stranger.key", key)
    fleet.issue("edge-x", "edge/x")
    (tmp_path / "binary.token").write_bytes(bytes(range(128, 176)))
    ca = str(fleet.ca_dir / "ca.crt")

    def keys(*flags: str) -> str:
        argv = fleetlm("keys", "list", "--controlplane", fleet.controlplane, "--state-dir", str(tmp_path), *flags)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result
        assert result.stderr.count("\n") == 1, result.stderr
        return result.stderr

    plaintext = keys()
    assert "closed the plaintext connection" in plaintext and "--tls-ca" in plaintext, plaintext
    stranger = keys(
        "--tls-ca", ca, "--tls-cert", str(tmp_path / "stranger.crt"), "--tls-key", str(tmp_path / "stranger.key")
    )
    assert "refused the client certificate" in stranger, stranger
    wrong_ca = keys("--tls-ca", str(tmp_path / "other-ca" / "ca.crt"), *fleet.tls_flags("admin")[:4])
    assert "TLS failed" in wrong_ca and "--tls-ca" in wrong_ca, wrong_ca
    edge = keys(*fleet.tls_flags("edge-x"))
    assert "refused the credentials" in edge and "an edge's" in edge, edge
    binary = keys(*fleet.tls_flags("admin"), "--admin-token-file", str(tmp_path / "binary.token"))
    assert "is not printable ASCII" in binary and "fleetlm keys new-secret" in binary, binary
