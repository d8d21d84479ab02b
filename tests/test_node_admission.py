"""A node's own limits, with concurrent gRPC calls straight to it (nothing in front to serialize them),
on every engine kind that runs here: llama.cpp in the agent, an attached OpenAI-compatible server and a
launched one (`llama_cpp.server` with the real model). And a launched server's API key: used, never
shown in the node's log or in what it reports.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.default_model import default_model_path
from mesh.errors import ErrorCode, FleetError
from tests.cluster import Cluster, Proc, free_port, wait_for

pytestmark = [pytest.mark.model, pytest.mark.cluster]

MODEL_PATH = str(default_model_path())
NODE = "admit"
ENGINES = ["llamacpp", "attached", "launched"]
LIMITS = [(1, 0), (1, 2)]  # (max_running_requests, max_queued_requests)
SECRET = f"sk-{uuid.uuid4().hex}"
SECRET_MODEL = "keyed-launched"


def llama_cpp_server_argv(port: str) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", MODEL_PATH, "--port", port, "--n_threads", "2",
            "--n_ctx", "2048", "--interrupt_requests", "False"]  # fmt: skip


def model_name(engine: str, running: int, queued: int) -> str:
    return f"{engine}-{running}-{queued}"


def catalog_entry(engine: str, running: int, queued: int, attached_port: int) -> dict[str, object]:
    entry: dict[str, object] = {"name": model_name(engine, running, queued), "format": "gguf", "context_size": 1024,
                                "max_running_requests": running, "max_queued_requests": queued}  # fmt: skip
    if engine == "llamacpp":
        entry |= {"path": MODEL_PATH, "engine": "llamacpp"}
    elif engine == "attached":
        entry |= {"path": f"http://127.0.0.1:{attached_port}/v1", "engine": "openai"}
    else:
        entry |= {"path": MODEL_PATH, "engine": "openai", "command": llama_cpp_server_argv("{port}"),
                  "startup_timeout": 300}  # fmt: skip
    return entry


@dataclass
class Fleet:
    cluster: Cluster
    node: Proc
    node_address: str

    def node_record(self) -> node_pb2.Node:
        with grpc.insecure_channel(self.cluster.controlplane) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            return admin.GetNode(admin_pb2.GetNodeRequest(node_id=NODE), timeout=10).node

    def ready(self, model: str) -> bool:
        replicas = self.node_record().replicas
        return any(r.model.name == model and r.state == node_pb2.REPLICA_STATE_READY for r in replicas)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path_factory.mktemp("node-admission"))
    port = free_port()
    attached = Proc("attached-server", llama_cpp_server_argv(str(port)), cluster.dir)
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200, 120,
                 "llama_cpp.server", attached)  # fmt: skip
        cluster.start_etcd()
        cluster.start_controlplane(3)
        models = [catalog_entry(engine, r, q, port) for engine in ENGINES for r, q in LIMITS]
        # llama_cpp.server refuses every request without this key once it is started with --api_key.
        models.append({"name": SECRET_MODEL, "path": MODEL_PATH, "engine": "openai", "format": "gguf",
                       "command": llama_cpp_server_argv("{port}"), "startup_timeout": 300,
                       "engine_args": {"api_key": SECRET}})  # fmt: skip
        node, address = cluster.start_node(NODE, models=models, models_dirs=[str(Path(MODEL_PATH).parent)])
        fleet = Fleet(cluster, node, address)
        for entry in models:
            # 300 s: four servers and two in-process models load at once on 2 cores.
            wait_for(lambda name=entry["name"]: fleet.ready(str(name)), 300, f"{entry['name']} ready", node)
        yield fleet
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
        attached.stop()


CONCURRENT = 24
# Long enough (160 tokens, seconds on 2 cores) that all the calls reach the node while the first one runs.
LONG = inference_pb2.SamplingParams(max_tokens=160, temperature=0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("running", "queued"), LIMITS)
async def test_concurrent_requests_straight_to_the_node_get_in_only_up_to_the_limits(
    fleet: Fleet, engine: str, running: int, queued: int
) -> None:
    model = model_name(engine, running, queued)
    capacity = running + queued

    async def one(stub: inference_pb2_grpc.InferenceServiceStub, i: int) -> str | grpc.aio.AioRpcError:
        request = inference_pb2.GenerateRequest(model=model, prompt="Once upon a time, in a far away kingdom,",
                                                sampling=LONG, request_id=f"admission-{model}-{i}")  # fmt: skip
        try:
            async for _ in stub.Generate(request, timeout=600):
                pass
            return "served"
        except grpc.aio.AioRpcError as exc:
            return exc

    async with grpc.aio.insecure_channel(fleet.node_address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        # None hangs: the admitted ones run one after another (seconds each); 600 s is a generous bound.
        outcomes = await asyncio.wait_for(asyncio.gather(*(one(stub, i) for i in range(CONCURRENT))), 600)
    served = [o for o in outcomes if o == "served"]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(served) + len(refused) == CONCURRENT
    assert len(served) == capacity, f"{len(served)} admitted; the limit is {capacity}"
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        fleet_error = FleetError.from_rpc_error(error)
        assert fleet_error.code == ErrorCode.NO_CAPACITY
        assert fleet_error.retry_after_seconds == 1
    # Each refusal is in the node's log (its one line per request, node_agent.request_log) with its
    # request id and model.
    log = fleet.node.log_path.read_text(errors="replace")
    logged = [line for line in log.splitlines() if f"Generate {model} on " in line and ": NO_CAPACITY " in line]
    assert len([line for line in logged if f"request_id=admission-{model}-" in line]) >= len(refused), logged


def test_the_nodes_log_survives_two_llama_models_loading_at_once(fleet: Fleet) -> None:
    # llama-cpp-python points fd 2 at /dev/null while it loads; two loads at once used to leave it there.
    log = fleet.node.log_path.read_text(errors="replace")
    for running, queued in LIMITS:
        assert f"model {model_name('llamacpp', running, queued)} ready on cpu" in log
    assert "registered with the control plane" in log


def test_a_launched_servers_api_key_is_used_and_never_shown(fleet: Fleet) -> None:
    # The key was used: the server requires it for every request, and it serves.
    sampling = inference_pb2.SamplingParams(max_tokens=4, temperature=0)
    request = inference_pb2.GenerateRequest(model=SECRET_MODEL, prompt="The capital of France is", sampling=sampling)
    with grpc.insecure_channel(fleet.node_address) as channel:
        responses = list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=120))
    assert responses[-1].HasField("result") and responses[-1].result.usage.completion_tokens > 0
    # Not in the node's log (its launch command line is logged)...
    log = fleet.node.log_path.read_text(errors="replace")
    assert "llama_cpp.server" in log and "--api_key [redacted]" in log
    assert SECRET not in log
    # ...nor in what the node reports: its record as the control plane shows it, and as it is stored.
    replica = next(r for r in fleet.node_record().replicas if r.model.name == SECRET_MODEL)
    assert replica.model.engine_args["api_key"] == "[redacted]"
    etcdctl = Path(sys.executable).parent / "etcdctl"
    stored = subprocess.run([str(etcdctl), f"--endpoints={fleet.cluster.etcd_url}", "get", "--prefix", "/"],
                            capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    assert SECRET_MODEL in stored and SECRET not in stored


async def test_a_prompt_that_can_never_fit_is_context_length_exceeded_even_when_the_replica_is_full(
    fleet: Fleet,
) -> None:
    """A full replica refuses with a retryable NO_CAPACITY; a request that could never fit its context
    (1,024 tokens here) must hear that instead, busy or not: an SDK retries a 429 by itself, to no end."""
    model = model_name("llamacpp", 1, 0)  # one slot, no queue
    too_long = "hello world " * 1200  # ~2,400 tokens
    chat = inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(role="user", content=too_long)])
    cases = {
        "prompt": inference_pb2.GenerateRequest(model=model, prompt=too_long, sampling=LONG),
        "messages": inference_pb2.GenerateRequest(model=model, chat=chat, sampling=LONG),
        "max_tokens": inference_pb2.GenerateRequest(
            model=model, prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=5000)
        ),
    }

    def rejected() -> float:
        """The node's requests_rejected_total for the model (refused because the replica was full)."""
        page = httpx.get(fleet.cluster.metrics[NODE], timeout=10).text
        pattern = rf'^fleetlm_node_requests_rejected_total\{{model="{re.escape(model)}"\}} (\S+)$'
        found = re.search(pattern, page, re.M)
        return float(found.group(1)) if found else 0.0

    rejected_before = rejected()
    async with grpc.aio.insecure_channel(fleet.node_address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        busy = stub.Generate(inference_pb2.GenerateRequest(model=model, prompt="Once upon a time", sampling=LONG))
        assert (await busy.read()).HasField("delta")  # the one slot is taken
        try:
            for param, request in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in stub.Generate(request, timeout=60):
                        pass
                error = FleetError.from_rpc_error(caught.value)
                assert error.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED and error.param == param, error
                assert "maximum context length is 1024" in error.message or "of 1024 tokens" in error.message
            # A request that fits is refused as the replica is full: retryable.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Generate(inference_pb2.GenerateRequest(model=model, prompt="Hi"), timeout=60):
                    pass
            assert FleetError.from_rpc_error(caught.value).code == ErrorCode.NO_CAPACITY
        finally:
            busy.cancel()
    # Only that one was refused for a full replica: the three that could never fit were not (they were
    # counted as such too, and the node's requests_rejected_total was 4).
    assert rejected() - rejected_before == 1
