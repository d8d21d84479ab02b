"""Embeddings obey the replica's limits and never hang.

The batcher's own logic (closing, its cache) is driven by a plain async function that computes vectors:
what is tested is who gets an answer and when. The load and the drain before an unload run on the real
llama.cpp engine with the real model, behind the node's real gRPC service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from fleetlm.controlplane.v1 import node_pb2
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.default_model import default_model_path
from mesh.errors import ErrorCode, FleetError
from mesh.grpc_server import GrpcServer
from node_agent import host as host_module
from node_agent.engines.base import EngineUnavailable
from node_agent.engines.embedding_batch import EmbeddingBatcher
from node_agent.host import ModelHost
from node_agent.inference_service import NodeInference
from node_agent.server import INFERENCE_SERVICE
from node_agent.settings import NodeSettings


def vector_of(text: str) -> list[float]:
    return [float(len(text)), float(sum(map(ord, text)) % 997)]


async def test_closing_the_batcher_fails_its_waiting_callers_at_once() -> None:
    in_call = asyncio.Event()

    async def never_answers(texts: list[str]) -> list[list[float]]:
        in_call.set()
        await asyncio.Event().wait()
        return [vector_of(t) for t in texts]

    # One caller whose inputs are in an embedding call, one whose inputs are still being gathered (a
    # window of a minute): both must learn of the close now, not at their deadline.
    calling = EmbeddingBatcher(never_answers, window_seconds=0.001)
    gathering = EmbeddingBatcher(never_answers, window_seconds=60)
    first = asyncio.ensure_future(calling.embed(["a", "b"]))
    await asyncio.wait_for(in_call.wait(), 30)
    second = asyncio.ensure_future(gathering.embed(["c"]))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    started = time.monotonic()
    await calling.close()
    await gathering.close()
    for caller in (first, second):
        with pytest.raises(EngineUnavailable, match="unloaded"):
            await asyncio.wait_for(caller, 10)  # 10 s: far less than the 60 s window or a never-ending call
    assert time.monotonic() - started < 10
    with pytest.raises(EngineUnavailable):  # and a closed batcher refuses at once
        await asyncio.wait_for(calling.embed(["d"]), 10)


async def test_a_cached_input_evicted_while_its_caller_waits_is_still_answered() -> None:
    slow_in_call, release = asyncio.Event(), asyncio.Event()

    async def embed(texts: list[str]) -> list[list[float]]:
        if "slow" in texts:
            slow_in_call.set()
            await release.wait()
        return [vector_of(t) for t in texts]

    batcher = EmbeddingBatcher(embed, window_seconds=0.001, cache_size=2)
    assert await batcher.embed(["cached"]) == [vector_of("cached")]
    # "cached" is answered from the cache and skipped; "slow" waits in an embedding call...
    waiter = asyncio.ensure_future(batcher.embed(["cached", "slow"]))
    await asyncio.wait_for(slow_in_call.wait(), 30)
    # ...while others' inputs fill the two-entry cache and evict "cached".
    assert await batcher.embed(["x1", "x2", "x3"]) == [vector_of(t) for t in ("x1", "x2", "x3")]
    release.set()
    assert await asyncio.wait_for(waiter, 30) == [vector_of("cached"), vector_of("slow")]
    calls = batcher.batches
    await batcher.embed(["cached"])
    assert batcher.batches == calls + 1, "the test meant 'cached' to have been evicted"


# --- the real engine ----------------------------------------------------------------------------------

MODEL = "smol-embed-limits"
# Eight inputs of ~360 tokens: several seconds of embedding on 2 cores (measured: ~60 s for 64 of them),
# long enough to look at the replica while they run.
LONG_INPUTS = [f"Sentence {i}: " + "the quick brown fox jumps over the lazy dog " * 40 for i in range(8)]


class NodeUnderTest:
    def __init__(self, host: ModelHost, server: GrpcServer, address: str) -> None:
        self.host, self.server, self.address = host, server, address


@pytest_asyncio.fixture
async def node() -> AsyncIterator[NodeUnderTest]:
    host = ModelHost([], NodeSettings(node_id="embed-test", threads=2))
    server = GrpcServer([INFERENCE_SERVICE])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(NodeInference(host, "embed-test"), server.server)
    port = await server.start("127.0.0.1:0")
    try:
        yield NodeUnderTest(host, server, f"127.0.0.1:{port}")
    finally:
        await server.stop(0)
        await host.close()


async def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.model
async def test_an_embedding_counts_toward_the_load_the_limits_and_the_unload_drain(
    node: NodeUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The unload starts when the assignment goes (no grace to wait for a re-assignment: not what this tests).
    monkeypatch.setattr(host_module, "UNASSIGNED_GRACE_SECONDS", 0)
    spec = node_pb2.ModelSpec(name=MODEL, path=str(default_model_path()), format="gguf", engine="llamacpp",
                              context_size=1024, max_running_requests=1, max_queued_requests=0)  # fmt: skip
    assignment = node_pb2.Assignment(node_id="embed-test", model=spec, device="cpu")
    host = node.host
    host.apply_assignments([assignment])
    hosted = host.models[MODEL]
    # 120 s: loading the model on a busy 2-core machine, with other tests running.
    await wait_until(lambda: hosted.state == node_pb2.REPLICA_STATE_READY, 120, "the replica to be ready")

    async with grpc.aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        before = hosted.last_request_at
        long = asyncio.ensure_future(
            stub.Embed(inference_pb2.EmbedRequest(model=MODEL, inputs=LONG_INPUTS), timeout=600)
        )
        # Admission stamps the replica's last request.
        await wait_until(lambda: hosted.last_request_at > before or long.done(), 60, "the embedding to be admitted")
        assert not long.done(), "the embedding finished before the test could look at it"

        # It is the replica's load, as the node reports it to the control plane...
        (replica,) = host.replicas()
        assert replica.running_requests + replica.queued_requests == 1
        # ...and it takes the replica's only place: another request is refused.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(inference_pb2.EmbedRequest(model=MODEL, inputs=["hello"]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert FleetError.from_rpc_error(caught.value).code == ErrorCode.NO_CAPACITY
        assert not long.done()

        # Unassigned while it runs: the replica refuses new work at once, but the embedding finishes
        # before the engine is closed.
        host.apply_assignments([])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Embed(inference_pb2.EmbedRequest(model=MODEL, inputs=["hello"]), timeout=60)
        assert "unloading" in (refused.value.details() or "")
        reply = await asyncio.wait_for(long, 600)
        assert len(reply.embeddings) == len(LONG_INPUTS) and all(len(e.values) > 0 for e in reply.embeddings)
    await wait_until(lambda: MODEL not in host.models, 60, "the replica to be unloaded")


@pytest.mark.model
async def test_an_input_with_no_tokens_is_the_requests_error_and_the_engine_goes_on() -> None:
    # Found by fuzzing the edge: "\x04" tokenizes to nothing on SmolLM2, and an empty batch made llama_decode
    # fail and corrupt the heap (the node crashed on a later request).
    from node_agent.engines.base import InvalidInput
    from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

    engine = LlamaCppEngine(LlamaCppConfig(str(default_model_path()), context_size=512, threads=2, slots=1))
    await engine.start()
    try:
        assert await engine.tokenize("\x04") == []
        for _ in range(3):
            with pytest.raises(InvalidInput) as caught:
                await engine.embed(["a fine sentence", "\x04"])
            assert caught.value.param == "input" and "input[1]" in str(caught.value)
        result = await engine.embed(["a fine sentence", "another one"])
        assert len(result.vectors) == 2 and all(len(v) > 0 for v in result.vectors)
    finally:
        await engine.close()


async def test_an_input_longer_than_a_batch_is_embedded_whole_and_counted_as_embedded() -> None:
    # Found by review: the embedding context's batch was the engine's batch size (512), and llama-cpp-python's
    # embed cut every input to it, so an input of 513 to context-size tokens was embedded from its first 512
    # only (two inputs that differ after them got the same vector), while its usage counted every token.
    from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

    engine = LlamaCppEngine(
        LlamaCppConfig(str(default_model_path()), context_size=2048, batch_size=512, threads=2, slots=1)
    )
    await engine.start()
    try:
        long_text = " ".join(f"item {i} is a small grey stone." for i in range(150))
        tail = " The final line is about a bright red kite over the sea."
        result = await engine.embed([long_text, long_text + tail])
        assert 1000 < result.prompt_tokens // 2 < 2048
        a, b = result.vectors
        # The tail moves a mean over 1,200 tokens only a little, but it moves it (it was bit-identical).
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-4
        # Special tokens' text is embedded as text; the usage counts the tokens embedded, not fewer.
        special = "<|im_start|>user hello<|im_end|>"
        counted = (await engine.embed([special])).prompt_tokens
        assert counted == len(engine._llm.tokenize(special.encode(), special=False)) > 4
    finally:
        await engine.close()
