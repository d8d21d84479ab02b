"""`POST /tokenize` and `POST /detokenize` in vLLM's shape, and gRPC's Detokenize, through the edge with the real
model: a text and a conversation round-trip, a conversation's count is the `usage.prompt_tokens` a chat
completion with the same messages (and tools, and tool history) reports, and gRPC's Tokenize count, and bad
input is a 400 naming the field."""

from __future__ import annotations

import json
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
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ARGUMENTS = '{"city": "Paris"}'
# A call the assistant made and its result (content parts, as a client may send them), then the user again.
CALLED: list[dict[str, Any]] = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18 °C and sunny"}]},
    {"role": "user", "content": "And should I take an umbrella?"},
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


def test_text_parts_are_joined_by_a_newline_as_vllm_and_llama_server_join_them(mesh: Mesh) -> None:
    """A message of two text parts is the message of their texts on two lines (they ran together)."""
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    as_text = [{"role": "user", "content": "Hello\nworld"}]
    parts = ok(mesh, "/tokenize", {"model": mesh.model, "messages": as_parts})["tokens"]
    assert parts == ok(mesh, "/tokenize", {"model": mesh.model, "messages": as_text})["tokens"]


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


def grpc_chat(messages: list[dict[str, Any]], tools: bool = False, **options: Any) -> inference_pb2.ChatConversation:
    """The conversation of an HTTP body's messages (those above), written out as gRPC takes it."""
    out = []
    for m in messages:
        content = m["content"] if isinstance(m["content"], str | None) else "\n".join(p["text"] for p in m["content"])
        calls = [
            inference_pb2.ToolCall(id=c["id"], function=inference_pb2.FunctionCall(**c["function"]))
            for c in m.get("tool_calls", ())
        ]
        out.append(
            inference_pb2.ChatMessage(
                role=m["role"], content=content, tool_calls=calls, tool_call_id=m.get("tool_call_id", "")
            )
        )
    function = WEATHER["function"]
    tool = inference_pb2.Tool(
        function=inference_pb2.FunctionDefinition(
            name=function["name"], description=function["description"], parameters=json.dumps(function["parameters"])
        )
    )
    return inference_pb2.ChatConversation(messages=out, tools=[tool] if tools else [], **options)


NONE = inference_pb2.ToolChoice(mode=inference_pb2.TOOL_CHOICE_MODE_NONE)
# (HTTP body beside model, the same over gRPC): tools, and what changes how they are rendered; a tool history.
TOOL_CHATS: list[tuple[str, dict[str, Any], inference_pb2.ChatConversation]] = [
    ("no tools", {"messages": CHAT}, grpc_chat(CHAT)),
    ("tools", {"messages": CHAT, "tools": [WEATHER]}, grpc_chat(CHAT, tools=True)),
    (
        "tools, one call at most",
        {"messages": CHAT, "tools": [WEATHER], "parallel_tool_calls": False},
        grpc_chat(CHAT, tools=True, parallel_tool_calls=False),
    ),
    (
        "tools, none",
        {"messages": CHAT, "tools": [WEATHER], "tool_choice": "none"},
        grpc_chat(CHAT, True, tool_choice=NONE),
    ),
    ("a call", {"messages": CALLED[:2]}, grpc_chat(CALLED[:2])),
    ("a call and its result", {"messages": CALLED}, grpc_chat(CALLED)),
    ("a call and its result, with tools", {"messages": CALLED, "tools": [WEATHER]}, grpc_chat(CALLED, tools=True)),
]


def tokenize_count(mesh: Mesh, body: dict[str, Any]) -> int:
    return ok(mesh, "/tokenize", {"model": mesh.model, **body})["count"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("body", "chat"), [case[1:] for case in TOOL_CHATS], ids=[case[0] for case in TOOL_CHATS])
def test_tools_and_a_tool_history_count_what_a_chat_completion_and_grpc_report(
    mesh: Mesh, body: dict[str, Any], chat: inference_pb2.ChatConversation
) -> None:
    tokens = ok(mesh, "/tokenize", {"model": mesh.model, **body})
    with grpc.insecure_channel(mesh.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        over_grpc = stub.Tokenize(inference_pb2.TokenizeRequest(model=mesh.model, chat=chat), timeout=30)
    assert tokens["count"] == len(over_grpc.token_ids) and tokens["tokens"] == list(over_grpc.token_ids)
    completion = {"model": mesh.model, "max_tokens": 1, "temperature": 0, **body}
    if body["messages"][-1].get("tool_calls"):
        # Counted before its result is in; a chat completion needs the result first, as OpenAI's does.
        refused = httpx.post(f"{mesh.http}/v1/chat/completions", json=completion, timeout=60)
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, "messages[1].tool_calls")
        return
    reply = ok(mesh, "/v1/chat/completions", completion)
    assert tokens["count"] == reply["usage"]["prompt_tokens"], (tokens["count"], reply["usage"]["prompt_tokens"])


def test_the_tools_and_the_calls_are_rendered(mesh: Mesh) -> None:
    counts = {name: tokenize_count(mesh, body) for name, body, _ in TOOL_CHATS}
    assert counts["tools"] > counts["no tools"] == counts["tools, none"]  # tool_choice none renders no tools
    assert counts["tools, one call at most"] != counts["tools"]  # the section says so
    assert counts["a call and its result, with tools"] > counts["a call and its result"]
    tokens = ok(mesh, "/tokenize", {"model": mesh.model, "messages": CALLED})["tokens"]
    rendered = ok(mesh, "/detokenize", {"model": mesh.model, "tokens": tokens})["prompt"]
    assert ARGUMENTS in rendered and "18 °C and sunny" in rendered and "umbrella" in rendered


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
    ("/tokenize", {"model": "M", "prompt": "a", "tools": [WEATHER]}, "tools"),
    ("/tokenize", {"model": "M", "prompt": "a", "tool_choice": "none"}, "tool_choice"),
    ("/tokenize", {"model": "M", "prompt": "a", "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"model": "M", "messages": CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
    (
        "/tokenize",
        {"model": "M", "messages": CHAT, "tools": [{**WEATHER, "function": {"name": "a b"}}]},
        "tools[0].function.name",
    ),
    ("/tokenize", {"model": "M", "messages": CHAT, "tool_choice": "always"}, "tool_choice"),
    ("/tokenize", {"model": "M", "messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/tokenize", {"model": "M", "messages": CHAT, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    (
        "/tokenize",
        {"model": "M", "messages": [CALLED[0], {**CALLED[2], "tool_call_id": "call_9"}]},
        "messages[1].tool_call_id",
    ),
    (
        "/tokenize",
        {"model": "M", "messages": [*CALLED[:2], {**CALLED[2], "tool_call_id": None}]},
        "messages[2].tool_call_id",
    ),
    (
        "/tokenize",
        {"model": "M", "messages": [{**CALLED[1], "role": "user", "content": "x"}]},
        "messages[0].tool_calls",
    ),
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
