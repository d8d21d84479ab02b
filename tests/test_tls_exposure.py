"""Safe by default: a component that listens beyond this machine without TLS refuses to start, with one
clear line, unless its operator asks for plaintext by name (--insecure-plaintext); on loopback, plaintext
stays the default."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from mesh.lifecycle import free_port
from mesh.tls import is_loopback
from tests.cluster import START_TIMEOUT, Cluster, fleetlm, grpc_serving, wait_for

pytestmark = [pytest.mark.cluster]


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1:1") and is_loopback("127.0.0.2:1") and is_loopback("[::1]:1")
    assert is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:1") and not is_loopback("[::]:1") and not is_loopback(":1")
    assert not is_loopback("10.1.2.3:1") and not is_loopback("192.168.0.9:1")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("exposure"), tls=True)
    try:
        cluster.start_etcd()
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def refusal(*args: str) -> str:
    done = subprocess.run(fleetlm(*args), capture_output=True, text=True, timeout=START_TIMEOUT)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


def test_every_component_refuses_plaintext_beyond_loopback(fleet: Cluster) -> None:
    wild = f"0.0.0.0:{free_port()}"
    for argv in (
        ("controlplane", "--listen", wild, "--etcd", fleet.etcd_url),
        ("node", "--listen", wild, "--controlplane", "127.0.0.1:1"),
        ("edge", "--http-listen", wild, "--grpc-listen", f"127.0.0.1:{free_port()}"),
    ):
        message = refusal(*argv)
        assert f"listens on {wild}, beyond this machine, without TLS" in message, message
        assert "--insecure-plaintext" in message


def test_plaintext_beyond_loopback_when_asked_by_name_and_tls_beyond_loopback(fleet: Cluster) -> None:
    plain, secure = free_port(), free_port()
    asked = fleet._start(
        "controlplane-plain",
        fleetlm("controlplane", "--listen", f"0.0.0.0:{plain}", "--etcd", fleet.etcd_url, "--insecure-plaintext"),
    )
    wait_for(lambda: grpc_serving(f"127.0.0.1:{plain}"), START_TIMEOUT, "the plaintext control plane", asked)
    flags = fleet.issue("controlplane", "controlplane/cp")
    with_tls = fleet._start(
        "controlplane-tls",
        fleetlm("controlplane", "--listen", f"0.0.0.0:{secure}", "--etcd", fleet.etcd_url, *flags),
    )
    credentials = fleet.credentials()
    wait_for(
        lambda: grpc_serving(f"127.0.0.1:{secure}", credentials=credentials), START_TIMEOUT, "the TLS one", with_tls
    )
