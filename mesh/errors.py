"""fleetlm's one error vocabulary, and its mapping to HTTP (OpenAI's error shape) and to gRPC.

Every failure a client can see is a `FleetError` with a code from `ErrorCode`. The table below gives each
code its HTTP status, gRPC status code and OpenAI error type, so that an HTTP client and a gRPC client
see the same reason for the same failure. Over gRPC the reason travels as a google.rpc.ErrorInfo in the
status details (domain "fleetlm"), so it survives every hop: node -> edge -> client.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "fleetlm"
# A 429 always says when to come back (OpenAI's clients and the old system's read it); a refusal that
# names no time of its own gets this one.
DEFAULT_RETRY_AFTER_SECONDS = 1
DETAILS_KEY = "grpc-status-details-bin"


class ErrorCode(enum.StrEnum):
    """Reasons a request can fail. The value is what clients see as `code` / ErrorInfo.reason."""

    INVALID_REQUEST = "INVALID_REQUEST"
    MODEL_REQUIRED = "MODEL_REQUIRED"
    CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    NODE_NOT_FOUND = "NODE_NOT_FOUND"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    BACKEND_UNAVAILABLE = "BACKEND_UNAVAILABLE"
    BACKEND_TIMEOUT = "BACKEND_TIMEOUT"
    FORMAT_NOT_SUPPORTED = "FORMAT_NOT_SUPPORTED"
    NO_CAPACITY = "NO_CAPACITY"
    GPU_OVERLOADED = "GPU_OVERLOADED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    # Credentials and limits. An HTTP body spells the edge's as OpenAI does (`_OPENAI_CODES`), which its
    # SDKs and users already know; UNAUTHENTICATED is an operator's missing or wrong admin credential.
    INVALID_API_KEY = "INVALID_API_KEY"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    RATE_LIMIT_EXCEEDED = "RATE_LIMIT_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    # A fleet component that proved who it is but may not make this call (a node's certificate on AdminService).
    PERMISSION_DENIED = "PERMISSION_DENIED"
    API_KEY_NOT_FOUND = "API_KEY_NOT_FOUND"
    JOIN_TOKEN_NOT_FOUND = "JOIN_TOKEN_NOT_FOUND"
    # A node id a running node holds (Join): another host under it would lock that node out.
    NODE_ID_IN_USE = "NODE_ID_IN_USE"
    # The RPC needs something this control plane was not started with (the fleet CA, the fleet secret).
    NOT_CONFIGURED = "NOT_CONFIGURED"


@dataclass(frozen=True)
class _Mapping:
    http_status: int
    grpc_code: grpc.StatusCode
    openai_type: str


# The one table. OpenAI's types: invalid_request_error (4xx the caller can fix), rate_limit_error (429:
# the fleet is busy now, come back after Retry-After), server_error (5xx: it cannot be served as it is).
_TABLE: Mapping[ErrorCode, _Mapping] = {
    ErrorCode.INVALID_REQUEST: _Mapping(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    ErrorCode.MODEL_REQUIRED: _Mapping(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: _Mapping(400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"),
    ErrorCode.FORMAT_NOT_SUPPORTED: _Mapping(400, grpc.StatusCode.FAILED_PRECONDITION, "invalid_request_error"),
    ErrorCode.MODEL_NOT_FOUND: _Mapping(404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
    ErrorCode.NODE_NOT_FOUND: _Mapping(404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
    ErrorCode.LEASE_EXPIRED: _Mapping(404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
    ErrorCode.GPU_OVERLOADED: _Mapping(429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error"),
    ErrorCode.NO_CAPACITY: _Mapping(429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error"),
    ErrorCode.MODEL_UNAVAILABLE: _Mapping(503, grpc.StatusCode.UNAVAILABLE, "server_error"),
    ErrorCode.BACKEND_UNAVAILABLE: _Mapping(503, grpc.StatusCode.UNAVAILABLE, "server_error"),
    ErrorCode.BACKEND_TIMEOUT: _Mapping(504, grpc.StatusCode.DEADLINE_EXCEEDED, "server_error"),
    ErrorCode.CANCELLED: _Mapping(499, grpc.StatusCode.CANCELLED, "server_error"),
    ErrorCode.INTERNAL: _Mapping(500, grpc.StatusCode.INTERNAL, "server_error"),
    ErrorCode.INVALID_API_KEY: _Mapping(401, grpc.StatusCode.UNAUTHENTICATED, "invalid_request_error"),
    ErrorCode.UNAUTHENTICATED: _Mapping(401, grpc.StatusCode.UNAUTHENTICATED, "invalid_request_error"),
    ErrorCode.MODEL_NOT_ALLOWED: _Mapping(403, grpc.StatusCode.PERMISSION_DENIED, "invalid_request_error"),
    ErrorCode.PERMISSION_DENIED: _Mapping(403, grpc.StatusCode.PERMISSION_DENIED, "invalid_request_error"),
    ErrorCode.RATE_LIMIT_EXCEEDED: _Mapping(429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error"),
    ErrorCode.API_KEY_NOT_FOUND: _Mapping(404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
    ErrorCode.JOIN_TOKEN_NOT_FOUND: _Mapping(404, grpc.StatusCode.NOT_FOUND, "invalid_request_error"),
    ErrorCode.NODE_ID_IN_USE: _Mapping(409, grpc.StatusCode.ALREADY_EXISTS, "invalid_request_error"),
    ErrorCode.NOT_CONFIGURED: _Mapping(400, grpc.StatusCode.FAILED_PRECONDITION, "invalid_request_error"),
}

# For a gRPC error that carries no ErrorInfo (a peer that is not fleetlm, or the transport itself).
_FROM_GRPC: Mapping[grpc.StatusCode, ErrorCode] = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorCode.INVALID_REQUEST,
    grpc.StatusCode.NOT_FOUND: ErrorCode.MODEL_NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: ErrorCode.BACKEND_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: ErrorCode.BACKEND_TIMEOUT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorCode.NO_CAPACITY,
    grpc.StatusCode.CANCELLED: ErrorCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED: ErrorCode.UNAUTHENTICATED,
}


_REASONS = {code.value for code in ErrorCode}

# OpenAI's own spelling of a code, where its API has one, for the `code` of an HTTP error body:
# applications and frameworks on OpenAI's SDKs test for these (`error.code == "context_length_exceeded"`,
# or the code in the body's text, is how many of them trim a conversation and retry). gRPC's
# ErrorInfo.reason, the access log and the metrics keep the vocabulary's spelling (`vocabulary_code`).
_OPENAI_CODES: Mapping[ErrorCode, str] = {
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "context_length_exceeded",
    ErrorCode.MODEL_NOT_FOUND: "model_not_found",
    ErrorCode.INVALID_API_KEY: "invalid_api_key",
    ErrorCode.MODEL_NOT_ALLOWED: "model_not_allowed",
    ErrorCode.RATE_LIMIT_EXCEEDED: "rate_limit_exceeded",
}
_FROM_OPENAI = {spelled: code.value for code, spelled in _OPENAI_CODES.items()}
# ErrorInfo reasons as a peer of an earlier version sent them (the credential codes were lowercase then).
_EARLIER = (ErrorCode.INVALID_API_KEY, ErrorCode.MODEL_NOT_ALLOWED, ErrorCode.RATE_LIMIT_EXCEEDED)
_EARLIER_REASONS = {_OPENAI_CODES[code]: code.value for code in _EARLIER}


def vocabulary_code(openai_code: str) -> str:
    """The vocabulary's code for the `code` of an OpenAI-shaped error body (the same string for most)."""
    return _FROM_OPENAI.get(openai_code, openai_code)


@dataclass
class FleetError(Exception):
    """A failure with a code from the vocabulary, safe to show to clients."""

    code: ErrorCode
    message: str
    param: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_seconds: int | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def http_status(self) -> int:
        return _TABLE[self.code].http_status

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _TABLE[self.code].grpc_code

    def openai_body(self) -> dict[str, Any]:
        """The body OpenAI's API returns for an error, which OpenAI SDKs parse."""
        return {
            "error": {
                "message": self.message,
                "type": _TABLE[self.code].openai_type,
                "param": self.param,
                "code": _OPENAI_CODES.get(self.code, self.code.value),
            }
        }

    @property
    def retry_after(self) -> int | None:
        """Seconds the client should wait before trying again, if it says so (every 429 does)."""
        if self.retry_after_seconds is None and self.http_status == 429:
            return DEFAULT_RETRY_AFTER_SECONDS
        return self.retry_after_seconds

    def http_headers(self) -> dict[str, str]:
        retry_after = self.retry_after
        return {} if retry_after is None else {"Retry-After": str(retry_after)}

    def grpc_trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """Trailing metadata holding a google.rpc.Status with an ErrorInfo, as grpcio-status writes it."""
        info_metadata = dict(self.metadata)
        if self.param is not None:
            info_metadata["param"] = self.param
        if self.retry_after is not None:
            info_metadata["retry_after_seconds"] = str(self.retry_after)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason=self.code.value, domain=DOMAIN, metadata=info_metadata))
        status = status_pb2.Status(code=getattr(code_pb2, self.grpc_code.name), message=self.message, details=[detail])
        return ((DETAILS_KEY, status.SerializeToString()),)

    @classmethod
    def sent_by_peer(cls, error: grpc.RpcError) -> FleetError | None:
        """The FleetError a fleetlm peer put in a failed call's status (its ErrorInfo), or None when the
        status carries none (the transport failed, or the peer is not fleetlm)."""
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        for key, value in trailing or ():
            if key != DETAILS_KEY:
                continue
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                return None  # not a google.rpc.Status: no reason of ours in it
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if not detail.Unpack(info) or info.domain != DOMAIN:
                    continue
                reason = _EARLIER_REASONS.get(info.reason, info.reason)
                if reason in _REASONS:
                    meta = dict(info.metadata)
                    param = meta.pop("param", None)
                    retry = meta.pop("retry_after_seconds", "")
                    return cls(
                        ErrorCode(reason),
                        status.message,
                        param=param,
                        metadata=meta,
                        retry_after_seconds=int(retry) if retry.isdigit() else None,
                    )
        return None

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FleetError:
        """Rebuild the FleetError a fleetlm peer sent, or classify a bare gRPC failure."""
        sent = cls.sent_by_peer(error)
        if sent is not None:
            return sent
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else None) or ""
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            # gRPC's own message size limit, not a peer that is full: asking again gets the same answer.
            return cls(
                ErrorCode.INVALID_REQUEST,
                f"the reply is larger than a gRPC message may be here ({details.rsplit('(', 1)[-1].rstrip(')')}"
                " bytes): ask for less in one request",
            )
        mapped = _FROM_GRPC.get(code, ErrorCode.BACKEND_UNAVAILABLE)
        return cls(mapped, f"backend call failed: {code.name}: {details}".rstrip(": "))


def invalid(param: str, message: str) -> FleetError:
    """A 400 naming the offending request field."""
    return FleetError(ErrorCode.INVALID_REQUEST, message, param=param)


def required(value: str, field: str) -> None:
    """A required string field of a request: empty is a 400 naming it."""
    if not value:
        raise invalid(field, f"{field} is required")
