"""The scheduler on a real fleet: four node agents as processes on one etcd, with different declared
inventories (GPUs declared here exist for placement only; the model still runs on this CPU).

The fleet is started once for the module; before each test it is put back as it started (every node up,
none cordoned, no deployment), so each test stands alone and in any order.

Time bounds here are for things that take a few seconds on an idle machine (a lease expiring, a model
loading); they are generous because other test runs share these 2 cores, and what they check is that the
thing happens, not how fast.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import openai
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.default_model import default_model_path
from mesh.errors import ErrorCode, FleetError
from tests.cluster import Cluster, wait_for
from tests.test_grpcurl import grpcurl
from tests.test_openai_engines import llama_cpp_server_argv

pytestmark = [pytest.mark.model, pytest.mark.cluster]

TTL = 3
# A client gives up on a request after this long and counts it as hung. Above the edge's longest promised
# wait (--scale-from-zero-timeout 60, below, then a 503 MODEL_UNAVAILABLE), so a request answered as the
# README promises never reaches it.
CLIENT_TIMEOUT = 90
MODEL_PATH = str(default_model_path())
MODEL_DIR = str(default_model_path().parent)
NODES: dict[str, dict[str, Any]] = {
    "gpu-1": {"gpus": [{"name": "declared A10", "memory_gib": 16}], "ram_total_gib": 32},
    "cpu-1": {"gpus": [], "ram_total_gib": 16},
    "cpu-2": {"gpus": [], "ram_total_gib": 16},
    "bare": {"gpus": [], "ram_total_gib": 16},  # has no model files
}


@dataclass
class Fleet:
    cluster: Cluster
    http: str
    admin: admin_pb2_grpc.AdminServiceStub
    procs: dict[str, Any] = field(default_factory=dict)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0, timeout=120)

    def deploy(self, name: str, **fields: Any) -> admin_pb2.DeployModelResponse:
        spec_fields = {k: fields.pop(k) for k in list(fields) if k in node_pb2.ModelSpec.DESCRIPTOR.fields_by_name}
        defaults = {"name": name, "path": MODEL_PATH, "format": "gguf", "context_size": 1024}
        spec = node_pb2.ModelSpec(**(defaults | spec_fields))
        deployment = node_pb2.Deployment(spec=spec, **{"min_replicas": 1, "max_replicas": 1} | fields)
        return self.admin.DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), timeout=30)

    def status(self, name: str) -> admin_pb2.DeploymentStatus | None:
        listed = self.admin.ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=5).deployments
        return next((d for d in listed if d.deployment.spec.name == name), None)

    def ready_nodes(self, name: str) -> list[str]:
        status = self.status(name)
        if status is None:
            return []
        return [r.node_id for r in status.replicas if r.state == node_pb2.REPLICA_STATE_READY]

    def wait_ready(self, name: str, timeout: float = 60) -> list[str]:
        return wait_for(lambda: self.ready_nodes(name), timeout, f"{name} ready")  # type: ignore[no-any-return]

    def undeploy(self, name: str) -> None:
        self.admin.UndeployModel(admin_pb2.UndeployModelRequest(name=name), timeout=30)

    def cordon(self, node_id: str, on: bool = True) -> None:
        if on:
            self.admin.CordonNode(admin_pb2.CordonNodeRequest(node_id=node_id), timeout=5)
        else:
            self.admin.UncordonNode(admin_pb2.UncordonNodeRequest(node_id=node_id), timeout=5)

    def nodes(self) -> dict[str, node_pb2.Node]:
        return {n.node_id: n for n in self.admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes}

    def reset(self) -> None:
        """The fleet as the module started it: a node a test killed is started again, no node is cordoned
        or draining, no deployment is left, and no node runs a replica."""
        for node_id, proc in self.procs.items():
            if proc.popen.poll() is not None:
                self.procs[node_id] = self.cluster.restart(proc)
        for status in self.admin.ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=5).deployments:
            self.undeploy(status.deployment.spec.name)
        for node in self.nodes().values():
            if node.scheduling != node_pb2.SCHEDULING_ACTIVE:
                self.cordon(node.node_id, on=False)

        def fresh() -> bool:
            nodes = self.nodes()
            return set(NODES) <= set(nodes) and all(
                not nodes[n].replicas and nodes[n].scheduling == node_pb2.SCHEDULING_ACTIVE for n in NODES
            )

        wait_for(fresh, 60, "the fleet as it started")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path_factory.mktemp("scheduler"))
    try:
        cluster.start_etcd()
        cluster.start_controlplane(TTL, "--placement-strategy", "spread")
        procs = {}
        for node_id, inventory in NODES.items():
            dirs = [] if node_id == "bare" else [MODEL_DIR]
            procs[node_id], _ = cluster.start_node(node_id, models_dirs=dirs, inventory=inventory, threads=1)
        _, http, _ = cluster.start_edge("--scale-from-zero-timeout", "60")
        admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cluster.controlplane))
        wait_for(
            lambda: len(admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes) == len(NODES), 60, "4 nodes"
        )
        yield Fleet(cluster, http, admin, procs)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def fresh_fleet(fleet: Fleet) -> None:
    fleet.reset()


def explain(fleet: Fleet, **spec_fields: Any) -> dict[str, admin_pb2.NodeVerdict]:
    spec = node_pb2.ModelSpec(name="probe", path=MODEL_PATH, format="gguf", context_size=1024)
    for key, value in spec_fields.items():
        setattr(spec, key, value)
    reply = fleet.admin.ExplainPlacement(
        admin_pb2.ExplainPlacementRequest(deployment=node_pb2.Deployment(spec=spec, min_replicas=1)), timeout=5
    )
    return {v.node_id: v for v in reply.verdicts}


def rpc_error(call: Any) -> FleetError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return FleetError.from_rpc_error(caught.value)


def test_placement_follows_fit_format_and_device_with_reasons(fleet: Fleet) -> None:
    gpu = explain(fleet, device="gpu")
    assert [n for n, v in gpu.items() if v.fits] == ["gpu-1"] and gpu["gpu-1"].device == "gpu"
    assert gpu["cpu-1"].reason == "deployment needs a GPU; node has none"
    cpu = explain(fleet, device="cpu")
    assert {n for n, v in cpu.items() if v.fits} == {"gpu-1", "cpu-1", "cpu-2"}
    assert all(cpu[n].device == "cpu" for n in ("gpu-1", "cpu-1", "cpu-2"))
    assert cpu["bare"].reason == f"model file not present on the node: {MODEL_PATH}"
    # A 1M-token context needs ~22.6 GiB of KV cache: only gpu-1's 32 GiB of RAM holds it (its 16 GiB GPU
    # less the reserve, does not).
    huge = explain(fleet, context_size=1_048_576, max_running_requests=1)
    assert [n for n, v in huge.items() if v.fits] == ["gpu-1"] and huge["gpu-1"].device == "cpu"
    assert "GiB of RAM" in huge["cpu-1"].reason
    awq = explain(fleet, format="awq", engine="sglang", path="/models/qwen-awq")
    assert not any(v.fits for v in awq.values())
    assert "NVIDIA GPU" in awq["cpu-1"].reason and "not present" in awq["gpu-1"].reason


def test_deployments_that_fit_nowhere_are_refused_with_reasons(fleet: Fleet) -> None:
    error = rpc_error(lambda: fleet.deploy("wrong-engine", engine="sglang"))
    assert error.code == ErrorCode.FORMAT_NOT_SUPPORTED
    assert error.message == "model 'wrong-engine': engine 'sglang' cannot run 'gguf' weights"
    error = rpc_error(lambda: fleet.deploy("awq-on-cpu", format="awq", path="/m/awq", device="cpu"))
    assert error.code == ErrorCode.FORMAT_NOT_SUPPORTED
    assert "runs on NVIDIA GPUs only, but the deployment asks for a CPU" in error.message
    # An HF model on a fleet whose only GPU node lacks the weights and whose other nodes have no GPU.
    error = rpc_error(lambda: fleet.deploy("hf-no-gpu", format="hf", engine="sglang", path="/m/hf"))
    assert error.code == ErrorCode.NO_CAPACITY and "cpu-1: hf models run on SGLang, which needs an NVIDIA GPU" in (
        error.message
    )
    error = rpc_error(lambda: fleet.deploy("too-big", context_size=1_048_576, device="gpu", max_running_requests=1))
    assert error.code == ErrorCode.NO_CAPACITY
    assert "gpu-1:" in error.message and "cpu-1:" in error.message
    assert fleet.status("too-big") is None


def test_spread_puts_replicas_on_different_nodes(fleet: Fleet) -> None:
    reply = fleet.deploy("spread-me", device="cpu", min_replicas=3, max_replicas=3)
    nodes = [a.node_id for a in reply.assignments]
    assert sorted(nodes) == ["cpu-1", "cpu-2", "gpu-1"]
    wait_for(lambda: len(fleet.ready_nodes("spread-me")) == 3, 60, "3 replicas ready")
    fleet.undeploy("spread-me")
    wait_for(lambda: fleet.status("spread-me") is None, 10, "undeploy")


def _changed_under_load(fleet: Fleet, name: str, replicas: int, context_size: int, meanwhile: Any = None) -> None:
    """Change the deployment's context size while a client sends requests in a loop; wait until `replicas`
    replicas with the new spec are ready and none with the old one is left (`meanwhile` runs between);
    assert that no request failed or hung, and that no fewer than `replicas` - 1 replicas served at any
    sample (as their nodes report them: ready, with either spec). Every replica was unloaded at once: the
    edge held requests until new ones had loaded (none failed, but the model served nothing meanwhile)."""
    serving: list[int] = []
    load = Load(fleet, name)
    try:
        wait_for(lambda: load.ok >= 3, 60, "requests served before the change")
        fleet.deploy(name, device="cpu", min_replicas=replicas, max_replicas=replicas, context_size=context_size)
        if meanwhile is not None:
            meanwhile()

        ready = node_pb2.REPLICA_STATE_READY

        def sampled() -> list[node_pb2.Replica]:
            reported = [r for n in fleet.nodes().values() for r in n.replicas if r.model.name == name]
            serving.append(sum(1 for r in reported if r.state == ready))
            return reported

        def rolled_out() -> bool:
            reported = sampled()
            status = fleet.status(name)
            if status is None or len(status.assignments) != replicas:
                return False
            new_ready = sum(1 for r in reported if r.state == ready and r.model.context_size == context_size)
            return all(a.model.context_size == context_size for a in status.assignments) and new_ready == replicas

        wait_for(rolled_out, 120, f"{replicas} replicas of {name} with the new spec ready")
        served = load.ok
        # Sampled on until then too: a roll-out whose models load in a second gives few samples by itself.
        wait_for(lambda: sampled() is not None and load.ok >= served + 3, 60, "requests served after the change")
    finally:
        load.stop()
    print(f"{name} changed under load: {load.summary()}; replicas serving, sampled: {serving}")
    assert load.failed == [] and load.hung == 0, load.summary()
    assert len(serving) >= 5 and min(serving) >= replicas - 1, serving


def test_a_deployment_on_every_node_it_fits_is_changed_one_replica_at_a_time(fleet: Fleet) -> None:
    """Its replicas hold every node with the weights, so each new one can only take an old one's place: one
    at a time, the next only once the last is ready, so the others serve meanwhile. Every replica was
    dropped at once, and the model served nothing until the new ones had loaded (the change's dry run had
    also refused it outright: "already runs a replica of this model" on each node)."""
    fleet.deploy("change-me", device="cpu", min_replicas=3, max_replicas=3)
    wait_for(lambda: len(fleet.ready_nodes("change-me")) == 3, 60, "3 replicas ready")
    _changed_under_load(fleet, "change-me", 3, 512)


def test_a_changed_deployment_starts_its_new_replicas_beside_the_old_where_there_is_room(fleet: Fleet) -> None:
    """2 replicas on 3 nodes that fit: the new replicas load on the free node (and then in the places
    of the old ones), and an old replica goes only once a new one is ready to take its requests."""
    fleet.deploy("surge", device="cpu", min_replicas=2, max_replicas=2)
    wait_for(lambda: len(fleet.ready_nodes("surge")) == 2, 60, "2 replicas ready")
    before = set(fleet.ready_nodes("surge"))

    def first_goes_beside() -> None:
        status = fleet.status("surge")
        first = [a.node_id for a in status.assignments if a.model.context_size == 768] if status else []
        assert set(first) - before, f"new replicas {first} all took an old one's place; old ones on {before}"

    _changed_under_load(fleet, "surge", 2, 768, meanwhile=first_goes_beside)


def test_scale_from_zero_then_idle_unload(fleet: Fleet) -> None:
    fleet.deploy("lazy", device="cpu", min_replicas=0, max_replicas=1, idle_timeout={"seconds": 4})
    status = fleet.status("lazy")
    assert status is not None and not status.assignments
    start = time.monotonic()
    reply = fleet.client().completions.create(model="lazy", prompt="Hello", max_tokens=5, temperature=0)
    waited = time.monotonic() - start
    print(f"scale from zero: first request answered after {waited:.2f}s")
    assert reply.choices[0].text and reply.model == "lazy"
    assert len(fleet.ready_nodes("lazy")) == 1
    # Idle: unloaded after idle_timeout (plus a heartbeat and a reconcile pass), down to min_replicas=0;
    # never before: the last request's start was at most one request's time before idle_start.
    idle_start = time.monotonic()
    wait_for(lambda: not fleet.status("lazy").assignments, 60, "idle unload")  # type: ignore[union-attr]
    unloaded_after = time.monotonic() - idle_start
    print(f"idle unload observed {unloaded_after:.1f}s after the last request (idle_timeout 4s)")
    assert unloaded_after >= 3
    assert fleet.status("lazy").deployment.replicas == 0  # type: ignore[union-attr]
    wait_for(
        lambda: (
            not any(
                r.model.name == "lazy"
                for n in fleet.admin.ListNodes(admin_pb2.ListNodesRequest(), timeout=5).nodes
                for r in n.replicas
            )
        ),
        30,
        "engine unloaded on the node",
    )
    # And it scales from zero again.
    assert fleet.client().completions.create(model="lazy", prompt="Hi", max_tokens=3).choices
    fleet.undeploy("lazy")


def test_a_streamed_request_that_waits_for_scale_from_zero_hears_how_the_load_goes(fleet: Fleet) -> None:
    # An engine server that takes a few seconds to start, as SGLang does (SmolLM2 on llama.cpp loads in a
    # third of a second here, within the edge's first quiet second).
    server = " ".join(llama_cpp_server_argv("{port}"))
    fleet.deploy("lazy-notes", device="cpu", min_replicas=0, max_replicas=1, engine="openai",
                 command=["sh", "-c", f"sleep 2; exec {server}"], startup_timeout={"seconds": 120})  # fmt: skip

    # The edge tells of a wait only for a model its routing table knows is deployed: wait until the table has
    # heard of the deployment (on a busy machine the request could otherwise go first, and hear nothing).
    def known() -> bool:
        listed = httpx.get(f"{fleet.http}/v1/models", timeout=10).json()["data"]
        return any(m["id"] == "lazy-notes" for m in listed)

    wait_for(known, 30, "the edge's routing table to know lazy-notes")
    body = {"model": "lazy-notes", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{fleet.http}/v1/completions", json=body, timeout=CLIENT_TIMEOUT) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    notes = [line for line in lines[:first_data] if line.startswith(": fleetlm: ")]
    print("\n".join(notes))
    # The wait took longer than the first second (a node loads the model), so the client heard where it was:
    # SSE comments naming the model, before its first chunk; then the stream as usual.
    assert notes and all("lazy-notes" in note for note in notes), lines[:first_data]
    assert all(line.startswith(": fleetlm: ") for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]" and all(not line.startswith(":") for line in lines[first_data:])
    chunks = [json.loads(line[6:]) for line in lines[first_data:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # OpenAI's SDK skips the comments: a cold model streams to it like a warm one.
    fleet.deploy("lazy-sdk", device="cpu", min_replicas=0, max_replicas=1)
    stream = fleet.client().completions.create(model="lazy-sdk", prompt="Hello", max_tokens=4, stream=True)
    finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    # The Responses API's stream hears the same news before its first typed event.
    fleet.deploy("lazy-responses", device="cpu", min_replicas=0, max_replicas=1, engine="openai",
                 command=["sh", "-c", f"sleep 2; exec {server}"], startup_timeout={"seconds": 120})  # fmt: skip
    wait_for(lambda: any(m["id"] == "lazy-responses" for m in httpx.get(f"{fleet.http}/v1/models", timeout=10)
                         .json()["data"]), 30, "the edge's routing table to know lazy-responses")  # fmt: skip
    body = {"model": "lazy-responses", "input": "Hello", "max_output_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{fleet.http}/v1/responses", json=body, timeout=CLIENT_TIMEOUT) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    first_event = next(i for i, line in enumerate(lines) if not line.startswith(":"))
    notes = lines[:first_event]
    assert notes and all(n.startswith(": fleetlm: ") and "lazy-responses" in n for n in notes), lines[:first_event]
    assert lines[first_event] == "event: response.created"
    assert all(not line.startswith(":") for line in lines[first_event:])
    assert lines[-2] in ("event: response.completed", "event: response.incomplete"), lines[-2:]
    fleet.undeploy("lazy-notes")
    fleet.undeploy("lazy-sdk")
    fleet.undeploy("lazy-responses")


def test_a_streamed_request_for_a_deployment_that_fits_nowhere_is_still_a_plain_http_error(fleet: Fleet) -> None:
    # Refused at once (every node cordoned): no wait, so no news, and the refusal is a real HTTP status.
    fleet.deploy("nowhere", device="cpu", min_replicas=0, max_replicas=1)
    for node_id in NODES:
        fleet.cordon(node_id)
    body = {"model": "nowhere", "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{fleet.http}/v1/completions", json=body, timeout=CLIENT_TIMEOUT) as reply:
        reply.read()
    assert reply.status_code in (429, 503), reply.text
    assert reply.json()["error"]["message"]
    fleet.undeploy("nowhere")


def _hold_stream(fleet: Fleet, model: str) -> tuple[threading.Event, threading.Thread]:
    """A long greedy stream that keeps the model's only slot busy until `release` is set."""
    started, release = threading.Event(), threading.Event()
    body = {"model": model, "prompt": "Write a very long story.", "max_tokens": 1000, "temperature": 0, "stream": True}

    def run() -> None:
        with httpx.stream("POST", f"{fleet.http}/v1/completions", json=body, timeout=120) as stream:
            assert stream.status_code == 200, stream.read()
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    started.set()
                if release.is_set():
                    break

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(60), "the holding stream never started"
    return release, thread


def test_overload_spills_to_the_cpu_offload_model_else_429(fleet: Fleet) -> None:
    fleet.deploy("smol-cpu", device="cpu")
    fleet.deploy("smol-gpu", device="gpu", max_running_requests=1, max_queued_requests=0, cpu_offload_model="smol-cpu")
    fleet.deploy("smol-gpu-solo", device="gpu", max_running_requests=1, max_queued_requests=0)
    for name in ("smol-cpu", "smol-gpu", "smol-gpu-solo"):
        fleet.wait_ready(name)
    assert fleet.ready_nodes("smol-gpu") == ["gpu-1"]

    release, thread = _hold_stream(fleet, "smol-gpu")
    try:
        spilled = fleet.client().completions.create(model="smol-gpu", prompt="Hello", max_tokens=4, temperature=0)
        assert spilled.model == "smol-cpu"  # served by the offload deployment
        assert spilled.choices[0].text
    finally:
        release.set()
        thread.join(30)

    release, thread = _hold_stream(fleet, "smol-gpu-solo")
    try:
        response = httpx.post(
            f"{fleet.http}/v1/completions", json={"model": "smol-gpu-solo", "prompt": "Hi", "max_tokens": 4}, timeout=60
        )
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "GPU_OVERLOADED"
        assert int(response.headers["retry-after"]) >= 1
    finally:
        release.set()
        thread.join(30)
    # Once the slot is free the same request is served.
    ok = fleet.client().completions.create(model="smol-gpu-solo", prompt="Hi", max_tokens=4)
    assert ok.model == "smol-gpu-solo"
    for name in ("smol-gpu", "smol-gpu-solo", "smol-cpu"):
        fleet.undeploy(name)


@dataclass(frozen=True)
class Failure:
    status: int | None  # None: no HTTP answer at all
    code: str
    retry_after: str | None
    message: str


class Load:
    """Short requests in a loop from a thread, counting outcomes. The client never retries (its retries
    would hide failures) and gives up after CLIENT_TIMEOUT: a request unanswered by then counts as hung."""

    def __init__(self, fleet: Fleet, model: str) -> None:
        self.ok, self.hung = 0, 0
        self.failed: list[Failure] = []
        self._stop = threading.Event()
        self._client = openai.OpenAI(
            base_url=f"{fleet.http}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT
        )
        self._model = model
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client.completions.create(model=self._model, prompt="Hi", max_tokens=4, temperature=0)
                self.ok += 1
                continue
            except openai.APITimeoutError:
                self.hung += 1
            except openai.APIStatusError as exc:
                retry_after = exc.response.headers.get("retry-after")
                self.failed.append(Failure(exc.status_code, str(exc.code), retry_after, exc.message))
            except openai.APIConnectionError as exc:
                self.failed.append(Failure(None, "", None, str(exc)))
            time.sleep(0.1)

    def summary(self) -> str:
        kinds = Counter((f.status, f.code, f.retry_after) for f in self.failed)
        examples = {(f.status, f.code, f.retry_after): f.message for f in self.failed}
        failures = "; ".join(f"{n} x {s} {c} retry-after={r} ({examples[s, c, r]})" for (s, c, r), n in kinds.items())
        return f"{self.ok} served, {self.hung} hung, {len(self.failed)} failed: {failures or 'none'}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT + 30)
        assert not self._thread.is_alive(), "a request outlived the client's own timeout"


def test_drained_node_replicas_move_with_no_failed_request(fleet: Fleet) -> None:
    fleet.deploy("mover", device="cpu")
    [origin] = fleet.wait_ready("mover")
    load = Load(fleet, "mover")
    try:
        wait_for(lambda: load.ok >= 3, 60, "requests served before the drain")
        moving = fleet.admin.DrainNode(admin_pb2.DrainNodeRequest(node_id=origin), timeout=5).replicas_to_move
        assert moving >= 1
        wait_for(lambda: (n := fleet.ready_nodes("mover")) and origin not in n, 60, "replica moved")
        # Keep serving across the old replica's unload, and after it.
        wait_for(lambda: not any(r.model.name == "mover" for r in fleet.nodes()[origin].replicas), 60, "unload")
        served = load.ok
        wait_for(lambda: load.ok >= served + 3, 60, "requests served after the unload")
    finally:
        load.stop()
    print(f"drain: {load.summary()}")
    assert load.failed == [] and load.hung == 0, load.summary()


def test_node_killed_under_load_replicas_placed_again(fleet: Fleet) -> None:
    victim = "cpu-2"
    others = [n for n in NODES if n != victim]
    for n in others:
        fleet.cordon(n)
    try:
        fleet.deploy("phoenix", device="cpu")
        assert fleet.wait_ready("phoenix") == [victim]
    finally:
        for n in others:
            fleet.cordon(n, on=False)
    load = Load(fleet, "phoenix")
    try:
        wait_for(lambda: load.ok >= 3, 60, "requests served before the kill")
        fleet.procs[victim].signal(signal.SIGKILL)
        killed = time.monotonic()
        # The lease expires (TTL 3 s), a reconcile pass places the replica again, the model loads there:
        # 5-8 s on an idle machine.
        new = wait_for(lambda: [n for n in fleet.ready_nodes("phoenix") if n != victim], 90, "re-placement")
        replaced_after = time.monotonic() - killed
        served_before = load.ok
        wait_for(lambda: load.ok > served_before + 3, 60, "requests served again")
    finally:
        load.stop()
    print(f"node killed: replica ready on {new} {replaced_after:.1f}s later (lease TTL {TTL}s); {load.summary()}")
    # What a user is promised while the only replica's node is down: no request hangs, and each one that
    # fails says the model cannot be served now (503: its node is unreachable, or it has no ready replica
    # yet) and when to try again.
    assert load.hung == 0, load.summary()
    for failure in load.failed:
        assert failure.status == 503, load.summary()
        assert failure.code in ("BACKEND_UNAVAILABLE", "MODEL_UNAVAILABLE"), load.summary()
        assert failure.retry_after is not None and int(failure.retry_after) >= 1, load.summary()


def test_grpcurl_drives_deploy_scale_cordon_drain_undeploy(fleet: Fleet) -> None:
    cp = fleet.cluster.controlplane
    admin = "fleetlm.controlplane.v1.AdminService"
    deployment = {
        "deployment": {
            "spec": {"name": "by-grpcurl", "path": MODEL_PATH, "format": "gguf", "device": "cpu", "context_size": 1024},
            "min_replicas": 1,
            "max_replicas": 2,
        }
    }
    deployed = json.loads(grpcurl("-d", json.dumps(deployment), cp, f"{admin}/DeployModel").stdout)
    first = deployed["assignments"][0]["node_id"]
    fleet.wait_ready("by-grpcurl")
    scaled = grpcurl("-d", '{"name": "by-grpcurl", "replicas": 2}', cp, f"{admin}/ScaleDeployment")
    assert json.loads(scaled.stdout)["deployment"]["replicas"] == 2
    wait_for(lambda: len(fleet.ready_nodes("by-grpcurl")) == 2, 60, "2 replicas")
    bad = grpcurl("-d", '{"name": "by-grpcurl", "replicas": 9}', cp, f"{admin}/ScaleDeployment", check=False)
    assert bad.returncode != 0 and "INVALID_REQUEST" in bad.stderr
    listed = json.loads(grpcurl(cp, f"{admin}/ListDeployments").stdout)
    assert any(d["deployment"]["spec"]["name"] == "by-grpcurl" for d in listed["deployments"])

    grpcurl("-d", json.dumps({"node_id": first}), cp, f"{admin}/CordonNode")
    node = json.loads(grpcurl("-d", json.dumps({"node_id": first}), cp, f"{admin}/GetNode").stdout)["node"]
    assert node["scheduling"] == "SCHEDULING_CORDONED"
    grpcurl("-d", json.dumps({"node_id": first}), cp, f"{admin}/DrainNode")
    # A replacement is placed on the third node that has the weights; the replica leaves the drained node
    # once it is ready.
    wait_for(lambda: len(ready := fleet.ready_nodes("by-grpcurl")) == 2 and first not in ready, 60, "drained")
    grpcurl("-d", json.dumps({"node_id": first}), cp, f"{admin}/UncordonNode")
    node = json.loads(grpcurl("-d", json.dumps({"node_id": first}), cp, f"{admin}/GetNode").stdout)["node"]
    assert node.get("scheduling", "SCHEDULING_ACTIVE") == "SCHEDULING_ACTIVE"
    explained = json.loads(grpcurl("-d", '{"name": "by-grpcurl"}', cp, f"{admin}/ExplainPlacement").stdout)
    assert explained["verdicts"] and all("reason" in v for v in explained["verdicts"])

    grpcurl("-d", '{"name": "by-grpcurl"}', cp, f"{admin}/UndeployModel")
    assert fleet.status("by-grpcurl") is None
    wait_for(lambda: httpx.post(
        f"{fleet.http}/v1/completions", json={"model": "by-grpcurl", "prompt": "x"}, timeout=30
    ).status_code == 404, 20, "undeployed model to be unknown")  # fmt: skip


def test_failed_load_is_reported_and_retried_with_backoff(fleet: Fleet, tmp_path: Any) -> None:
    import shutil

    models = tmp_path / "flaky-models"
    models.mkdir()
    broken = models / "weights.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 4096)  # a GGUF header llama.cpp cannot load
    proc, _ = fleet.cluster.start_node("flaky", models_dirs=[str(models)], inventory={"gpus": [], "ram_total_gib": 8})
    try:
        wait_for(lambda: "flaky" in fleet.nodes(), 30, "flaky")
        fleet.deploy("flaky-model", path=str(broken), device="cpu")

        def failed_with_reason() -> str:
            status = fleet.status("flaky-model")
            failed = [r for r in status.replicas if r.state == node_pb2.REPLICA_STATE_FAILED] if status else []
            return failed[0].error if failed else ""

        reason = wait_for(failed_with_reason, 60, "the load to fail")
        assert "llama.cpp could not load" in reason
        response = httpx.post(f"{fleet.http}/v1/completions", json={"model": "flaky-model", "prompt": "x"}, timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "MODEL_UNAVAILABLE"
        shutil.copyfile(MODEL_PATH, broken)  # the operator fixes the file; the next retry loads it
        assert fleet.wait_ready("flaky-model", timeout=90) == ["flaky"]
        assert fleet.client().completions.create(model="flaky-model", prompt="Hi", max_tokens=3).choices
    finally:
        fleet.undeploy("flaky-model")
        proc.stop()
