"""OpenAI-compatible servers as engines, end to end through the edge with the real model.

SGLang cannot run on these machines (no GPU), so the HTTP streaming path its engine uses is tested
against a real OpenAI-compatible server, `llama_cpp.server`, serving the real model: once attached by
URL (engine "openai" with a path that is a URL) and once started and supervised by the node agent
(engine "openai" with a `command`, the same code that runs SGLang). Then the supervision seen from the
fleet: a crashed engine is reported and restarted with backoff, a server that stops answering fails its
replica until it answers again, a hung start-up fails with the reason, and an agent that is killed
leaves no engine process behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import psutil
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.default_model import default_model_path
from tests.cluster import Cluster, Proc, command_line, free_port, wait_for

pytestmark = [pytest.mark.model, pytest.mark.cluster]

MODEL_PATH = str(default_model_path())


def llama_cpp_server_argv(port: str) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", MODEL_PATH, "--port", port, "--n_threads", "2",
            "--n_ctx", "2048", "--interrupt_requests", "False", "--model_alias", "smollm2"]  # fmt: skip


@contextlib.contextmanager
def fleet_with_llama_cpp_server(directory: Path, name: str, *others: dict[str, Any]) -> Iterator[str]:
    """A llama_cpp.server started here, then a fleet (etcd, a control plane, one node, an edge) whose node
    serves it as the `openai` engine of model `name`, beside the `openai` engines `others`; the edge's HTTP
    base once every model is ready. Everything stops when the block ends."""
    cluster = Cluster(directory)
    port = free_port()
    server = Proc("attached-server", llama_cpp_server_argv(str(port)), cluster.dir)
    try:
        # 120 s: a model load on a busy 2-core machine, with other tests running.
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200, 120,
                 "llama_cpp.server", server)  # fmt: skip
        cluster.start_etcd()
        cluster.start_controlplane(3)
        attached = {"name": name, "path": f"http://127.0.0.1:{port}/v1", "engine": "openai", "format": "gguf",
                    "context_size": 2048}  # fmt: skip
        cluster.start_node("srv", models=[*others, attached])
        _, http, _ = cluster.start_edge()
        for model in (*(m["name"] for m in others), name):
            cluster.wait_model_state(http, model, timeout=120)
        yield http
    finally:
        cluster.close()
        server.stop()


@dataclass
class Fleet:
    cluster: Cluster
    http: str
    node: Proc
    attached_port: int
    attached: Proc

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0, timeout=60)

    def replica(self, model: str) -> node_pb2.Replica:
        with grpc.insecure_channel(self.cluster.controlplane) as channel:
            node = (
                admin_pb2_grpc.AdminServiceStub(channel)
                .GetNode(admin_pb2.GetNodeRequest(node_id="srv"), timeout=5)
                .node
            )
        return next(r for r in node.replicas if r.model.name == model)

    # 120 s: a model load or a server start on a busy 2-core machine, with other tests running.
    def wait_state(self, model: str, state: int, timeout: float = 120) -> node_pb2.Replica:
        return wait_for(
            lambda: (r := self.replica(model)).state == state and r,
            timeout,
            f"{model} {node_pb2.ReplicaState.Name(state)}",
        )

    def start_attached(self) -> None:
        self.attached = Proc("attached-server", llama_cpp_server_argv(str(self.attached_port)), self.cluster.dir)
        url = f"http://127.0.0.1:{self.attached_port}/v1/models"
        wait_for(lambda: httpx.get(url, timeout=1).status_code == 200, 120, "llama_cpp.server", self.attached)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path_factory.mktemp("openai-engines"))
    port = free_port()
    attached = Proc("attached-server", llama_cpp_server_argv(str(port)), cluster.dir)
    fleet: Fleet | None = None
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200, 120,
                 "llama_cpp.server", attached)  # fmt: skip
        cluster.start_etcd()
        cluster.start_controlplane(3)
        models = [
            {"name": "smol-attached", "path": f"http://127.0.0.1:{port}/v1", "engine": "openai", "format": "gguf",
             "context_size": 2048},
            {"name": "smol-launched", "path": MODEL_PATH, "engine": "openai", "format": "gguf", "context_size": 2048,
             "command": llama_cpp_server_argv("{port}"), "startup_timeout": 60},
            {"name": "smol-embed", "path": MODEL_PATH, "engine": "openai", "format": "gguf", "context_size": 2048,
             "command": [*llama_cpp_server_argv("{port}"), "--embedding", "True"], "startup_timeout": 60},
            {"name": "hung", "path": MODEL_PATH, "engine": "openai", "format": "gguf", "startup_timeout": 1,
             "command": ["sh", "-c", "echo 'loading shard 1 of 4'; sleep 300"]},
            {"name": "qwen-sglang", "path": "/models/qwen2.5-7b", "engine": "sglang", "format": "hf",
             "device": "gpu"},
        ]  # fmt: skip
        node, _ = cluster.start_node(
            "srv", models=models, models_dirs=[str(Path(MODEL_PATH).parent)], extra=("--engine-health-seconds", "0.3")
        )
        _, http, _ = cluster.start_edge()
        fleet = Fleet(cluster, http, node, port, attached)
        fleet.wait_state("smol-attached", node_pb2.REPLICA_STATE_READY)
        fleet.wait_state("smol-launched", node_pb2.REPLICA_STATE_READY)
        fleet.wait_state("smol-embed", node_pb2.REPLICA_STATE_READY)
        yield fleet
    finally:
        cluster.close()
        # A test restarts the attached server: stop the one running now.
        (fleet.attached if fleet is not None else attached).stop()


def chat(fleet: Fleet, model: str, max_tokens: int = 24) -> tuple[str, str | None]:
    stream = fleet.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name three colors of the rainbow."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def engine_processes(fleet: Fleet) -> list[psutil.Process]:
    children = psutil.Process(fleet.node.popen.pid).children(recursive=True)
    return [p for p in children if "llama_cpp.server" in " ".join(command_line(p))]


@pytest.mark.parametrize("model", ["smol-attached", "smol-launched"])
def test_openai_server_engines_serve_through_the_edge(fleet: Fleet, model: str) -> None:
    text, finish = chat(fleet, model)
    assert len(text.split()) >= 3 and finish in ("stop", "length")
    completion = fleet.client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                                                 temperature=0)  # fmt: skip
    assert completion.model == model
    assert "Paris" in completion.choices[0].text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    # The same greedy request through the server directly gives the same text.
    direct = httpx.post(f"http://127.0.0.1:{fleet.attached_port}/v1/completions", timeout=60,
                        json={"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0,
                              "repeat_penalty": 1.0}).json()  # fmt: skip
    assert completion.choices[0].text == direct["choices"][0]["text"]


def test_logprobs_pass_through_from_the_engines_server(fleet: Fleet) -> None:
    prompt = "The capital of France is"
    reply = fleet.client.completions.create(model="smol-attached", prompt=prompt, max_tokens=5, temperature=0,
                                            logprobs=2)  # fmt: skip
    scores = reply.choices[0].logprobs
    assert scores is not None and scores.tokens and scores.token_logprobs and scores.top_logprobs
    assert "".join(scores.tokens) == reply.choices[0].text
    direct = httpx.post(f"http://127.0.0.1:{fleet.attached_port}/v1/completions", timeout=60,
                        json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "repeat_penalty": 1.0,
                              "logprobs": 2}).json()["choices"][0]["logprobs"]  # fmt: skip
    assert scores.tokens == direct["tokens"]
    assert [round(x, 4) for x in scores.token_logprobs] == [round(x, 4) for x in direct["token_logprobs"]]
    assert [sorted(t) for t in scores.top_logprobs] == [sorted(t) for t in direct["top_logprobs"]]
    chat = fleet.client.chat.completions.create(
        model="smol-attached",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content if chat.choices[0].logprobs else None
    assert content and "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_logit_bias_passes_through_to_the_engines_server(fleet: Fleet) -> None:
    prompt = "The capital of France is"
    direct = f"http://127.0.0.1:{fleet.attached_port}"
    (banana,) = httpx.post(f"{direct}/extras/tokenize", json={"input": " banana"}, timeout=30).json()["tokens"]
    biased = fleet.client.completions.create(model="smol-attached", prompt=prompt, max_tokens=3, temperature=0,
                                             logit_bias={str(banana): 100})  # fmt: skip
    itself = httpx.post(f"{direct}/v1/completions", timeout=60,
                        json={"prompt": prompt, "max_tokens": 3, "temperature": 0, "repeat_penalty": 1.0,
                              "logit_bias": {str(banana): 100}}).json()["choices"][0]["text"]  # fmt: skip
    assert biased.choices[0].text == itself == " banana banana banana"


def test_echo_on_an_openai_compatible_engine_is_a_400_naming_it(fleet: Fleet) -> None:
    # Each server carries an echoed prompt in its own way (llama_cpp.server, vLLM, SGLang): refused, not
    # passed on into the choice's text.
    for max_tokens in (0, 4):
        with pytest.raises(openai.BadRequestError) as caught:
            fleet.client.completions.create(model="smol-attached", prompt="Hello", echo=True, max_tokens=max_tokens)
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == "echo" and "echo" in body["message"], body


def test_a_server_without_pooled_embeddings_is_a_clear_400(fleet: Fleet) -> None:
    # llama_cpp.server answers /v1/embeddings of a generative model with one vector per token: no
    # sentence embedding to give, and fleetlm says so instead of inventing one.
    with pytest.raises(openai.BadRequestError) as caught:
        fleet.client.embeddings.create(model="smol-embed", input=["hello world", "the fleet"])
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "INVALID_REQUEST" and body["param"] == "model"
    assert "does not give one embedding per input" in body["message"]


def test_embeddings_from_a_server_that_does_not_serve_them_are_a_400_not_a_retryable_503(fleet: Fleet) -> None:
    # llama_cpp.server started without --embedding answers 500 "Llama model must be created with
    # embedding=True ...": asking again cannot help, so it is the client's 400 (it was a 503 with Retry-After,
    # retried on the replica and by the SDK).
    with pytest.raises(openai.BadRequestError) as caught:
        fleet.client.embeddings.create(model="smol-attached", input="hello")
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "INVALID_REQUEST" and body["param"] == "input", body
    assert "does not serve this request" in body["message"] and "embedding=True" in body["message"], body
    assert fleet.wait_state("smol-attached", node_pb2.REPLICA_STATE_READY)  # the replica is fine


def test_dropping_a_stream_closes_the_upstream_request(fleet: Fleet) -> None:
    stream = fleet.client.completions.create(model="smol-launched", prompt="Write a very long story.",
                                             max_tokens=1500, temperature=0, stream=True)  # fmt: skip
    for n, _ in enumerate(stream):
        if n == 5:
            break
    stream.close()
    # Unless the server learnt of the drop, it would spend ~20 s on the 1,495 tokens left before this.
    started = time.monotonic()
    text, _ = chat(fleet, "smol-launched", max_tokens=8)
    assert text and time.monotonic() - started < 8


def test_a_crashed_engine_is_reported_then_restarted_with_backoff(fleet: Fleet) -> None:
    # smol-launched's server: the only engine process without --embedding at this point.
    server = next(p for p in engine_processes(fleet) if "--embedding" not in command_line(p))
    killed_at = time.monotonic()
    server.send_signal(signal.SIGKILL)
    failed = fleet.wait_state("smol-launched", node_pb2.REPLICA_STATE_FAILED, timeout=30)
    assert "was killed by SIGKILL; last output:" in failed.error
    with pytest.raises(openai.APIStatusError) as caught:
        fleet.client.completions.create(model="smol-launched", prompt="Hi", max_tokens=2)
    # 503 with the reason while it is down; on a busy machine the request may come after the first
    # restart (1 s) has begun, and then the replica is "loading" again.
    body = str(caught.value.body)
    assert caught.value.status_code == 503 and ("SIGKILL" in body or "is loading" in body), body
    fleet.wait_state("smol-launched", node_pb2.REPLICA_STATE_READY)
    assert time.monotonic() - killed_at >= 1.0  # the first restart waits the first backoff step
    fleet.cluster.wait_model_state(fleet.http, "smol-launched", "ready", timeout=30)  # the edge's table
    text, _ = chat(fleet, "smol-launched", max_tokens=8)
    assert text


def failed_loads(fleet: Fleet, model: str) -> int:
    return fleet.node.log_path.read_text(errors="replace").count(f"model {model} failed to load")


def test_an_attached_server_that_stops_answering_fails_its_replica_until_it_answers(fleet: Fleet) -> None:
    before = failed_loads(fleet, "smol-attached")
    fleet.attached.stop()
    # Three health checks 0.3 s apart, on a busy machine: 30 s is generous.
    failed = fleet.wait_state("smol-attached", node_pb2.REPLICA_STATE_FAILED, timeout=30)
    assert "unreachable" in failed.error and "health checks in a row failed" in failed.error
    # The server stays down for several tries: the agent keeps trying, however long it takes (60 s is a
    # generous bound for four tries), and an attached server at least every health interval (here 0.3 s,
    # so every 1 s, the first backoff step), not with a backoff that grows to 60 s: a try is one request.
    wait_for(lambda: failed_loads(fleet, "smol-attached") >= before + 4, 60, "four failed tries", fleet.node)
    waits = re.findall(r"starting smol-attached again in (\d+)s", fleet.node.log_path.read_text(errors="replace"))
    assert len(waits) >= 4 and set(waits) == {"1"}, waits
    fleet.start_attached()
    # Served again at the next try once the server answers; 120 s is generous on a busy machine.
    fleet.wait_state("smol-attached", node_pb2.REPLICA_STATE_READY, timeout=120)
    # The edge routes from the table the control plane publishes, a moment behind the node's report.
    fleet.cluster.wait_model_state(fleet.http, "smol-attached", "ready", timeout=30)
    text, _ = chat(fleet, "smol-attached", max_tokens=8)
    assert text


def test_a_hung_start_up_fails_the_replica_with_the_engines_output(fleet: Fleet) -> None:
    # The replica is started again with backoff (8 s, 16 s, ...) and its error is the last attempt's: the
    # test waits for an attempt that failed with the hang's reason, since every attempt of this engine hangs.
    # (A fresh CI machine once read an attempt whose child died at start with SIGSEGV: children forked by
    # uvloop beside busy gRPC threads, fixed in the supervisor and tested in tests/test_supervision.py.)
    hung = "was not ready within 1s; last output: loading shard 1 of 4 (more in the node's log)"
    seen: list[str] = []

    def failed_with_its_output() -> bool:
        replica = fleet.replica("hung")
        if replica.state == node_pb2.REPLICA_STATE_FAILED and replica.error not in seen:
            seen.append(replica.error)
        return replica.state == node_pb2.REPLICA_STATE_FAILED and hung in replica.error

    try:
        wait_for(failed_with_its_output, 60, "the hung replica to fail with its output")
    except TimeoutError:
        pytest.fail(f"the hung replica never failed with {hung!r}; its errors: {seen}")


def test_sglang_on_a_node_without_an_nvidia_gpu_is_refused_with_the_reason(fleet: Fleet) -> None:
    failed = fleet.wait_state("qwen-sglang", node_pb2.REPLICA_STATE_FAILED, timeout=30)
    assert "runs on SGLang, which needs an NVIDIA GPU; this node has none" in failed.error
    with pytest.raises(openai.APIStatusError) as caught:
        fleet.client.completions.create(model="qwen-sglang", prompt="Hi", max_tokens=2)
    assert caught.value.status_code == 503 and "NVIDIA GPU" in str(caught.value.body)


def test_a_deployment_with_a_command_is_placed_started_and_stopped_when_undeployed(fleet: Fleet) -> None:
    with grpc.insecure_channel(fleet.cluster.controlplane) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        spec = node_pb2.ModelSpec(name="smol-deployed", path=MODEL_PATH, format="gguf", engine="openai",
                                  context_size=2048, command=llama_cpp_server_argv("{port}"))  # fmt: skip
        deployment = node_pb2.Deployment(spec=spec, min_replicas=1, max_replicas=1)
        admin.DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), timeout=30)
        fleet.wait_state("smol-deployed", node_pb2.REPLICA_STATE_READY)
        before = {p.pid for p in engine_processes(fleet)}
        text, _ = chat(fleet, "smol-deployed", max_tokens=8)
        assert text
        admin.UndeployModel(admin_pb2.UndeployModelRequest(name="smol-deployed"), timeout=30)
    wait_for(lambda: len({p.pid for p in engine_processes(fleet)}) == len(before) - 1, 30, "the engine to stop")


def test_an_agent_killed_leaves_no_engine_process(fleet: Fleet) -> None:
    # Last in this module: it kills the node agent.
    engines = engine_processes(fleet)
    assert len(engines) >= 2
    os.kill(fleet.node.popen.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(engines, timeout=30)  # each gets SIGTERM from the kernel; 30 s is generous
    assert not alive, [command_line(p) for p in alive]
