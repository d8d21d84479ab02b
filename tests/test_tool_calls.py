"""Tool calling through the edge, with the official openai client and over gRPC, answered by SmolLM2 on the
llama.cpp engine (generic format, calls constrained by grammar): tool_choice required, a named function,
auto and none behave as OpenAI documents them; sampled calls always validate against their schemas;
streamed deltas reassemble to the same calls; tools beside a response_format give calls or an answer in
its schema; what is malformed or cannot be enforced is a 400 (INVALID_ARGUMENT) naming the field."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import grpc
import httpx
import jsonschema_rs
import openai
import pydantic
import pytest
from google.protobuf import duration_pb2  # noqa: F401 - registers well-known types for ErrorInfo

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import FleetError
from tests.conftest import Mesh
from tests.test_metrics import scrape, value

pytestmark = [pytest.mark.model, pytest.mark.cluster]

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
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIMEZONE}},
]
SCHEMAS = {"get_weather": jsonschema_rs.validator_for(WEATHER), "get_time": jsonschema_rs.validator_for(TIMEZONE)}
ASK: list[Any] = [{"role": "user", "content": "What is the weather like in Paris today?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
# SmolLM2-135M does not call tools of its own accord; asked to repeat a call's block, it often does.
REPEAT: list[Any] = [{"role": "user", "content": f"Repeat exactly this text: {CALL}"}]
GET_TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)


def validate(calls: Any) -> None:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        SCHEMAS[call.function.name].validate(json.loads(call.function.arguments))


def test_twenty_sampled_required_calls_all_validate(client: openai.OpenAI, mesh: Mesh) -> None:
    def ask(seed: int) -> Any:
        return client.chat.completions.create(
            model=mesh.model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        ).choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, range(20)))
    for choice in choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        validate(choice.message.tool_calls)
    assert len({c.message.tool_calls[0].function.arguments for c in choices}) >= 5  # sampled, all valid


def test_required_with_parallel_calls_gives_one_or_more_valid_calls(client: openai.OpenAI, mesh: Mesh) -> None:
    for seed in range(3):
        choice = client.chat.completions.create(
            model=mesh.model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed,
            max_tokens=300,
        ).choices[0]  # fmt: skip
        calls = choice.message.tool_calls or []
        assert calls and choice.finish_reason in ("tool_calls", "length"), choice
        # A reply cut by max_tokens may end in a call cut short (as with OpenAI); every other one is whole.
        validate(calls if choice.finish_reason == "tool_calls" else calls[:-1])
        assert len({c.id for c in calls}) == len(calls)


def test_a_named_function_is_the_one_called(client: openai.OpenAI, mesh: Mesh) -> None:
    for seed in range(3):
        choice = client.chat.completions.create(
            model=mesh.model, messages=ASK, tools=TOOLS, tool_choice=GET_TIME, temperature=0.8, seed=seed,
            max_tokens=200,
        ).choices[0]  # fmt: skip
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        validate(choice.message.tool_calls)


def test_auto_answers_in_text_or_calls(client: openai.OpenAI, mesh: Mesh) -> None:
    greeting = client.chat.completions.create(
        model=mesh.model, messages=[{"role": "user", "content": "Hi! How are you?"}], tools=TOOLS, temperature=0,
        max_tokens=100,
    ).choices[0]  # fmt: skip
    assert greeting.finish_reason == "stop" and not greeting.message.tool_calls
    assert (greeting.message.content or "").strip()

    def ask(seed: int) -> Any:
        return client.chat.completions.create(
            model=mesh.model, messages=REPEAT, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False,
            temperature=0.7, seed=seed, max_tokens=80,
        ).choices[0]  # fmt: skip

    called = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for attempt in range(2):  # bounded: about half of these replies call
            for choice in pool.map(ask, range(8 * attempt, 8 * attempt + 8)):
                assert "<tool_call" not in (choice.message.content or "")
                if choice.message.tool_calls:
                    called.append(choice)
            if called:
                break
    assert called, "no reply called the tool in 16 tries"
    for choice in called:
        if choice.finish_reason == "tool_calls":
            validate(choice.message.tool_calls)


class Answer(pydantic.BaseModel):
    """The final answer's shape, as an agent framework gives it (OpenAI Agents SDK's output_type)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    answer: str = pydantic.Field(max_length=60)


def test_tools_beside_a_response_format_give_calls_or_an_answer_in_its_schema(
    client: openai.OpenAI, mesh: Mesh
) -> None:
    """An agent sends the tools and the schema of its final answer in one request (the SDK's parse helper): each
    reply is either valid calls or content that parses as the schema, streamed or not."""

    # The parse helper takes strict functions only (strict: additionalProperties false, every property required).
    strict = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]

    def ask(seed: int, messages: list[Any]) -> Any:
        return client.beta.chat.completions.parse(
            model=mesh.model, messages=messages, tools=strict, response_format=Answer, parallel_tool_calls=False,
            temperature=0.8, seed=seed, max_tokens=200,
        ).choices[0]  # fmt: skip

    kinds = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for choice in pool.map(ask, range(8), [REPEAT] * 4 + [ASK] * 4):
            if choice.finish_reason == "length":  # cut by max_tokens: neither whole
                kinds.append("cut")
            elif choice.message.tool_calls:
                assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
                validate(choice.message.tool_calls)
                kinds.append("calls")
            else:
                assert choice.finish_reason == "stop", choice
                assert isinstance(choice.message.parsed, Answer), choice  # the SDK parsed the content
                kinds.append("answer")
    assert "answer" in kinds, kinds

    stream = client.chat.completions.create(
        model=mesh.model, messages=[{"role": "user", "content": "Hi! How are you?"}], tools=TOOLS,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": Answer.model_json_schema(),
                                                                 "strict": True}},
        temperature=0, max_tokens=120, stream=True,
    )  # fmt: skip
    text, calls, reasons = "", [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        calls += delta.tool_calls or []
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    if not calls:
        assert reasons == ["stop"] and Answer.model_validate_json(text)
    # A reply that must call has no content: the schema is no reason to refuse it.
    forced = client.chat.completions.create(
        model=mesh.model, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        response_format={"type": "json_object"}, temperature=0, max_tokens=120,
    ).choices[0]  # fmt: skip
    assert forced.finish_reason == "tool_calls" and forced.message.tool_calls
    validate(forced.message.tool_calls)


def test_none_renders_no_tools_and_calls_nothing(client: openai.OpenAI, mesh: Mesh) -> None:
    plain = client.chat.completions.create(model=mesh.model, messages=ASK, max_tokens=8, temperature=0)
    none = client.chat.completions.create(
        model=mesh.model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert none.usage is not None and plain.usage is not None
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools are not in the prompt
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason != "tool_calls"
    assert none.choices[0].message.content == plain.choices[0].message.content


def reassembled(chunks: Any) -> tuple[list[dict[str, str]], str | None, str]:
    """The calls and finish reason a stream's chunks add up to, as a client reassembles them; checks that
    each call's first delta has its id, type and name, and the later ones only pieces of its arguments."""
    calls: dict[int, dict[str, str]] = {}
    finish, content = None, ""
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or ():
            if delta.index not in calls:
                assert delta.id and delta.id.startswith("call_") and delta.type == "function"
                assert delta.function and delta.function.name and delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert not delta.id and delta.function and not delta.function.name
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish, content


def test_streamed_deltas_reassemble_to_the_same_calls(client: openai.OpenAI, mesh: Mesh) -> None:
    # One call each: greedy, with parallel calls allowed, this model calls again and again until max_tokens.
    body: dict[str, Any] = {"model": mesh.model, "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 200}
    body["parallel_tool_calls"] = False
    for choice_of_tool in (GET_TIME, "required"):
        body["tool_choice"] = choice_of_tool
        client.chat.completions.create(**body)  # the prompt cached, so that both replies below decode alike
        whole = client.chat.completions.create(**body).choices[0]
        stream = client.chat.completions.create(**body, stream=True)
        calls, finish, content = reassembled(stream)
        assert finish == "tool_calls" == whole.finish_reason and content == ""
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c.function.name, c.function.arguments) for c in whole.message.tool_calls
        ]
        for call in calls:
            SCHEMAS[call["name"]].validate(json.loads(call["arguments"]))


def test_a_streamed_auto_reply_sends_no_part_of_the_tag_as_content(client: openai.OpenAI, mesh: Mesh) -> None:
    seen_call = False
    for seed in range(16):  # bounded: until one reply calls
        stream = client.chat.completions.create(
            model=mesh.model, messages=REPEAT, tools=TOOLS, parallel_tool_calls=False, temperature=0.7, seed=seed,
            max_tokens=80, stream=True,
        )  # fmt: skip
        calls, finish, content = reassembled(stream)
        assert "<tool_call" not in content and not content.endswith("<"), content
        if calls:
            seen_call = True
            assert finish in ("tool_calls", "length")
            if finish == "tool_calls":
                SCHEMAS[calls[0]["name"]].validate(json.loads(calls[0]["arguments"]))
            break
    assert seen_call, "no streamed reply called the tool in 16 tries"


def test_a_conversation_with_a_tool_result_is_answered(client: openai.OpenAI, mesh: Mesh) -> None:
    first = client.chat.completions.create(
        model=mesh.model, messages=ASK, tools=TOOLS, tool_choice=GET_TIME, temperature=0, max_tokens=200
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),  # sent back as it came: content null, tool_calls
        {"role": "tool", "tool_call_id": call.id, "content": "It is 10:15 in Paris."},
    ]
    reply = client.chat.completions.create(model=mesh.model, messages=history, tools=TOOLS, max_tokens=60)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The call and its result are in the prompt: their tokens on top of the first request's.
    assert first.usage is not None and reply.usage is not None
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + 20


def grpc_tools() -> list[inference_pb2.Tool]:
    return [
        inference_pb2.Tool(
            function=inference_pb2.FunctionDefinition(
                name=t["function"]["name"], description=t["function"]["description"],
                parameters=json.dumps(t["function"]["parameters"]),
            )
        )
        for t in TOOLS
    ]  # fmt: skip


def grpc_request(mesh: Mesh, **chat: Any) -> inference_pb2.GenerateRequest:
    messages = chat.pop("messages", [inference_pb2.ChatMessage(**m) for m in ASK])
    conversation = inference_pb2.ChatConversation(messages=messages, **chat)
    sampling = inference_pb2.SamplingParams(max_tokens=200, temperature=0.8, seed=7)
    return inference_pb2.GenerateRequest(model=mesh.model, chat=conversation, sampling=sampling)


def test_grpc_tool_calls_through_the_edge(mesh: Mesh) -> None:
    required = inference_pb2.ToolChoice(mode=inference_pb2.TOOL_CHOICE_MODE_REQUIRED)
    with grpc.insecure_channel(mesh.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for choice in (required, inference_pb2.ToolChoice(function_name="get_time")):
            request = grpc_request(mesh, tools=grpc_tools(), tool_choice=choice, parallel_tool_calls=False)
            events = list(stub.Generate(request, timeout=120))
            result = events[-1].result
            assert result.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS and len(result.tool_calls) == 1
            call = result.tool_calls[0]
            assert call.id.startswith("call_") and (choice.function_name in ("", call.function.name))
            SCHEMAS[call.function.name].validate(json.loads(call.function.arguments))
            deltas = [e.tool_call for e in events if e.HasField("tool_call")]
            assert (deltas[0].index, deltas[0].id, deltas[0].name) == (0, call.id, call.function.name)
            assert all(not d.id and not d.name for d in deltas[1:])
            assert "".join(d.arguments for d in deltas) == call.function.arguments
            assert not any(e.HasField("delta") and e.delta.text for e in events)
        # The history typed: the assistant's call and the tool's result.
        history = [
            *(inference_pb2.ChatMessage(**m) for m in ASK),
            inference_pb2.ChatMessage(role="assistant", tool_calls=[call]),
            inference_pb2.ChatMessage(role="tool", tool_call_id=call.id, content="It is 10:15 in Paris."),
        ]
        events = list(stub.Generate(grpc_request(mesh, messages=history, tools=grpc_tools()), timeout=120))
        assert events[-1].HasField("result")


def post(mesh: Mesh, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{mesh.http}/v1/chat/completions", json={"model": mesh.model, "max_tokens": 8, **body}, timeout=60
    )


NO_RANGES = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
BAD: list[tuple[dict[str, Any], str]] = [
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"messages": ASK, "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
    ({"messages": ASK, "tools": [TOOLS[0], {"type": "function", "function": {"name": "n", "parameters": NO_RANGES}}]},
     "tools[1].function.parameters"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_mood"}}},
     "tool_choice"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"messages": ASK, "tool_choice": "required"}, "tool_choice"),
    ({"messages": ASK, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": [*ASK, {"role": "tool", "content": "22 C"}]}, "messages[1].tool_call_id"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "22 C"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": ASK, "tools": TOOLS, "n": 2}, "n"),  # several choices with tools
    ({"messages": ASK, "tools": TOOLS, "tool_choice": "auto", "n": 3}, "n"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), BAD)
def test_a_malformed_tool_request_is_a_400_naming_the_field(mesh: Mesh, body: dict[str, Any], param: str) -> None:
    response = post(mesh, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert "Traceback" not in error["message"] and 'File "' not in error["message"]


def test_grpc_malformed_tools_are_invalid_argument_naming_the_field(mesh: Mesh) -> None:
    unenforceable = inference_pb2.Tool(
        function=inference_pb2.FunctionDefinition(name="n", parameters=json.dumps(NO_RANGES))
    )
    cases = [
        (grpc_request(mesh, tools=[inference_pb2.Tool()]), "tools[0].function"),
        (grpc_request(mesh, tools=[*grpc_tools(), unenforceable]), "tools[2].function.parameters"),
        (grpc_request(mesh, tools=grpc_tools(), tool_choice=inference_pb2.ToolChoice()), "tool_choice"),
        (
            grpc_request(mesh, tools=grpc_tools(), tool_choice=inference_pb2.ToolChoice(function_name="x")),
            "tool_choice",
        ),
        (
            grpc_request(mesh, messages=[inference_pb2.ChatMessage(role="tool", content="22 C")]),
            "messages[0].tool_call_id",
        ),
    ]
    several = grpc_request(mesh, tools=grpc_tools())
    several.sampling.n = 2
    cases.append((several, "n"))
    with grpc.insecure_channel(mesh.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for request, param in cases:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request, timeout=60))
            error = FleetError.from_rpc_error(caught.value)
            assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT, (param, error)
            assert error.code == "INVALID_REQUEST" and error.param == param, (param, error)


def test_a_reply_of_calls_only_has_its_first_token_timed(client: openai.OpenAI, mesh: Mesh) -> None:
    # The edge's time-to-first-token histogram counts the first output of either kind: a reply that is
    # only a tool call (no text at all) is counted once, and its argument pieces are timed as tokens.
    before = scrape(f"{mesh.http}/metrics")
    stream = client.chat.completions.create(
        model=mesh.model, messages=ASK, tools=TOOLS, tool_choice=GET_TIME, parallel_tool_calls=False,
        max_tokens=60, temperature=0, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    after = scrape(f"{mesh.http}/metrics")
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    counted = {
        name: value(after, f"fleetlm_edge_{name}_seconds_count", model=mesh.model)
        - value(before, f"fleetlm_edge_{name}_seconds_count", model=mesh.model)
        for name in ("time_to_first_token", "inter_token_latency")
    }
    assert counted["time_to_first_token"] == 1, counted
    assert counted["inter_token_latency"] >= 1, counted
