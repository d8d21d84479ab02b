"""The `fleetlm` command line refuses what it cannot use with one line naming the flag, never a traceback:
ports outside 1-65535, a key's limits outside what the API holds, negative durations, unreadable TLS files;
a service's settings that are not finite numbers are refused naming the setting. So do the services for
what an operator gives them that cannot work: secret and token files too short or missing, TLS files that
are not a certificate and its key, an address that is in use; and the etcd commands for an etcd they
cannot reach."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.fleet_ca import FleetCA
from mesh.lifecycle import free_port
from tests.cluster import Cluster

FLEETLM = str(Path(sys.executable).parent / "fleetlm")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["up", "--http-port", "-1"], "argument --http-port: -1 is not a port (1-65535)"),
        (["up", "--grpc-port", "70000"], "argument --grpc-port: 70000 is not a port (1-65535)"),
        (["up", "--node-port", "http"], "argument --node-port: 'http' is not a whole number"),
        # etcd's peer port is its client port + 1: the edge's would have gone to etcd, and `up` waited for
        # models from etcd's HTTP for 300 s.
        (
            ["up", "--etcd-port", "41079", "--http-port", "41080", "--state-dir", "state"],
            "fleetlm up: one port given to two components: edge HTTP and etcd peer (41080)",
        ),
        (
            ["up", "--grpc-port", "41050", "--node-port", "41050", "--state-dir", "state"],
            "fleetlm up: one port given to two components: edge gRPC and node agent (41050)",
        ),
        (["keys", "create", "k", "--rpm", "-5"], "argument --rpm: -5 must be from 0 (no limit) to 4294967295"),
        (["keys", "create", "k", "--tpm", "99999999999"], "argument --tpm: 99999999999 must be from 0"),
        (["keys", "create", "k", "--concurrency", "1.5"], "argument --concurrency: '1.5' is not a whole number"),
        (["keys", "create", "k", "--expires-in", "-10"], "argument --expires-in: -10 must be a number of seconds"),
        (["status", "--interval", "0"], "argument --interval: 0 must be a number of seconds more than 0"),
        (["status", "--interval", "nan"], "argument --interval: nan must be a number of seconds, 0 or more"),
        # A service's settings are finite: an edge started with --request-timeout inf failed every request.
        (["edge", "--request-timeout", "inf"], "request_timeout_seconds\n  Input should be a finite number"),
        (["controlplane", "--startup-grace", "nan"], "startup_grace_seconds\n  Input should be a finite number"),
        (["node", "--engine-health-seconds", "inf"], "engine_health_seconds\n  Input should be a finite number"),
        (
            ["keys", "create", "k", "--tls-ca", "/nonexistent/ca.crt", "--tls-cert", "a", "--tls-key", "b"],
            "fleetlm keys create: cannot read a TLS file: [Errno 2] No such file or directory: '/nonexistent/ca.crt'",
        ),
    ],
)
def test_a_bad_argument_is_one_line_naming_it(argv: list[str], said: str, tmp_path: Path) -> None:
    # Nothing listens on port 1: a command that got as far as calling would fail there, not hang.
    result = subprocess.run(
        [FLEETLM, *argv, *(["--controlplane", "127.0.0.1:1"] if argv[0] == "keys" else [])],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """An operator's directory: a fleet CA (ca/), certificates for a control plane, an edge and a node, a
    secret file too short to be one. etcd is started only for the tests that need it (`etcd`)."""
    cluster = Cluster(tmp_path_factory.mktemp("operator"), tls=True)
    for name, identity in (("cp1", "controlplane/cp1"), ("edge1", "edge/edge1"), ("n1", "node/n1")):
        cluster.issue(name, identity)
    (cluster.dir / "short.secret").write_text("hello\n")
    (cluster.dir / "binary.token").write_bytes(bytes(range(128, 176)))  # `head -c 48 /dev/urandom > F`
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def etcd(operator: Cluster) -> str:
    return operator.etcd_url or operator.start_etcd()


UNREACHABLE_ETCD = "http://127.0.0.1:1"  # a control plane that got as far as etcd fails there, saying so
CP = ["controlplane", "--listen", "127.0.0.1:{free}", "--etcd", UNREACHABLE_ETCD, "--metrics-listen", ""]
EDGE = ["edge", "--http-listen", "127.0.0.1:{free}", "--grpc-listen", "127.0.0.1:{free}"]
NODE = ["node", "--listen", "127.0.0.1:{free}", "--metrics-listen", "", "--state-dir", "node-state"]
CA_FLAG = ["--tls-ca", "ca/ca.crt"]
CP_ON_ETCD = ["controlplane", "--etcd", "{etcd}", "--metrics-listen", ""]  # {etcd}: the `etcd` fixture's
CP_TLS = ["--tls-cert", "cp1.crt", "--tls-key", "cp1.key", *CA_FLAG]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        # Secret and token files: too short, or not there (named, their content never shown).
        (
            [*CP, "--auth-secret-file", "short.secret"],
            "fleetlm controlplane: auth secret file short.secret holds 5 bytes; it needs at least 32",
        ),
        (
            [*CP, "--admin-token-file", "/dev/null"],
            "fleetlm controlplane: admin token file /dev/null holds 0 bytes; it needs at least 32",
        ),
        (
            [*CP, "--admin-token-file", "binary.token"],
            "fleetlm controlplane: admin token file binary.token is not printable ASCII text without spaces",
        ),
        (
            [*EDGE, "--require-api-key", "--auth-secret-file", "short.secret"],
            "fleetlm edge: auth secret file short.secret holds 5 bytes; it needs at least 32",
        ),
        (
            [*CP, "--auth-secret-file", "nope.secret"],
            "fleetlm controlplane: cannot read the auth secret file nope.secret: No such file or directory",
        ),
        (
            [*CP, "--admin-token-file", "nope.token"],
            "fleetlm controlplane: cannot read the admin token file nope.token: No such file or directory",
        ),
        (
            [*EDGE, "--require-api-key", "--auth-secret-file", "nope.secret"],
            "fleetlm edge: cannot read the auth secret file nope.secret: No such file or directory",
        ),
        # TLS files: a key that is not the certificate's, a key given as the certificate.
        (
            [*CP, "--tls-cert", "cp1.crt", "--tls-key", "edge1.key", *CA_FLAG],
            "fleetlm controlplane: the key edge1.key is not the key of cp1.crt",
        ),
        (
            [*CP, "--tls-cert", "cp1.key", "--tls-key", "cp1.key", *CA_FLAG],
            "fleetlm controlplane: the TLS certificate cp1.key is not a PEM certificate: Valid PEM but no BEGIN",
        ),
        (
            [*EDGE, "--tls-cert", "edge1.crt", "--tls-key", "cp1.key", *CA_FLAG],
            "fleetlm edge: the key cp1.key is not the key of edge1.crt",
        ),
        (
            [*NODE, "--tls-cert", "n1.key", "--tls-key", "n1.key", *CA_FLAG],
            "fleetlm node: the TLS certificate n1.key is not a PEM certificate",
        ),
        (
            [*NODE, "--tls-cert", "n1.crt", "--tls-key", "edge1.key", *CA_FLAG],
            "fleetlm node: the key edge1.key is not the key of n1.crt",
        ),
        (
            [*EDGE, "--tls-cert", "edge1.crt", "--tls-key", "edge1.key", "--tls-ca", "edge1.key"],
            "fleetlm edge: the TLS CA edge1.key is not a PEM certificate",
        ),
        # A gRPC address in use ({busy}: a socket the test listens on).
        (
            [*CP_ON_ETCD, "--listen", "127.0.0.1:{busy}"],
            "fleetlm controlplane: cannot serve gRPC on 127.0.0.1:{busy}: Address already in use",
        ),
        (
            [
                *CP_ON_ETCD,
                "--listen",
                "127.0.0.1:{free}",
                *CP_TLS,
                "--ca-dir",
                "ca",
                "--join-listen",
                "127.0.0.1:{busy}",
            ],
            "fleetlm controlplane: cannot serve gRPC on 127.0.0.1:{busy}: Address already in use",
        ),
        (
            ["edge", "--http-listen", "127.0.0.1:{free}", "--grpc-listen", "127.0.0.1:{busy}"],
            "fleetlm edge: cannot serve gRPC on 127.0.0.1:{busy}: Address already in use",
        ),
        (
            ["edge", "--http-listen", "127.0.0.1:{busy}", "--grpc-listen", "127.0.0.1:{free}"],
            "fleetlm edge: cannot serve HTTP on 127.0.0.1:{busy}: Address already in use",
        ),
        (
            ["node", "--listen", "127.0.0.1:{busy}", "--metrics-listen", "", "--state-dir", "node-state"],
            "fleetlm node: cannot serve gRPC on 127.0.0.1:{busy}: Address already in use",
        ),
        # An etcd that is down, or a name that does not resolve.
        (
            ["join-token", "create", "--etcd", UNREACHABLE_ETCD, "--ca-dir", "ca"],
            f"fleetlm join-token create: cannot use etcd at {UNREACHABLE_ETCD}: failed to connect",
        ),
        (
            ["join-token", "list", "--etcd", "garbage.invalid"],
            "fleetlm join-token list: cannot use etcd at garbage.invalid: ",
        ),
        (
            ["ca", "revoke", "--node", "X", "--etcd", UNREACHABLE_ETCD],
            f"fleetlm ca revoke: cannot use etcd at {UNREACHABLE_ETCD}: failed to connect",
        ),
    ],
)
def test_what_an_operator_gives_that_cannot_work_is_one_line_naming_it(
    argv: list[str], said: str, operator: Cluster, request: pytest.FixtureRequest
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        etcd = request.getfixturevalue("etcd") if any("{etcd}" in a for a in argv) else ""

        def filled(text: str) -> str:
            text = text.replace("{busy}", str(port)).replace("{etcd}", etcd)
            return text.replace("{free}", str(free_port())) if "{free}" in text else text

        result = subprocess.run(
            [FLEETLM, *map(filled, argv)], capture_output=True, text=True, timeout=60, cwd=operator.dir
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert filled(said) in result.stderr, result.stderr


def test_join_token_create_suggests_the_node_command_with_the_token_in_the_environment(
    operator: Cluster, etcd: str
) -> None:
    out = subprocess.run(
        [FLEETLM, "join-token", "create", "--etcd", etcd, "--ca-dir", "ca"],
        capture_output=True, text=True, check=True, timeout=60, cwd=operator.dir,
    ).stdout  # fmt: skip
    token = re.search(r"join token \(shown once\): (fljt_\S+)", out)
    assert token, out
    # As README's "A fleet of machines" starts a node: the token in the environment keeps it out of `ps`.
    fingerprint = FleetCA.load(operator.ca_dir).fingerprint
    command = (
        f"FLEETLM_NODE_JOIN_TOKEN={token.group(1)} fleetlm node --controlplane CP:PORT --join-address CP:JOINPORT"
        f" --ca-fingerprint {fingerprint}"
    )
    assert command in out.splitlines(), out
    assert "--join-token" not in out
