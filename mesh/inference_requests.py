"""Validation of InferenceService requests, the same at the edge and on the node.

The edge checks before it spends a placement decision; the node checks again because gRPC clients may
call a node directly. Every rejection names the request field (`param`) as OpenAI's API does.
"""

from __future__ import annotations

import math

from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError, invalid

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


def require_model(model: str) -> None:
    if not model.strip():
        raise FleetError(ErrorCode.MODEL_REQUIRED, "the 'model' field is required", param="model")


def _in_range(params: inference_pb2.SamplingParams, name: str, low: float, high: float) -> None:
    if not params.HasField(name):  # type: ignore[arg-type]
        return
    value = getattr(params, name)
    if not (math.isfinite(value) and low <= value <= high):
        raise invalid(name, f"'{name}' must be between {low:g} and {high:g}; got {value:g}")


def validate_sampling(params: inference_pb2.SamplingParams) -> None:
    if params.HasField("max_tokens") and params.max_tokens < 1:
        raise invalid("max_tokens", "'max_tokens' must be at least 1")
    _in_range(params, "temperature", 0.0, 2.0)
    _in_range(params, "presence_penalty", -2.0, 2.0)
    _in_range(params, "frequency_penalty", -2.0, 2.0)
    _in_range(params, "min_p", 0.0, 1.0)
    _in_range(params, "repetition_penalty", 0.01, 10.0)
    if params.HasField("top_p") and not (0.0 < params.top_p <= 1.0):
        raise invalid("top_p", f"'top_p' must be greater than 0 and at most 1; got {params.top_p:g}")
    if len(params.stops) > MAX_STOPS:
        raise invalid("stop", f"at most {MAX_STOPS} stop sequences are allowed; got {len(params.stops)}")
    if any(not s for s in params.stops):
        raise invalid("stop", "stop sequences must not be empty strings")
    if params.top_logprobs > MAX_TOP_LOGPROBS:
        raise invalid(
            "top_logprobs", f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}; got {params.top_logprobs}"
        )
    if params.top_logprobs and not params.logprobs:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs' set to true")


def validate_chat(chat: inference_pb2.ChatConversation) -> None:
    if not chat.messages:
        raise invalid("messages", "'messages' must contain at least one message")
    for i, message in enumerate(chat.messages):
        if message.role not in ROLES:
            raise invalid(
                f"messages[{i}].role",
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got '{message.role}'",
            )


def validate_generate(request: inference_pb2.GenerateRequest) -> None:
    require_model(request.model)
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("messages", "a request needs 'messages' (chat) or 'prompt' (completion)")
    if which == "chat":
        validate_chat(request.chat)
    validate_sampling(request.sampling)


def validate_embed(request: inference_pb2.EmbedRequest, max_inputs: int = 2048) -> None:
    require_model(request.model)
    if not request.inputs:
        raise invalid("input", "'input' must not be empty")
    if len(request.inputs) > max_inputs:
        raise invalid("input", f"at most {max_inputs} inputs per request; got {len(request.inputs)}")
    if any(not text for text in request.inputs):
        raise invalid("input", "'input' must not contain empty strings")


def validate_tokenize(request: inference_pb2.TokenizeRequest) -> None:
    require_model(request.model)
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("text", "a request needs 'text' or 'chat'")
    if which == "chat":
        validate_chat(request.chat)
