"""Tools through an OpenAI-compatible engine: the node passes tools, tool_choice, parallel_tool_calls and the
tool history on in OpenAI's shape and maps the server's tool calls back, streamed and not. The server is
the real `llama_cpp.server` (llama-cpp-python 0.3.36) serving the real model, attached by URL, with its
default chat format (the model's Jinja template): it enforces a named tool_choice with a grammar of the
function's parameters and returns tool_calls; it ignores "auto" and "required" (SmolLM2's template does
not render tools) and answers in text. fleetlm passes "auto"'s text on (OpenAI allows a text answer
there) and refuses a "required" it was not given a call for, with a 400 naming tool_choice, instead of
passing the text on as if the server had honoured it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.test_openai_engines import fleet_with_llama_cpp_server
from tests.test_tool_calls import reassembled

pytestmark = [pytest.mark.model, pytest.mark.cluster]

MODEL = "smol-attached"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}
TOOLS: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fleet_with_llama_cpp_server(tmp_path_factory.mktemp("tools-engines"), MODEL) as base:
        yield base


@pytest.fixture(scope="module")
def client(http: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_named_function_is_called_through_the_server(client: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 60}
    whole = client.chat.completions.create(**body, temperature=0).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    calls, finish, content = reassembled(client.chat.completions.create(**body, temperature=0, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", json.loads(call.function.arguments))
    ]


def test_the_tool_history_reaches_the_server(client: openai.OpenAI) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "It is 31 degrees and sunny."},
    ]  # fmt: skip
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=30, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.content


def test_auto_is_answered_in_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=20, temperature=0)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_a_required_call_the_server_does_not_make_is_a_400_naming_tool_choice(http: str) -> None:
    for stream in (False, True):
        body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 20}
        response = httpx.post(f"{http}/v1/chat/completions", json={**body, "stream": stream}, timeout=120)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "tool_choice" and "does not enforce tool_choice" in error["message"], error
