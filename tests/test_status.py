"""`fleetlm status` against a real fleet (etcd, a control plane with an admin token, two node agents with
SmolLM2 each, a deployment), in a real terminal (tmux): the live view shows both nodes and their replicas,
refreshes in place, and follows an undeploy; `--json` for scripts; failures are one line. Also the load
progress a llama.cpp replica reports while it loads."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.admin_access import write_operator_file
from launcher.default_model import default_model_path
from launcher.status import render
from mesh.auth import create_secret_file
from mesh.lifecycle import free_port
from node_agent.host import ModelHost
from node_agent.settings import NodeSettings
from tests.cluster import Cluster, smollm_entry, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.model]

TMUX_INSTALL = "apt-get install -y tmux (make test does it through scripts/test_tools.sh when run as root)"
DEPLOYED = "smol-deployed"


class Fleet:
    def __init__(self, cluster: Cluster, token_file: Path, state: Path) -> None:
        self.cluster, self.token_file, self.state = cluster, token_file, state

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(self.cluster.controlplane))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token_file.read_text().strip()}"),)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("status")
    token_file = work / "admin.token"
    create_secret_file(token_file)
    cluster = Cluster(work)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(3, "--admin-token-file", str(token_file))
        models_dir = str(default_model_path().parent)
        cluster.start_node("node-a", [smollm_entry("smol-a", context_size=512)], models_dirs=[models_dir])
        cluster.start_node("node-b", [smollm_entry("smol-b", context_size=512)], models_dirs=[models_dir])
        # The operator file `fleetlm up` writes: status finds the control plane and the token through it.
        state = work / "state"
        state.mkdir()
        write_operator_file(state, cluster.controlplane, {}, str(token_file))
        yield Fleet(cluster, token_file, state)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def replicas_ready(fleet: Fleet, names: set[str]) -> bool:
    reply = fleet.admin().ListNodes(admin_pb2.ListNodesRequest(), metadata=fleet.metadata, timeout=5)
    ready = {r.model.name for n in reply.nodes for r in n.replicas if r.state == node_pb2.REPLICA_STATE_READY}
    return names <= ready


class Tmux:
    """One tmux server of the test's own (its own socket), a 160x50 terminal running one command."""

    def __init__(self, socket: str) -> None:
        self.socket = socket

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout  # fmt: skip

    def capture(self) -> str:
        return self.run("capture-pane", "-p", "-t", "status")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail(f"tmux is not installed; this test runs fleetlm status in a real terminal: {TMUX_INSTALL}")
    terminal = Tmux(f"fleetlm-status-{os.getpid()}")
    try:
        yield terminal
    finally:
        subprocess.run(["tmux", "-L", terminal.socket, "kill-server"], capture_output=True, timeout=30)


def test_status_in_a_terminal_shows_both_nodes_and_follows_an_undeploy(fleet: Fleet, tmux: Tmux) -> None:
    spec = node_pb2.ModelSpec(name=DEPLOYED, path=str(default_model_path()), format="gguf", engine="llamacpp",
                              context_size=512)  # fmt: skip
    deployment = node_pb2.Deployment(spec=spec, min_replicas=1, max_replicas=1, replicas=1)
    fleet.admin().DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), metadata=fleet.metadata, timeout=30)
    # Three llama.cpp loads on two busy cores: generous.
    wait_for(lambda: replicas_ready(fleet, {"smol-a", "smol-b", DEPLOYED}), 120, "every replica to be ready")

    # Only the state directory: the control plane and the admin token come from the operator file.
    command = f"{sys.executable} -m launcher status --interval 0.5 --state-dir {fleet.state}; sleep 600"
    tmux.run("new-session", "-d", "-s", "status", "-x", "160", "-y", "50", command)

    def shows_all() -> str:
        screen = tmux.capture()
        rows = [line.split() for line in screen.splitlines()]
        replica_rows = {(r[0], r[1], r[2]) for r in rows if len(r) >= 3}
        wanted = {("node-a", "smol-a", "ready"), ("node-b", "smol-b", "ready")}
        deployed = any(r[1:3] == (DEPLOYED, "ready") for r in replica_rows)
        return screen if wanted <= replica_rows and deployed else ""

    screen = wait_for(shows_all, 60, "the view to show both nodes and every replica")
    print(screen)
    lines = screen.splitlines()
    assert lines[0].startswith("fleetlm status") and fleet.cluster.controlplane in lines[0]
    # In place: one view on the screen, not frames scrolling by (two refreshes have gone by at 0.5 s each).
    time.sleep(1.5)
    screen = tmux.capture()
    assert screen.count("fleetlm status") == 1 and screen.splitlines()[0].startswith("fleetlm status")
    node_rows = [line.split() for line in screen.splitlines() if line.startswith("node-")]
    assert {r[0] for r in node_rows if r[1] == "active"} == {"node-a", "node-b"}
    assert "NODES (2)" in screen and "DEPLOYMENTS (1)" in screen and "REPLICAS (3)" in screen
    deployment_row = next(line.split() for line in screen.splitlines() if line.startswith(DEPLOYED))
    assert deployment_row[1:3] == ["llamacpp", "1/1"]

    fleet.admin().UndeployModel(admin_pb2.UndeployModelRequest(name=DEPLOYED), metadata=fleet.metadata, timeout=30)

    def refreshed() -> str:
        screen = tmux.capture()
        return screen if DEPLOYED not in screen and "REPLICAS (2)" in screen else ""

    # The node unloads an unassigned replica after a 5 s grace, then reports: within 60 s on busy cores.
    screen = wait_for(refreshed, 60, "the view to drop the undeployed model")
    print(screen)
    assert "DEPLOYMENTS (0)" in screen and "smol-a" in screen and "smol-b" in screen
    assert screen.count("fleetlm status") == 1


def test_status_json_describes_the_fleet(fleet: Fleet) -> None:
    wait_for(lambda: replicas_ready(fleet, {"smol-a", "smol-b"}), 120, "both catalog replicas to be ready")
    done = status("--json", "--state-dir", str(fleet.state))
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    assert snap["controlplane"] == fleet.cluster.controlplane and snap["leader"] == fleet.cluster.controlplane
    nodes = {n["id"]: n for n in snap["nodes"]}
    assert set(nodes) == {"node-a", "node-b"}
    for node in nodes.values():
        assert node["state"] == "active" and node["cpu"]["cores"] == os.cpu_count()
        assert 0 < node["ram"]["free_bytes"] < node["ram"]["total_bytes"] and node["gpus"] == []
        assert 0 <= node["heartbeat_seconds_ago"] < 30
    replicas = {(r["node"], r["model"]): r for r in snap["replicas"]}
    for key in (("node-a", "smol-a"), ("node-b", "smol-b")):
        replica = replicas[key]
        assert replica["state"] == "ready" and replica["device"] == "cpu" and replica["slots"] == 4
        assert replica["queue_limit"] == 16 and replica["error"] == "" and replica["load_progress"] is None
        assert replica["assigned"] is False


def test_status_piped_prints_one_view_and_ends(fleet: Fleet) -> None:
    # `fleetlm status | grep vm`: its output is a pipe, not a terminal. It used to draw the live view there
    # for ever, in escape codes, and the pipe's reader never saw an end (the 60 s timeout here).
    piped = status("--state-dir", str(fleet.state))
    assert piped.returncode == 0, piped.stderr
    assert "NODES (2)" in piped.stdout and "node-a" in piped.stdout and "node-b" in piped.stdout
    assert "\x1b" not in piped.stdout and "Ctrl-C" not in piped.stdout


def test_status_says_why_replicas_wanted_are_not_placed(fleet: Fleet) -> None:
    # A scale beyond what the nodes hold is accepted and waits for room (one replica of a model per node,
    # two nodes); the view says why the third is not placed, with each node's reason.
    name = "smol-three"
    spec = node_pb2.ModelSpec(name=name, path=str(default_model_path()), format="gguf", engine="llamacpp",
                              context_size=512)  # fmt: skip
    deployment = node_pb2.Deployment(spec=spec, min_replicas=1, max_replicas=3, replicas=1)
    admin, metadata = fleet.admin(), fleet.metadata
    admin.DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), metadata=metadata, timeout=30)
    try:
        admin.ScaleDeployment(admin_pb2.ScaleDeploymentRequest(name=name, replicas=3), metadata=metadata, timeout=30)

        def explained() -> dict[str, object] | None:
            done = status("--json", "--state-dir", str(fleet.state))
            ours = (
                [d for d in json.loads(done.stdout)["deployments"] if d["name"] == name] if done.returncode == 0 else []
            )
            return ours[0] if ours and ours[0]["assigned"] == 2 and ours[0]["unplaced_reason"] else None

        shown = wait_for(explained, 60, "two replicas placed and the third explained")
        assert "already runs a replica of this model" in str(shown["unplaced_reason"]), shown
        view = status("--once", "--state-dir", str(fleet.state)).stdout
        line = next(x for x in view.splitlines() if x.strip().startswith(f"{name}: "))
        assert "1 of 3 replicas fit on no node: node-" in line and "already runs a replica" in line, view
    finally:
        admin.UndeployModel(admin_pb2.UndeployModelRequest(name=name), metadata=metadata, timeout=30)


def test_status_failures_are_one_line(fleet: Fleet, tmp_path: Path) -> None:
    # Nothing listening.
    down = status("--once", "--controlplane", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path))
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.count("\n") == 1 and "does not answer" in down.stderr, down.stderr
    # A wrong admin token: refused, and the token is not repeated back.
    wrong = tmp_path / "wrong.token"
    create_secret_file(wrong)
    refused = status("--once", "--controlplane", fleet.cluster.controlplane, "--admin-token-file", str(wrong))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "refused the credentials" in refused.stderr and wrong.read_text().strip() not in refused.stderr
    # No token at all for a control plane that wants one (the operator file names another control plane).
    bare = status("--json", "--controlplane", fleet.cluster.controlplane, "--state-dir", str(tmp_path))
    assert bare.returncode == 1 and "refused the credentials" in bare.stderr and "Traceback" not in bare.stderr
    # An address that is not a control plane's (a node's: it serves no AdminService) is said to be so, not
    # "answered UNIMPLEMENTED: Method not found!".
    node = next(p for p in fleet.cluster.procs if p.name == "node-node-a")
    address = node.argv[node.argv.index("--listen") + 1]
    elsewhere = status("--once", "--controlplane", address, "--admin-token-file", str(fleet.token_file))
    assert elsewhere.returncode == 1 and elsewhere.stderr.count("\n") == 1, elsewhere.stderr
    assert "is not a control plane" in elsewhere.stderr, elsewhere.stderr
    # A token file that cannot be read.
    missing = status("--once", "--controlplane", fleet.cluster.controlplane, "--admin-token-file", "/nonexistent")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "/nonexistent" in missing.stderr
    # The environment's token works with no file.
    token = fleet.token_file.read_text().strip()
    good = status("--once", "--controlplane", fleet.cluster.controlplane, env={"FLEETLM_ADMIN_TOKEN": token})
    assert good.returncode == 0 and "node-a" in good.stdout, good.stderr
    # Several control planes: the first that answers.
    both = f"127.0.0.1:{free_port()},{fleet.cluster.controlplane}"
    several = status("--json", "--controlplane", both, env={"FLEETLM_ADMIN_TOKEN": token})
    assert several.returncode == 0, several.stderr
    assert json.loads(several.stdout)["controlplane"] == fleet.cluster.controlplane


async def test_a_llama_replica_reports_its_load_progress() -> None:
    # In the agent's process: every report of the replica while it loads, as the load stream would send it.
    host = ModelHost([], NodeSettings(node_id="progress-test", threads=2))
    spec = node_pb2.ModelSpec(name="progress", path=str(default_model_path()), format="gguf", engine="llamacpp",
                              context_size=256)  # fmt: skip
    seen: list[node_pb2.Replica] = []

    async def record() -> None:
        while True:
            await host.changed.wait()
            host.changed.clear()
            seen.extend(host.replicas())

    recorder = asyncio.ensure_future(record())
    try:
        host.apply_assignments([node_pb2.Assignment(node_id="progress-test", model=spec, device="cpu")])
        deadline = time.monotonic() + 60  # one load of a 98 MB model: seconds, on busy cores
        while not any(r.state == node_pb2.REPLICA_STATE_READY for r in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        recorder.cancel()
        await host.close()
    loading = [r for r in seen if r.state == node_pb2.REPLICA_STATE_LOADING]
    progress = [r.load_progress for r in loading if r.HasField("load_progress")]
    assert progress, f"no load progress in {len(loading)} reports while loading"
    assert all(0.0 <= p <= 1.0 for p in progress) and progress == sorted(progress)
    assert all(r.HasField("loading_since") for r in loading)
    assert abs(loading[0].loading_since.ToNanoseconds() / 1e9 - time.time()) < 120
    ready = [r for r in seen if r.state == node_pb2.REPLICA_STATE_READY]
    assert ready and not ready[-1].HasField("load_progress") and not ready[-1].HasField("loading_since")


def test_the_view_says_a_deployment_is_rolling_out_a_change() -> None:
    old = node_pb2.ModelSpec(name="m", engine="llamacpp", context_size=1024)
    new = node_pb2.ModelSpec(name="m", engine="llamacpp", context_size=512)
    status = admin_pb2.DeploymentStatus(
        deployment=node_pb2.Deployment(spec=new, replicas=3, min_replicas=3, max_replicas=3),
        assignments=[node_pb2.Assignment(node_id=n, model=spec) for n, spec in (("a", new), ("b", old), ("c", old))],
    )
    from launcher.status import snapshot

    snap = snapshot("cp:1", admin_pb2.ListNodesResponse(), admin_pb2.ListDeploymentsResponse(deployments=[status]),
                    admin_pb2.GetLeaderResponse(), time.time())  # fmt: skip
    assert snap["deployments"][0]["outdated"] == 2
    said = [line.strip() for line in render(snap, 200) if "rolling out" in line]
    assert said == [
        "m: rolling out a change: 1 of 3 replicas placed with the new spec; 2 with the old one serve until new ones"
        " are ready"
    ]
    status.assignments[1].model.CopyFrom(new)
    status.assignments[2].model.CopyFrom(new)
    done = snapshot("cp:1", admin_pb2.ListNodesResponse(), admin_pb2.ListDeploymentsResponse(deployments=[status]),
                    admin_pb2.GetLeaderResponse(), time.time())  # fmt: skip
    assert not [line for line in render(done, 200) if "rolling out" in line]


def test_the_view_says_a_node_pins_a_deployments_name() -> None:
    spec = node_pb2.ModelSpec(name="m", engine="llamacpp", context_size=1024)
    pinned = node_pb2.ModelSpec(name="m", engine="llamacpp", context_size=256)
    nodes = admin_pb2.ListNodesResponse(nodes=[
        node_pb2.Node(node_id="a", replicas=[node_pb2.Replica(model=spec, assigned=True)]),
        node_pb2.Node(node_id="pinner", replicas=[node_pb2.Replica(model=pinned, assigned=False)]),
    ])  # fmt: skip
    status = admin_pb2.DeploymentStatus(deployment=node_pb2.Deployment(spec=spec, replicas=1))
    from launcher.status import snapshot

    snap = snapshot("cp:1", nodes, admin_pb2.ListDeploymentsResponse(deployments=[status]),
                    admin_pb2.GetLeaderResponse(), time.time())  # fmt: skip
    assert snap["deployments"][0]["pinned_by"] == ["pinner"]
    said = [line.strip() for line in render(snap, 200) if "pins" in line]
    assert said == [
        "m: node pinner pins a model of this name from its own catalog: not routed for the deployment (remove it"
        " from that catalog)"
    ]


def test_the_view_shows_load_progress_and_errors() -> None:
    # Formatting only: a loading replica with and without a fraction, and a failed one.
    def replica(model: str, **fields: object) -> node_pb2.Replica:
        return node_pb2.Replica(model=node_pb2.ModelSpec(name=model, engine="llamacpp"), **fields)  # type: ignore[arg-type]

    now = time.time()
    since = node_pb2.Replica().loading_since
    since.FromNanoseconds(int((now - 12) * 1e9))
    node = node_pb2.Node(node_id="n1", inference_address="127.0.0.1:1")
    node.replicas.append(replica("m1", state=node_pb2.REPLICA_STATE_LOADING, load_progress=0.35, loading_since=since))
    node.replicas.append(replica("m2", state=node_pb2.REPLICA_STATE_LOADING, loading_since=since))
    node.replicas.append(replica("m3", state=node_pb2.REPLICA_STATE_FAILED, error="model file not found: /x"))
    from launcher.status import snapshot

    snap = snapshot("cp:1", admin_pb2.ListNodesResponse(nodes=[node]), admin_pb2.ListDeploymentsResponse(),
                    admin_pb2.GetLeaderResponse(), now)  # fmt: skip
    rows = {line.split()[1]: line for line in render(snap, 200) if line.startswith("n1 ")}
    assert rows["m1"].endswith("loading 35% 12s")
    assert rows["m2"].endswith("loading 12s")
    assert rows["m3"].endswith("model file not found: /x")
    assert [r["load_progress"] for r in snap["replicas"]] == [pytest.approx(0.35), None, None]
    assert all(len(line) <= 40 for line in render(snap, 40))


def test_status_finds_what_fleetlm_up_made_and_up_serves_metrics(tmp_path: Path) -> None:
    from tests.test_up import start_up

    # TLS and credentials: status needs the CA, the operator certificate and the admin token, and finds
    # them all in up's state directory.
    up, ports, log = start_up(tmp_path, "--tls")
    try:
        state = tmp_path / "state"
        text = log.read_text()
        assert f"fleetlm status --state-dir {state}" in text
        # The wait for the default model said how its load went, up to ready.
        assert f"smollm2-135m on {socket.gethostname()}: ready" in text
        done = status("--json", "--state-dir", str(state))
        assert done.returncode == 0, done.stderr
        snap = json.loads(done.stdout)
        assert snap["controlplane"] == f"127.0.0.1:{ports['cp']}"
        assert [(r["model"], r["state"]) for r in snap["replicas"]] == [("smollm2-135m", "ready")]
        [deployed] = snap["deployments"]
        assert (deployed["name"], deployed["replicas"], deployed["assigned"], deployed["ready"]) == (
            "smollm2-135m",
            1,
            1,
            1,
        )
        # The metrics ports it gave the control plane and the node, in its banner, over HTTPS with the CA.
        trust = ssl.create_default_context(cafile=str(state / "ca" / "ca.crt"))
        for port, prefix in ((ports["cp_metrics"], "fleetlm_controlplane_"), (ports["node_metrics"], "fleetlm_node_")):
            url = f"https://127.0.0.1:{port}/metrics"
            assert url in text
            scraped = httpx.get(url, verify=trust, timeout=10)
            assert scraped.status_code == 200 and prefix in scraped.text
        assert f"https://127.0.0.1:{ports['http']}/metrics (edge)" in text
        # Without them: refused, in one line.
        bare = status("--once", "--controlplane", f"127.0.0.1:{ports['cp']}", "--state-dir", str(tmp_path))
        assert bare.returncode == 1 and bare.stderr.count("\n") == 1, bare.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def test_load_progress_is_load_not_cluster_state() -> None:
    # The control plane's view: a new fraction changes no durable key (no etcd write), and the newest report
    # is what ListNodes shows over the record.
    from google.protobuf import timestamp_pb2

    from controlplane.fleet import LoadBoard, durable_key

    def node(progress: float | None) -> node_pb2.Node:
        replica = node_pb2.Replica(model=node_pb2.ModelSpec(name="m"), state=node_pb2.REPLICA_STATE_LOADING)
        if progress is not None:
            replica.load_progress = progress
        return node_pb2.Node(node_id="n1", replicas=[replica])

    assert durable_key(node(0.2)) == durable_key(node(0.7)) == durable_key(node(None))
    board, now = LoadBoard(), timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    board.report("n1", node(0.7).replicas, 0, now)
    assert board.overlay(node(0.2)).replicas[0].load_progress == pytest.approx(0.7)
    board.report("n1", node(None).replicas, 0, now)
    assert not board.overlay(node(0.2)).replicas[0].HasField("load_progress")


@pytest.fixture
def bare_controlplane(tmp_path: Path) -> Iterator[str]:
    """etcd and a control plane with no node: enough for status to print a view."""
    cluster = Cluster(tmp_path)
    try:
        cluster.start_etcd()
        yield cluster.start_controlplane(3)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


@pytest.mark.parametrize("flags", [["--once"], ["--json"], []])
def test_status_into_a_pipe_its_reader_closed_ends_quietly(bare_controlplane: str, flags: list[str]) -> None:
    # `fleetlm status | head -3`: the reader is gone before status writes. As `ls | head` does, it ends
    # without a word (it printed a BrokenPipeError traceback, or "Exception ignored ... BrokenPipeError" at
    # exit). The reader's end is closed before status starts, so every write meets a closed pipe.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "launcher", "status", *flags, "--controlplane", bare_controlplane],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == "", done.stderr
    assert done.returncode in (0, 128 + signal.SIGPIPE), done.returncode
    # The same, through a shell pipe into head, as an operator types it.
    piped = subprocess.run(
        f"{sys.executable} -m launcher status {' '.join(flags)} --controlplane {bare_controlplane} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert piped.returncode == 0 and piped.stdout.count("\n") == 1 and piped.stderr == "", piped


def test_the_live_view_killed_by_sigterm_shows_the_cursor_again(tmp_path: Path) -> None:
    # A real terminal (a pty) running the live view, with no control plane to answer: the view shows the
    # failure in place and tries again. SIGTERM (a `kill`, a supervisor's stop) must give the terminal its
    # cursor back, as Ctrl-C does: it was left hidden.
    import pty
    import select

    hide, show = b"\x1b[?25l", b"\x1b[?25h"
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "status", "--interval", "0.5", "--controlplane",
         f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path)],
        stdin=terminal, stdout=terminal, stderr=terminal, env={**os.environ, "COLUMNS": "120", "LINES": "40"},
    )  # fmt: skip
    os.close(terminal)
    seen = b""

    def read_until(done: Any, seconds: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the terminal's last holder has exited
                    return
                if not chunk:
                    return
                seen += chunk

    try:
        read_until(lambda: hide in seen and b"trying again" in seen, 60)
        assert hide in seen and b"trying again" in seen, seen[-500:]
        shown_before = seen.count(show)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        read_until(lambda: False, 2)  # what it wrote on its way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(controller)
    assert seen.count(show) == shown_before + 1, seen[-500:]
    assert seen.rindex(show) > seen.rindex(hide)
    assert b"Traceback" not in seen, seen[-2000:]
