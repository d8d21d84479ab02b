"""Several choices (`n` > 1) in the llama.cpp engine, with the real model: the prompt is computed once and its
KV cache copied to the other choices' slots (the engine's own counters show it), each choice has its own
sampler and seed (greedy choices equal the n = 1 answer; seeded ones differ and come back the same), its
own stop strings, logprobs and grammar, and a request that goes away frees all its slots."""

from __future__ import annotations

import asyncio
import collections
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jsonschema_rs
import pytest
import pytest_asyncio

from node_agent.engines.base import (
    Chat,
    ChoiceEnd,
    EngineUnavailable,
    Finished,
    InvalidInput,
    Message,
    Prompt,
    ResponseFormat,
    SamplingOptions,
    TextChunk,
    TokenLogprob,
)
from node_agent.engines.llamacpp import LlamaCppEngine
from tests.model_engine import default_model_engine
from tests.test_structured_outputs_engine import CountingLlama

pytestmark = [pytest.mark.model]

SLOTS = 4
POEM = Chat((Message("user", "Write a short poem about the sea."),))


@pytest_asyncio.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    async with default_model_engine(SLOTS) as built:
        yield built


@dataclass
class Reply:
    texts: dict[int, str] = field(default_factory=lambda: collections.defaultdict(str))
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=lambda: collections.defaultdict(list))
    ends: dict[int, str] = field(default_factory=dict)
    finished: Finished | None = None
    order: list[str] = field(default_factory=list)  # the events' kinds, in order

    def choices(self, n: int) -> list[str]:
        return [self.texts[i] for i in range(n)]


async def run(engine: LlamaCppEngine, prompt: Prompt, options: SamplingOptions) -> Reply:
    reply = Reply()
    async for event in engine.generate(prompt, options):
        reply.order.append(type(event).__name__)
        if isinstance(event, TextChunk):
            reply.texts[event.index] += event.text
            reply.logprobs[event.index].extend(event.logprobs)
        elif isinstance(event, ChoiceEnd):
            assert event.index not in reply.ends, f"choice {event.index} ended twice"
            reply.ends[event.index] = event.reason
        else:
            reply.finished = event
    assert reply.finished is not None and reply.order[-1] == "Finished"
    return reply


async def test_greedy_choices_are_the_single_answer_and_usage_counts_the_prompt_once(engine: LlamaCppEngine) -> None:
    one = await run(engine, POEM, SamplingOptions(max_tokens=40, temperature=0))
    four = await run(engine, POEM, SamplingOptions(max_tokens=40, temperature=0, n=4))
    assert four.choices(4) == [one.texts[0]] * 4
    assert set(four.ends) == {0, 1, 2, 3} and "ChoiceEnd" not in one.order  # n = 1 ends with Finished alone
    assert four.ends[0] == one.finished.reason  # type: ignore[union-attr]
    assert four.finished is not None and one.finished is not None
    assert four.finished.prompt_tokens == one.finished.prompt_tokens
    assert four.finished.completion_tokens == 4 * one.finished.completion_tokens


async def test_seeded_choices_differ_and_the_same_seed_gives_them_again(engine: LlamaCppEngine) -> None:
    options = SamplingOptions(max_tokens=32, temperature=1.0, seed=1234, n=4)
    first, again = await run(engine, POEM, options), await run(engine, POEM, options)
    assert len(set(first.choices(4))) == 4, first.texts
    assert again.choices(4) == first.choices(4)
    # Choice i is seeded with seed + i: choice 1 of seed 1234 is choice 0 of seed 1235.
    shifted = await run(engine, POEM, SamplingOptions(max_tokens=32, temperature=1.0, seed=1235, n=1))
    assert shifted.texts[0] == first.texts[1]


async def test_without_a_seed_the_choices_still_differ(engine: LlamaCppEngine) -> None:
    reply = await run(engine, POEM, SamplingOptions(max_tokens=32, temperature=1.0, n=4))
    assert len(set(reply.choices(4))) == 4, reply.texts  # 32 tokens at temperature 1: never all alike by chance


async def test_the_prompt_is_computed_once_and_copied_to_the_other_choices(engine: LlamaCppEngine) -> None:
    """The engine's own counters: a fresh prompt (no prefix of it cached anywhere) of P tokens for n = 4 is
    computed by llama_decode once, and the three other choices get its KV by copy, not by computing it."""
    fresh = Chat((Message("user", f"{uuid.uuid4().hex} Tell me about lighthouses, in detail. " * 6),))
    prompt_tokens = len(await engine.tokenize(fresh))
    stats = engine.stats
    assert stats is not None
    before = (stats.computed_prompt_tokens, stats.forked_prompt_tokens, stats.reused_prompt_tokens)
    reply = await run(engine, fresh, SamplingOptions(max_tokens=8, temperature=0, n=4))
    computed, forked, reused = (now - then for now, then in zip(
        (stats.computed_prompt_tokens, stats.forked_prompt_tokens, stats.reused_prompt_tokens), before, strict=True
    ))  # fmt: skip
    assert reply.finished is not None and reply.finished.prompt_tokens == prompt_tokens
    assert computed + reused == prompt_tokens, (computed, reused)  # once, part of it maybe from the prefix cache
    assert computed > prompt_tokens // 2  # the random text at the start: most of it is new
    assert forked == 3 * prompt_tokens


async def test_n_above_the_slots_is_refused_naming_n(engine: LlamaCppEngine) -> None:
    with pytest.raises(InvalidInput) as refused:
        await run(engine, POEM, SamplingOptions(max_tokens=4, n=SLOTS + 1))
    assert refused.value.param == "n"
    assert engine.load.running == 0 and engine.load.queued == 0


async def test_requests_for_every_slot_wait_their_turn_and_all_complete(engine: LlamaCppEngine) -> None:
    """Three requests of n = 4 on 4 slots, and singles between them: each waits until it has its 4 slots
    (first come, first served), and every answer is the one it gets alone."""
    greedy = SamplingOptions(max_tokens=16, temperature=0)
    alone = (await run(engine, POEM, greedy)).texts[0]
    replies = await asyncio.gather(
        run(engine, POEM, SamplingOptions(max_tokens=16, temperature=0, n=4)),
        run(engine, POEM, greedy),
        run(engine, POEM, SamplingOptions(max_tokens=16, temperature=0, n=4)),
        run(engine, POEM, greedy),
        run(engine, POEM, SamplingOptions(max_tokens=16, temperature=0, n=4)),
    )
    for reply in replies:
        assert set(reply.texts.values()) == {alone}


async def test_stop_strings_apply_to_each_choice(engine: LlamaCppEngine) -> None:
    options = SamplingOptions(max_tokens=60, temperature=1.0, seed=7, n=4, stops=("\n",))
    reply = await run(engine, POEM, options)
    assert set(reply.ends) == {0, 1, 2, 3}
    for index in range(4):
        assert "\n" not in reply.texts[index], reply.texts[index]
    assert "stop" in reply.ends.values()  # a poem's first line ends: the stop string cut it there


async def test_each_choice_has_its_own_logprobs(engine: LlamaCppEngine) -> None:
    options = SamplingOptions(max_tokens=24, temperature=1.0, seed=3, n=3, logprobs=True, top_logprobs=2)
    reply = await run(engine, POEM, options)
    for index in range(3):
        entries = reply.logprobs[index]
        assert b"".join(e.token_bytes for e in entries).decode() == reply.texts[index]
        offsets = [e.text_offset for e in entries]
        assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(reply.texts[index])  # its own
        assert all(e.logprob <= 0 and len(e.top) == 2 for e in entries)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer"},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


async def test_each_choice_keeps_to_the_schema_with_its_own_grammar(engine: LlamaCppEngine) -> None:
    ask = Chat((Message("user", "Describe a fictional person with a name, an age and a color, as JSON."),))
    fmt = ResponseFormat("json_schema", json.dumps(PERSON), "person")
    stats = engine.stats
    assert stats is not None
    grammars = stats.grammars
    reply = await run(engine, ask, SamplingOptions(max_tokens=200, temperature=1.0, seed=11, n=4, response_format=fmt))
    validator = jsonschema_rs.validator_for(PERSON)
    for index in range(4):
        assert reply.ends[index] == "stop", reply.texts[index]
        validator.validate(json.loads(reply.texts[index]))
    assert stats.grammars - grammars == 4
    assert len(set(reply.choices(4))) > 1  # sampled, each with its own grammar state


async def test_a_request_that_goes_away_frees_all_its_slots_and_samplers(engine: LlamaCppEngine) -> None:
    loop = engine._loop
    assert loop is not None
    counting = CountingLlama(loop._ll)
    loop._ll = counting
    try:
        stream = engine.generate(POEM, SamplingOptions(max_tokens=500, temperature=1.0, n=4))
        seen: set[int] = set()
        async for event in stream:  # until every choice has sent text: all four are decoding
            if isinstance(event, TextChunk):
                seen.add(event.index)
                if len(seen) == 4:
                    break
        assert loop.running == 4
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(100):  # the decode thread drops the sequences at its next step
            if loop.running == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        loop._ll = counting._real
    assert loop.running == 0
    assert counting.calls["llama_sampler_chain_init"] == 4
    assert counting.calls["llama_sampler_free"] == 4
    # The slots take the next request at once.
    assert (await run(engine, POEM, SamplingOptions(max_tokens=4, temperature=0, n=4))).finished is not None


async def test_a_request_whose_sampler_cannot_be_made_fails_and_frees_what_was_made(engine: LlamaCppEngine) -> None:
    """n = 3 with a schema, and the second choice's sampler chain fails (as an allocation in llama.cpp could):
    the request fails with that error (as EngineUnavailable), and the two grammars and the one chain made
    for it are freed, the grammar of the failing choice too."""
    loop = engine._loop
    assert loop is not None and loop.running == 0
    counting = CountingLlama(loop._ll)
    loop._ll = counting
    real_sampler = loop._sampler
    made = 0

    def failing_second(options: SamplingOptions, index: int = 0) -> object:
        nonlocal made
        made += 1
        if made == 2:
            raise MemoryError("no memory for a sampler chain")
        return real_sampler(options, index)

    loop._sampler = failing_second  # type: ignore[method-assign]
    fmt = ResponseFormat("json_schema", json.dumps(PERSON), "person")
    ask = Chat((Message("user", "Describe a person as JSON."),))
    try:
        with pytest.raises(EngineUnavailable, match="no memory for a sampler chain"):
            await run(engine, ask, SamplingOptions(max_tokens=8, temperature=1.0, n=3, response_format=fmt))
    finally:
        loop._sampler = real_sampler  # type: ignore[method-assign]
        loop._ll = counting._real
    assert counting.calls["llama_sampler_init_grammar"] == 2
    assert counting.calls["llama_sampler_chain_init"] == 1
    assert counting.calls["llama_sampler_free"] == 3  # one chain and both grammars
    assert loop.running == 0
    assert (await run(engine, POEM, SamplingOptions(max_tokens=4, temperature=0, n=3))).finished is not None
