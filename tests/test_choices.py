"""`n` > 1 through the edge, with the official openai client and over gRPC, answered by SmolLM2 on the llama.cpp
engine: at temperature 0 the n choices are the n = 1 answer, with a seed they differ and come back the same;
`choices[i].index` streamed and not; usage counts the prompt once; an n the replica cannot run is a 400 naming
`n`. Then OpenAI-compatible engines: `n` is passed through and the server's choices mapped back (the server
being another fleetlm edge, which takes `n`), and a server that ignores `n` (llama_cpp.server) is a 400 naming
it, not one choice in place of four."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from google.protobuf import duration_pb2  # noqa: F401 - registers well-known types for ErrorInfo

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import FleetError
from tests.cluster import wait_for
from tests.conftest import Mesh
from tests.test_openai_engines import fleet_with_llama_cpp_server

pytestmark = [pytest.mark.model, pytest.mark.cluster]

ASK = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)


def streamed(chunks: Any) -> tuple[dict[int, str], dict[int, str], Any, list[int]]:
    """(text by choice index, finish reason by index, usage, the indices of the role chunks)."""
    texts: dict[int, str] = collections.defaultdict(str)
    finishes: dict[int, str] = {}
    roles: list[int] = []
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = getattr(choice, "delta", None)
            if delta is not None and delta.role:
                roles.append(choice.index)
            texts[choice.index] += (delta.content if delta is not None else choice.text) or ""
            if choice.finish_reason:
                assert choice.index not in finishes, f"choice {choice.index} finished twice"
                finishes[choice.index] = choice.finish_reason
    return dict(texts), finishes, usage, roles


def test_greedy_choices_equal_the_single_answer_streamed_and_not(client: openai.OpenAI, mesh: Mesh) -> None:
    one = client.chat.completions.create(model=mesh.model, messages=ASK, max_tokens=40, temperature=0)
    four = client.chat.completions.create(model=mesh.model, messages=ASK, max_tokens=40, temperature=0, n=4)
    assert [c.index for c in four.choices] == [0, 1, 2, 3]
    assert [c.message.content for c in four.choices] == [one.choices[0].message.content] * 4
    assert [c.finish_reason for c in four.choices] == [one.choices[0].finish_reason] * 4
    assert one.usage is not None and four.usage is not None
    assert four.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert four.usage.completion_tokens == 4 * one.usage.completion_tokens
    stream = client.chat.completions.create(
        model=mesh.model,
        messages=ASK,
        max_tokens=40,
        temperature=0,
        n=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usage, roles = streamed(stream)
    assert sorted(roles) == [0, 1, 2, 3]  # each choice starts with its role
    assert texts == {i: one.choices[0].message.content for i in range(4)}
    assert finishes == {i: one.choices[0].finish_reason for i in range(4)}
    assert usage is not None and usage.prompt_tokens == one.usage.prompt_tokens
    assert usage.completion_tokens == four.usage.completion_tokens


def test_seeded_choices_differ_and_come_back_the_same(client: openai.OpenAI, mesh: Mesh) -> None:
    def ask(stream: bool) -> list[str]:
        reply = client.chat.completions.create(
            model=mesh.model, messages=ASK, max_tokens=32, temperature=1.0, seed=2024, n=4, stream=stream
        )
        if stream:
            texts = streamed(reply)[0]
            return [texts[i] for i in range(4)]
        return [c.message.content or "" for c in reply.choices]  # type: ignore[union-attr]

    first = ask(False)
    assert len(set(first)) == 4, first
    assert ask(False) == first
    assert ask(True) == first  # streamed: the same four, told apart by their index


def test_completions_take_n(client: openai.OpenAI, mesh: Mesh) -> None:
    prompt = "The three primary colors are"
    one = client.completions.create(model=mesh.model, prompt=prompt, max_tokens=16, temperature=0)
    two = client.completions.create(model=mesh.model, prompt=prompt, max_tokens=16, temperature=0, n=2)
    assert [(c.index, c.text) for c in two.choices] == [(0, one.choices[0].text), (1, one.choices[0].text)]
    texts, finishes, _, _ = streamed(
        client.completions.create(model=mesh.model, prompt=prompt, max_tokens=16, temperature=0, n=2, stream=True)
    )
    assert texts == {0: one.choices[0].text, 1: one.choices[0].text} and set(finishes) == {0, 1}


def test_choices_each_have_logprobs(client: openai.OpenAI, mesh: Mesh) -> None:
    reply = client.chat.completions.create(
        model=mesh.model, messages=ASK, max_tokens=16, temperature=1.0, seed=5, n=3, logprobs=True, top_logprobs=1
    )
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert b"".join(bytes(t.bytes or []) for t in choice.logprobs.content).decode() == choice.message.content


def test_grpc_deltas_carry_their_choice_and_each_choice_ends(mesh: Mesh) -> None:
    request = inference_pb2.GenerateRequest(
        model=mesh.model,
        chat=inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(**m) for m in ASK]),
        sampling=inference_pb2.SamplingParams(max_tokens=24, temperature=0),
    )
    with grpc.insecure_channel(mesh.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        single = list(stub.Generate(request, timeout=120))
        request.sampling.n = 4
        events = list(stub.Generate(request, timeout=120))
    assert not any(e.HasField("choice_end") for e in single)  # n = 1 is as it always was
    answer = "".join(e.delta.text for e in single if e.HasField("delta"))
    texts: dict[int, str] = collections.defaultdict(str)
    ends: dict[int, int] = {}
    for event in events[:-1]:
        if event.HasField("delta"):
            assert event.delta.index not in ends, "text after its choice ended"
            texts[event.delta.index] += event.delta.text
        else:
            ends[event.choice_end.index] = event.choice_end.finish_reason
    assert texts == {i: answer for i in range(4)}
    assert ends == {i: single[-1].result.finish_reason for i in range(4)}
    result = events[-1].result
    assert result.usage.prompt_tokens == single[-1].result.usage.prompt_tokens
    assert result.usage.completion_tokens == 4 * single[-1].result.usage.completion_tokens


def test_grpc_seeded_choices_differ_and_come_back_the_same(mesh: Mesh) -> None:
    request = inference_pb2.GenerateRequest(
        model=mesh.model,
        chat=inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(**m) for m in ASK]),
        sampling=inference_pb2.SamplingParams(max_tokens=24, temperature=1.0, seed=77, n=4),
    )

    def choices() -> list[str]:
        texts: dict[int, str] = collections.defaultdict(str)
        with grpc.insecure_channel(mesh.grpc) as channel:
            for event in inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=120):
                if event.HasField("delta"):
                    texts[event.delta.index] += event.delta.text
        return [texts[i] for i in range(4)]

    first = choices()
    assert len(set(first)) == 4, first
    assert choices() == first


def test_a_negative_seed_is_a_fixed_seed_as_openai_takes_it(client: openai.OpenAI, mesh: Mesh) -> None:
    """OpenAI's seed is a signed 64-bit integer, and clients send -1: it is taken (a 200, not a 400), as its
    64-bit two's complement over gRPC's unsigned field, and it is a fixed seed like any other (the same
    answer again, the answer of seed 2^64 - 1), not llama.cpp's "random"."""

    def ask(seed: int) -> str:
        reply = client.chat.completions.create(
            model=mesh.model, messages=ASK, max_tokens=24, temperature=1.0, seed=seed
        )
        return reply.choices[0].message.content or ""

    minus_one = ask(-1)
    assert minus_one and ask(-1) == minus_one
    assert ask(2**64 - 1) == minus_one
    assert ask(-(2**63)) == ask(2**63)
    assert len({minus_one, ask(1), ask(2)}) == 3, "three seeds gave fewer answers: the seed is not used"
    with pytest.raises(openai.BadRequestError) as refused:
        ask(-(2**63) - 1)  # below OpenAI's range
    assert refused.value.body["param"] == "seed"  # type: ignore[index]


def test_the_node_counts_a_request_for_n_choices_as_n_sequences(mesh: Mesh) -> None:
    """While an n = 4 request streams, the load the node reports (seen in the control plane's GetNode) is 4
    running sequences; after it, none."""
    story = "The lighthouse keeper's long story:\n"  # greedy, it runs long (bench.grammar_bench)
    sampling = inference_pb2.SamplingParams(max_tokens=1000, temperature=0, n=4)
    request = inference_pb2.GenerateRequest(model=mesh.model, prompt=story, sampling=sampling)

    def load() -> int:
        with grpc.insecure_channel(mesh.controlplane) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            node = admin.GetNode(admin_pb2.GetNodeRequest(node_id="node-a"), timeout=5).node
        replica = next(r for r in node.replicas if r.model.name == mesh.model)
        return replica.running_requests + replica.queued_requests

    with grpc.insecure_channel(mesh.node_address) as channel:
        stream = inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=300)
        try:
            assert next(stream).HasField("delta")
            wait_for(lambda: load() == 4, 30, "the node to report 4 running sequences")
        finally:
            stream.cancel()
    wait_for(lambda: load() == 0, 30, "the node to report its slots free again")


@pytest.mark.parametrize("n", [0, 5, 129])
def test_an_n_the_replica_cannot_run_is_a_400_naming_n(mesh: Mesh, n: int) -> None:
    """0 and 129 are outside OpenAI's 1..128; 5 is more than the replica's 4 running sequences."""
    for path, body in (
        ("/v1/chat/completions", {"messages": ASK}),
        ("/v1/completions", {"prompt": "Hello"}),
    ):
        response = httpx.post(f"{mesh.http}{path}", json={"model": mesh.model, "max_tokens": 4, "n": n, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "n" and error["type"] == "invalid_request_error", error
    request = inference_pb2.GenerateRequest(
        model=mesh.model, prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=4, n=n)
    )
    with grpc.insecure_channel(mesh.grpc) as channel, pytest.raises(grpc.RpcError) as caught:
        list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=60))
    error = FleetError.from_rpc_error(caught.value)
    assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and error.param == "n", error


# --- OpenAI-compatible engines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attached(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second fleet whose node serves two `openai` engines: the first fleet's edge (a server that takes n),
    under the model's own name, and llama_cpp.server (which drops n)."""
    this_fleet = {"name": mesh.model, "path": f"{mesh.http}/v1", "engine": "openai", "format": "gguf",
                  "context_size": 2048}  # fmt: skip
    with fleet_with_llama_cpp_server(tmp_path_factory.mktemp("choices-engines"), "smol-attached", this_fleet) as base:
        yield base


def test_an_openai_engine_passes_n_through_and_maps_the_choices_back(attached: str, mesh: Mesh) -> None:
    direct = openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)
    via = openai.OpenAI(base_url=f"{attached}/v1", api_key="unused", max_retries=0, timeout=120)
    kwargs: dict[str, Any] = {"model": mesh.model, "messages": ASK, "max_tokens": 24, "temperature": 1.0, "seed": 9}
    expected = [c.message.content for c in direct.chat.completions.create(n=3, **kwargs).choices]
    assert len(set(expected)) == 3
    assert [c.message.content for c in via.chat.completions.create(n=3, **kwargs).choices] == expected
    texts, finishes, usage, _ = streamed(
        via.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert [texts[i] for i in range(3)] == expected and set(finishes) == {0, 1, 2}
    assert usage is not None and usage.completion_tokens > 0


def test_a_server_that_ignores_n_is_a_400_naming_n(attached: str) -> None:
    body = {"model": "smol-attached", "messages": ASK, "max_tokens": 8, "n": 2}
    response = httpx.post(f"{attached}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "n" and "1 choice" in error["message"], error
