"""response_format through an OpenAI-compatible engine: the node passes it on as OpenAI's field, and the
server enforces it, or refuses it with an answer that reaches the client as a 400 naming it. The server
is the real `llama_cpp.server` serving the real model, attached by URL; it takes `json_object` and
refuses `json_schema` (its request model knows only "text" and "json_object"), with a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.test_openai_engines import fleet_with_llama_cpp_server

pytestmark = [pytest.mark.model, pytest.mark.cluster]

MODEL = "smol-attached"
ASK = [{"role": "user", "content": "Return a JSON object with the keys city and country for Paris."}]


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fleet_with_llama_cpp_server(tmp_path_factory.mktemp("structured-engines"), MODEL) as base:
        yield base


def test_json_object_is_passed_through_and_enforced(http: str) -> None:
    client = openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=120)
    for stream in (False, True):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
            temperature=0.7,
            max_tokens=200,
            stream=stream,
        )
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices)  # type: ignore[union-attr]
        else:
            text = reply.choices[0].message.content or ""  # type: ignore[union-attr]
        assert isinstance(json.loads(text), dict), text


def test_a_format_the_server_refuses_is_a_400_naming_it(http: str) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {
        "model": MODEL,
        "messages": ASK,
        "max_tokens": 50,
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    }
    response = httpx.post(f"{http}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format", error
    # llama_cpp.server sends its refusal as a 500 with a traceback: the request's fault, and no traceback.
    assert 'File "' not in error["message"] and "Traceback" not in error["message"]
