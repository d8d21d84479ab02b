"""`fleetlm up`, run as a user runs it: one command, a real curl chat request, Ctrl-C, nothing left."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from launcher.processes import port_free
from mesh.lifecycle import free_port_pair
from tests.cluster import command_line, free_port

pytestmark = [pytest.mark.model, pytest.mark.cluster]


def up_argv(tmp_path: Path, *flags: str) -> tuple[list[str], dict[str, int]]:
    """The command line of `fleetlm up` with `flags` on free ports, its state in tmp_path/state, and its ports."""
    ports = {name: free_port() for name in ("http", "grpc", "cp", "node", "cp_metrics", "node_metrics")}
    # Its peer port, one above, is handed out too: the project's CI once gave it to the edge as well.
    etcd_port = free_port_pair()
    argv = [
        str(Path(sys.executable).parent / "fleetlm"), "up", *flags,
        "--state-dir", str(tmp_path / "state"),
        "--http-port", str(ports["http"]),
        "--grpc-port", str(ports["grpc"]),
        "--controlplane-port", str(ports["cp"]),
        "--node-port", str(ports["node"]),
        "--controlplane-metrics-port", str(ports["cp_metrics"]),
        "--node-metrics-port", str(ports["node_metrics"]),
        "--etcd-port", str(etcd_port),
        "--threads", "2",
    ]  # fmt: skip
    ports["etcd"] = etcd_port  # and its peer port, one above
    return argv, ports


def start_up(
    tmp_path: Path, *flags: str, cwd: Path | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    """`fleetlm up` with `flags` on free ports, its state in tmp_path/state, once its banner is out (120 s at
    most; it is killed if it does not get there). Returns the process, its ports and its log."""
    argv, ports = up_argv(tmp_path, *flags)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.monotonic() + 120
        while "fleetlm is up" not in log.read_text():
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    except BaseException:
        up.kill()
        up.wait()
        raise
    return up, ports, log


@contextlib.contextmanager
def stopped_at_the_end(up: subprocess.Popen[bytes], log: Path) -> Iterator[None]:
    """The block, then Ctrl-C to `up` as a user sends it (it must exit 0); killed if the block failed first."""
    try:
        yield
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, log.read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_up_serves_curl_and_stops_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    up, ports, log = start_up(tmp_path)
    with stopped_at_the_end(up, log):
        banner = log.read_text()
        assert f"http://127.0.0.1:{ports['http']}/v1" in banner
        assert f"127.0.0.1:{ports['grpc']}" in banner
        descendants = psutil.Process(up.pid).children(recursive=True)
        assert {"etcd"} <= {p.name() for p in descendants}
        assert len(descendants) >= 4
        for child in psutil.Process(up.pid).children():
            # A process group of its own, so a terminal's Ctrl-C reaches `fleetlm up` alone, which stops the
            # children in order; but up's session, so that under Linux's autogroup scheduling they share one
            # CPU group and the engine's SCHED_IDLE threads yield to the edge (its first token: bench.inference_bench
            # --ttft-only --sessions-apart).
            assert os.getpgid(child.pid) == child.pid, child
            assert os.getsid(child.pid) == os.getsid(up.pid), child

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
        # The node's llama.cpp compute threads (its decode thread and OpenMP's workers) are in the SCHED_IDLE
        # class, so its gRPC and every other process here take a core from them at once; the rest are not.
        [node] = [p for p in descendants if command_line(p)[1:5] == ["-P", "-m", "launcher", "node"]]
        policies = [os.sched_getscheduler(thread.id) for thread in node.threads()]
        assert policies.count(os.SCHED_IDLE) >= 2 and os.sched_getscheduler(node.pid) == os.SCHED_OTHER, policies

        # up's wait asks where an unplaced model fits; the reconciler may place it between up's snapshot and
        # that question, whose answer is then "vm: already runs a replica". That is not a model that fits
        # nowhere (a fresh-clone run stopped `up` on it): replay the race with a snapshot from before.
        from launcher import up as up_module

        real_fetch, calls = up_module.fetch, []

        async def fetch_from_before_placement(target: object) -> dict[str, object]:
            snap = await real_fetch(target)  # type: ignore[arg-type]
            calls.append(snap)
            if len(calls) == 1:
                snap["deployments"] = [{**d, "assigned": 0} for d in snap["deployments"]]
            return snap

        monkeypatch.setattr(up_module, "fetch", fetch_from_before_placement)
        assert up_module.LoadProgress(tmp_path / "state", ["smollm2-135m"]).show(now=True) is False
        assert len(calls) == 2  # the verdicts were asked for, and checked against a fresh snapshot
    assert "fleetlm stopped." in log.read_text()
    leftovers = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, leftovers
    for port in [*ports.values(), ports["etcd"] + 1]:
        assert port_free("127.0.0.1", port), f"port {port} still bound"


def test_up_runs_from_a_folder_holding_a_clone_named_fleetlm(tmp_path: Path) -> None:
    """`git clone .../fleetlm` makes a folder named like fleetlm's generated package: from the folder that
    holds it, the components' `python -m launcher` found that folder first and died at their first import
    (`No module named 'fleetlm.controlplane.v1'`)."""
    workdir = tmp_path / "work"
    clone = workdir / "fleetlm"
    for package in ("controlplane", "launcher", "mesh"):  # as the clone has them
        (clone / package).mkdir(parents=True)
        (clone / package / "__init__.py").touch()
    up, ports, log = start_up(tmp_path, cwd=workdir)
    with stopped_at_the_end(up, log):
        reply = httpx.get(f"http://127.0.0.1:{ports['http']}/v1/models", timeout=30)
        assert reply.status_code == 200 and reply.json()["data"], reply.text
    assert "Traceback" not in log.read_text()


def test_a_killed_up_takes_its_components_with_it_and_can_start_again(tmp_path: Path) -> None:
    """`kill -9` of `fleetlm up`: every component gets its parent-death signal at once, etcd included, and
    each must be gone soon, leaving its ports to the next `up` (the control plane's stop waited on the etcd
    that was stopping beside it, and held its ports for 35 s, until its shutdown deadline)."""
    outlived = []
    for attempt in range(3):  # it happened in about half of the kills: the control plane's stop raced etcd's
        (tmp_path / str(attempt)).mkdir()
        up, ports, _ = start_up(tmp_path / str(attempt))  # a new state: its control plane leads (the race is its)
        descendants = psutil.Process(up.pid).children(recursive=True)
        up.kill()
        up.wait()
        killed = time.monotonic()
        alive = descendants
        while alive and time.monotonic() - killed < 60:  # bounded: the shutdown deadline is 35 s
            time.sleep(0.1)
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [command_line(p) for p in alive]
        outlived.append(round(time.monotonic() - killed, 1))
        assert all(port_free("127.0.0.1", port) for port in ports.values()), attempt
    assert max(outlived) < 10, f"the components outlived up by {outlived} s"


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


def make_key(state: Path, log: Path) -> str:
    """`fleetlm keys create` as the banner says: it finds the control plane, the admin token (and the operator
    certificate) up made in the state directory."""
    fleetlm = str(Path(sys.executable).parent / "fleetlm")
    argv = [fleetlm, "keys", "create", "tester", "--state-dir", str(state)]
    assert f"fleetlm keys create NAME --state-dir {state}" in log.read_text()
    made = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made
    secret = next(word for word in made.stdout.split() if word.startswith("flk-"))
    return secret


def test_up_with_tls_serves_https_with_its_own_ca_and_asks_for_credentials(tmp_path: Path) -> None:
    # What `fleetlm up --host 0.0.0.0` (and the Docker image) does, kept on loopback here with --tls: TLS on
    # every link and credentials required.
    up, ports, log = start_up(tmp_path, "--tls")
    state = tmp_path / "state"
    try:
        ca, admin = state / "ca" / "ca.crt", state / "tls" / "admin"
        assert f"https://127.0.0.1:{ports['http']}/v1" in log.read_text()
        assert (state / "ca" / "ca.key").stat().st_mode & 0o077 == 0  # private keys are the owner's only
        curl = shutil.which("curl")
        assert curl
        body = json.dumps({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}],
                           "max_tokens": 8})  # fmt: skip
        url = f"https://127.0.0.1:{ports['http']}/v1/chat/completions"
        anonymous = subprocess.run([curl, "-sS", "--cacert", str(ca), url, "-H", "content-type: application/json",
                                    "-d", body], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert json.loads(anonymous.stdout)["error"]["code"] == "invalid_api_key", anonymous
        key = make_key(state, log)
        reply = subprocess.run([curl, "-sS", "--cacert", str(ca), url, "-H", "content-type: application/json",
                                "-H", f"authorization: Bearer {key}", "-d", body], capture_output=True, text=True,
                               timeout=60)  # fmt: skip
        assert json.loads(reply.stdout)["choices"][0]["message"]["content"], reply
        assert key not in log.read_text()
        # Not without trusting the CA, and not in plaintext.
        untrusted = subprocess.run([curl, "-sS", url, "-d", body], capture_output=True, text=True, timeout=30)
        assert untrusted.returncode != 0 and "certificate" in untrusted.stderr, untrusted
        plain = subprocess.run([curl, "-sS", url.replace("https", "http"), "-d", body], capture_output=True,
                               text=True, timeout=30)  # fmt: skip
        assert plain.returncode != 0 or not plain.stdout.startswith("{"), plain
        # The control plane answers an operator with the admin certificate, and no one without one.
        grpcurl = str(Path(sys.executable).parent / "grpcurl")
        method = "fleetlm.controlplane.v1.AdminService/ListNodes"
        cp = f"127.0.0.1:{ports['cp']}"
        token = (state / "auth" / "admin.token").read_text().strip()
        ok = subprocess.run([grpcurl, "-cacert", str(ca), "-cert", f"{admin}.crt", "-key", f"{admin}.key",
                             "-H", f"authorization: Bearer {token}", cp, method], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
        assert ok.returncode == 0 and '"nodes"' in ok.stdout, ok
        refused = subprocess.run([grpcurl, "-max-time", "5", "-cacert", str(ca), cp, method], capture_output=True,
                                 text=True, timeout=30)  # fmt: skip
        assert refused.returncode != 0, refused
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def test_up_with_require_auth_on_loopback_asks_for_a_key_and_the_admin_token(tmp_path: Path) -> None:
    up, ports, log = start_up(tmp_path, "--require-auth")
    state = tmp_path / "state"
    try:
        assert "fleetlm keys create" in log.read_text()
        curl = shutil.which("curl")
        assert curl
        url = f"http://127.0.0.1:{ports['http']}/v1/models"
        refused = subprocess.run([curl, "-sS", "-w", "%{http_code}", url], capture_output=True, text=True, timeout=30)
        assert refused.stdout.endswith("401"), refused
        key = make_key(state, log)
        ok = subprocess.run([curl, "-sS", url, "-H", f"authorization: Bearer {key}"], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
        assert json.loads(ok.stdout)["data"][0]["id"] == "smollm2-135m", ok
        grpcurl = str(Path(sys.executable).parent / "grpcurl")
        method = "fleetlm.controlplane.v1.AdminService/ListNodes"
        no_token = subprocess.run([grpcurl, "-plaintext", f"127.0.0.1:{ports['cp']}", method], capture_output=True,
                                  text=True, timeout=30)  # fmt: skip
        assert no_token.returncode != 0 and "Unauthenticated" in no_token.stderr, no_token
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def test_up_refuses_a_catalog_whose_weights_are_not_here(tmp_path: Path) -> None:
    """Before, it started everything and waited 300 s for a replica that could be placed nowhere."""
    catalog = tmp_path / "models.yaml"
    catalog.write_text("models:\n  - name: typo\n    path: weights/SmolLM2.gguf\n    format: gguf\n")
    result = subprocess.run(up_argv(tmp_path, "--catalog", str(catalog))[0], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"'typo': no file at {tmp_path / 'weights' / 'SmolLM2.gguf'}" in result.stderr
    assert "fleetlm is up" not in result.stdout and not (tmp_path / "state" / "etcd").exists()


def test_ctrl_c_while_up_waits_for_its_models_stops_at_once(tmp_path: Path) -> None:
    """A model whose server takes its time to start (here one that never answers) keeps `up` waiting for it.
    Ctrl-C then used to be ignored until the 300 s wait ran out; now it stops everything at once."""
    from launcher.default_model import default_model_path

    catalog = tmp_path / "models.yaml"
    slow = {"name": "slow-server", "path": str(default_model_path()), "format": "gguf", "engine": "openai",
            "command": ["sh", "-c", "echo 'loading shard 1 of 4'; sleep 300"], "startup_timeout": 600}  # fmt: skip
    catalog.write_text(yaml.safe_dump({"models": [slow]}))
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(up_argv(tmp_path, "--catalog", str(catalog))[0], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "edge serving" not in log.read_text():  # up now waits for the model
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 130, log.read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    text = log.read_text()
    assert "stopped while waiting for the models to load" in text and "fleetlm stopped." in text
    assert "fleetlm is up" not in text


def test_up_ends_its_wait_for_a_model_that_fits_on_no_node_with_the_reason(tmp_path: Path) -> None:
    """A GPU model on a machine without one: the node here is the whole fleet, so it will never fit. `up`
    used to wait the 300 s out; now it stops as soon as the control plane says so, with its reason."""
    from launcher.default_model import default_model_path

    catalog = tmp_path / "models.yaml"
    catalog.write_text(f"models:\n  - name: gpu-only\n    path: {default_model_path()}\n    device: gpu\n")
    started = time.monotonic()
    try:
        result = subprocess.run(up_argv(tmp_path, "--catalog", str(catalog))[0], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired as waited:
        raise AssertionError(f"up still waits for a model that fits nowhere: {waited.stdout!r}") from None
    assert result.returncode == 1, result.stdout + result.stderr
    assert "model 'gpu-only' fits on no node (" in result.stderr, result.stderr
    assert "gpu" in result.stderr.split("fits on no node", 1)[1].lower()
    assert "fleetlm is up" not in result.stdout and "fleetlm stopped." in result.stdout
    assert time.monotonic() - started < 100


def test_up_starts_a_component_that_died_again_and_serves_on(tmp_path: Path) -> None:
    """A node or an edge that dies (killed, or the kernel's OOM killer) is started again: the model loads on
    the new node, and `up` goes on serving; before, one death stopped the whole fleet."""
    up, ports, log = start_up(tmp_path)
    url = f"http://127.0.0.1:{ports['http']}/v1/chat/completions"
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}

    def served_within(seconds: float) -> int:
        """Requests tried until one is answered (AssertionError after `seconds`)."""
        deadline, tries = time.monotonic() + seconds, 0
        while True:
            tries += 1
            try:
                reply = httpx.post(url, json=body, timeout=30)
                if reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0:
                    return tries
            except httpx.HTTPError:
                pass
            assert up.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

    def child(argv_part: str) -> psutil.Process:
        [found] = [
            p for p in psutil.Process(up.pid).children() if command_line(p)[1:5] == ["-P", "-m", "launcher", argv_part]
        ]
        return found

    try:
        assert served_within(10) == 1
        for name in ("node", "edge"):
            before = child(name)
            before.kill()
            served_within(120)
            text = log.read_text()
            assert f"fleetlm up: {name} exited with code -9; starting it again in 1s" in text, text[-3000:]
            assert f"fleetlm up: {name} started again" in text
            assert child(name).pid != before.pid
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, log.read_text()
    finally:
        if up.poll() is None:
            up.kill()


def test_up_says_which_deployments_an_earlier_start_left_beside_its_catalog(tmp_path: Path) -> None:
    """Deployments live in etcd, in the state directory: `up` again with another catalog runs its models
    and the earlier ones too. The banner says so, naming them and how to remove one (it removes none: an
    operator's DeployModel is kept across starts as well)."""
    from launcher.default_model import default_model_path

    def catalog(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"models:\n  - {{name: {name}, path: {default_model_path()}, context_size: 512}}\n")
        return path

    for name, others in (("smol-a", None), ("smol-b", "smol-a")):
        up, _, log = start_up(tmp_path, "--catalog", str(catalog(name)))
        with stopped_at_the_end(up, log):
            banner = log.read_text().split("fleetlm is up", 1)[1]
            assert f"deployments       {name}" in banner, banner
            if others is None:
                assert "also deployed" not in banner, banner
            else:
                assert f"also deployed     {others}   (kept from an earlier start" in banner, banner
                assert "AdminService/UndeployModel" in banner, banner


def test_up_with_another_catalog_runs_the_default_model_kept_from_before(tmp_path: Path) -> None:
    """The default model, deployed by a plain `up`, is kept in etcd; `up --catalog` with a model in another
    folder then runs both, as the README says (the node looked for weights in the new catalog's folder only,
    the kept model could not be placed, and `up` waited for it until its timeout, with no banner)."""
    from launcher.default_model import default_model_path

    up, _, log = start_up(tmp_path)
    up.send_signal(signal.SIGINT)
    assert up.wait(60) == 0, log.read_text()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "other.gguf").symlink_to(default_model_path())
    catalog = tmp_path / "other.yaml"
    catalog.write_text(f"models:\n  - {{name: other, path: {tmp_path / 'models' / 'other.gguf'}, context_size: 512}}\n")
    up, ports, log = start_up(tmp_path, "--catalog", str(catalog))
    with stopped_at_the_end(up, log):
        banner = log.read_text().split("fleetlm is up", 1)[1]
        assert "also deployed     smollm2-135m   (kept from an earlier start" in banner, banner

        def states() -> dict[str, str]:
            reply = httpx.get(f"http://127.0.0.1:{ports['http']}/v1/models", timeout=10)
            return {m["id"]: m["state"] for m in reply.json()["data"]}

        deadline = time.monotonic() + 60
        while states() != {"other": "ready", "smollm2-135m": "ready"}:  # bounded: the kept one loads beside
            assert time.monotonic() < deadline, states()
            time.sleep(0.5)


def test_up_refuses_a_state_directory_in_use_or_unusable(tmp_path: Path) -> None:
    """A second `up` on a running one's state directory says so at once, before it touches anything there
    (it waited 60 s for an etcd that could not take the data, and had pointed `fleetlm status` at itself);
    a state directory that cannot be one is one line, not a traceback."""
    up, _, log = start_up(tmp_path)
    try:
        operator = (tmp_path / "state" / "operator.json").read_text()
        argv, _ = up_argv(tmp_path)  # other ports, the same state directory
        second = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert second.returncode == 2, second.stderr
        assert f"another fleetlm up runs with the state directory {tmp_path / 'state'} (pid {up.pid})" in second.stderr
        assert (tmp_path / "state" / "operator.json").read_text() == operator
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, log.read_text()
    (tmp_path / "a-file").write_text("")
    for state in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        argv, _ = up_argv(tmp_path)
        refused = subprocess.run([*argv, "--state-dir", str(state)], capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"fleetlm up: cannot use {state} as the state directory")
        assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1, refused.stderr


def test_up_waits_for_etcd_to_serve_not_only_for_its_port(tmp_path: Path) -> None:
    """etcd's port opens before it serves: `fleetlm up` started its control plane as soon as the port was
    open, which on a busy machine was refused ("timed out before receiving SETTINGS frame") and stopped
    `up`. It waits for etcd's /health: false on a port that is open but not an etcd's (it never answers),
    and on a closed one; true on a real etcd."""
    import socket

    from launcher.processes import etcd_healthy
    from tests.cluster import Cluster

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        assert not etcd_healthy("127.0.0.1", silent.getsockname()[1])
        assert time.monotonic() - started < 5
    assert not etcd_healthy("127.0.0.1", free_port())
    cluster = Cluster(tmp_path)
    try:
        url = cluster.start_etcd()
        assert etcd_healthy("127.0.0.1", int(url.rsplit(":", 1)[1]))
    finally:
        cluster.close()
