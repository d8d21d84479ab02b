"""Structured outputs in the llama.cpp engine, with the real model: a grammar in a request's own sampler
chain keeps its output to the schema, ends the sequence when the document is complete, leaves the other
sequences of the batch alone (they are still decoded in the same steps) and is freed with its sequence."""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import jsonschema_rs
import pytest
import pytest_asyncio

from node_agent.engines.base import (
    Chat,
    Finished,
    InvalidInput,
    Message,
    Prompt,
    ResponseFormat,
    SamplingOptions,
    TextChunk,
)
from node_agent.engines.json_grammar import schema_grammar
from node_agent.engines.llamacpp import LlamaCppEngine
from tests.model_engine import default_model_engine

pytestmark = [pytest.mark.model]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "color", "hobbies"],
    "additionalProperties": False,
}
AS_PERSON = ResponseFormat("json_schema", json.dumps(PERSON), "person")
ASK = Chat((Message("user", "Describe a fictional person: name, age, favourite color and hobbies, as JSON."),))
FREE_PROMPTS = ["The capital of France is", "Water boils at", "The three primary colors are", "In 1969, astronauts"]


@pytest_asyncio.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    async with default_model_engine(8) as built:
        yield built


async def run(engine: LlamaCppEngine, prompt: Prompt, options: SamplingOptions) -> tuple[str, Finished]:
    parts: list[str] = []
    async for event in engine.generate(prompt, options):
        if isinstance(event, TextChunk):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise AssertionError("no Finished event")


async def test_sampled_documents_validate_and_end_with_stop(engine: LlamaCppEngine) -> None:
    validator = jsonschema_rs.validator_for(PERSON)
    options = [SamplingOptions(max_tokens=300, temperature=0.8, seed=s, response_format=AS_PERSON) for s in range(8)]
    replies = await asyncio.gather(*(run(engine, ASK, o) for o in options))
    for text, finished in replies:
        assert finished.reason == "stop", text  # the grammar ended the document, not max_tokens
        validator.validate(json.loads(text))
    assert len({text for text, _ in replies}) >= 4  # sampled, not one answer forced by the grammar


async def test_json_object_mode_gives_an_object(engine: LlamaCppEngine) -> None:
    # A short answer: any object has no bound, and at temperature 0 this model can repeat list items
    # until max_tokens (that is the model; the grammar only keeps it to JSON).
    ask = Chat((Message("user", "Return a JSON object with the keys city and country for Paris."),))
    mode = ResponseFormat("json_object")
    options = [SamplingOptions(max_tokens=200, temperature=0.7, seed=s, response_format=mode) for s in range(4)]
    for text, finished in await asyncio.gather(*(run(engine, ask, o) for o in options)):
        assert finished.reason == "stop", text
        assert isinstance(json.loads(text), dict)


async def test_a_stop_string_does_not_cut_a_document(engine: LlamaCppEngine) -> None:
    """The grammar ends the document; a stop string inside it ended the reply with JSON that did not parse
    (`{ "name": "Ann"` at stop '",'), as finish_reason "stop". It still ends free text."""
    validator = jsonschema_rs.validator_for(PERSON)
    for stops in (("}",), ('",', ":"), ("name",)):
        options = SamplingOptions(max_tokens=300, temperature=0, response_format=AS_PERSON, stops=stops)
        text, finished = await run(engine, ASK, options)
        assert finished.reason == "stop", (stops, text)
        validator.validate(json.loads(text))
    free, _ = await run(engine, FREE_PROMPTS[0], SamplingOptions(max_tokens=16, temperature=0))
    word = free.split()[1]
    cut, finished = await run(engine, FREE_PROMPTS[0], SamplingOptions(max_tokens=16, temperature=0, stops=(word,)))
    assert finished.reason == "stop" and cut == free[: free.index(word)], (free, word)


async def test_max_tokens_cuts_a_document_with_length(engine: LlamaCppEngine) -> None:
    text, finished = await run(engine, ASK, SamplingOptions(max_tokens=4, temperature=0, response_format=AS_PERSON))
    assert finished.reason == "length" and finished.completion_tokens == 4
    assert text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # cut, as OpenAI's would be


async def test_strings_never_hold_raw_control_characters(engine: LlamaCppEngine) -> None:
    """The converter's string rule allows a raw newline, which JSON forbids: a poem in a string field at
    temperature 1 gives the model every reason to write one."""
    poem = {"type": "object", "properties": {"poem": {"type": "string", "maxLength": 200}}, "required": ["poem"]}
    ask = Chat((Message("user", "Write a four-line poem about the sea, one line per line, as JSON."),))
    fmt = ResponseFormat("json_schema", json.dumps(poem), "poem")
    options = [SamplingOptions(max_tokens=300, temperature=1.0, seed=s, response_format=fmt) for s in range(8)]
    replies = await asyncio.gather(*(run(engine, ask, o) for o in options))
    for text, finished in replies:
        assert finished.reason == "stop"
        assert isinstance(json.loads(text)["poem"], str), text  # json.loads refuses raw control characters


async def test_a_constrained_request_batches_and_leaves_the_others_unchanged(engine: LlamaCppEngine) -> None:
    greedy = SamplingOptions(max_tokens=32, temperature=0)
    alone = [await run(engine, p, greedy) for p in FREE_PROMPTS]
    stats = engine.stats
    assert stats is not None
    steps_before, grammars_before = stats.steps, stats.grammars
    constrained = [
        SamplingOptions(max_tokens=300, temperature=0.8, seed=s, response_format=AS_PERSON) for s in range(4)
    ]
    together = await asyncio.gather(
        *(run(engine, p, greedy) for p in FREE_PROMPTS), *(run(engine, ASK, o) for o in constrained)
    )
    steps = stats.steps - steps_before
    assert [text for text, _ in together[:4]] == [text for text, _ in alone]
    for text, _ in together[4:]:
        jsonschema_rs.validator_for(PERSON).validate(json.loads(text))
    assert stats.grammars - grammars_before == 4
    # Decoded together: far fewer steps than the eight sequences' tokens one after another.
    assert steps < sum(f.completion_tokens for _, f in together) / 2


async def test_in_a_batch_of_eight_one_grammar_changes_none_of_the_seven_others(engine: LlamaCppEngine) -> None:
    """Issue 14's must-show, exactly: 8 requests at once, 7 greedy and 1 constrained, and the same 7 beside
    1 free request instead: the 7 answers are the same both times, and the same as each alone."""
    prompts = [*FREE_PROMPTS, "Once upon a time, in a small village,", "The history of Rome", "def add(a, b):"]
    greedy = SamplingOptions(max_tokens=48, temperature=0)
    alone = [(await run(engine, p, greedy))[0] for p in prompts]
    for fmt in (AS_PERSON, None):
        options = SamplingOptions(max_tokens=300, temperature=0.8, seed=5, response_format=fmt)
        jobs = [*(run(engine, p, greedy) for p in prompts), run(engine, ASK, options)]
        *seven, (eighth, _) = await asyncio.gather(*jobs)
        assert [text for text, _ in seven] == alone, fmt
        if fmt is not None:
            jsonschema_rs.validator_for(PERSON).validate(json.loads(eighth))


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}, "'minimum'"),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "'oneOf'"),
        ({"type": "string", "format": "email"}, "email"),
        ({"type": "object", "properties": {}, "required": ["x"]}, "'x'"),
        ({"type": "array", "items": {"type": "string"}, "maxItems": 10**9}, "'maxItems'"),
        ({"$ref": "https://example.com/schema.json"}, "local references"),
        ({"description": "no type at all"}, "converter"),
    ],
)
async def test_a_schema_the_grammar_cannot_enforce_is_refused(
    engine: LlamaCppEngine, schema: dict[str, Any], words: str
) -> None:
    fmt = ResponseFormat("json_schema", json.dumps(schema), "s")
    with pytest.raises(InvalidInput) as refused:
        await run(engine, ASK, SamplingOptions(max_tokens=8, response_format=fmt))
    assert refused.value.param == "response_format"
    assert words in str(refused.value)
    assert engine.load.running == 0 and engine.load.queued == 0  # refused before it took a slot


class CountingLlama:
    """The real llama_cpp module, counting the sampler calls the decode loop makes through it."""

    COUNTED = ("llama_sampler_chain_init", "llama_sampler_free", "llama_sampler_init_grammar")

    def __init__(self, real: Any) -> None:
        self._real = real
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if name not in self.COUNTED:
            return attr

        def counted(*args: Any) -> Any:
            self.calls[name] += 1
            return attr(*args)

        return counted


async def test_every_sampler_is_freed_with_its_sequence(engine: LlamaCppEngine) -> None:
    """100 constrained requests, ended every way a sequence ends: the grammar's end, max_tokens, and the
    client going away mid-stream. Each chain and each grammar is freed exactly once."""
    loop = engine._loop
    assert loop is not None and loop.running == 0
    counting = CountingLlama(loop._ll)
    loop._ll = counting
    tiny = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    done = ResponseFormat("json_schema", json.dumps(tiny), "tiny")
    finished: collections.Counter[str] = collections.Counter()

    async def cancelled_after_first_chunk() -> None:
        stream = engine.generate(ASK, SamplingOptions(max_tokens=300, temperature=0.8, response_format=AS_PERSON))
        async for event in stream:
            if isinstance(event, TextChunk):
                break
        await stream.aclose()  # type: ignore[attr-defined]
        finished["cancelled"] += 1

    async def completed(options: SamplingOptions) -> None:
        _, end = await run(engine, ASK, options)
        finished[end.reason] += 1

    try:
        for _ in range(10):  # 10 rounds of 10: 6 complete, 2 cut by max_tokens, 2 cancelled
            await asyncio.gather(
                *(completed(SamplingOptions(max_tokens=40, temperature=0.8, response_format=done)) for _ in range(6)),
                *(completed(SamplingOptions(max_tokens=2, response_format=AS_PERSON)) for _ in range(2)),
                *(cancelled_after_first_chunk() for _ in range(2)),
            )
        for _ in range(100):  # a cancelled sequence leaves the batch at the decode thread's next step
            if loop.running == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        loop._ll = counting._real
    assert finished == {"stop": 60, "length": 20, "cancelled": 20}
    assert counting.calls["llama_sampler_init_grammar"] == 100
    assert counting.calls["llama_sampler_chain_init"] == 100
    assert counting.calls["llama_sampler_free"] == 200  # each chain and each grammar, once
    assert loop.running == 0


def grammar_allows(engine: LlamaCppEngine, schema: dict[str, Any], text: str) -> bool:
    """Whether llama.cpp's grammar sampler, with the grammar the engine makes of `schema`, lets the model write
    exactly `text` (each of its tokens allowed in turn, then the end of generation)."""
    return gbnf_allows(engine, schema_grammar(json.dumps(schema)), text)


def gbnf_allows(engine: LlamaCppEngine, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler with `grammar` (root `root`) lets the engine's model write exactly
    `text` (each of its tokens allowed in turn, then the end of generation)."""
    import llama_cpp

    llm = engine._llm
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    assert sampler, grammar
    try:
        for token in [*llm.tokenize(text.encode(), add_bos=False, special=False), llm.token_eos()]:
            one = llama_cpp.llama_token_data(token, 0.0, 0.0)
            llama_cpp.llama_sampler_apply(
                sampler, ctypes.byref(llama_cpp.llama_token_data_array(ctypes.pointer(one), 1, -1, False))
            )
            if one.logit == -math.inf:
                return False
            if token != llm.token_eos():
                llama_cpp.llama_sampler_accept(sampler, token)  # never a forbidden one: llama.cpp would abort
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ('"2024-02-29"', True),  # a leap year
        ('"2000-02-29"', True),  # a century divisible by 400
        ('"2023-12-31"', True),
        ('"1999-04-30"', True),
        ('"0001-01-01"', True),
        ('"2023-02-29"', False),  # the converter's own date rule allowed these
        ('"1900-02-29"', False),
        ('"2023-04-31"', False),
        ('"2023-02-30"', False),
        ('"0000-01-01"', False),
        ('"2023-13-01"', False),
    ],
)
def test_a_date_is_a_date_of_the_calendar(engine: LlamaCppEngine, text: str, allowed: bool) -> None:
    assert grammar_allows(engine, {"type": "string", "format": "date"}, text) is allowed
    assert grammar_allows(engine, {"type": "string", "format": "date-time"}, text[:-1] + 'T10:00:00Z"') is allowed


@pytest.mark.parametrize(
    ("pattern", "text", "allowed"),
    [
        # JSON Schema's patterns match anywhere; the grammar takes the whole string to match (which satisfies
        # them too), with or without the anchors, as Pydantic writes them.
        (r"\d{3}-\d{4}", "555-1234", True),
        (r"\d{3}-\d{4}", "55-1234", False),
        (r"\d{3}-\d{4}", "555-12345", False),
        (r"^[A-Z]{2}\d{2}$", "AB12", True),
        (r"^[A-Z]{2}\d{2}$", "ab12", False),
        (r"[a-z]+\.com", "abc.com", True),
        (r"[a-z]+\.com", "abcxcom", False),
        (r"\w+@\w+", "a_b@c1", True),
        (r"\w+@\w+", "a b@c", False),
        (r"[\d-]+", "12-3", True),
        (r"[\d-]+", "12a", False),
    ],
)
def test_a_pattern_is_enforced_as_a_whole_string(
    engine: LlamaCppEngine, pattern: str, text: str, allowed: bool
) -> None:
    assert grammar_allows(engine, {"type": "string", "pattern": pattern}, json.dumps(text)) is allowed


TREE_BY_ROOT_REF = {  # OpenAI's own form of a recursive schema: "#" is the whole schema
    "type": "object",
    "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
    "required": ["name", "children"],
    "additionalProperties": False,
}
TREE_BY_DEFINITION = {  # Pydantic's: the root is a $ref to a definition that refers to itself
    "$defs": {
        "Tree": {
            **TREE_BY_ROOT_REF,
            "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Tree"}},
            },
        }
    },
    "$ref": "#/$defs/Tree",
}


@pytest.mark.parametrize("schema", [TREE_BY_ROOT_REF, TREE_BY_DEFINITION], ids=["ref-#", "root-ref-to-defs"])
@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ('{"name": "a", "children": []}', True),
        ('{"name": "a", "children": [{"name": "b", "children": [{"name": "c", "children": []}]}]}', True),
        ('{"name": "a", "children": [{"name": "b"}]}', False),  # a child is a tree too: "children" required
        ('{"name": "a", "children": [{"name": "b", "children": [1]}]}', False),
    ],
)
def test_a_recursive_schema_is_enforced_at_every_depth(
    engine: LlamaCppEngine, schema: dict[str, Any], text: str, allowed: bool
) -> None:
    assert grammar_allows(engine, schema, text) is allowed
