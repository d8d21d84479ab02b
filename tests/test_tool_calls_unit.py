"""Tool calling's pure logic: the reply parsed into content and calls however it is split into chunks,
the generic prompt format, a template that has Hermes' tool format rendered through it, the grammar's
shape per tool_choice, the request checks (HTTP models and the proto's), and an OpenAI-compatible
server's tool fields both ways."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge.http_app import parse_body
from edge.openai_protocol import ChatCompletionRequest
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import FleetError
from mesh.inference_requests import validate_chat, validate_generate
from node_agent.engines.base import Chat, Function, InvalidInput, Message, ToolCall, ToolCallChunk, ToolChoice
from node_agent.engines.openai_tools import ToolCallDeltas, message_json, tools_json
from node_agent.engines.tool_call_stream import ToolCallStream
from node_agent.engines.tool_calls import call_block, renders_tools, template_input, tool_grammar

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}
REPLY = (
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris {\\"}", "unit": "c"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
)


def parse(chunks: list[str], content_or_calls: bool = False) -> tuple[str, list[ToolCallChunk], ToolCallStream]:
    stream = ToolCallStream(content_or_calls)
    events = [e for chunk in chunks for e in stream.feed(chunk)] + stream.flush()
    content = "".join(e for e in events if isinstance(e, str))
    return content, [e for e in events if isinstance(e, ToolCallChunk)], stream


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_a_reply_parses_to_the_same_content_and_calls_however_it_is_chunked(size: int) -> None:
    content, parts, stream = parse([REPLY[i : i + size] for i in range(0, len(REPLY), size)])
    assert content == "Let me check. "
    calls = stream.calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": 'Paris {"}', "unit": "c"}),  # braces and quotes inside strings are no ends
        ("get_time", {}),
    ]
    assert stream.complete_calls == 2
    # Streamed as OpenAI streams: the first part of a call has its index, id and name; the arguments come in
    # pieces that concatenate to the call's arguments exactly.
    for index, call in enumerate(calls):
        mine = [p for p in parts if p.index == index]
        assert mine[0].id == call.id and mine[0].name == call.name and call.id.startswith("call_")
        assert all(not p.id and not p.name for p in mine[1:])
        assert "".join(p.arguments for p in mine) == call.arguments
    assert calls[0].id != calls[1].id


DOCUMENT = '  { "answer" : "This <tool_call>\\n{\\"name\\": \\"get_weather\\"} </tool_call>" }'


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_beside_a_schema_a_reply_that_opens_with_a_document_is_content_tags_in_its_strings_included(
    size: int,
) -> None:
    """Beside a response_format the grammar allows calls or a document from the first character: a document
    that quotes the tag (a model asked to repeat a call, say) is content, whole. CI saw it cut at the tag
    ('{ "answer" : "This ', the rest taken for a call that never parsed), with finish reason stop."""
    content, parts, stream = parse([DOCUMENT[i : i + size] for i in range(0, len(DOCUMENT), size)], True)
    assert content == DOCUMENT and parts == [] and stream.calls == ()
    assert json.loads(content)["answer"].startswith("This <tool_call>")
    # The same reply without the mode (free text, where the tag starts a call) is cut at the tag.
    assert parse([DOCUMENT], False)[0] == '  { "answer" : "This '
    # Calls beside a schema still parse, also after spaces; only spaces is content.
    content, _, stream = parse(["\n", REPLY[len("Let me check. ") :]], True)
    assert content == "\n" and [c.name for c in stream.calls] == ["get_weather", "get_time"]  # as without it
    assert parse(["  "], True)[0] == "  "


def test_text_that_only_starts_like_the_tag_is_content_in_the_end() -> None:
    stream = ToolCallStream()
    assert stream.feed("a <tool") == ["a "]  # held back: it may still become the tag
    assert stream.feed("box>") == ["<toolbox>"]
    assert stream.feed(" <tool_") == [" "]
    assert stream.flush() == ["<tool_"] and stream.calls == ()


def test_a_call_cut_in_its_arguments_is_kept_and_one_cut_before_its_name_is_dropped() -> None:
    content, _, stream = parse(['<tool_call>\n{"name": "f", "arguments": {"a": [1, 2'])
    assert content == "" and [(c.name, c.arguments) for c in stream.calls] == [("f", '{"a": [1, 2')]
    assert stream.complete_calls == 0
    content, parts, stream = parse(['Hi <tool_call>\n{"na'])
    assert content == "Hi " and parts == [] and stream.calls == ()


def functions() -> tuple[Function, ...]:
    return (
        Function("get_weather", "Weather in a city", json.dumps(WEATHER)),
        Function("get_time", "The time now"),
    )


def test_the_generic_format_puts_the_tools_in_the_system_prompt_and_the_calls_in_the_history() -> None:
    chat = Chat(
        (
            Message("system", "Be brief."),
            Message("user", "Weather and time in Paris?"),
            Message(
                "assistant",
                "",
                (ToolCall("call_1", "get_weather", '{"city": "Paris"}'), ToolCall("call_2", "get_time", "{}")),
            ),
            Message("tool", "22 C", tool_call_id="call_1"),
            Message("tool", "10:00", tool_call_id="call_2"),
        ),
        tools=functions(),
        tool_choice=ToolChoice("required"),
        parallel_tool_calls=False,
    )
    messages, tools = template_input(chat, native=False)
    assert tools is None  # the template is not given them: the system prompt has them
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools")
    for function in chat.tools:
        assert json.dumps(json.loads(function.parameters or '{"type": "object", "properties": {}}')) in system
    assert "You must call at least one function. Make at most one call." in system
    assert messages[2]["content"] == "\n".join(
        [call_block("get_weather", '{"city": "Paris"}'), call_block("get_time", "{}")]
    )
    # Consecutive results share one user turn (templates that insist on alternating roles).
    assert messages[3]["content"] == "<tool_response>\n22 C\n</tool_response>\n<tool_response>\n10:00\n</tool_response>"
    none = Chat(chat.messages, tools=chat.tools, tool_choice=ToolChoice("none"))
    assert "# Tools" not in template_input(none, native=False)[0][0]["content"]  # none: no tools rendered


# A chat template with Hermes' tool format, written for this test (as Qwen's and Hermes' templates do it):
# tools listed in the system turn, calls as <tool_call> blocks, results in tool turns.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}"
    'Call with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    '{% for c in m.tool_calls or [] %}<tool_call>\n{"name": "{{ c.function.name }}", "arguments": '
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def test_a_template_with_the_tool_format_renders_the_tools_and_history_itself() -> None:
    hermes = Jinja2ChatFormatter(template=HERMES_TEMPLATE, eos_token="</s>", bos_token="<s>")
    plain = Jinja2ChatFormatter(template=PLAIN_TEMPLATE, eos_token="</s>", bos_token="<s>")
    assert renders_tools(HERMES_TEMPLATE, hermes)
    assert not renders_tools(PLAIN_TEMPLATE, plain)  # SmolLM2's kind: no tool format
    chat = Chat(
        (
            Message("user", "Weather in Paris?"),
            Message("assistant", "", (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
            Message("tool", "22 C", tool_call_id="call_1"),
        ),
        tools=functions(),
    )
    messages, tools = template_input(chat, native=True)
    prompt = hermes(messages=messages, tools=tools).prompt
    assert '{"name": "get_weather", "description": "Weather in a city", "parameters": ' in prompt
    # The call's arguments reach the template as JSON (it writes `arguments | tojson`), the result as a tool turn.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|im_start|>tool\n22 C<|im_end|>" in prompt
    assert messages[2]["name"] == "get_weather" and messages[2]["tool_call_id"] == "call_1"


@pytest.mark.parametrize(
    ("choice", "parallel", "lazy", "root"),
    [
        (ToolChoice("auto"), True, True, 'root ::= tool-call ("\\n" tool-call)*'),
        (ToolChoice("required"), False, False, "root ::= tool-call\n"),
        (ToolChoice("function", "get_time"), True, False, "root ::= tool-call\n"),
    ],
)
def test_the_grammar_follows_tool_choice(choice: ToolChoice, parallel: bool, lazy: bool, root: str) -> None:
    chat = Chat((Message("user", "hi"),), tools=functions(), tool_choice=choice, parallel_tool_calls=parallel)
    grammar, trigger = tool_grammar(chat)
    assert root in grammar
    assert (trigger is not None) == lazy
    named = '"\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": "'
    assert (named in grammar) == (choice.mode != "function")  # a named choice allows that function only
    if trigger is not None:
        assert trigger.word == "<tool_call>"
        assert not trigger.refuses(b'\n{"name": "get_w') and trigger.refuses(b"{") and trigger.refuses(b">")


def test_a_parameters_schema_the_grammar_cannot_enforce_is_refused_naming_it() -> None:
    bad = Function(
        "f", parameters=json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}})
    )
    chat = Chat((Message("user", "hi"),), tools=(*functions(), bad))
    with pytest.raises(InvalidInput) as refused:
        tool_grammar(chat)
    assert refused.value.param == "tools[2].function.parameters" and "'minimum'" in str(refused.value)


def test_two_tools_with_the_same_definition_names_keep_their_own() -> None:
    """The converter names a definition's rule by its name alone: without a prefix per tool, tool b's `x`
    would take tool a's Item (an integer `v` where b wants a boolean)."""

    def with_item(kind: str) -> str:
        item = {"type": "object", "properties": {"v": {"type": kind}}, "required": ["v"]}
        return json.dumps({"type": "object", "properties": {"x": {"$ref": "#/$defs/Item"}}, "$defs": {"Item": item}})

    tools = (Function("a", parameters=with_item("integer")), Function("b", parameters=with_item("boolean")))
    grammar, _ = tool_grammar(Chat((Message("user", "hi"),), tools=tools))
    assert "tool0-arguments-x ::= tool0-arguments-Item\n" in grammar
    assert "tool1-arguments-x ::= tool1-arguments-Item\n" in grammar
    assert 'tool0-arguments-Item-v-kv ::= "\\"v\\"" space ":" space integer\n' in grammar
    assert 'tool1-arguments-Item-v-kv ::= "\\"v\\"" space ":" space boolean\n' in grammar


def request(**body: Any) -> inference_pb2.GenerateRequest:
    """A request body as the edge reads it (its pydantic model, a type error a 400 naming the field)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return parse_body(json.dumps(body).encode(), ChatCompletionRequest).to_proto("req_1")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


ARGS = '{"city": "Oslo"}'


def test_an_openai_request_with_tools_and_tool_history_becomes_the_proto() -> None:
    proto = request(
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3 C"},
        ],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )  # fmt: skip
    chat = proto.chat
    assert [t.function.name for t in chat.tools] == ["get_weather"]
    assert json.loads(chat.tools[0].function.parameters) == WEATHER
    assert list(json.loads(chat.tools[0].function.parameters)["properties"]) == ["city", "unit"]  # order kept
    assert chat.tool_choice.function_name == "get_weather" and chat.parallel_tool_calls is False
    assistant, tool = chat.messages[1], chat.messages[2]
    assert assistant.content == "" and assistant.tool_calls[0].function.arguments == '{"city": "Oslo"}'
    assert tool.tool_call_id == "call_1" and tool.content == "3 C"
    validate_chat(chat)
    assert request(tools=TOOLS, tool_choice="required").chat.tool_choice.mode == inference_pb2.TOOL_CHOICE_MODE_REQUIRED
    assert not request(tools=TOOLS).chat.HasField("tool_choice")  # unset: auto with tools


ASKED = {"role": "user", "content": "Weather in Oslo?"}


def called(ids: list[str]) -> dict[str, Any]:
    calls = [{"id": i, "type": "function", "function": {"name": "get_weather", "arguments": ARGS}} for i in ids]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def answer(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "3 C"}


BAD_HTTP: list[tuple[dict[str, Any], str]] = [
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS * 2}, "tools[1].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "tool", "content": "3 C"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "call_9", "content": "b"}]},
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls[0].id"),
    # A call must be answered by a tool message right after its assistant turn (OpenAI's rule): the model
    # would go on from a call it never heard the result of. They were accepted.
    ({"messages": [ASKED, called(["c1"]), {"role": "user", "content": "go on"}]}, "messages[1].tool_calls"),
    ({"messages": [ASKED, called(["c1", "c2"]), answer("c1"), {"role": "user", "content": "go on"}]},
     "messages[1].tool_calls"),
    ({"messages": [ASKED, called(["c1"])]}, "messages[1].tool_calls"),
    ({"messages": [ASKED, called(["c1", "c1"]), answer("c1")]}, "messages[1].tool_calls[1].id"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), BAD_HTTP)
def test_a_malformed_tool_request_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(FleetError) as refused:
        validate_generate(request(**body))
    assert refused.value.param == param, refused.value.message
    assert refused.value.http_status == 400


def test_an_openai_compatible_server_gets_the_tools_and_history_and_its_deltas_become_calls() -> None:
    chat = Chat(
        (Message("user", "Weather?"), Message("assistant", "", (ToolCall("call_1", "get_weather", "{}"),)),
         Message("tool", "3 C", tool_call_id="call_1")),
        tools=functions(), tool_choice=ToolChoice("function", "get_time"), parallel_tool_calls=False,
    )  # fmt: skip
    body = tools_json(chat)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert body["parallel_tool_calls"] is False and body["tools"][0]["function"]["parameters"] == WEATHER
    assert body["tools"][1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert message_json(chat.messages[1])["content"] == ""
    assert message_json(chat.messages[1])["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{}"}
    assert message_json(chat.messages[2]) == {"role": "tool", "content": "3 C", "tool_call_id": "call_1"}
    assert tools_json(Chat(chat.messages)) == {}
    deltas = ToolCallDeltas()
    chunks = deltas.feed(
        [{"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_time", "arguments": ""}}]
    )
    chunks += deltas.feed([{"index": 0, "function": {"arguments": '{"tz"'}}])
    chunks += deltas.feed([{"index": 0, "function": {"arguments": ': "UTC"}'}}])
    assert chunks[0] == ToolCallChunk(0, "call_x", "get_time", "")
    assert deltas.calls == (ToolCall("call_x", "get_time", '{"tz": "UTC"}'),)
    # A server that sends a call whole, without an id, gets one made.
    whole = ToolCallDeltas()
    first = whole.feed([{"index": 0, "function": {"name": "f", "arguments": "{}"}}])
    assert first[0].id.startswith("call_") and whole.calls[0].arguments == "{}"


def test_with_parallel_tool_calls_false_a_servers_second_call_is_not_taken() -> None:
    """OpenAI's rule for parallel_tool_calls false (at most one call), for a server that ignores the flag: the
    second call's deltas are dropped and `over` says the reply ends with the first (the engine then stops
    reading the server's stream, with finish_reason tool_calls)."""
    deltas = ToolCallDeltas(single=True)
    chunks = deltas.feed([{"index": 0, "id": "c0", "function": {"name": "get_weather", "arguments": '{"city"'}}])
    chunks += deltas.feed([{"index": 0, "function": {"arguments": ': "Paris"}'}}])
    assert not deltas.over
    chunks += deltas.feed([{"index": 1, "id": "c1", "function": {"name": "get_time", "arguments": "{}"}}])
    assert deltas.over
    assert deltas.calls == (ToolCall("c0", "get_weather", '{"city": "Paris"}'),)
    assert [c.index for c in chunks] == [0, 0, 0] and all(c.name != "get_time" for c in chunks)
    several = ToolCallDeltas()  # parallel calls allowed: both kept
    several.feed([{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}])
    several.feed([{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}])
    assert len(several.calls) == 2 and not several.over


def test_a_call_answered_in_any_order_with_more_turns_after_is_taken() -> None:
    validate_generate(request(messages=[ASKED, called(["c1", "c2"]), answer("c2"), answer("c1"),
                                        {"role": "assistant", "content": "3 C in both."},
                                        {"role": "user", "content": "Thanks"}]))  # fmt: skip
    # Counted (Tokenize's check), a conversation may end with calls whose results are not in yet.
    validate_chat(request(messages=[ASKED, called(["c1"])]).chat)


@pytest.mark.parametrize(
    ("message", "param", "said"),
    [
        ({"role": "user", "content": "hi", "name": 5}, "messages[0].name", "valid string"),
        ({"role": "user", "content": [{"type": "video", "video": "x"}]}, "messages[0].content[0].type", "'text'"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text", "must be a string"),
        ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, "messages[0].content[0].type",
         "only allowed in an assistant's message"),
        ({"role": "user", "content": ["hi"]}, "messages[0].content[0]", "content part object"),
    ],
)  # fmt: skip
def test_a_message_field_of_the_wrong_kind_is_a_400_that_says_what_is_wrong(
    message: dict[str, Any], param: str, said: str
) -> None:
    """It was "Input should be a valid string" for each part (pydantic's first union branch), and a `name` of
    any type was dropped unread."""
    with pytest.raises(FleetError) as refused:
        request(messages=[message])
    assert refused.value.param == param and said in refused.value.message, refused.value


def test_a_participant_name_and_an_assistant_refusal_part_are_taken() -> None:
    chat = request(messages=[
        {"role": "user", "content": "Say no.", "name": "alice"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
    ]).chat  # fmt: skip
    assert [m.content for m in chat.messages] == ["Say no.", "I can't.", "Why?"]
