"""Tool calls in the llama.cpp engine, with the real model (SmolLM2-135M, whose template has no tool format:
the generic one is injected): the grammar keeps every call to its function's schema whatever the
tool_choice, "auto" still answers in text and calls when the model writes the trigger, "none" renders no
tools, a constrained request leaves the others of its batch alone, a lazy grammar's trigger never
replays text its grammar refuses (llama.cpp would abort the process), and tools beside a response_format
give calls or content in its schema."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import jsonschema_rs
import pytest
import pytest_asyncio

from node_agent.engines.base import (
    Chat,
    Finished,
    Function,
    GenerationEvent,
    InvalidInput,
    Message,
    ResponseFormat,
    SamplingOptions,
    TextChunk,
    ToolCall,
    ToolCallChunk,
    ToolChoice,
)
from node_agent.engines.llamacpp import LlamaCppEngine
from node_agent.engines.llamacpp_batch import BatchRequest, Trigger
from node_agent.engines.tool_calls import tool_grammar
from tests.model_engine import default_model_engine
from tests.test_structured_outputs_engine import gbnf_allows

pytestmark = [pytest.mark.model]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIMEZONE = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}}, "required": ["timezone"]}
TOOLS = (
    Function("get_weather", "Get the current weather in a city", json.dumps(WEATHER)),
    Function("get_time", "Get the current time in a timezone", json.dumps(TIMEZONE)),
)
SCHEMAS = {"get_weather": jsonschema_rs.validator_for(WEATHER), "get_time": jsonschema_rs.validator_for(TIMEZONE)}
ASK = (Message("user", "What is the weather like in Paris today?"),)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
# The model does not call tools of its own accord; asked to repeat a call's block, it often does (and
# otherwise writes text): how "auto" is seen to call here.
REPEAT = (Message("user", f"Repeat exactly this text: {CALL}"),)
FREE_PROMPTS = ["The capital of France is", "Water boils at", "The three primary colors are", "In 1969, astronauts"]


@pytest_asyncio.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    async with default_model_engine(8, context_size=2048) as built:
        yield built


async def run(engine: LlamaCppEngine, prompt: Chat | str, options: SamplingOptions) -> list[GenerationEvent]:
    return [event async for event in engine.generate(prompt, options)]


def content(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


def finished(events: list[GenerationEvent]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished)
    return last


def check_calls(events: list[GenerationEvent]) -> None:
    """Every call's arguments parse and validate against its function's schema, and its streamed chunks
    (first: id and name; then pieces of the arguments) reassemble to it."""
    calls = finished(events).tool_calls
    chunks = [e for e in events if isinstance(e, ToolCallChunk)]
    for index, call in enumerate(calls):
        SCHEMAS[call.name].validate(json.loads(call.arguments))
        mine = [c for c in chunks if c.index == index]
        assert (mine[0].id, mine[0].name) == (call.id, call.name)
        assert "".join(c.arguments for c in mine) == call.arguments


async def test_smollm2_s_template_has_no_tool_format_so_the_generic_one_is_injected(engine: LlamaCppEngine) -> None:
    assert not engine._native_tools
    rendered = engine._render_chat(Chat(ASK, tools=TOOLS))
    assert rendered.startswith("<|im_start|>system\n# Tools\n")  # a system message added for the section
    assert '<tool_call>\n{"name": "<function name>", "arguments": <the arguments, a JSON object>}' in rendered
    assert json.dumps({"type": "function", "function": {"name": "get_time", "description": TOOLS[1].description,
                                                        "parameters": TIMEZONE}}) in rendered  # fmt: skip


async def test_required_calls_validate_against_their_schemas(engine: LlamaCppEngine) -> None:
    chat = Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("required"), parallel_tool_calls=False)
    options = [SamplingOptions(max_tokens=200, temperature=1.0, seed=s) for s in range(8)]
    replies = await asyncio.gather(*(run(engine, chat, o) for o in options))
    for events in replies:
        end = finished(events)
        assert end.reason == "tool_calls" and len(end.tool_calls) == 1, events
        assert content(events) == ""  # from the first token, the grammar allows only the call
        check_calls(events)
    assert len({finished(e).tool_calls[0].arguments for e in replies}) >= 3  # sampled, not one forced answer


async def test_a_named_function_is_the_one_called(engine: LlamaCppEngine) -> None:
    chat = Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("function", "get_time"))
    replies = await asyncio.gather(
        *(run(engine, chat, SamplingOptions(max_tokens=200, temperature=0.8, seed=s)) for s in range(4))
    )
    for events in replies:
        end = finished(events)
        assert end.reason == "tool_calls" and [c.name for c in end.tool_calls] == ["get_time"], events
        check_calls(events)


async def test_auto_answers_in_text_or_calls_when_the_model_writes_the_tag(engine: LlamaCppEngine) -> None:
    greeting = Chat((Message("user", "Hi! How are you?"),), tools=TOOLS, tool_choice=ToolChoice("auto"))
    events = await run(engine, greeting, SamplingOptions(max_tokens=100, temperature=0))
    assert finished(events).reason == "stop" and finished(events).tool_calls == ()
    assert content(events).strip()
    chat = Chat(REPEAT, tools=TOOLS, tool_choice=ToolChoice("auto"), parallel_tool_calls=False)
    called = []
    for attempt in range(2):  # bounded: sampled, about half of the replies call
        options = [SamplingOptions(max_tokens=80, temperature=0.7, seed=8 * attempt + s) for s in range(8)]
        for events in await asyncio.gather(*(run(engine, chat, o) for o in options)):
            text = content(events)
            assert "<tool_call" not in text, text  # a tag starts a call; no part of it is content
            if finished(events).tool_calls:
                assert finished(events).reason in ("tool_calls", "length")
                called.append(events)
        if called:
            break
    assert called, "no reply called the tool in 16 tries"
    for events in called:
        if finished(events).reason == "tool_calls":
            check_calls(events)


async def test_none_renders_no_tools_and_makes_no_calls(engine: LlamaCppEngine) -> None:
    plain = await engine.tokenize(Chat(ASK))
    assert await engine.tokenize(Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("none"))) == plain
    assert len(await engine.tokenize(Chat(ASK, tools=TOOLS))) > len(plain) + 100  # auto: the tools are listed
    events = await run(engine, Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("none")), SamplingOptions(max_tokens=40))
    assert finished(events).tool_calls == () and not any(isinstance(e, ToolCallChunk) for e in events)


async def test_a_tool_result_in_the_history_reaches_the_model(engine: LlamaCppEngine) -> None:
    chat = Chat(
        (
            *ASK,
            Message("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),)),
            Message("tool", "It is 31 degrees and sunny in Paris.", tool_call_id="call_1"),
        ),
        tools=TOOLS,
    )
    rendered = engine._render_chat(chat)
    assert CALL in rendered
    assert "<tool_response>\nIt is 31 degrees and sunny in Paris.\n</tool_response>" in rendered
    events = await run(engine, chat, SamplingOptions(max_tokens=60, temperature=0))
    assert finished(events).reason in ("stop", "length") and content(events).strip()


async def test_a_tool_constrained_request_leaves_the_others_of_its_batch_alone(engine: LlamaCppEngine) -> None:
    greedy = SamplingOptions(max_tokens=32, temperature=0)
    alone = [content(await run(engine, p, greedy)) for p in FREE_PROMPTS]
    stats = engine.stats
    assert stats is not None
    grammars_before = stats.grammars
    constrained = [
        Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("required")),
        Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("function", "get_time")),
        Chat(REPEAT, tools=TOOLS, tool_choice=ToolChoice("auto")),
        Chat(REPEAT, tools=TOOLS, tool_choice=ToolChoice("auto")),
    ]
    together = await asyncio.gather(
        *(run(engine, p, greedy) for p in FREE_PROMPTS),
        *(run(engine, c, SamplingOptions(max_tokens=120, temperature=0.8, seed=i)) for i, c in enumerate(constrained)),
    )
    assert [content(events) for events in together[:4]] == alone
    assert stats.grammars - grammars_before == 4
    for events in together[4:6]:
        check_calls(events)


async def lazy(engine: LlamaCppEngine, prompt: str, grammar: str, trigger: Trigger) -> str:
    """The engine's decode loop run on a raw prompt with a lazy grammar: the text generated (greedy)."""
    loop = engine._loop
    assert loop is not None
    queue: asyncio.Queue[object] = asyncio.Queue()
    tokens = await engine.tokenize(prompt)
    loop.submit(BatchRequest(tokens, SamplingOptions(temperature=0), 12, queue.put_nowait, grammar, "tools", trigger))
    parts = []
    while not isinstance(item := await asyncio.wait_for(queue.get(), 60), Finished):
        assert isinstance(item, TextChunk), item
        parts.append(item.text)
    return "".join(parts)


async def test_a_lazy_grammar_starts_at_its_trigger_even_mid_token(engine: LlamaCppEngine) -> None:
    """Greedy, the model goes on " Paris" (one token): the trigger " Par" is inside it, and the grammar gets
    the rest of the token ("is") replayed and constrains what follows."""
    free = await run(engine, "The capital of France is", SamplingOptions(max_tokens=12, temperature=0))
    assert content(free).startswith(" Paris")
    text = await lazy(engine, "The capital of France is", 'root ::= " Paris" [a-z]*', Trigger(" Par", ("is",)))
    assert text.startswith(" Paris") and text[len(" Paris") :].isalpha(), text


async def test_a_token_that_would_start_a_lazy_grammar_with_text_it_refuses_is_not_sampled(
    engine: LlamaCppEngine,
) -> None:
    """The same, with a grammar that wants "X" after " Par": " Paris" would replay "is" into it, which
    llama.cpp answers by aborting the process. The token is set aside and another sampled instead."""
    stats = engine.stats
    assert stats is not None
    before = stats.trigger_resamples
    text = await lazy(engine, "The capital of France is", 'root ::= " ParX" [a-z]*', Trigger(" Par", ("X",)))
    assert not text.startswith(" Paris"), text
    assert stats.trigger_resamples > before


ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 60}},
    "required": ["answer"],
    "additionalProperties": False,
}
ANSWER_FORMAT = ResponseFormat("json_schema", json.dumps(ANSWER), "answer")


def calls_or_answer(events: list[GenerationEvent]) -> str:
    """Which a reply under tools and ANSWER_FORMAT is, "calls" or "answer", after checking it is one of them
    whole: valid calls and no content, or content valid against ANSWER and no calls ("cut" when max_tokens
    ended it first)."""
    end = finished(events)
    if end.reason == "length":
        assert not (end.tool_calls and content(events)), events
        return "cut"
    if end.tool_calls:
        assert end.reason == "tool_calls" and content(events) == "", events
        check_calls(events)
        return "calls"
    assert end.reason == "stop", events
    jsonschema_rs.validator_for(ANSWER).validate(json.loads(content(events)))
    return "answer"


async def test_tools_beside_a_response_format_give_calls_or_content_in_its_schema(engine: LlamaCppEngine) -> None:
    """OpenAI's agents send both: the tools the model may call and the schema of its final answer. Under
    "auto" the grammar allows calls or content in the schema from the first token, and nothing else."""
    auto = Chat(REPEAT, tools=TOOLS, tool_choice=ToolChoice("auto"), parallel_tool_calls=False)
    grammar, trigger = tool_grammar(auto, content=ANSWER_FORMAT.schema)
    assert trigger is None  # not lazy: there is no free text for a call to follow
    assert gbnf_allows(engine, grammar, CALL)
    assert gbnf_allows(engine, grammar, '{"answer": "It is sunny in Paris."}')
    assert not gbnf_allows(engine, grammar, "It is sunny in Paris.")  # free text
    assert not gbnf_allows(engine, grammar, '{"answer": "sunny", "city": "Paris"}')  # not the schema
    assert not gbnf_allows(engine, grammar, "Sure! " + CALL)  # text before a call is content, not JSON

    kinds = []
    for chat in (auto, Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("auto"))):
        options = [
            SamplingOptions(max_tokens=200, temperature=0.8, seed=s, response_format=ANSWER_FORMAT) for s in range(4)
        ]
        kinds += [calls_or_answer(events) for events in await asyncio.gather(*(run(engine, chat, o) for o in options))]
    greedy = SamplingOptions(max_tokens=120, temperature=0, response_format=ANSWER_FORMAT)
    kinds.append(calls_or_answer(await run(engine, Chat((Message("user", "Hi! How are you?"),), tools=TOOLS), greedy)))
    assert "answer" in kinds, kinds

    # A reply that must call has no content: the schema changes nothing, and the call is made.
    required = Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("required"), parallel_tool_calls=False)
    events = await run(engine, required, SamplingOptions(max_tokens=200, temperature=0, response_format=ANSWER_FORMAT))
    assert calls_or_answer(events) == "calls"
    # A response_format the grammar cannot enforce is refused beside tools as alone, naming it.
    unenforceable = ResponseFormat("json_schema", json.dumps({"type": "integer", "minimum": 3}), "x")
    with pytest.raises(InvalidInput) as refused:
        await run(engine, auto, SamplingOptions(max_tokens=20, response_format=unenforceable))
    assert refused.value.param == "response_format"


async def test_tools_beside_json_object_give_calls_or_an_object(engine: LlamaCppEngine) -> None:
    chat = Chat((Message("user", "Hi! How are you?"),), tools=TOOLS)
    grammar, _ = tool_grammar(chat, content='{"type": "object"}')
    assert gbnf_allows(engine, grammar, '{"mood": "good", "n": [1, 2]}')
    assert gbnf_allows(engine, grammar, CALL)
    assert not gbnf_allows(engine, grammar, '"just a string"')
    events = await run(
        engine, chat, SamplingOptions(max_tokens=80, temperature=0, response_format=ResponseFormat("json_object"))
    )
    end = finished(events)
    if not end.tool_calls:
        assert end.reason == "stop" and isinstance(json.loads(content(events)), dict), events


async def test_a_stop_string_ends_free_text_but_never_cuts_a_call(engine: LlamaCppEngine) -> None:
    """`stop` is about the content. A call's text is the grammar's: a stop string in it ended the reply with
    arguments that did not parse (`{ "city": "Paris" `, finish_reason "stop")."""
    required = Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("required"), parallel_tool_calls=False)
    for stops in (("}",), ('"',), ("Paris", ":")):
        events = await run(engine, required, SamplingOptions(max_tokens=200, temperature=0, stops=stops))
        assert finished(events).reason == "tool_calls" and len(finished(events).tool_calls) == 1, (stops, events)
        check_calls(events)
    # Under "auto" a stop string still ends the free text before any call.
    greeting = Chat((Message("user", "Hi! How are you?"),), tools=TOOLS)
    free = content(await run(engine, greeting, SamplingOptions(max_tokens=60, temperature=0)))
    word = free.split()[2]
    cut = await run(engine, greeting, SamplingOptions(max_tokens=60, temperature=0, stops=(word,)))
    assert finished(cut).reason == "stop" and content(cut) == free[: free.index(word)], (free, word)
    # And once the model writes the tag, the call is whole.
    auto = Chat(REPEAT, tools=TOOLS, tool_choice=ToolChoice("auto"), parallel_tool_calls=False)
    called: list[list[GenerationEvent]] = []
    for attempt in range(2):  # bounded: sampled, about half of the replies call
        options = [
            SamplingOptions(max_tokens=120, temperature=0.7, seed=8 * attempt + s, stops=("}", "Paris"))
            for s in range(8)
        ]
        replies = await asyncio.gather(*(run(engine, auto, o) for o in options))
        called += [events for events in replies if finished(events).tool_calls]
        if called:
            break
    assert called, "no reply called the tool in 16 tries"
    for events in called:
        assert finished(events).reason in ("tool_calls", "length"), events
        if finished(events).reason == "tool_calls":
            check_calls(events)
