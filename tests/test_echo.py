"""The completions API's `echo` and prompts of token ids, as evaluation harnesses use them
(lm-evaluation-harness scores a continuation with its own token ids, echo, logprobs and max_tokens 0 or 1),
with the official openai client and gRPC through a real edge and node running llama.cpp: the prompt's own
tokens scored (the first with null), the scores agreeing with what greedy generation chose, the same scores
again when the prompt is cached, the prompt before the generated text streamed or not, with several choices
and several prompts, token ids answered as their text; and what is refused, in the API's shape."""

from __future__ import annotations

import concurrent.futures
import math

import grpc
import httpx
import openai
import pytest

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from node_agent.engines.base import PromptEcho, TokenLogprob, TopLogprob
from node_agent.engines.llamacpp_batch import SCORE_CHUNK
from node_agent.inference_service import MAX_ECHO_BYTES, prompt_echo
from tests.conftest import Mesh

PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)


def token_ids(mesh: Mesh, text: str) -> list[int]:
    with grpc.insecure_channel(mesh.grpc) as channel:
        reply = inference_pb2_grpc.InferenceServiceStub(channel).Tokenize(
            inference_pb2.TokenizeRequest(model=mesh.model, text=text), timeout=30
        )
    return list(reply.token_ids)


def scored(client: openai.OpenAI, mesh: Mesh, prompt: str, top: int = 1) -> openai.types.Completion:
    """How evaluation harnesses ask: the prompt scored, nothing generated."""
    return client.completions.create(
        model=mesh.model, prompt=prompt, echo=True, max_tokens=0, logprobs=top, temperature=0
    )


@pytest.mark.model
@pytest.mark.cluster
def test_echo_with_max_tokens_0_scores_every_prompt_token(client: openai.OpenAI, mesh: Mesh) -> None:
    reply = scored(client, mesh, PROMPT, top=3)
    choice = reply.choices[0]
    ids = token_ids(mesh, PROMPT)
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)
    scores = choice.logprobs
    assert scores is not None and scores.tokens and scores.token_logprobs and scores.top_logprobs
    assert scores.text_offset is not None
    assert len(scores.tokens) == len(scores.token_logprobs) == len(scores.top_logprobs) == len(ids)
    # Nothing comes before the first token: OpenAI shows null for it.
    assert scores.token_logprobs[0] is None and scores.top_logprobs[0] is None
    assert "".join(scores.tokens) == PROMPT  # this model adds no beginning-of-text token
    for token, logprob, top, offset in zip(
        scores.tokens, scores.token_logprobs, scores.top_logprobs, scores.text_offset, strict=True
    ):
        assert PROMPT[offset:].startswith(token)
        if logprob is None:
            continue
        assert math.isfinite(logprob) and logprob <= 0
        assert len(top) == 3 and max(top.values()) >= logprob - 1e-4
    # The model finds " Rome" likely after the pattern the prompt sets up, and "Paris" after "France is".
    at = scores.tokens.index(" Paris")
    assert scores.token_logprobs[at] > math.log(0.05), scores.token_logprobs[at]


@pytest.mark.model
@pytest.mark.cluster
def test_echo_scores_agree_with_greedy_generation_past_a_chunk(client: openai.OpenAI, mesh: Mesh) -> None:
    """The check lm-evaluation-harness makes (is the continuation greedy?) holds for the text the model
    generated greedily, and the scores match the generation's own logprobs, with a context longer than
    one scoring chunk, so that the continuation is scored in a later step than the prompt's start."""
    context = " ".join(f"Item {i} is a number." for i in range(SCORE_CHUNK // 5 + 20)) + " Item"
    assert len(token_ids(mesh, context)) > SCORE_CHUNK + 20
    generated = client.completions.create(model=mesh.model, prompt=context, max_tokens=6, temperature=0, logprobs=1)
    continuation = generated.choices[0].text
    gen_scores = generated.choices[0].logprobs
    assert gen_scores is not None and gen_scores.token_logprobs and continuation
    ctxlen = len(token_ids(mesh, context))
    whole = token_ids(mesh, context + continuation)
    assert whole[:ctxlen] == token_ids(mesh, context)  # the continuation's tokens follow the context's
    reply = scored(client, mesh, context + continuation)
    scores = reply.choices[0].logprobs
    assert scores is not None and scores.token_logprobs and scores.top_logprobs
    assert len(scores.token_logprobs) == len(whole)
    tail = scores.token_logprobs[ctxlen:]
    tops = scores.top_logprobs[ctxlen:]
    for logprob, top in zip(tail, tops, strict=True):  # lm-evaluation-harness's is_greedy
        assert logprob is not None and top is not None
        assert logprob >= max(top.values()) - 1e-3, (logprob, top)
    if whole[ctxlen:] == token_ids(mesh, continuation)[: len(whole) - ctxlen]:
        for mine, theirs in zip(tail, gen_scores.token_logprobs, strict=False):
            assert mine == pytest.approx(theirs, abs=0.05)


@pytest.mark.model
@pytest.mark.cluster
def test_echo_scores_are_the_same_when_the_prompt_is_cached(client: openai.OpenAI, mesh: Mesh) -> None:
    """A slot keeps its last prompt's KV cache for reuse; a scored prompt must not take positions from it
    (a reused position has no logits)."""
    client.completions.create(model=mesh.model, prompt=PROMPT + " Rome.", max_tokens=2, temperature=0)
    first = scored(client, mesh, PROMPT).choices[0].logprobs
    again = scored(client, mesh, PROMPT).choices[0].logprobs
    assert first is not None and again is not None and first.token_logprobs
    assert first.token_logprobs == pytest.approx(again.token_logprobs)
    assert len(first.token_logprobs) == len(token_ids(mesh, PROMPT))


@pytest.mark.model
@pytest.mark.cluster
def test_scoring_beside_generation_changes_neither(client: openai.OpenAI, mesh: Mesh) -> None:
    """At temperature 0 a request's output does not depend on what else is in the batch: a greedy reply
    while prompts are scored beside it is the reply alone, and the scores are those of a prompt alone."""
    story = "Once upon a time, in a small village by the sea, there lived"
    alone = client.completions.create(model=mesh.model, prompt=story, max_tokens=24, temperature=0).choices[0].text
    scores_alone = scored(client, mesh, PROMPT).choices[0].logprobs
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        reply = pool.submit(client.completions.create, model=mesh.model, prompt=story, max_tokens=24, temperature=0)
        beside = [pool.submit(scored, client, mesh, PROMPT) for _ in range(3)]
        assert reply.result().choices[0].text == alone
        for future in beside:
            scores = future.result().choices[0].logprobs
            assert scores is not None and scores_alone is not None and scores.token_logprobs
            assert scores.token_logprobs == pytest.approx(scores_alone.token_logprobs, abs=1e-3)


@pytest.mark.model
@pytest.mark.cluster
def test_echo_puts_the_prompt_before_the_generated_text_streamed_or_not(client: openai.OpenAI, mesh: Mesh) -> None:
    args = {"model": mesh.model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "echo": True}
    plain = client.completions.create(**args)
    alone = client.completions.create(**{**args, "echo": False})
    assert plain.choices[0].text == PROMPT + alone.choices[0].text
    assert plain.choices[0].logprobs is None
    assert plain.usage is not None and plain.usage.completion_tokens == 5

    whole = client.completions.create(**args, logprobs=2)
    scores = whole.choices[0].logprobs
    assert scores is not None and scores.tokens and scores.text_offset and scores.token_logprobs
    prompt_tokens = len(token_ids(mesh, PROMPT))
    assert len(scores.tokens) == prompt_tokens + 5
    text = whole.choices[0].text
    # The generated tokens' offsets count from the start of the text, which begins with the prompt.
    assert scores.text_offset[prompt_tokens] == len(PROMPT)
    for token, offset in zip(scores.tokens, scores.text_offset, strict=True):
        assert text[offset:].startswith(token)

    streamed_text, streamed_tokens, streamed_offsets = "", [], []
    for chunk in client.completions.create(**args, logprobs=2, stream=True):
        for c in chunk.choices:
            streamed_text += c.text
            if c.logprobs is not None and c.logprobs.tokens:
                streamed_tokens += c.logprobs.tokens
                streamed_offsets += c.logprobs.text_offset or []
    assert streamed_text == text
    assert streamed_tokens == scores.tokens and streamed_offsets == scores.text_offset


@pytest.mark.model
@pytest.mark.cluster
def test_echo_with_several_choices_and_prompts(client: openai.OpenAI, mesh: Mesh) -> None:
    prompts = ["Water boils at", PROMPT]
    reply = client.completions.create(
        model=mesh.model, prompt=prompts, n=2, max_tokens=4, temperature=0.8, seed=5, echo=True, logprobs=1
    )
    assert len(reply.choices) == 4
    for choice in reply.choices:
        prompt = prompts[choice.index // 2]
        assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
        assert choice.logprobs is not None and choice.logprobs.token_logprobs
        assert choice.logprobs.token_logprobs[0] is None
        assert len(choice.logprobs.tokens or []) == len(token_ids(mesh, prompt)) + 4
    counted: dict[int, str] = {}
    for chunk in client.completions.create(model=mesh.model, prompt=prompts, n=2, max_tokens=0, echo=True, stream=True):
        for c in chunk.choices:
            counted[c.index] = counted.get(c.index, "") + c.text
    assert counted == {0: prompts[0], 1: prompts[0], 2: prompts[1], 3: prompts[1]}
    # Scored with two choices each: the prompt computed once, every choice ends at it.
    reply = client.completions.create(model=mesh.model, prompt=prompts, n=2, max_tokens=0, echo=True, logprobs=1)
    assert [(c.index, c.text, c.finish_reason) for c in sorted(reply.choices, key=lambda c: c.index)] == [
        (0, prompts[0], "length"), (1, prompts[0], "length"), (2, prompts[1], "length"), (3, prompts[1], "length")
    ]  # fmt: skip
    firsts = [c.logprobs.token_logprobs for c in reply.choices if c.logprobs is not None]
    assert len(firsts) == 4 and firsts[0] == firsts[1] and firsts[2] == firsts[3]
    assert reply.usage is not None and reply.usage.completion_tokens == 0


@pytest.mark.model
@pytest.mark.cluster
def test_grpc_echo_starts_the_stream_with_the_prompt(mesh: Mesh) -> None:
    request = inference_pb2.GenerateRequest(
        model=mesh.model,
        prompt=PROMPT,
        echo=True,
        sampling=inference_pb2.SamplingParams(max_tokens=3, temperature=0, logprobs=True, top_logprobs=2),
    )
    with grpc.insecure_channel(mesh.grpc) as channel:
        events = list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=60))
    assert events[0].HasField("prompt") and events[0].prompt.text == PROMPT
    entries = [t for e in events if e.HasField("prompt") for t in e.prompt.logprobs]
    assert len(entries) == len(token_ids(mesh, PROMPT))
    assert math.isnan(entries[0].logprob) and not entries[0].top_logprobs
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in entries[1:])
    assert [e.WhichOneof("event") for e in events[1:]].count("delta") >= 1
    assert events[-1].result.usage.completion_tokens == 3


@pytest.mark.model
@pytest.mark.cluster
@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "Hello", "max_tokens": 0}, "max_tokens", "between 1"),
        ({"prompt": "Hello", "max_tokens": -1, "echo": True}, "max_tokens", "between 0"),
        ({"prompt": "Hello", "echo": True, "suffix": "x"}, "suffix", "suffix"),
    ],
)
def test_echo_refusals_name_their_field(mesh: Mesh, body: dict[str, object], param: str, words: str) -> None:
    reply = httpx.post(f"{mesh.http}/v1/completions", json={"model": mesh.model, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.model
@pytest.mark.cluster
def test_grpc_echo_of_a_chat_is_refused_naming_echo(mesh: Mesh) -> None:
    request = inference_pb2.GenerateRequest(
        model=mesh.model,
        chat=inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(role="user", content="Hi")]),
        echo=True,
    )
    with grpc.insecure_channel(mesh.grpc) as channel, pytest.raises(grpc.RpcError) as refused:
        list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "echo" in (refused.value.details() or "")


@pytest.mark.model
@pytest.mark.cluster
def test_a_prompt_of_token_ids_is_the_prompt_of_their_text(client: openai.OpenAI, mesh: Mesh) -> None:
    """OpenAI's token-id forms of `prompt` (lm-evaluation-harness sends its own tokenization): one prompt,
    several, streamed, and scored with echo, each the same as the text they are the tokens of."""
    other = "Water boils at"
    ids, other_ids = token_ids(mesh, PROMPT), token_ids(mesh, other)
    args = {"model": mesh.model, "max_tokens": 8, "temperature": 0}
    as_text = client.completions.create(prompt=PROMPT, **args)
    as_ids = client.completions.create(prompt=ids, **args)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage is not None and as_ids.usage.prompt_tokens == len(ids)
    several = client.completions.create(prompt=[ids, other_ids], **args)
    alone = client.completions.create(prompt=other, **args).choices[0].text
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [as_text.choices[0].text, alone]
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt=ids, stream=True, **args))
    assert streamed == as_text.choices[0].text
    # Scored as lm-evaluation-harness scores a continuation: context and continuation ids, echo, max_tokens 1.
    reply = client.completions.create(model=mesh.model, prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0)
    scores = reply.choices[0].logprobs
    by_text = scored(client, mesh, PROMPT).choices[0].logprobs
    assert scores is not None and by_text is not None and scores.token_logprobs and by_text.token_logprobs
    assert reply.choices[0].text.startswith(PROMPT)  # the ids' text
    assert len(scores.token_logprobs) == len(ids) + 1
    assert scores.token_logprobs[: len(ids)] == pytest.approx(by_text.token_logprobs)


@pytest.mark.model
@pytest.mark.cluster
def test_grpc_takes_a_prompt_of_token_ids(mesh: Mesh) -> None:
    ids = token_ids(mesh, PROMPT)
    request = inference_pb2.GenerateRequest(
        model=mesh.model,
        prompt_token_ids=inference_pb2.TokenIds(ids=ids),
        echo=True,
        sampling=inference_pb2.SamplingParams(max_tokens=4, temperature=0),
    )
    with grpc.insecure_channel(mesh.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        events = list(stub.Generate(request, timeout=60))
        assert events[0].prompt.text == PROMPT
        assert events[-1].result.usage.prompt_tokens == len(ids)
        request.prompt_token_ids.ids.append(10**6)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt[{len(ids)}] is 1000000" in (refused.value.details() or "")


def test_a_long_prompts_scores_come_in_several_events_below_grpcs_limit() -> None:
    """The node's splitting of a PromptEcho (a 2,048-token context cannot hold a prompt this long)."""
    top = tuple(TopLogprob(f"tok{i}", f"tok{i}".encode(), -float(i)) for i in range(20))
    entries = tuple(TokenLogprob(f"t{i}", f"t{i}".encode(), -0.5, top, i) for i in range(8000))
    events = list(prompt_echo(PromptEcho(entries), "the prompt"))
    assert len(events) > 2
    assert events[0].prompt.text == "the prompt" and all(not e.prompt.text for e in events[1:])
    assert all(e.ByteSize() <= MAX_ECHO_BYTES + len("the prompt") + 16 for e in events)
    joined = [t.text_offset for e in events for t in e.prompt.logprobs]
    assert joined == list(range(8000))
