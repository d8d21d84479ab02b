"""What fleetlm does not implement is refused with a 400 naming the field, in OpenAI's shape, on the real edge:
never ignored (an answer that silently lacks what was asked for) and never a 500. Fields that would not change
the answer (metadata, store) are still ignored, as OpenAI's own API ignores what it does not need."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

USER = {"role": "user", "content": "Describe this."}


def parts(*content: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe this."}, *content]}]


CHAT_REFUSED: list[tuple[dict[str, Any], str, str]] = [
    (
        {"messages": parts({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})},
        "messages[0].content[1]",
        "images",
    ),
    (
        {"messages": parts({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})},
        "messages[0].content[1]",
        "audio",
    ),
    ({"messages": parts({"type": "file", "file": {"file_id": "file-1"}})}, "messages[0].content[1]", "file"),
    ({"messages": [USER], "audio": {"voice": "alloy", "format": "wav"}}, "audio", "audio"),
    ({"messages": [USER], "modalities": ["text", "audio"]}, "modalities", "text"),
    ({"messages": [USER], "web_search_options": {}}, "web_search_options", "web search"),
    # The completions API's fields, and other servers' that would change the answer: refused, not ignored.
    ({"messages": [USER], "echo": True}, "echo", "completions API"),
    ({"messages": [USER], "suffix": "world"}, "suffix", "suffix"),
    ({"messages": [USER], "best_of": 2}, "best_of", "best_of"),
    ({"messages": [USER], "reasoning_effort": "low"}, "reasoning_effort", "no reasoning budget"),
    ({"messages": [USER], "guided_json": {"type": "object"}}, "guided_json", "response_format"),
    ({"messages": [USER], "guided_choice": ["a", "b"]}, "guided_choice", "enum"),
    ({"messages": [USER], "min_tokens": 5}, "min_tokens", "min_tokens"),
    ({"messages": [USER], "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ({"messages": [USER], "stop_token_ids": [2]}, "stop_token_ids", "stop strings"),
    ({"messages": [USER], "add_generation_prompt": False}, "add_generation_prompt", "continue_final_message"),
    (
        {
            "messages": [USER, {"role": "assistant", "content": "It"}],
            "continue_final_message": True,
            "add_generation_prompt": True,
        },
        "add_generation_prompt",
        "continue_final_message",
    ),
    ({"messages": [USER], "continue_final_message": True}, "continue_final_message", "assistant"),
    ({"messages": [USER], "logit_bias": {"hello": 5}}, "logit_bias", "token ids"),
    ({"messages": [USER], "logit_bias": {"-3": 5}}, "logit_bias", "token ids"),
    ({"messages": [USER], "logit_bias": {"3": "high"}}, "logit_bias", "numbers"),
    ({"messages": [USER], "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", "at most 1024"),
    ({"messages": [USER], "logit_bias": {"49152": 5}}, "logit_bias", "token ids are 0 to 49151"),
    # The value refused, as it was sent (it was rounded: "must be between 0 and 2; got 2")
    ({"messages": [USER], "temperature": 2.0000001}, "temperature", "got 2.0000001"),
]
COMPLETION_REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"prompt": "Hello", "suffix": "world"}, "suffix", "suffix"),
    ({"prompt": "Hello", "best_of": 3}, "best_of", "best_of"),
    ({"prompt": "Hello", "guided_regex": "[a-z]+"}, "guided_regex", "pattern"),
    ({"prompt": "Hello", "include_stop_str_in_output": True}, "include_stop_str_in_output", "stop string"),
    ({"prompt": "Hello", "logit_bias": {"50256": -101}}, "logit_bias", "between -100 and 100"),
    ({"prompt": "Hello", "logit_bias": {"99999999999": 1}}, "logit_bias", "token ids"),
    ({"prompt": "Hello", "logit_bias": {"2147483648": 1}}, "logit_bias", "no model has token id"),
    # Token ids (OpenAI's forms of `prompt`) the model does not have, or that are no ids; more prompts
    # than a request may hold
    ({"prompt": [15496, 11, 49152]}, "prompt", "token ids are 0 to 49151"),
    ({"prompt": [[15496, 11], [49152]]}, "prompt", "prompt[1][0] is 49152"),  # the prompt named (was prompt[0])
    ({"prompt": [[15496, 11], [-3]]}, "prompt", "not negative"),
    ({"prompt": [15496, 2**31]}, "prompt", "no model has a token id that large"),
    ({"prompt": [15496, "Hello"]}, "prompt", "prompt"),
    ({"prompt": [[15496], []]}, "prompt", "empty"),
    ({"prompt": ["Hello"] * 65}, "prompt", "at most 64 prompts"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": None}, "prompt", "must be a string, a list of strings, a list of token ids"),
    # The chat API's own fields, sent here: ignored, a completion would lack what they ask for.
    ({"prompt": "Hello", "top_logprobs": 5}, "top_logprobs", "logprobs is the number of alternatives"),
    ({"prompt": "Hello", "messages": [USER]}, "messages", "/v1/chat/completions"),
    ({"prompt": "Hello", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "chat API"),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "word"),
    [("/v1/chat/completions", *case) for case in CHAT_REFUSED]
    + [("/v1/completions", *case) for case in COMPLETION_REFUSED],
)
@pytest.mark.parametrize("stream", [False, True])
def test_what_is_not_supported_is_a_400_naming_it(
    mesh: Mesh, path: str, body: dict[str, Any], param: str, word: str, stream: bool
) -> None:
    response = httpx.post(
        f"{mesh.http}{path}", json={"model": mesh.model, "max_tokens": 4, "stream": stream, **body}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error == {"message": error["message"], "type": "invalid_request_error", "param": param,
                     "code": "INVALID_REQUEST"}  # fmt: skip
    assert word in error["message"], error


def test_stream_options_without_stream_is_a_400_as_openai_answers(mesh: Mesh) -> None:
    for path, body in (("/v1/chat/completions", {"messages": [USER]}), ("/v1/completions", {"prompt": "Hello"})):
        for stream in ({}, {"stream": False}):
            sent = {"model": mesh.model, "max_tokens": 4, "stream_options": {"include_usage": True}, **body, **stream}
            response = httpx.post(f"{mesh.http}{path}", json=sent, timeout=30)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "stream_options" and "'stream' is true" in error["message"], error


def test_what_changes_nothing_is_accepted(mesh: Mesh) -> None:
    """Text-only modalities, best_of equal to n, an empty logit_bias, and fields that do not change the answer."""
    for path, body in (
        ("/v1/chat/completions", {"messages": [USER], "modalities": ["text"], "logit_bias": {}, "store": False,
                                  "metadata": {"team": "a"}, "reasoning_effort": None}),
        ("/v1/completions", {"prompt": "Hello", "best_of": 2, "n": 2, "echo": False, "suffix": None}),
    ):  # fmt: skip
        response = httpx.post(f"{mesh.http}{path}", json={"model": mesh.model, "max_tokens": 4, **body}, timeout=60)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("tokens", [[15496, 11, 995], [[15496, 11], [995]]])
def test_embedding_input_of_token_ids_is_a_400_naming_it(mesh: Mesh, tokens: list[Any]) -> None:
    response = httpx.post(f"{mesh.http}/v1/embeddings", json={"model": mesh.model, "input": tokens}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("input", "INVALID_REQUEST"), error
    assert "token ids" in error["message"], error


@pytest.mark.parametrize(
    ("given", "why"), [(None, "null"), (123, "a number"), ([1.5], "a list of numbers"), (["a", 2], "with a number")]
)
def test_an_embedding_input_of_another_kind_is_a_400_saying_what_it_may_be(mesh: Mesh, given: Any, why: str) -> None:
    response = httpx.post(f"{mesh.http}/v1/embeddings", json={"model": mesh.model, "input": given}, timeout=30)
    assert response.status_code == 400, (why, response.text)
    error = response.json()["error"]
    assert error["param"] == "input" and error["message"] == "'input' must be a string or a list of strings", error


def test_null_encoding_format_and_max_completion_tokens_on_completions_are_taken(mesh: Mesh) -> None:
    """null asks for OpenAI's default (float), as `dimensions: null` does; chat's `max_completion_tokens`
    sent to completions caps the answer there too, and wins over max_tokens as on chat (it was ignored)."""
    embedded = httpx.post(
        f"{mesh.http}/v1/embeddings",
        json={"model": mesh.model, "input": "hello", "encoding_format": None, "dimensions": None},
        timeout=60,
    )
    assert embedded.status_code == 200, embedded.text
    assert isinstance(embedded.json()["data"][0]["embedding"], list)
    body = {"model": mesh.model, "prompt": "Count: one, two,", "temperature": 0, "max_completion_tokens": 2}
    for extra in ({}, {"max_tokens": 5}):
        completed = httpx.post(f"{mesh.http}/v1/completions", json={**body, **extra}, timeout=60)
        assert completed.status_code == 200, completed.text
        assert completed.json()["usage"]["completion_tokens"] == 2, (extra, completed.text)
