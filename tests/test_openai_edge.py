"""The official openai client against the edge, answered by SmolLM2 through llama.cpp."""

from __future__ import annotations

from typing import Any

import grpc
import openai
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.default_model import default_model_path
from mesh.errors import FleetError
from tests.cluster import wait_for
from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

QUESTION = [{"role": "user", "content": "Name three colors of the rainbow."}]


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0)


def token_count(mesh: Mesh, **which: object) -> int:
    with grpc.insecure_channel(mesh.grpc) as channel:
        reply = inference_pb2_grpc.InferenceServiceStub(channel).Tokenize(
            inference_pb2.TokenizeRequest(model=mesh.model, **which), timeout=10
        )
    return len(reply.token_ids)


def test_models_lists_the_served_model(client: openai.OpenAI, mesh: Mesh) -> None:
    ids = [m.id for m in client.models.list().data]
    assert mesh.model in ids
    assert client.models.retrieve(mesh.model).id == mesh.model


def test_chat_answers_with_real_text_and_true_usage(client: openai.OpenAI, mesh: Mesh) -> None:
    reply = client.chat.completions.create(model=mesh.model, messages=QUESTION, max_tokens=40, temperature=0)
    text = reply.choices[0].message.content or ""
    assert reply.choices[0].message.role == "assistant"
    assert len(text.split()) >= 3 and any(c.isalpha() for c in text)
    assert reply.choices[0].finish_reason in ("stop", "length")
    chat = inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(**m) for m in QUESTION])
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == token_count(mesh, chat=chat)
    # The completion's own tokens: re-tokenizing the text gives the same count for this model's BPE
    # when generation stopped on its own; with a length stop it is exactly max_tokens.
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 40
    assert 0 < reply.usage.completion_tokens <= 40
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_equals_non_stream_at_temperature_zero(client: openai.OpenAI, mesh: Mesh) -> None:
    whole = client.chat.completions.create(model=mesh.model, messages=QUESTION, max_tokens=48, temperature=0)
    stream = client.chat.completions.create(
        model=mesh.model,
        messages=QUESTION,
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert len(parts) > 3, "the answer arrived in one piece, not streamed"
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_and_not(client: openai.OpenAI, mesh: Mesh) -> None:
    prompt = "The three primary colors are"
    whole = client.completions.create(model=mesh.model, prompt=prompt, max_tokens=24, temperature=0)
    assert whole.object == "text_completion"
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == token_count(mesh, text=prompt)
    assert whole.usage.completion_tokens == 24 or whole.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=mesh.model, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].text
    assert streamed.strip()


def test_completions_default_max_tokens_is_openais_16(client: openai.OpenAI, mesh: Mesh) -> None:
    reply = client.completions.create(model=mesh.model, prompt="Once upon a time", temperature=0)
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 16


def test_embeddings_float_and_base64(client: openai.OpenAI, mesh: Mesh) -> None:
    texts = ["the cat sat on the mat", "a kitten rested on the rug", "quarterly tax filing deadline"]
    # The openai client asks for base64 by default and decodes it.
    result = client.embeddings.create(model=mesh.model, input=texts)
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100
    plain = client.embeddings.create(model=mesh.model, input=texts, encoding_format="float")
    assert [round(x, 5) for x in plain.data[0].embedding] == [round(x, 5) for x in vectors[0]]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))  # vectors are normalized

    assert abs(cos(vectors[0], vectors[0]) - 1) < 1e-3
    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert result.usage.prompt_tokens == sum(token_count(mesh, text=t) for t in texts)


def test_stop_string_is_not_in_output(client: openai.OpenAI, mesh: Mesh) -> None:
    base = (
        client.completions.create(model=mesh.model, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    assert " 5" in base, base
    cut = client.completions.create(
        model=mesh.model, prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[" 5"]
    )
    assert cut.choices[0].text == base[: base.index(" 5")]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI, mesh: Mesh) -> None:
    args: dict[str, Any] = {"model": mesh.model, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**args, logprobs=True, top_logprobs=3)
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert whole.usage is not None and len(content) == whole.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token  # greedy
        assert bytes(entry.bytes or []).decode() == entry.token
    streamed: list[Any] = []
    for chunk in client.chat.completions.create(**args, logprobs=True, top_logprobs=3, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in content]
    # Not asked for: none, as OpenAI answers.
    assert client.chat.completions.create(**args).choices[0].logprobs is None


def test_completions_logprobs_have_openais_legacy_shape(client: openai.OpenAI, mesh: Mesh) -> None:
    reply = client.completions.create(
        model=mesh.model, prompt="The three primary colors are", max_tokens=10, temperature=0, logprobs=2
    )
    choice = reply.choices[0]
    scores = choice.logprobs
    assert scores is not None and scores.tokens and scores.token_logprobs and scores.top_logprobs
    assert scores.text_offset is not None
    assert "".join(scores.tokens) == choice.text
    assert scores.text_offset == [len("".join(scores.tokens[:i])) for i in range(len(scores.tokens))]
    for token, logprob, top in zip(scores.tokens, scores.token_logprobs, scores.top_logprobs, strict=True):
        assert len(top) == 2 and top[token] == logprob  # greedy: the chosen token is the likeliest


def test_grpc_generate_streams_logprobs_with_the_text(mesh: Mesh) -> None:
    request = inference_pb2.GenerateRequest(
        model=mesh.model,
        prompt="Water boils at",
        sampling=inference_pb2.SamplingParams(max_tokens=10, temperature=0, logprobs=True, top_logprobs=4),
    )
    with grpc.insecure_channel(mesh.grpc) as channel:
        events = list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=30))
    deltas = [e.delta for e in events if e.HasField("delta")]
    scored = [t for d in deltas for t in d.logprobs]
    assert len(scored) == events[-1].result.usage.completion_tokens
    assert "".join(t.token for t in scored) == "".join(d.text for d in deltas)
    assert all(len(t.top_logprobs) == 4 and t.token_bytes == t.token.encode() for t in scored)


def test_grpc_generate_whole_delivery_is_the_same_reply_in_two_deltas(mesh: Mesh) -> None:
    def generate(delivery: inference_pb2.TextDelivery) -> list[inference_pb2.GenerateResponse]:
        sampling = inference_pb2.SamplingParams(max_tokens=32, temperature=0, logprobs=True, top_logprobs=2)
        request = inference_pb2.GenerateRequest(
            model=mesh.model, prompt="Once upon a time", sampling=sampling, delivery=delivery
        )
        with grpc.insecure_channel(mesh.grpc) as channel:
            return list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=60))

    streamed = generate(inference_pb2.TEXT_DELIVERY_UNSPECIFIED)
    whole = generate(inference_pb2.TEXT_DELIVERY_WHOLE)
    streamed_deltas = [e.delta for e in streamed if e.HasField("delta")]
    whole_deltas = [e.delta for e in whole if e.HasField("delta")]
    assert len(streamed_deltas) > 8  # a delta about every token
    assert len(whole_deltas) == 2  # the first at once, the rest before the result
    assert "".join(d.text for d in whole_deltas) == "".join(d.text for d in streamed_deltas)

    def scored(deltas: list[inference_pb2.TextDelta]) -> list[tuple[str, float, int]]:
        return [(t.token, round(t.logprob, 4), t.text_offset) for d in deltas for t in d.logprobs]

    assert scored(whole_deltas) == scored(streamed_deltas)
    assert whole[-1].result.usage == streamed[-1].result.usage
    assert whole[-1].result.finish_reason == streamed[-1].result.finish_reason


HF_STYLE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct:q8"  # as vLLM and SGLang name a model: org/name, a tag


def test_a_model_id_with_a_slash_and_a_colon_is_deployed_and_served(client: openai.OpenAI, mesh: Mesh) -> None:
    spec = node_pb2.ModelSpec(name=HF_STYLE_ID, path=str(default_model_path()), format="gguf", context_size=2048)
    with grpc.insecure_channel(mesh.controlplane) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        deployment = node_pb2.Deployment(spec=spec, min_replicas=1, max_replicas=1)
        admin.DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), timeout=30)
        try:
            mesh.cluster.wait_model_state(mesh.http, HF_STYLE_ID, "ready", timeout=120)
            assert HF_STYLE_ID in [m.id for m in client.models.list().data]
            assert client.models.retrieve(HF_STYLE_ID).id == HF_STYLE_ID
            reply = client.chat.completions.create(model=HF_STYLE_ID, messages=QUESTION, max_tokens=8, temperature=0)
            assert reply.model == HF_STYLE_ID and reply.choices[0].message.content
            with grpc.insecure_channel(mesh.grpc) as edge:
                request = inference_pb2.GenerateRequest(
                    model=HF_STYLE_ID, prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=4)
                )
                results = [r.result for r in inference_pb2_grpc.InferenceServiceStub(edge).Generate(request, timeout=60)
                           if r.HasField("result")]  # fmt: skip
            assert len(results) == 1 and results[0].usage.completion_tokens == 4
            listed = admin.ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=10).deployments
            assert HF_STYLE_ID in [d.deployment.spec.name for d in listed]
        finally:
            admin.UndeployModel(admin_pb2.UndeployModelRequest(name=HF_STYLE_ID), timeout=30)
    wait_for(lambda: HF_STYLE_ID not in [m.id for m in client.models.list().data], 60, "the model to go")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(HF_STYLE_ID)


@pytest.mark.parametrize(
    "name", ["", "two words", "line\nbreak", "tab\there", "x" * 257, "org//m", "..", "/abs", "org/"]
)
def test_a_deployment_name_the_api_cannot_carry_is_refused_naming_the_field(mesh: Mesh, name: str) -> None:
    spec = node_pb2.ModelSpec(name=name, path=str(default_model_path()), format="gguf")
    with grpc.insecure_channel(mesh.controlplane) as channel, pytest.raises(grpc.RpcError) as refused:
        admin_pb2_grpc.AdminServiceStub(channel).DeployModel(
            admin_pb2.DeployModelRequest(deployment=node_pb2.Deployment(spec=spec, min_replicas=1)), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = FleetError.from_rpc_error(refused.value)
    assert error.param == "deployment.spec.name"
    assert "1 to 256 characters without spaces or control characters" in error.message or (
        ("/" in name or "." in name) and "none of them empty, '.' or '..'" in error.message
    )


def token_ids(mesh: Mesh, text: str) -> list[int]:
    with grpc.insecure_channel(mesh.grpc) as channel:
        reply = inference_pb2_grpc.InferenceServiceStub(channel).Tokenize(
            inference_pb2.TokenizeRequest(model=mesh.model, text=text), timeout=10
        )
    return list(reply.token_ids)


def piece_of(mesh: Mesh, ids: list[int]) -> str:
    with grpc.insecure_channel(mesh.grpc) as channel:
        return str(
            inference_pb2_grpc.InferenceServiceStub(channel)
            .Detokenize(inference_pb2.DetokenizeRequest(model=mesh.model, token_ids=ids), timeout=10)
            .text
        )


def test_logit_bias_forces_a_token_and_bans_another(client: openai.OpenAI, mesh: Mesh) -> None:
    (banana,) = token_ids(mesh, " banana")
    forced = client.chat.completions.create(
        model=mesh.model, messages=QUESTION, max_tokens=5, temperature=0, logit_bias={str(banana): 100}
    )
    assert forced.choices[0].message.content == piece_of(mesh, [banana] * 5)
    completion = client.completions.create(
        model=mesh.model, prompt="Hello", max_tokens=3, temperature=0.8, seed=3, logit_bias={str(banana): 100}
    )
    assert completion.choices[0].text == piece_of(mesh, [banana] * 3)

    def first_token(**extra: Any) -> tuple[bytes, str]:
        reply = client.chat.completions.create(
            model=mesh.model, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, **extra
        )
        assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
        return bytes(reply.choices[0].logprobs.content[0].bytes or []), reply.choices[0].message.content or ""

    first, text = first_token()
    (banned,) = token_ids(mesh, first.decode())
    again, other = first_token(logit_bias={str(banned): -100})
    assert again != first and other != text
    assert first_token(logit_bias={str(banned): -0.0001})[1] == text  # a bias too small to matter changes nothing
    streamed = client.chat.completions.create(
        model=mesh.model, messages=QUESTION, max_tokens=6, temperature=0, stream=True, logit_bias={str(banned): -100}
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == other

    with grpc.insecure_channel(mesh.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            model=mesh.model,
            prompt="Hello",
            sampling=inference_pb2.SamplingParams(max_tokens=4, temperature=0, logit_bias={banana: 100}),
        )
        assert "".join(r.delta.text for r in stub.Generate(request, timeout=60)) == piece_of(mesh, [banana] * 4)
        for bias, says in (({-1: 5.0}, "token ids, 0 or more"), ({5: 200.0}, "between -100 and 100"),
                           ({10**9: 1.0}, "token ids are 0 to")):  # fmt: skip
            request.sampling.logit_bias.clear()
            request.sampling.logit_bias.update(bias)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request, timeout=60))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            error = FleetError.from_rpc_error(refused.value)
            assert error.param == "logit_bias" and says in error.message, error
