"""The node's side of a continued chat (`ChatConversation.continue_final_message`): the request is refused
unless its last message is the assistant's; the llama.cpp engine renders the conversation with the real
SmolLM2 template cut just after the final message's text, so that Tokenize counts what Generate runs and
greedy decoding goes on exactly as the uncut reply did; an OpenAI-compatible server is sent vLLM's and
SGLang's parameters for it. The edge's side: tests/test_continue.py and tests/test_continue_e2e.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import validate_generate, validate_tokenize
from node_agent.engines.base import Chat, Finished, InvalidInput, Message, SamplingOptions, TextChunk
from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine
from node_agent.engines.openai_server import request_body
from tests.model_engine import default_model_engine

QUESTION = Message("user", "Write a short story about a robot who learns to paint.")
COUNTING = Message("user", "Count from 1 to 100, separated by commas.")


def conversation(*roles: str, continue_final: bool = True) -> inference_pb2.ChatConversation:
    return inference_pb2.ChatConversation(
        messages=[inference_pb2.ChatMessage(role=role, content="text") for role in roles],
        continue_final_message=continue_final,
    )


@pytest.mark.parametrize("roles", [("user",), ("assistant", "user"), ("user", "assistant", "system")])
def test_continue_final_message_needs_the_assistant_s_message_last(roles: tuple[str, ...]) -> None:
    for check, request in (
        (validate_generate, inference_pb2.GenerateRequest(model="m", chat=conversation(*roles))),
        (validate_tokenize, inference_pb2.TokenizeRequest(model="m", chat=conversation(*roles))),
    ):
        with pytest.raises(FleetError) as caught:
            check(request)  # type: ignore[operator]
        assert caught.value.code == ErrorCode.INVALID_REQUEST
        assert caught.value.param == "continue_final_message"
        assert f"its role is '{roles[-1]}'" in caught.value.message


def test_continue_final_message_with_the_assistant_s_message_last_is_valid() -> None:
    validate_generate(inference_pb2.GenerateRequest(model="m", chat=conversation("user", "assistant")))
    validate_tokenize(inference_pb2.TokenizeRequest(model="m", chat=conversation("system", "user", "assistant")))
    validate_generate(  # without the flag a conversation may end with any role, as before
        inference_pb2.GenerateRequest(model="m", chat=conversation("user", "assistant", continue_final=False))
    )


@pytest_asyncio.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    async with default_model_engine(2) as built:
        yield built


async def reply(engine: LlamaCppEngine, chat: Chat, max_tokens: int) -> tuple[list[str], Finished]:
    parts: list[str] = []
    async for event in engine.generate(chat, SamplingOptions(max_tokens=max_tokens, temperature=0)):
        if isinstance(event, TextChunk):
            parts.append(event.text)
        else:
            return parts, event
    raise AssertionError("no Finished event")


@pytest.mark.model
async def test_a_continued_conversation_ends_with_the_partial_reply_and_no_end_of_turn(
    engine: LlamaCppEngine,
) -> None:
    partial = "Once upon a time, a robot named"
    asked = Chat((QUESTION,))
    continued = Chat((QUESTION, Message("assistant", partial)), continue_final_message=True)
    finished = Chat((QUESTION, Message("assistant", partial)))  # the same conversation, the turn complete
    asked_ids, continued_ids, finished_ids = [await engine.tokenize(c) for c in (asked, continued, finished)]
    end_of_turn = engine._llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    assert len(end_of_turn) == 1
    # SmolLM2's template opens an assistant turn as its generation prompt does: the continued conversation
    # is the question as generation sees it, then the partial reply's tokens, and nothing after them.
    assert continued_ids[: len(asked_ids)] == asked_ids
    after = continued_ids[len(asked_ids) :]
    assert engine._llm.detokenize(after).decode() == partial
    assert end_of_turn[0] not in after
    # Without the flag the assistant's turn is closed and a new one opened after it.
    assert finished_ids[: len(continued_ids)] == continued_ids
    assert end_of_turn[0] in finished_ids[len(continued_ids) :]


@pytest.mark.model
async def test_a_continued_reply_is_the_very_tokens_that_were_generated(engine: LlamaCppEngine) -> None:
    """Tokenize of the continued conversation is the original prompt followed by exactly the tokens the
    model generated, wherever the cut falls (here inside a word the model wrote in three tokens)."""
    asked = Chat((QUESTION,))
    generated: list[bytes] = []
    options = SamplingOptions(max_tokens=48, temperature=0, logprobs=True)
    async for event in engine.generate(asked, options):
        if isinstance(event, TextChunk):
            generated.extend(entry.token_bytes for entry in event.logprobs)
    asked_ids = await engine.tokenize(asked)
    for cut in range(1, len(generated) + 1):
        sent = b"".join(generated[:cut]).decode(errors="strict")
        ids = await engine.tokenize(Chat((QUESTION, Message("assistant", sent)), continue_final_message=True))
        assert ids[: len(asked_ids)] == asked_ids
        assert [engine._llm.detokenize([i]) for i in ids[len(asked_ids) :]] == generated[:cut], cut


@pytest.mark.model
@pytest.mark.parametrize("cut", [1, 9, 40])
async def test_greedy_decoding_continued_from_a_cut_gives_the_uncut_reply(engine: LlamaCppEngine, cut: int) -> None:
    """What the edge does after a node died `cut` chunks into a reply: count the tokens already generated by
    tokenizing both conversations, ask for the rest. Greedy decoding then gives the same reply, and the
    counts add up to the uncut run's. (A reply where the model is sure of every token: where its two most
    likely tokens are close, the continuation may pick the other one, because the partial reply is read
    in one batch and llama.cpp's batched arithmetic rounds differently from decoding token by token.)"""
    asked = Chat((COUNTING,))
    whole, done = await reply(engine, asked, 64)
    assert done.completion_tokens == 64 and len(whole) > cut
    sent = "".join(whole[:cut])
    continued = Chat((COUNTING, Message("assistant", sent)), continue_final_message=True)
    generated = len(await engine.tokenize(continued)) - len(await engine.tokenize(asked))
    assert generated == cut  # the text sent retokenizes to the tokens that were generated
    rest, finished = await reply(engine, continued, 64 - generated)
    assert sent + "".join(rest) == "".join(whole)
    assert finished.prompt_tokens == done.prompt_tokens + generated
    assert generated + finished.completion_tokens == done.completion_tokens


def rendering_engine(template: str) -> LlamaCppEngine:
    """An engine that only renders chats (its model is never loaded), with the templates `start` builds."""
    built = LlamaCppEngine(LlamaCppConfig("unused.gguf"))
    built._template = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
    built._continuing = Jinja2ChatFormatter(
        template=template, eos_token="</s>", bos_token="<s>", add_generation_prompt=False
    )
    return built


def test_the_partial_reply_is_kept_exactly_when_the_template_trims_messages() -> None:
    trimming = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    engine = rendering_engine(trimming)
    chat = Chat((Message("user", " hi "), Message("assistant", "Hello, ")), continue_final_message=True)
    # The client was sent "Hello, " (with its space): the model goes on from exactly that.
    assert engine._render_chat(chat) == "<|user|>hi<|end|><|assistant|>Hello, "


def test_a_template_that_drops_the_final_message_cannot_continue_it() -> None:
    users_only = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>{% endif %}"
        "{% endfor %}<|assistant|>"
    )
    engine = rendering_engine(users_only)
    chat = Chat((Message("user", "hi"), Message("assistant", "Hello")), continue_final_message=True)
    with pytest.raises(InvalidInput) as caught:
        engine._render_chat(chat)
    assert caught.value.param == "continue_final_message" and "cannot be continued" in str(caught.value)


def test_an_openai_compatible_server_is_asked_to_continue_the_final_message() -> None:
    messages = (QUESTION, Message("assistant", "Once"))
    path, body = request_body(Chat(messages, continue_final_message=True), SamplingOptions(max_tokens=8), "up")
    assert path == "/chat/completions"
    assert body["messages"][-1] == {"role": "assistant", "content": "Once"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    _, plain = request_body(Chat(messages), SamplingOptions(max_tokens=8), "up")
    assert "continue_final_message" not in plain and "add_generation_prompt" not in plain
