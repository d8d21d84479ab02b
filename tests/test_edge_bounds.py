"""One table of request bounds: a value out of range gets the same param and the same message over the
OpenAI HTTP API (the edge's pydantic models, then the gateway's checks) and over gRPC (validate_generate,
which the edge and the node both run). "model is required" is one check too, made first on both.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from edge.http_app import parse_body
from edge.openai_protocol import ChatCompletionRequest, CompletionRequest
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import SAMPLING_BOUNDS, validate_generate

HELLO = [{"role": "user", "content": "hello"}]


def over_http(body: dict[str, Any], chat: bool = True) -> FleetError | None:
    """What the edge answers a JSON body with before it routes it: None when it would route it."""
    raw = json.dumps(body).encode()
    try:
        parsed = parse_body(raw, ChatCompletionRequest) if chat else parse_body(raw, CompletionRequest)
        validate_generate(parsed.to_proto("chatcmpl-test"))
    except FleetError as error:
        return error
    return None


def over_grpc(request: inference_pb2.GenerateRequest) -> FleetError | None:
    try:
        validate_generate(request)
    except FleetError as error:
        return error
    return None


def grpc_chat(model: str = "m", **sampling: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=model,
        chat=inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(role="user", content="hello")]),
        sampling=inference_pb2.SamplingParams(**sampling),
    )


# Out of range on both sides. Floats are exact in float32, so the proto carries the same value.
OUT_OF_RANGE = [
    ("max_tokens", 0),
    ("temperature", -0.5),
    ("temperature", 2.5),
    ("temperature", math.nan),
    ("top_p", 0),
    ("top_p", 1.5),
    ("min_p", -0.5),
    ("min_p", 1.5),
    ("presence_penalty", -2.5),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", 2.5),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1),
    ("repetition_penalty", 10.5),
    ("top_logprobs", 21),
    ("n", 0),
    ("n", 129),
]


def test_every_bound_is_exercised() -> None:
    assert {name for name, _ in OUT_OF_RANGE} | {name for name, _ in HTTP_ONLY} == set(SAMPLING_BOUNDS)


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_http_and_grpc_give_the_same_param_and_message(name: str, value: float) -> None:
    extra = {"logprobs": True} if name == "top_logprobs" else {}
    http = over_http({"model": "m", "messages": HELLO, name: value, **extra})
    grpc = over_grpc(grpc_chat(**{name: value}, **extra))
    assert http is not None and grpc is not None
    assert (http.code, http.param, http.message) == (grpc.code, grpc.param, grpc.message)
    assert http.code == ErrorCode.INVALID_REQUEST and http.param == name
    assert http.message.startswith(f"'{name}' must be ")


# Values gRPC cannot even carry (its fields are unsigned or 32-bit): over HTTP they are a 400 naming the
# field, in the same words, never a crash when the proto is built.
HTTP_ONLY = [
    ("max_tokens", 2**32),
    ("top_k", -1),
    ("top_k", 2**32),
    ("seed", -(2**63) - 1),  # OpenAI's seed is a signed 64-bit integer; gRPC's unsigned: both ranges are taken
    ("seed", 2**64),
    ("seed", 10**400),
]


@pytest.mark.parametrize(("name", "value"), HTTP_ONLY, ids=[f"{n}-{str(v)[:24]}" for n, v in HTTP_ONLY])
def test_values_grpc_cannot_carry_are_a_400_over_http(name: str, value: int) -> None:
    http = over_http({"model": "m", "messages": HELLO, name: value})
    assert http is not None and http.code == ErrorCode.INVALID_REQUEST and http.param == name
    assert http.message.startswith(f"'{name}' must be between ") and len(http.message) < 200


# At the edges of the table, and values the two sides used to disagree on (repetition_penalty 0.005:
# pydantic took it, validate_sampling refused it).
IN_RANGE = [
    ("max_tokens", 1),
    ("temperature", 0),
    ("temperature", 2),
    ("top_p", 1),
    ("min_p", 0),
    ("min_p", 1),
    ("presence_penalty", -2),
    ("frequency_penalty", 2),
    ("repetition_penalty", 0.005),
    ("repetition_penalty", 10),
    ("top_k", 0),
    ("seed", 0),
    ("top_logprobs", 20),
    ("n", 1),
    ("n", 128),  # within OpenAI's bound: a replica with fewer slots refuses it, naming n (the node's check)
]


def test_max_completion_tokens_wins_over_its_deprecated_alias() -> None:
    """OpenAI deprecated max_tokens for max_completion_tokens; a client sending both means the new one."""
    for body, limit in (
        ({"max_completion_tokens": 3}, 3),
        ({"max_tokens": 5}, 5),
        ({"max_completion_tokens": 3, "max_tokens": 5}, 3),
        ({"max_tokens": 5, "max_completion_tokens": 3}, 3),
    ):
        parsed = parse_body(json.dumps({"model": "m", "messages": HELLO, **body}).encode(), ChatCompletionRequest)
        assert parsed.to_proto("chatcmpl-test").sampling.max_tokens == limit, body


@pytest.mark.parametrize(("name", "value"), IN_RANGE)
def test_values_in_range_are_taken_over_both(name: str, value: float) -> None:
    extra = {"logprobs": True} if name == "top_logprobs" else {}
    assert over_http({"model": "m", "messages": HELLO, name: value, **extra}) is None
    assert over_grpc(grpc_chat(**{name: value}, **extra)) is None


def test_http_names_of_the_same_bounds_are_named_in_the_error() -> None:
    tokens = over_http({"model": "m", "messages": HELLO, "max_completion_tokens": 0})
    assert tokens is not None and tokens.param == "max_completion_tokens"
    grpc = over_grpc(grpc_chat(max_tokens=0))
    assert grpc is not None and tokens.message == grpc.message.replace("max_tokens", "max_completion_tokens")
    legacy = over_http({"model": "m", "prompt": "x", "logprobs": 21}, chat=False)
    assert legacy is not None and legacy.param == "logprobs" and "between 0 and 20; got 21" in legacy.message
    assert over_http({"model": "m", "prompt": "x", "logprobs": 20}, chat=False) is None


@pytest.mark.parametrize(
    "body",
    [
        {"messages": HELLO},
        {"model": None, "messages": HELLO},
        {"model": "", "messages": HELLO},
        {"model": "   ", "messages": HELLO},
        {"messages": "not a list", "temperature": 9},  # checked first, as over gRPC
    ],
)
def test_model_required_over_http(body: dict[str, Any]) -> None:
    error = over_http(body)
    assert error is not None and (error.code, error.param) == (ErrorCode.MODEL_REQUIRED, "model")


def test_model_required_over_grpc_is_the_same_error() -> None:
    http = over_http({"messages": HELLO})
    for model in ("", "   "):
        grpc = over_grpc(grpc_chat(model, temperature=9))
        assert grpc is not None and http is not None
        assert (grpc.code, grpc.param, grpc.message) == (http.code, http.param, http.message)


def test_a_seed_in_openais_signed_range_is_carried_as_its_twos_complement() -> None:
    def carried(seed: int) -> int:
        body = json.dumps({"model": "m", "messages": HELLO, "seed": seed}).encode()
        return parse_body(body, ChatCompletionRequest).to_proto("chatcmpl-test").sampling.seed

    assert [carried(s) for s in (0, 7, 2**64 - 1, -1, -2, -(2**63))] == [0, 7, 2**64 - 1, 2**64 - 1, 2**64 - 2, 2**63]
