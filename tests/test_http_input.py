"""What the HTTP API makes of input at its edges, on the real edge and node: text that is not text (a lone
UTF-16 surrogate) and JSON nested past what a parser takes are 400s naming where, never a 500; a completions
`max_tokens` of null is OpenAI's default; a `developer` message is the model's system message; a chat may
continue its final assistant message (`continue_final_message`, as vLLM and SGLang take it); and fields that
ask for nothing (false, null) are accepted where their asking values are refused."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

USER = {"role": "user", "content": "Name a color."}


def post(mesh: Mesh, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        return httpx.post(f"{mesh.http}{path}", content=body, headers=headers, timeout=60)
    return httpx.post(f"{mesh.http}{path}", json={"model": mesh.model, **body}, timeout=60)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", '"messages": [{"role": "user", "content": "a\\ud800b"}]', "messages[0].content"),
        ("/v1/chat/completions", '"messages": [{"role": "user", "content": "Hi"}], "stop": ["\\udfff"]', "stop[0]"),
        ("/v1/chat/completions", '"messages": [{"role": "user", "content": "Hi"}], "user": "\\uD83D"', "user"),
        ("/v1/completions", '"prompt": ["ok", "\\ud83d x"]', "prompt[1]"),
        ("/v1/embeddings", '"input": "\\ud800"', "input"),
        ("/v1/responses", '"input": "Hi", "instructions": "\\udc00"', "instructions"),
        ("/tokenize", '"prompt": "\\ud800"', "prompt"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_where(mesh: Mesh, path: str, body: str, param: str) -> None:
    raw = f'{{"model": "{mesh.model}", "max_tokens": 2, {body}}}'.encode()
    if path in ("/v1/embeddings", "/tokenize", "/v1/responses"):
        raw = raw.replace(b'"max_tokens": 2, ', b"")
    reply = post(mesh, path, raw)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"], error
    # A surrogate pair is one character (an emoji here), and passes.
    ok = post(mesh, "/v1/chat/completions", {"messages": [{"role": "user", "content": "\U0001f600"}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_json_nested_past_the_parser_is_a_400(mesh: Mesh) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for raw in (
        b'{"model": "m", "messages": [], "metadata": ' + deep + b"}",
        b'{"model": "m", "messages": ' + deep + b"}",
    ):
        reply = post(mesh, "/v1/chat/completions", raw)
        assert reply.status_code == 400, reply.text
        assert "nested too deeply" in reply.json()["error"]["message"]


def test_a_completions_max_tokens_of_null_is_the_default_16(mesh: Mesh) -> None:
    reply = post(mesh, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": None, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 16


def test_a_developer_message_is_the_models_system_message(mesh: Mesh) -> None:
    def ids(role: str) -> list[int]:
        body = {"messages": [{"role": role, "content": "Be brief."}, USER]}
        reply = post(mesh, "/tokenize", body)
        assert reply.status_code == 200, reply.text
        return list(reply.json()["tokens"])

    assert ids("developer") == ids("system")


def test_a_chat_continues_its_final_assistant_message(mesh: Mesh) -> None:
    messages = [{"role": "user", "content": "Count from one to ten in words."},
                {"role": "assistant", "content": "One, two, three,"}]  # fmt: skip
    counted = post(mesh, "/tokenize", {"messages": messages, "continue_final_message": True,
                                       "add_generation_prompt": False})  # fmt: skip
    assert counted.status_code == 200, counted.text
    body = {"messages": messages, "continue_final_message": True, "max_tokens": 8, "temperature": 0}
    reply = post(mesh, "/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    # The prompt is the conversation cut after the final message's text, as /tokenize renders it.
    assert reply.json()["usage"]["prompt_tokens"] == counted.json()["count"]
    answered = post(mesh, "/v1/chat/completions", {**body, "continue_final_message": False})
    assert answered.json()["usage"]["prompt_tokens"] > counted.json()["count"]  # a new assistant turn opened
    # The same over a stream, and with add_generation_prompt false said outright.
    streamed = post(mesh, "/v1/chat/completions", {**body, "add_generation_prompt": False, "stream": True})
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text


def test_fields_that_ask_for_nothing_are_accepted(mesh: Mesh) -> None:
    neutral = {"echo": False, "best_of": None, "ignore_eos": False, "min_tokens": 0, "stop_token_ids": [],
               "guided_json": None, "add_generation_prompt": True}  # fmt: skip
    reply = post(mesh, "/v1/chat/completions", {"messages": [USER], "max_tokens": 2, **neutral})
    assert reply.status_code == 200, reply.text
