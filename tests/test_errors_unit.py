"""The error vocabulary's one table, and its round trip through gRPC status details."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from mesh.errors import ErrorCode, FleetError, vocabulary_code
from mesh.grpc_server import ended_by_deadline

EXPECTED = {
    "MODEL_REQUIRED": (400, grpc.StatusCode.INVALID_ARGUMENT),
    "INVALID_REQUEST": (400, grpc.StatusCode.INVALID_ARGUMENT),
    "CONTEXT_LENGTH_EXCEEDED": (400, grpc.StatusCode.INVALID_ARGUMENT),
    "MODEL_NOT_FOUND": (404, grpc.StatusCode.NOT_FOUND),
    "MODEL_UNAVAILABLE": (503, grpc.StatusCode.UNAVAILABLE),
    "BACKEND_UNAVAILABLE": (503, grpc.StatusCode.UNAVAILABLE),
    "BACKEND_TIMEOUT": (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    "GPU_OVERLOADED": (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "NO_CAPACITY": (429, grpc.StatusCode.RESOURCE_EXHAUSTED),  # a busy fleet: come back later, not 503
}


@pytest.mark.parametrize(("code", "expected"), EXPECTED.items())
def test_each_code_maps_to_http_and_grpc(code: str, expected: tuple[int, grpc.StatusCode]) -> None:
    error = FleetError(ErrorCode(code), "message")
    assert (error.http_status, error.grpc_code) == expected


def test_every_code_has_a_mapping() -> None:
    for code in ErrorCode:
        error = FleetError(code, "x")
        assert error.http_status >= 400
        assert error.openai_body()["error"]["code"] == OPENAI_SPELLING.get(code.value, code.value)
        assert vocabulary_code(error.openai_body()["error"]["code"]) == code.value


# OpenAI's API has its own codes for these; applications look for them in the HTTP body's `code`.
OPENAI_SPELLING = {
    "CONTEXT_LENGTH_EXCEEDED": "context_length_exceeded",
    "MODEL_NOT_FOUND": "model_not_found",
    "INVALID_API_KEY": "invalid_api_key",
    "MODEL_NOT_ALLOWED": "model_not_allowed",
    "RATE_LIMIT_EXCEEDED": "rate_limit_exceeded",
}


def test_every_reason_is_spelled_as_error_info_asks() -> None:
    """google.rpc.ErrorInfo: a reason matches [A-Z][A-Z0-9_]+[A-Z0-9]. The credential codes were OpenAI's
    lowercase over gRPC too, so a client matched two spellings."""
    for code in ErrorCode:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+[A-Z0-9]", code.value), code


def test_a_reason_in_the_spelling_of_an_earlier_peer_is_understood() -> None:
    for earlier, code in (
        ("invalid_api_key", ErrorCode.INVALID_API_KEY),
        ("rate_limit_exceeded", ErrorCode.RATE_LIMIT_EXCEEDED),
    ):
        info = error_details_pb2.ErrorInfo(reason=earlier, domain="fleetlm", metadata={"retry_after_seconds": "7"})
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=16, message="no", details=[detail])
        received = _Received(None, grpc.StatusCode.UNAUTHENTICATED, "no")
        received._trailing = (("grpc-status-details-bin", status.SerializeToString()),)
        got = FleetError.from_rpc_error(received)
        assert (got.code, got.retry_after_seconds) == (code, 7)


class _Received(grpc.RpcError):
    """What a gRPC client holds after a call failed: code, details, trailing metadata."""

    def __init__(self, error: FleetError | None, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details
        self._trailing = error.grpc_trailing_metadata() if error else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailing


def test_error_info_round_trip_keeps_reason_param_and_metadata() -> None:
    sent = FleetError(
        ErrorCode.MODEL_NOT_FOUND,
        "no such model",
        param="model",
        metadata={"available_models": "a,b"},
        retry_after_seconds=3,
    )
    got = FleetError.from_rpc_error(_Received(sent, sent.grpc_code, sent.message))
    assert got == sent


def test_bare_grpc_failures_are_classified() -> None:
    unavailable = FleetError.from_rpc_error(_Received(None, grpc.StatusCode.UNAVAILABLE, "connect failed"))
    assert unavailable.code == ErrorCode.BACKEND_UNAVAILABLE
    deadline = FleetError.from_rpc_error(_Received(None, grpc.StatusCode.DEADLINE_EXCEEDED))
    assert deadline.code == ErrorCode.BACKEND_TIMEOUT


def test_openai_shape() -> None:
    body = FleetError(ErrorCode.INVALID_REQUEST, "bad", param="top_p").openai_body()
    assert body == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "top_p",
            "code": "INVALID_REQUEST",
        }
    }
    assert FleetError(ErrorCode.GPU_OVERLOADED, "busy", retry_after_seconds=2).http_headers() == {"Retry-After": "2"}


@pytest.mark.parametrize("code", [ErrorCode.GPU_OVERLOADED, ErrorCode.NO_CAPACITY])
def test_overload_is_a_rate_limit_that_says_when_to_come_back(code: ErrorCode) -> None:
    error = FleetError(code, "every replica is busy")
    assert error.http_status == 429 and error.openai_body()["error"]["type"] == "rate_limit_error"
    assert error.http_headers() == {"Retry-After": "1"}  # named by no one: the default
    received = FleetError.from_rpc_error(_Received(error, error.grpc_code, error.message))
    assert received.code == code and received.retry_after_seconds == 1  # it crosses gRPC hops too
    assert FleetError(code, "busy", retry_after_seconds=7).http_headers() == {"Retry-After": "7"}


def test_unavailable_stays_503_and_a_bare_resource_exhausted_is_overload() -> None:
    for code in (ErrorCode.MODEL_UNAVAILABLE, ErrorCode.BACKEND_UNAVAILABLE):
        assert FleetError(code, "cannot be served").http_status == 503
    bare = FleetError.from_rpc_error(_Received(None, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"))
    assert bare.code == ErrorCode.NO_CAPACITY and bare.http_status == 429 and bare.http_headers()


def test_a_peer_that_is_not_fleetlm_is_classified_not_crashed_on() -> None:
    garbage = _Received(None, grpc.StatusCode.INTERNAL, "boom")
    garbage._trailing = (("grpc-status-details-bin", b"\xff\x00 not a status"),)
    assert FleetError.sent_by_peer(garbage) is None
    assert FleetError.from_rpc_error(garbage).code == ErrorCode.BACKEND_UNAVAILABLE
    sent = FleetError(ErrorCode.BACKEND_UNAVAILABLE, "engine crashed", retry_after_seconds=1)
    assert FleetError.sent_by_peer(_Received(sent, grpc.StatusCode.UNAVAILABLE)) == sent


class _Remaining:
    """What `ended_by_deadline` reads of a call's context: the time its deadline leaves."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize(
    ("error", "remaining", "by_deadline"),
    [
        # The client's own cancellation at its deadline arrives before the server's timer for it fires.
        (asyncio.CancelledError(), 0.002, True),
        (FleetError(ErrorCode.CANCELLED, "the client cancelled"), 0.002, True),
        (asyncio.CancelledError(), -0.01, True),
        (asyncio.CancelledError(), 5.0, False),  # a client that cancelled well before its deadline
        (asyncio.CancelledError(), None, False),  # a call without a deadline
        (FleetError(ErrorCode.BACKEND_UNAVAILABLE, "node went away"), 0.0, False),  # not a cancellation
    ],
)
def test_a_cancellation_at_the_calls_deadline_is_the_deadline(
    error: BaseException, remaining: float | None, by_deadline: bool
) -> None:
    assert ended_by_deadline(error, _Remaining(remaining)) is by_deadline  # type: ignore[arg-type]
