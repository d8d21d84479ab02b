"""`fleetlm up`, run as a user runs it: one command, a real curl chat request, Ctrl-C, nothing left."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.processes import port_free
from tests.cluster import free_port

pytestmark = [pytest.mark.model, pytest.mark.cluster]


def test_up_serves_curl_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("http", "grpc", "cp", "node")}
    etcd_port = free_port()
    while not port_free("127.0.0.1", etcd_port + 1):
        etcd_port = free_port()
    fleetlm = str(Path(sys.executable).parent / "fleetlm")
    argv = [
        fleetlm, "up",
        "--state-dir", str(tmp_path / "state"),
        "--http-port", str(ports["http"]),
        "--grpc-port", str(ports["grpc"]),
        "--controlplane-port", str(ports["cp"]),
        "--node-port", str(ports["node"]),
        "--etcd-port", str(etcd_port),
        "--threads", "2",
    ]  # fmt: skip
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "fleetlm is up" not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        banner = log.read_text()
        assert f"http://127.0.0.1:{ports['http']}/v1" in banner
        assert f"127.0.0.1:{ports['grpc']}" in banner
        descendants = psutil.Process(up.pid).children(recursive=True)
        assert {"etcd"} <= {p.name() for p in descendants}
        assert len(descendants) >= 4

        curl = shutil.which("curl")
        assert curl, "curl is needed to test what the README shows"
        body = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 16,
        }
        reply = subprocess.run(
            [curl, "-sS", f"http://127.0.0.1:{ports['http']}/v1/chat/completions",
             "-H", "Content-Type: application/json", "-d", json.dumps(body)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        answer = json.loads(reply.stdout)
        assert answer["choices"][0]["message"]["content"].strip()
        assert answer["usage"]["completion_tokens"] > 0

        up.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        assert up.wait(60) == 0, log.read_text()
    finally:
        if up.poll() is None:
            up.kill()
    assert "fleetlm stopped." in log.read_text()
    leftovers = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, leftovers
    for port in [*ports.values(), etcd_port, etcd_port + 1]:
        assert port_free("127.0.0.1", port), f"port {port} still bound"


def test_up_refuses_busy_ports(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "launcher", "up", "--state-dir", str(tmp_path), "--http-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
