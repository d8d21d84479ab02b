"""Validation of InferenceService requests, the same at the edge and on the node.

The edge checks before it spends a placement decision; the node checks again because gRPC clients may
call a node directly. Every rejection names the request field (`param`) as OpenAI's API does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError, invalid

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
# OpenAI's own bound on `n`. A replica runs at most its max_running_requests sequences at once: a request
# for more choices than that is refused by the node (also a 400 naming n).
MAX_CHOICES = 128
MAX_LOGIT_BIAS = 1024  # logit_bias entries: far more than any use of it (OpenAI's own limit is 300)
# Limits against abuse, checked before anything is tokenized (tokenizing is linear in the text, and a
# chat template renders every message): more than any context the fleet serves (1,000,000 characters is
# ~250k tokens; OpenAI's API takes 2,048 messages at most), far less than what would tie up an engine.
MAX_MESSAGES = 2048
MAX_PROMPT_CHARS = 1_000_000
MAX_TOKEN_IDS = 1_000_000  # a Detokenize request's ids: more than any context, bounded all the same
# A JSON schema in response_format: its text is bounded (the grammar made from it grows with it, and it
# is parsed on every node that serves it); its name is OpenAI's pattern.
MAX_SCHEMA_CHARS = 65_536
SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Tools: OpenAI's limit on their number; a function's name follows the schema name's pattern (OpenAI's), and
# its parameters schema the same bound as a response_format's.
MAX_TOOLS = 128
FUNCTION_NAME = SCHEMA_NAME
UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        digits = str(int(value))
        return digits if len(digits) <= 24 else f"{digits[:20]}... ({len(digits)} digits)"
    return repr(float(value))  # the shortest that reads back as the value: 2.0000001 is not shown as 2


@dataclass(frozen=True)
class Bound:
    """The values one request parameter accepts: low <= value <= high (low < value when `low_open`)."""

    low: float
    high: float
    low_open: bool = False

    def check(self, param: str, value: float) -> None:
        """Raise INVALID_REQUEST naming `param` when `value` is outside (NaN and infinities always are)."""
        finite = isinstance(value, int) or math.isfinite(value)  # a JSON integer may not fit a float
        above_low = value > self.low if self.low_open else value >= self.low
        if finite and above_low and value <= self.high:
            return
        low = f"greater than {_number(self.low)} and at most" if self.low_open else f"between {_number(self.low)} and"
        raise invalid(param, f"'{param}' must be {low} {_number(self.high)}; got {_number(value)}")


# The one table of SamplingParams' bounds. gRPC requests are checked against it by validate_sampling, and
# the HTTP API's models check their fields against the same entries (edge/openai_protocol.py), so that a
# value out of range gets the same param and message over both. The integer limits beyond the bounds that
# matter are the proto fields' own (uint32, uint64): over HTTP a bigger number is an error, not a crash.
SAMPLING_BOUNDS: Mapping[str, Bound] = {
    "max_tokens": Bound(1, UINT32_MAX),
    "temperature": Bound(0, 2),
    "top_p": Bound(0, 1, low_open=True),
    "top_k": Bound(0, UINT32_MAX),
    "min_p": Bound(0, 1),
    "seed": Bound(0, UINT64_MAX),
    "presence_penalty": Bound(-2, 2),
    "frequency_penalty": Bound(-2, 2),
    # Multiplicative (llama.cpp, vLLM, SGLang): 1 is off; llama.cpp divides logits by it, so never 0.
    "repetition_penalty": Bound(0, 10, low_open=True),
    "top_logprobs": Bound(0, MAX_TOP_LOGPROBS),
    "n": Bound(1, MAX_CHOICES),
}


# OpenAI's `seed` is a signed 64-bit integer; SamplingParams.seed is unsigned (64 bits). The HTTP API takes
# both ranges: a negative seed is carried as its two's complement (seed mod 2^64), so -1 is 2^64 - 1, a fixed
# seed like any other (not llama.cpp's "random").
OPENAI_SEED = Bound(-(2**63), UINT64_MAX)


def seed_to_proto(seed: int) -> int:
    """An HTTP request's seed (OPENAI_SEED) as SamplingParams.seed."""
    return seed % 2**64


def seed_to_openai(seed: int) -> int:
    """SamplingParams.seed as an OpenAI-compatible server takes every seed: a signed 64-bit integer (vLLM
    refuses one beyond), and not negative (llama.cpp's servers read -1 as "random"), so still a fixed seed."""
    return seed % 2**63


def require_model(model: object) -> None:
    """The one check that a request names a model (a JSON body's `model`, or a proto's)."""
    if model is None or (isinstance(model, str) and not model.strip()):
        raise FleetError(ErrorCode.MODEL_REQUIRED, "the 'model' field is required", param="model")


# max_tokens of a completion that echoes its prompt: 0 scores the prompt and generates nothing (how
# evaluation harnesses ask for a text's log probabilities).
ECHO_MAX_TOKENS = Bound(0, UINT32_MAX)


def sampling_bound(name: str, echo: bool = False) -> Bound:
    """The bound of SamplingParams field `name` (max_tokens may be 0 when the prompt is echoed)."""
    return ECHO_MAX_TOKENS if echo and name == "max_tokens" else SAMPLING_BOUNDS[name]


def validate_sampling(params: inference_pb2.SamplingParams, echo: bool = False) -> None:
    for name in SAMPLING_BOUNDS:
        field = params.DESCRIPTOR.fields_by_name[name]
        if not field.has_presence or params.HasField(name):
            sampling_bound(name, echo).check(name, getattr(params, name))
    if len(params.stops) > MAX_STOPS:
        raise invalid("stop", f"at most {MAX_STOPS} stop sequences are allowed; got {len(params.stops)}")
    if any(not s for s in params.stops):
        raise invalid("stop", "stop sequences must not be empty strings")
    check_logit_bias(params.logit_bias)
    if params.top_logprobs and not params.logprobs:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs' set to true")
    if params.HasField("response_format"):
        validate_response_format(params.response_format)


def check_logit_bias(bias: Mapping[int, float]) -> None:
    """OpenAI's logit_bias over both APIs: token ids (not negative) -> a bias of -100 to 100, at most
    MAX_LOGIT_BIAS of them. Whether the model has each id is its engine's to say."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise invalid("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens; got {len(bias)}")
    for token, value in bias.items():
        if token < 0:
            raise invalid("logit_bias", f"logit_bias keys are token ids, 0 or more; got {token}")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise invalid(
                "logit_bias", f"logit_bias values must be between -100 and 100; got {_number(value)} for token {token}"
            )


def validate_response_format(response_format: inference_pb2.ResponseFormat) -> None:
    """Its shape: one kind, and for json_schema a name and a schema that is a JSON object. Whether an
    engine can enforce the schema is the engine's to say (also INVALID_REQUEST naming response_format)."""
    which = response_format.WhichOneof("format")
    if which is None:
        raise invalid("response_format", "'response_format' must set one of text, json_object or json_schema")
    if which != "json_schema":
        return
    spec = response_format.json_schema
    if not SCHEMA_NAME.fullmatch(spec.name):
        raise invalid(
            "response_format",
            "'response_format.json_schema.name' must be 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'",
        )
    if len(spec.schema) > MAX_SCHEMA_CHARS:
        raise invalid("response_format", f"'response_format.json_schema.schema' is over {MAX_SCHEMA_CHARS} characters")
    try:
        schema = json.loads(spec.schema) if spec.schema else None
    except (ValueError, RecursionError) as exc:
        raise invalid("response_format", f"'response_format.json_schema.schema' is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise invalid("response_format", "'response_format.json_schema.schema' must be a JSON object (a JSON schema)")


def check_prompt_chars(param: str, texts: Iterable[str]) -> None:
    """The text a request asks to tokenize, bounded before it is: MAX_PROMPT_CHARS in all."""
    total = 0
    for text in texts:
        total += len(text)
        if total > MAX_PROMPT_CHARS:
            raise invalid(param, f"'{param}' has more than {MAX_PROMPT_CHARS} characters in all")


def validate_chat(chat: inference_pb2.ChatConversation) -> None:
    if not chat.messages:
        raise invalid("messages", "'messages' must contain at least one message")
    if len(chat.messages) > MAX_MESSAGES:
        raise invalid("messages", f"at most {MAX_MESSAGES} messages are allowed; got {len(chat.messages)}")
    check_prompt_chars(
        "messages", (t for m in chat.messages for t in (m.content, *(c.function.arguments for c in m.tool_calls)))
    )
    call_ids: set[str] = set()  # ids of the tool calls made so far in the conversation
    for i, message in enumerate(chat.messages):
        if message.role not in ROLES:
            raise invalid(
                f"messages[{i}].role",
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got '{message.role}'",
            )
        _validate_tool_history(i, message, call_ids)
    last = chat.messages[-1]
    if chat.continue_final_message and last.role != "assistant":
        raise invalid(
            "continue_final_message",
            f"'continue_final_message' needs the last message to be the assistant's; its role is '{last.role}'",
        )
    if chat.continue_final_message and last.tool_calls:
        raise invalid("continue_final_message", "a final assistant message with tool calls cannot be continued")
    validate_tools(chat)


def validate_calls_answered(chat: inference_pb2.ChatConversation) -> None:
    """For a generation: every call of an assistant turn is answered by a tool turn right after it, as
    OpenAI requires (the model would otherwise go on from a call it never heard the result of). Not asked
    of a conversation only counted (Tokenize): one may be counted before its calls' results are in."""
    turn = -1  # the last assistant turn, and its calls no tool turn has answered yet
    unanswered: list[str] = []
    for i, message in enumerate(chat.messages):
        if message.role == "tool":
            unanswered = [c for c in unanswered if c != message.tool_call_id]
            continue
        _answered(turn, unanswered)
        turn, unanswered = i, [call.id for call in message.tool_calls]
    _answered(turn, unanswered)


def _answered(i: int, calls: list[str]) -> None:
    if calls:
        missing = ", ".join(calls[:5]) + (", ..." if len(calls) > 5 else "")
        raise invalid(
            f"messages[{i}].tool_calls",
            f"an assistant message with 'tool_calls' must be followed by tool messages answering each"
            f" 'tool_call_id'; messages[{i}] has calls no tool message answers: {missing}",
        )


def _validate_tool_history(i: int, message: inference_pb2.ChatMessage, call_ids: set[str]) -> None:
    """Tool calls only on assistant turns, each with an id and a function name; a tool turn answers a call
    made before it, by id (as OpenAI requires)."""
    if message.tool_calls and message.role != "assistant":
        raise invalid(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls is only allowed on role 'assistant'")
    ids: set[str] = set()
    for j, call in enumerate(message.tool_calls):
        where = f"messages[{i}].tool_calls[{j}]"
        if not call.id:
            raise invalid(f"{where}.id", f"{where}.id must not be empty")
        if call.id in ids:
            raise invalid(f"{where}.id", f"{where}.id '{call.id[:80]}' is the id of an earlier call of this message")
        ids.add(call.id)
        if not call.function.name:
            raise invalid(f"{where}.function.name", f"{where}.function.name must not be empty")
        call_ids.add(call.id)
    if message.role != "tool":
        if message.tool_call_id:
            raise invalid(f"messages[{i}].tool_call_id", f"messages[{i}].tool_call_id is only allowed on role 'tool'")
        return
    if not message.tool_call_id:
        raise invalid(
            f"messages[{i}].tool_call_id", f"messages[{i}] has role 'tool' and needs the 'tool_call_id' it answers"
        )
    if message.tool_call_id not in call_ids:
        raise invalid(
            f"messages[{i}].tool_call_id",
            f"messages[{i}].tool_call_id '{message.tool_call_id[:80]}' answers no tool call of an earlier assistant"
            " message",
        )


def validate_tools(chat: inference_pb2.ChatConversation) -> None:
    """The tools' shapes (names, parameters a JSON object schema), and a tool_choice that fits them. Whether
    an engine can enforce a parameters schema is the engine's to say (a 400 naming
    `tools[i].function.parameters`)."""
    if len(chat.tools) > MAX_TOOLS:
        raise invalid("tools", f"at most {MAX_TOOLS} tools are allowed; got {len(chat.tools)}")
    check_prompt_chars(
        "tools", (t for tool in chat.tools for t in (tool.function.description, tool.function.parameters))
    )
    names: list[str] = []
    for i, tool in enumerate(chat.tools):
        where = f"tools[{i}].function"
        if not tool.HasField("function"):
            raise invalid(where, f"'{where}' is required")
        name = tool.function.name
        if not FUNCTION_NAME.fullmatch(name):
            raise invalid(f"{where}.name", f"'{where}.name' must be 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'")
        if name in names:
            raise invalid(f"{where}.name", f"'{where}.name' is '{name}', which an earlier tool has too")
        names.append(name)
        _validate_parameters(f"{where}.parameters", tool.function.parameters)
    _validate_tool_choice(chat, names)


def _validate_parameters(param: str, parameters: str) -> None:
    if not parameters:
        return  # no arguments
    if len(parameters) > MAX_SCHEMA_CHARS:
        raise invalid(param, f"'{param}' is over {MAX_SCHEMA_CHARS} characters")
    try:
        schema = json.loads(parameters)
    except (ValueError, RecursionError) as exc:
        raise invalid(param, f"'{param}' is not valid JSON: {exc}") from exc
    if not isinstance(schema, dict):
        raise invalid(param, f"'{param}' must be a JSON object (a JSON schema)")
    if schema.get("type", "object") != "object":
        raise invalid(param, f"'{param}' must describe an object (its 'type' must be \"object\")")


def _validate_tool_choice(chat: inference_pb2.ChatConversation, names: list[str]) -> None:
    if not chat.HasField("tool_choice"):
        return
    which = chat.tool_choice.WhichOneof("choice")
    if which is None:
        raise invalid("tool_choice", "'tool_choice' must set one of mode or function_name")
    if which == "mode":
        mode = chat.tool_choice.mode
        if mode not in inference_pb2.ToolChoiceMode.values():
            raise invalid("tool_choice", f"'tool_choice.mode' {mode} is not a ToolChoiceMode")
        if mode == inference_pb2.TOOL_CHOICE_MODE_REQUIRED and not names:
            raise invalid("tool_choice", "'tool_choice' is 'required', but the request has no 'tools'")
        return
    name = chat.tool_choice.function_name
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise invalid(
            "tool_choice", f"'tool_choice' names the function '{name[:80]}', which is not among the tools ({listed})"
        )


def validate_generate(request: inference_pb2.GenerateRequest) -> None:
    require_model(request.model)
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("messages", "a request needs 'messages' (chat) or 'prompt' (completion)")
    if which == "chat":
        validate_chat(request.chat)
        validate_calls_answered(request.chat)
        if request.echo:
            raise invalid("echo", "'echo' is for a completion's prompt; a chat has none to echo")
    elif which == "prompt_token_ids":
        check_prompt_ids(request.prompt_token_ids.ids)
    else:
        if not request.prompt:
            raise invalid("prompt", "'prompt' must not be empty")
        check_prompt_chars("prompt", (request.prompt,))
    validate_sampling(request.sampling, request.echo)
    # proto3 enums are open: a number the proto does not name arrives as it is, and is refused by name rather
    # than read as the default (every enum field of a request is checked: this one and tool_choice.mode).
    if request.delivery not in inference_pb2.TextDelivery.values():
        raise invalid("delivery", f"'delivery' {request.delivery} is not a TextDelivery")
    if which == "chat" and request.sampling.n > 1 and _may_call_tools(request.chat):
        raise invalid(
            "n",
            f"'n' is {request.sampling.n}: several choices cannot be combined with tools (n must be 1, or "
            "tool_choice 'none')",
        )


def _may_call_tools(chat: inference_pb2.ChatConversation) -> bool:
    none = chat.HasField("tool_choice") and chat.tool_choice.WhichOneof("choice") == "mode"
    return bool(chat.tools) and not (none and chat.tool_choice.mode == inference_pb2.TOOL_CHOICE_MODE_NONE)


def validate_embed(request: inference_pb2.EmbedRequest, max_inputs: int = 2048) -> None:
    require_model(request.model)
    if not request.inputs:
        raise invalid("input", "'input' must not be empty")
    if len(request.inputs) > max_inputs:
        raise invalid("input", f"at most {max_inputs} inputs per request; got {len(request.inputs)}")
    if any(not text for text in request.inputs):
        raise invalid("input", "'input' must not contain empty strings")
    check_prompt_chars("input", request.inputs)


def validate_tokenize(request: inference_pb2.TokenizeRequest) -> None:
    require_model(request.model)
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("text", "a request needs 'text' or 'chat'")
    if which == "chat":
        validate_chat(request.chat)
        if request.chat.continue_final_message and request.add_generation_prompt:
            raise invalid(
                "add_generation_prompt",
                "'add_generation_prompt' and 'continue_final_message' cannot both be true: the final message is"
                " either continued or followed by a new turn",
            )
    else:
        check_prompt_chars("text", (request.text,))
        if request.HasField("add_generation_prompt"):
            raise invalid("add_generation_prompt", "'add_generation_prompt' applies to a conversation, not to a text")


def check_prompt_ids(ids: Sequence[int], param: str = "prompt") -> None:
    """A prompt of token ids: at least one, at most MAX_TOKEN_IDS, none negative. Whether the model has each
    is its engine's to say."""
    if not ids:
        raise invalid(param, f"'{param}' must not be empty")
    if len(ids) > MAX_TOKEN_IDS:
        raise invalid(param, f"at most {MAX_TOKEN_IDS} token ids in '{param}'; got {len(ids)}")
    for i, token in enumerate(ids):
        if token < 0:
            raise invalid(param, f"{param}[{i}] is {token}; token ids are not negative")
        if token > INT32_MAX:
            raise invalid(param, f"{param}[{i}] is {token}; no model has a token id that large")


def validate_detokenize(request: inference_pb2.DetokenizeRequest) -> None:
    """The ids' count and sign; whether each is in the model's vocabulary is the engine's to say."""
    require_model(request.model)
    if len(request.token_ids) > MAX_TOKEN_IDS:
        raise invalid("token_ids", f"at most {MAX_TOKEN_IDS} token ids per request; got {len(request.token_ids)}")
    for i, token in enumerate(request.token_ids):
        if token < 0:
            raise invalid("token_ids", f"token {i} is {token}; token ids are not negative")
