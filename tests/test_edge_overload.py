"""Overload is a 429, on every engine kind that runs here, end to end through a real edge.

A fleet of real processes (etcd, control plane, one node agent, edge) with two replicas that each hold
one request (`max_running_requests: 1, max_queued_requests: 0`): one on llama.cpp, one on an `openai`
engine attached to a real `llama_cpp.server`. 24 requests at once to each, over HTTP (half of them
streamed) and over gRPC. How many get in is the node's business (its admission); what is checked here is
what every other client hears: 429 with `Retry-After` and code NO_CAPACITY over HTTP, RESOURCE_EXHAUSTED
with the same reason in the ErrorInfo over gRPC, never a 503, never a hang, and the counts add up.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.default_model import default_model_path
from mesh.errors import FleetError
from tests.cluster import Cluster, Proc, free_port, smollm_entry, wait_for
from tests.test_openai_engines import llama_cpp_server_argv

pytestmark = [pytest.mark.model, pytest.mark.cluster]

CONCURRENT = 24
ONE_AT_A_TIME = {"max_running_requests": 1, "max_queued_requests": 0}
# Bounds, not expectations: a request that is let in generates 48 tokens (well under a second alone, a
# few seconds on a busy machine); one still open after this long has hung.
CLIENT_TIMEOUT = 120.0
BODY = {"prompt": "Write a long story.", "max_tokens": 48, "temperature": 0}


@dataclass
class Fleet:
    cluster: Cluster
    http: str
    grpc: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path_factory.mktemp("overload"))
    port = free_port()
    server = Proc("attached-server", llama_cpp_server_argv(str(port)), cluster.dir)
    try:
        # 60 s: loading the model on a busy 2-core machine.
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200, 60,
                 "llama_cpp.server", server)  # fmt: skip
        cluster.start_etcd()
        cluster.start_controlplane(3)
        models = [
            smollm_entry("busy-llamacpp", **ONE_AT_A_TIME),
            {"name": "busy-openai", "path": f"http://127.0.0.1:{port}/v1", "engine": "openai", "format": "gguf",
             "context_size": 2048, **ONE_AT_A_TIME},
        ]  # fmt: skip
        cluster.start_node("busy", models=models, models_dirs=[str(Path(default_model_path()).parent)])
        _, http, grpc_address = cluster.start_edge()
        for model in ("busy-llamacpp", "busy-openai"):
            cluster.wait_model_state(http, model)
        yield Fleet(cluster, http, grpc_address)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
        server.stop()


@dataclass
class Outcomes:
    ok: int = 0
    refused: list[str] = field(default_factory=list)  # one line per refusal, for the assertion messages
    hung: int = 0
    other: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + len(self.refused) + self.hung + len(self.other)


async def http_request(client: httpx.AsyncClient, model: str, stream: bool, outcomes: Outcomes) -> None:
    try:
        async with client.stream("POST", "/v1/completions", json={"model": model, "stream": stream, **BODY}) as reply:
            raw = await reply.aread()
    except httpx.TimeoutException:
        outcomes.hung += 1
        return
    if reply.status_code == 200:
        # A stream that was let in must also end well: its last event is [DONE] after a finish.
        if stream and not (raw.rstrip().endswith(b"data: [DONE]") and b'"finish_reason": "length"' in raw):
            outcomes.other.append(f"stream ended badly: {raw[-300:]!r}")
        else:
            outcomes.ok += 1
        return
    error = httpx.Response(reply.status_code, content=raw).json().get("error", {})
    retry_after = reply.headers.get("retry-after", "")
    line = f"{reply.status_code} {error.get('code')} {error.get('type')} retry-after={retry_after!r}"
    if (
        reply.status_code == 429
        and error.get("code") == "NO_CAPACITY"
        and error.get("type") == "rate_limit_error"
        and retry_after.isdigit()
        and int(retry_after) >= 1
    ):
        outcomes.refused.append(line)
    else:
        outcomes.other.append(f"{line}: {error.get('message')}")


async def grpc_request(stub: inference_pb2_grpc.InferenceServiceStub, model: str, outcomes: Outcomes) -> None:
    request = inference_pb2.GenerateRequest(
        model=model,
        prompt=str(BODY["prompt"]),
        sampling=inference_pb2.SamplingParams(max_tokens=int(BODY["max_tokens"]), temperature=0),
    )
    try:
        events = [event async for event in stub.Generate(request, timeout=CLIENT_TIMEOUT)]
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            outcomes.hung += 1
            return
        sent = FleetError.sent_by_peer(exc)
        line = f"{exc.code().name} {sent.code if sent else None} retry={sent.retry_after_seconds if sent else None}"
        if (
            exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and sent is not None
            and sent.code == "NO_CAPACITY"
            and (sent.retry_after_seconds or 0) >= 1
        ):
            outcomes.refused.append(line)
        else:
            outcomes.other.append(f"{line}: {exc.details()}")
        return
    if events and events[-1].HasField("result"):
        outcomes.ok += 1
    else:
        outcomes.other.append(f"stream without a result: {events[-1:]}")


async def burst_http(fleet: Fleet, model: str) -> Outcomes:
    outcomes = Outcomes()
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)
    async with httpx.AsyncClient(base_url=fleet.http, timeout=CLIENT_TIMEOUT, limits=limits) as client:
        await asyncio.gather(*(http_request(client, model, i % 2 == 0, outcomes) for i in range(CONCURRENT)))
    return outcomes


async def burst_grpc(fleet: Fleet, model: str) -> Outcomes:
    outcomes = Outcomes()
    async with grpc.aio.insecure_channel(fleet.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await asyncio.gather(*(grpc_request(stub, model, outcomes) for _ in range(CONCURRENT)))
    return outcomes


@pytest.mark.parametrize("model", ["busy-llamacpp", "busy-openai"])
@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_a_full_replica_answers_429_with_retry_after(fleet: Fleet, model: str, transport: str) -> None:
    outcomes = await (burst_http(fleet, model) if transport == "http" else burst_grpc(fleet, model))
    summary = f"{outcomes.ok} ok, refusals {Counter(outcomes.refused)}, {outcomes.hung} hung, other {outcomes.other}"
    assert outcomes.total == CONCURRENT, summary
    assert outcomes.hung == 0 and not outcomes.other, summary  # in particular, no 503
    assert outcomes.ok >= 1, summary
    # 24 at once against room for one: if none was refused, the limits were not applied and this test
    # showed nothing about refusals.
    assert outcomes.refused, summary
