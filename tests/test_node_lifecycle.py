"""No engine outlives its replica, and the agent's shutdown always runs.

The engine here is a launched server that never becomes ready, as SGLang is while it loads for minutes:
a process with a child of its own (SGLang has worker processes), both carrying a unique marker in their
command line. The parent-death signal only reaches the agent's direct child; the child's own child
goes only if the agent stops the engine's whole process group, which is what is checked.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.default_model import default_model_path
from node_agent import host as host_module
from node_agent.host import ModelHost
from node_agent.settings import NodeSettings
from tests.cluster import Cluster, Proc, wait_for

pytestmark = [pytest.mark.cluster]

MODEL_PATH = str(default_model_path())
_ENGINE = (
    "import subprocess, sys, time;"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', sys.argv[1]]);"
    "print('loading shard 1 of 40', flush=True); time.sleep(600)"
)


def slow_engine(marker: str) -> list[str]:
    return [sys.executable, "-c", _ENGINE, marker]


def slow_entry(name: str, marker: str) -> dict[str, object]:
    return {"name": name, "path": MODEL_PATH, "engine": "openai", "format": "gguf", "command": slow_engine(marker),
            "startup_timeout": 600}  # fmt: skip


def marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if marker in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_started(marker: str, node: Proc) -> None:
    # The engine and its child: 60 s for two Python start-ups on a busy machine.
    wait_for(lambda: len(marked(marker)) == 2, 60, "the engine and its child to start", node)


def wait_gone(marker: str) -> None:
    # The agent stops the engine with SIGTERM (the slow engine dies of it); 30 s is generous.
    deadline = time.monotonic() + 30
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = marked(marker)
    for proc in left:  # do not leave them to the next test
        proc.kill()
    assert not left, [p.info["cmdline"] for p in left]


@dataclass
class Fleet:
    cluster: Cluster

    def admin(self, channel: grpc.Channel) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(channel)

    def node_known(self, node_id: str) -> bool:
        with grpc.insecure_channel(self.cluster.controlplane) as channel:
            self.admin(channel).GetNode(admin_pb2.GetNodeRequest(node_id=node_id), timeout=10)
        return True

    def replica_state(self, node_id: str, model: str) -> int | None:
        with grpc.insecure_channel(self.cluster.controlplane) as channel:
            node = self.admin(channel).GetNode(admin_pb2.GetNodeRequest(node_id=node_id), timeout=10).node
        return next((r.state for r in node.replicas if r.model.name == model), None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path_factory.mktemp("node-lifecycle"))
    try:
        cluster.start_etcd()
        cluster.start_controlplane(3)
        yield Fleet(cluster)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def test_undeploying_a_replica_whose_engine_is_still_starting_stops_the_engine(fleet: Fleet) -> None:
    marker = f"fleetlm-test-{uuid.uuid4().hex}"
    node, _ = fleet.cluster.start_node("undeploy", models_dirs=[str(Path(MODEL_PATH).parent)])
    wait_for(lambda: fleet.node_known("undeploy"), 30, "the node to join the fleet", node)
    spec = node_pb2.ModelSpec(name="slow-deployed", path=MODEL_PATH, format="gguf", engine="openai",
                              command=slow_engine(marker))  # fmt: skip
    spec.startup_timeout.FromSeconds(600)
    with grpc.insecure_channel(fleet.cluster.controlplane) as channel:
        admin = fleet.admin(channel)
        deployment = node_pb2.Deployment(spec=spec, min_replicas=1, max_replicas=1)
        admin.DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), timeout=30)
        wait_started(marker, node)
        loading = node_pb2.REPLICA_STATE_LOADING
        wait_for(lambda: fleet.replica_state("undeploy", "slow-deployed") == loading, 30, "it to be loading", node)
        admin.UndeployModel(admin_pb2.UndeployModelRequest(name="slow-deployed"), timeout=30)
    wait_gone(marker)
    wait_for(lambda: fleet.replica_state("undeploy", "slow-deployed") is None, 30, "the replica to go", node)
    assert node.popen.poll() is None  # the agent itself is fine


def test_stopping_the_agent_while_an_engine_starts_stops_the_engine(fleet: Fleet) -> None:
    marker = f"fleetlm-test-{uuid.uuid4().hex}"
    node, _ = fleet.cluster.start_node("stopping", models=[slow_entry("slow", marker)])
    wait_started(marker, node)
    assert node.stop(timeout=60) == 0  # SIGTERM to the agent only: the engine runs in its own session
    wait_gone(marker)
    assert "node stopping stopped" in node.log_text()


def test_a_failed_background_task_still_shuts_the_agent_down_in_order(tmp_path: Path) -> None:
    # A real failure of a background task: the inventory override is broken after the agent started,
    # and the control plane restarts after the node's lease expired, so the agent registers again and
    # cannot build its inventory.
    marker = f"fleetlm-test-{uuid.uuid4().hex}"
    cluster = Cluster(tmp_path)
    try:
        cluster.start_etcd()
        controlplane = cluster.start_controlplane(3)
        override = {"ram_total_gib": 16}
        node, _ = cluster.start_node("breaks", models=[slow_entry("slow", marker)], inventory=override)
        wait_started(marker, node)
        (tmp_path / "breaks-inventory.yaml").write_text(yaml.safe_dump({"ram_total_gib": "lots"}))
        # The control plane goes away for longer than the lease (TTL 3 s) and comes back: the node's
        # heartbeats go unanswered (it keeps its lease meanwhile), then the control plane says the lease
        # expired and the node registers again, which builds its inventory.
        assert cluster.procs[1].name == "controlplane" and controlplane
        cluster.procs[1].stop()
        time.sleep(6)
        cluster.restart(cluster.procs[1])
        # The node ends by itself: 60 s covers its backoff (0.5 s) and the engine's stop.
        deadline = time.monotonic() + 60
        while node.popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.popen.poll() is not None, "the agent did not stop"
        log = node.log_text()
        assert node.popen.returncode != 0
        assert "the agent's registration task failed" in log and "could not convert string to float" in log
        wait_gone(marker)
        # In order: the gRPC server stopped, then the engines (the "stopped" line comes after both).
        assert "node breaks stopped" in log
    finally:
        cluster.close()
        for proc in marked(marker):
            proc.send_signal(signal.SIGKILL)


def decode_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "llama-batch")


@pytest.mark.model
async def test_unloading_a_llama_replica_while_it_loads_leaves_no_decode_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Unassigned means unloaded at once here: the grace for a re-assignment is not what this tests.
    monkeypatch.setattr(host_module, "UNASSIGNED_GRACE_SECONDS", 0)
    # In the agent's process: a llama.cpp replica unassigned at points all along its load (0.1 s for the
    # weights, then ~10 ms for the batched context, here) must leave no decode thread (each holds a
    # llama.cpp context) behind.
    host = ModelHost([], NodeSettings(node_id="unload-test", threads=2))
    spec = node_pb2.ModelSpec(name="brief", path=MODEL_PATH, format="gguf", engine="llamacpp", context_size=256,
                              max_running_requests=1)  # fmt: skip
    assignment = node_pb2.Assignment(node_id="unload-test", model=spec, device="cpu")
    before = decode_threads()
    try:
        for step in range(60):
            host.apply_assignments([assignment])
            await asyncio.sleep(0.005 * step)
            host.apply_assignments([])
            deadline = time.monotonic() + 60  # an unload waits for the load's thread: generous
            while "brief" in host.models and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert "brief" not in host.models
        assert decode_threads() == before
    finally:
        await host.close()
