"""`POST /tokenize` and `POST /detokenize` in vLLM's shape, and gRPC's Detokenize, through the edge with the real
model: a text and a conversation round-trip, a conversation's count is the `usage.prompt_tokens` a chat
completion with the same messages reports, and bad input is a 400 naming the field."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import openai
import pytest
from google.protobuf import duration_pb2  # noqa: F401 - registers well-known types for ErrorInfo

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import FleetError
from tests.conftest import MISSING_MODEL, Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colors of the rainbow, and one that is not: café au lait."},
]


def post(mesh: Mesh, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{mesh.http}{path}", json=body, timeout=60)


def ok(mesh: Mesh, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = post(mesh, path, body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_a_text_round_trips(mesh: Mesh) -> None:
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé, emoji 🦊, and <|im_start|> as text."
    tokens = ok(mesh, "/tokenize", {"model": mesh.model, "prompt": text})
    assert set(tokens) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tokens["count"] == len(tokens["tokens"]) > 10 and tokens["max_model_len"] == 2048
    assert tokens["token_strs"] is None
    assert ok(mesh, "/detokenize", {"model": mesh.model, "tokens": tokens["tokens"]}) == {"prompt": text}


def test_a_conversation_counts_what_a_chat_completion_reports(mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=mesh.model, messages=CHAT, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    tokens = ok(mesh, "/tokenize", {"model": mesh.model, "messages": CHAT})
    assert reply.usage is not None and tokens["count"] == reply.usage.prompt_tokens
    rendered = ok(mesh, "/detokenize", {"model": mesh.model, "tokens": tokens["tokens"]})["prompt"]
    assert CHAT[1]["content"] in rendered and rendered.rstrip().endswith("assistant")  # the template's turn
    again = ok(mesh, "/tokenize", {"model": mesh.model, "prompt": rendered})
    assert again["tokens"] == tokens["tokens"]  # the template's special tokens are written out, and read back


def test_a_conversation_without_the_generation_prompt_and_one_continued(mesh: Mesh) -> None:
    full = ok(mesh, "/tokenize", {"model": mesh.model, "messages": CHAT})["tokens"]
    bare = ok(mesh, "/tokenize", {"model": mesh.model, "messages": CHAT, "add_generation_prompt": False})["tokens"]
    assert full[: len(bare)] == bare and len(bare) < len(full)  # the same turns, without the assistant's start
    started = [*CHAT, {"role": "assistant", "content": "Red, green"}]
    body = {"model": mesh.model, "messages": started, "continue_final_message": True}
    continued = ok(mesh, "/detokenize", {"model": mesh.model, "tokens": ok(mesh, "/tokenize", body)["tokens"]})
    assert continued["prompt"].endswith("Red, green")  # open: the model goes on from there


def test_grpc_detokenize_and_tokenize_without_the_generation_prompt(mesh: Mesh) -> None:
    chat = inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(**m) for m in CHAT])
    with grpc.insecure_channel(mesh.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        full = stub.Tokenize(inference_pb2.TokenizeRequest(model=mesh.model, chat=chat), timeout=30)
        bare = stub.Tokenize(
            inference_pb2.TokenizeRequest(model=mesh.model, chat=chat, add_generation_prompt=False), timeout=30
        )
        text = stub.Detokenize(inference_pb2.DetokenizeRequest(model=mesh.model, token_ids=full.token_ids), timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Detokenize(inference_pb2.DetokenizeRequest(model=mesh.model, token_ids=[1, 10**9]), timeout=30)
    assert len(bare.token_ids) < len(full.token_ids)
    assert text.text == ok(mesh, "/detokenize", {"model": mesh.model, "tokens": list(full.token_ids)})["prompt"]
    error = FleetError.from_rpc_error(caught.value)
    assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT and error.param == "token_ids", error


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("/tokenize", {}, "model"),
    ("/tokenize", {"model": "M"}, "prompt"),
    ("/tokenize", {"model": "M", "prompt": "a", "messages": CHAT}, "prompt"),
    ("/tokenize", {"model": "M", "prompt": 12}, "prompt"),
    ("/tokenize", {"model": "M", "messages": []}, "messages"),
    ("/tokenize", {"model": "M", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"model": "M", "messages": [{"role": "user"}]}, "messages[0].content"),
    (
        "/tokenize",
        {"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0]",
    ),
    (
        "/tokenize",
        {
            "model": "M",
            "messages": [*CHAT, {"role": "assistant", "content": "Red"}],
            "add_generation_prompt": True,
            "continue_final_message": True,
        },
        "add_generation_prompt",
    ),
    ("/tokenize", {"model": "M", "prompt": "a", "add_generation_prompt": False}, "add_generation_prompt"),
    ("/tokenize", {"model": "M", "prompt": "a", "add_special_tokens": False}, "add_special_tokens"),
    ("/tokenize", {"model": "M", "prompt": "a", "return_token_strs": True}, "return_token_strs"),
    ("/tokenize", {"model": "M", "prompt": "x" * 1_000_001}, "prompt"),
    ("/detokenize", {"model": "M"}, "tokens"),
    ("/detokenize", {"model": "M", "tokens": "1 2 3"}, "tokens"),
    ("/detokenize", {"model": "M", "tokens": [1, "2"]}, "tokens[1]"),
    ("/detokenize", {"model": "M", "tokens": [1, -5]}, "tokens"),
    ("/detokenize", {"model": "M", "tokens": [2**31]}, "tokens"),
    ("/detokenize", {"model": "M", "tokens": [-105043058876354816]}, "tokens"),  # found by schemathesis: was a 500
    ("/detokenize", {"model": "M", "tokens": [1, 10**9]}, "tokens"),  # not in the vocabulary: the engine says
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_input_is_a_400_naming_the_field(mesh: Mesh, path: str, body: dict[str, Any], param: str) -> None:
    if body.get("model") == "M":
        body = {**body, "model": mesh.model}
    response = post(mesh, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert "Traceback" not in error["message"]


def test_an_unknown_model_is_a_404_and_a_model_that_failed_a_503(mesh: Mesh) -> None:
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        unknown = post(mesh, path, {"model": "no-such-model", **body})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model", unknown.text
        failed = post(mesh, path, {"model": MISSING_MODEL, **body})
        assert failed.status_code == 503, failed.text


def test_the_openapi_document_describes_both_routes(mesh: Mesh) -> None:
    document = httpx.get(f"{mesh.http}/openapi.json", timeout=10).json()
    for path, request, response in (
        ("/tokenize", "TokenizeRequest", "TokenizeResponse"),
        ("/detokenize", "DetokenizeRequest", "DetokenizeResponse"),
    ):
        operation = document["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(request)
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(response)
        assert "400" in operation["responses"]
