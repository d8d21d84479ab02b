"""OpenAI's request and response shapes, and their translation to and from fleetlm's protos.

Requests are validated by pydantic (types) and by mesh.inference_requests' table of bounds (ranges, the
same as over gRPC); a field of the wrong type or out of range becomes a 400 naming the field. Fields
OpenAI defines that fleetlm does not implement are refused when they would change the result (suffix,
best_of, audio, web search, image/audio/file content, the deprecated functions/function_call), and ignored
when they would not (metadata, store). A completion's `echo` begins each choice with its prompt (PromptEcho), with
the prompt's logprobs when asked for. `response_format` (structured outputs) is taken by chat
and, as vLLM and llama-server take it, by completions. `n` choices come back as `choices[i]` with their
`index`, streamed or not. Chat takes tools (`tools`, `tool_choice`, `parallel_tool_calls`, assistant
`tool_calls` and `tool` messages in the history); a reply's calls come back as `message.tool_calls`,
streamed as `delta.tool_calls` (index, id, type and name first, then pieces of the arguments).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from fleetlm.inference.v1 import inference_pb2
from mesh.errors import invalid
from mesh.inference_requests import (
    INT32_MAX,
    OPENAI_SEED,
    SAMPLING_BOUNDS,
    check_logit_bias,
    check_prompt_ids,
    sampling_bound,
    seed_to_proto,
)

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
TOOL_CHOICE_MODES = {
    "none": inference_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": inference_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": inference_pb2.TOOL_CHOICE_MODE_REQUIRED,
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    """OpenAI's `response_format.json_schema`. The name's pattern and the schema's size are checked with
    the proto (mesh.inference_requests.validate_response_format), the same over gRPC."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # `schema` would shadow BaseModel.schema
    strict: bool | None = None


class ResponseFormatIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> Self:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'json_schema' is required when type is 'json_schema'")
        return self

    def to_proto(self) -> inference_pb2.ResponseFormat:
        if self.type == "text":
            return inference_pb2.ResponseFormat(text=inference_pb2.TextFormat())
        if self.type == "json_object":
            return inference_pb2.ResponseFormat(json_object=inference_pb2.JsonObjectFormat())
        spec = self.json_schema
        assert spec is not None  # _schema_given
        return inference_pb2.ResponseFormat(
            json_schema=inference_pb2.JsonSchemaFormat(
                name=spec.name,
                description=spec.description or "",
                schema=json.dumps(spec.schema_),  # key order kept: it is the order the model writes them in
                strict=bool(spec.strict),
            )
        )


# Fields other servers take that would change the answer and that fleetlm does not implement: a 400 naming
# the field when one is given a value that asks for something (not null, false, 0 or empty), never ignored.
VLLM_REFUSED = {
    "guided_json": "vLLM's guided_json is not supported: send response_format {'type': 'json_schema', ...}",
    "guided_regex": "vLLM's guided_regex is not supported: response_format takes a JSON schema (a 'pattern' in it)",
    "guided_choice": "vLLM's guided_choice is not supported: response_format takes a JSON schema (an 'enum' in it)",
    "guided_grammar": "vLLM's guided_grammar is not supported: response_format takes a JSON schema",
    "structured_outputs": "vLLM's structured_outputs is not supported: send response_format",
    "min_tokens": "min_tokens is not supported",
    "ignore_eos": "ignore_eos is not supported",
    "stop_token_ids": "stop_token_ids is not supported: send stop strings",
    "include_stop_str_in_output": "include_stop_str_in_output is not supported: a stop string is never in the text",
    "prompt_logprobs": "prompt_logprobs is not supported: a completion's echo with logprobs scores the prompt",
    "use_beam_search": "beam search is not supported",
}


# On a chat, the completions API's own fields too.
CHAT_REFUSED = {
    **VLLM_REFUSED,
    "echo": "echo is the completions API's (its prompt before the answer); a chat has no prompt text to echo",
    "suffix": "suffix is the completions API's, and not supported",
    "best_of": "best_of is not supported (n choices are all returned)",
    "reasoning_effort": "reasoning_effort is not supported: fleetlm's engines have no reasoning budget to set",
}


# On a completion, the chat API's own fields: sent to the wrong endpoint, they would be ignored.
COMPLETION_REFUSED = {
    **VLLM_REFUSED,
    "messages": "messages is the chat API's: send a conversation to /v1/chat/completions",
    "top_logprobs": "top_logprobs is the chat API's: on completions, logprobs is the number of alternatives"
    " per token (logprobs: 5)",
    "tools": "tools are the chat API's: send them to /v1/chat/completions",
    "tool_choice": "tool_choice is the chat API's: send tools to /v1/chat/completions",
}


def _refuse_given(data: Any, refused: dict[str, str]) -> None:
    """A 400 naming the first field of `refused` that `data` (a request body) gives a value that asks for
    something."""
    if isinstance(data, dict):
        for field, message in refused.items():
            value = data.get(field)
            if value is not None and value is not False and value != 0 and value != [] and value != {}:
                raise invalid(field, message)


class _Request(BaseModel):
    """pydantic checks the types; the ranges come from mesh.inference_requests.SAMPLING_BOUNDS, the table
    gRPC requests are checked against, so that both give the same param and message."""

    model_config = ConfigDict(extra="ignore", strict=True)
    REFUSED: ClassVar[dict[str, str]] = VLLM_REFUSED

    @model_validator(mode="before")
    @classmethod
    def _refused_fields(cls, data: Any) -> Any:
        _refuse_given(data, cls.REFUSED)
        return data

    # Each bounded field -> the SamplingParams field whose bound it obeys.
    BOUNDED: ClassVar[dict[str, str]] = {name: name for name in SAMPLING_BOUNDS if name != "top_logprobs"}

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    response_format: ResponseFormatIn | None = None
    logit_bias: dict[str, Any] | None = None
    _token_bias: dict[int, float] = PrivateAttr(default_factory=dict)  # logit_bias as SamplingParams takes it

    @field_validator("response_format", mode="wrap")
    @classmethod
    def _response_format_param(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Every error inside response_format names `response_format` (as the gRPC check does)."""
        return _named("response_format", value, handler)

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        # Raises FleetError (INVALID_REQUEST), which pydantic lets through as it is.
        for field, bound in self.BOUNDED.items():
            value = getattr(self, field)
            if value is not None:
                (OPENAI_SEED if bound == "seed" else sampling_bound(bound, self.echoes)).check(field, value)
        self._token_bias = self.token_bias()  # checked here, so that a bad one is refused with the rest
        if self.stream_options is not None and not self.stream:  # as OpenAI answers it
            raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
        return self

    @property
    def echoes(self) -> bool:
        """Whether the prompt is echoed (a completion's `echo`): then max_tokens may be 0."""
        return False

    def token_bias(self) -> dict[int, float]:
        """`logit_bias` as SamplingParams takes it (token id -> bias), or a 400 naming it: OpenAI's keys are
        token ids written as strings, its values numbers from -100 to 100."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise invalid("logit_bias", f"logit_bias keys are token ids, as strings of digits; got {key[:40]!r}")
            token = int(key)
            if token > INT32_MAX:
                raise invalid("logit_bias", f"logit_bias: no model has token id {key[:40]}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise invalid("logit_bias", f"logit_bias values must be numbers from -100 to 100; got {value!r:.40}")
            bias[token] = float(value)
        check_logit_bias(bias)
        return bias

    def sampling(self) -> inference_pb2.SamplingParams:
        params = inference_pb2.SamplingParams()
        for name in (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "n",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(params, name, seed_to_proto(value) if name == "seed" else value)
        if self.stop is not None:
            params.stops.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        if self.response_format is not None:
            params.response_format.CopyFrom(self.response_format.to_proto())
        params.logit_bias.update(self._token_bias)
        return params

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    """A text part, or an assistant's refusal part (OpenAI's history carries the model's refusals so)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "refusal"]
    text: str = ""
    refusal: str = ""

    def value(self) -> str:
        return self.text if self.type == "text" else self.refusal


# Content parts OpenAI defines that carry something other than text. fleetlm's engines get text only (the
# proto's ChatMessage.content is a string), so these are refused by name rather than lost.
NOT_TEXT = {
    "image_url": "images are not supported: fleetlm passes text only, to every model",
    "input_audio": "audio input is not supported: fleetlm passes text only, to every model",
    "file": "file inputs are not supported: fleetlm passes text only, to every model",
}


def refuse_content_parts(messages: Any) -> None:
    """A 400 naming the part (`messages[i].content[j]`) for content that is not text, a part type fleetlm
    does not know, a part without its text, or a refusal part outside an assistant's message."""
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise invalid(where, f'\'{where}\' must be a content part object, such as {{"type": "text", ...}}')
            kind = part.get("type")
            if isinstance(kind, str) and kind in NOT_TEXT:
                raise invalid(where, f"'{kind}' content: {NOT_TEXT[kind]}")
            if kind not in ("text", "refusal"):
                said = "must be 'text' (or 'refusal' in an assistant's message)"
                raise invalid(f"{where}.type", f"'{where}.type' {said}")
            if kind == "refusal" and message.get("role") != "assistant":
                raise invalid(f"{where}.type", f"'{where}': a refusal part is only allowed in an assistant's message")
            if not isinstance(part.get(kind), str):
                raise invalid(f"{where}.{kind}", f"'{where}.{kind}' must be a string")


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallIn(BaseModel):
    """A call an assistant message made (the history a client sends back)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_proto(self) -> inference_pb2.ToolCall:
        call = inference_pb2.FunctionCall(name=self.function.name, arguments=self.function.arguments)
        return inference_pb2.ToolCall(id=self.id, function=call)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    # A participant's name: taken (a string) and not passed on; no chat template here has a place for it.
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.value() for part in self.content)  # as vLLM and llama-server join them

    def to_proto(self) -> inference_pb2.ChatMessage:
        return inference_pb2.ChatMessage(
            role=self.role,
            content=self.text(),
            tool_calls=[call.to_proto() for call in self.tool_calls or ()],
            tool_call_id=self.tool_call_id or "",
        )


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; checked with the proto (validate_tools)
    strict: bool | None = None


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: FunctionIn

    def to_proto(self) -> inference_pb2.Tool:
        function = self.function
        return inference_pb2.Tool(
            function=inference_pb2.FunctionDefinition(
                name=function.name,
                description=function.description or "",
                # key order kept: it is the order the model writes the arguments in
                parameters=json.dumps(function.parameters) if function.parameters is not None else "",
                strict=bool(function.strict),
            )
        )


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: NamedFunction


# The tags pydantic puts in an error's location for the branches of a union of plain types.
_UNION_TAGS = {"str", "int", "float", "bool", "none"}


def _named(param: str, value: Any, handler: Callable[[Any], Any], forms: str = "") -> Any:
    """pydantic's first error in a field, as a 400 naming the field (not its union branches); the message
    says which part. `forms`: what the field may be, said instead when the value is none of a union's."""
    try:
        return handler(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        if forms and (not first["loc"] or first["loc"][0] in _UNION_TAGS or "[" in str(first["loc"][0])):
            raise invalid(param, f"'{param}' must be {forms}") from exc
        parts = [p for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p[:1].isupper()))]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
        message = "must be an object" if first["type"] == "model_type" else first["msg"]
        message = message.removeprefix("Value error, ")
        raise invalid(param, f"invalid '{param}{where}': {message}") from exc


def _token_ids(value: list[Any]) -> bool:
    """Whether a list is one of OpenAI's token-id forms: ids, or lists of ids (a prompt or an input each)."""
    first = value[0] if value else None
    return (isinstance(first, int) and not isinstance(first, bool)) or (
        isinstance(first, list) and bool(first) and all(isinstance(t, int) for t in first)
    )


class TextOnlyMessages(BaseModel):
    """A request whose `messages` may carry only text: other content parts are refused by name."""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        # Before the types are checked, so that an image part is named as such, not as a wrong 'type'.
        if isinstance(data, dict):
            refuse_content_parts(data.get("messages"))
        return data

    @model_validator(mode="after")
    def _content_given(self) -> Self:
        # As OpenAI's API: only an assistant turn may come without content (its calls, or a refusal, are what
        # it said); any other message without it is a mistake, not an empty message ("" is one).
        for i, message in enumerate(getattr(self, "messages", None) or ()):
            if message.role != "assistant" and (message.content is None or message.content == []):
                given = "is missing" if message.content is None else "is an empty list of parts"
                raise invalid(
                    f"messages[{i}].content", f"messages[{i}].content {given}: a {message.role} message needs content"
                )
        return self


class ChatCompletionRequest(_Request, TextOnlyMessages):
    REFUSED: ClassVar[dict[str, str]] = CHAT_REFUSED
    BOUNDED: ClassVar[dict[str, str]] = {
        **_Request.BOUNDED,
        "max_completion_tokens": "max_tokens",
        "top_logprobs": "top_logprobs",
    }

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's deprecated forerunners of tools: refused rather than ignored.
    functions: Any = None
    function_call: Any = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: Any = None
    # vLLM's and SGLang's: the last message, the assistant's, is continued rather than answered.
    continue_final_message: bool = False
    add_generation_prompt: bool | None = None

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice_param(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # An object can only be a named function: its errors are that shape's, not the strings'.
        return _named("tool_choice", value, NamedToolChoice.model_validate if isinstance(value, dict) else handler)

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def check_supported(self) -> None:
        if self.audio is not None:
            raise invalid("audio", "audio output is not supported: fleetlm's models answer in text")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise invalid("modalities", "only the 'text' modality is supported")
        if self.add_generation_prompt is not None and self.add_generation_prompt == self.continue_final_message:
            raise invalid(
                "add_generation_prompt",
                "a chat either starts the assistant's turn (add_generation_prompt) or continues the final message"
                " (continue_final_message: true, add_generation_prompt false or unset)",
            )
        if self.web_search_options is not None:  # as the Responses API's web search tools are refused
            raise invalid(
                "web_search_options",
                "web search is built into OpenAI's own service; fleetlm's models read only the messages",
            )
        for legacy in ("functions", "function_call"):
            if getattr(self, legacy) is not None:
                raise invalid(
                    legacy, f"'{legacy}' (deprecated by OpenAI) is not supported; use 'tools' and 'tool_choice'"
                )

    def chat(self) -> inference_pb2.ChatConversation:
        chat = inference_pb2.ChatConversation(
            messages=[m.to_proto() for m in self.messages], tools=[t.to_proto() for t in self.tools or ()]
        )
        if isinstance(self.tool_choice, str):
            chat.tool_choice.mode = TOOL_CHOICE_MODES[self.tool_choice]
        elif self.tool_choice is not None:
            chat.tool_choice.function_name = self.tool_choice.function.name
        if self.parallel_tool_calls is not None:
            chat.parallel_tool_calls = self.parallel_tool_calls
        chat.continue_final_message = self.continue_final_message
        return chat

    def to_proto(self, request_id: str) -> inference_pb2.GenerateRequest:
        self.check_supported()
        sampling = self.sampling()
        if self.max_completion_tokens is not None:  # OpenAI's current name; max_tokens is its deprecated alias
            sampling.max_tokens = self.max_completion_tokens
        sampling.logprobs = bool(self.logprobs)
        sampling.top_logprobs = self.top_logprobs or 0
        chat = self.chat()
        return inference_pb2.GenerateRequest(
            model=self.model or "", chat=chat, sampling=sampling, user=self.user or "", request_id=request_id
        )


_PROMPT_FORMS = "a string, a list of strings, a list of token ids or a list of lists of token ids"

# Prompts in one completions request (OpenAI's limit is 2048; each is a generation of its own here).
MAX_PROMPTS = 64


class CompletionRequest(_Request):
    REFUSED: ClassVar[dict[str, str]] = COMPLETION_REFUSED
    BOUNDED: ClassVar[dict[str, str]] = {
        **_Request.BOUNDED,
        "logprobs": "top_logprobs",
        "max_completion_tokens": "max_tokens",
    }

    prompt: str | list[str] | list[int] | list[list[int]]  # OpenAI's four forms: text or token ids, one or several
    max_tokens: int | None = 16  # OpenAI's default for completions
    max_completion_tokens: int | None = None  # chat's name for it, taken here too (and winning) as on chat
    echo: bool = False
    logprobs: int | None = None  # the completions API's top_logprobs
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _default_max_tokens(cls, value: Any) -> Any:
        return 16 if value is None else value  # null is OpenAI's default too, not "to the end of the context"

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def echoes(self) -> bool:
        return self.echo

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_forms(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One prompt (text, or a list of token ids), or up to MAX_PROMPTS of them (a list of texts or of lists
        of ids)."""
        if isinstance(value, list):
            if not value:
                raise invalid("prompt", "'prompt' must not be empty")
            one = _token_ids(value) and not isinstance(value[0], list)  # a list of ids is one prompt
            if not one and len(value) > MAX_PROMPTS:
                raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request; got {len(value)}")
        return _named("prompt", value, handler, _PROMPT_FORMS)

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)

    def to_protos(self, request_id: str) -> list[inference_pb2.GenerateRequest]:
        """One GenerateRequest per prompt (edge.prompt_batch merges their streams), all with this request's
        id and sampling."""
        first = self.to_proto(request_id)  # checks every prompt
        protos = [first]
        for prompt in self.prompts[1:]:
            proto = inference_pb2.GenerateRequest()
            proto.CopyFrom(first)
            _put_prompt(proto, prompt)
            protos.append(proto)
        return protos

    def to_proto(self, request_id: str) -> inference_pb2.GenerateRequest:
        if self.suffix:
            raise invalid("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.choices:
            raise invalid("best_of", "best_of is not supported (n choices are all returned; leave best_of unset)")
        prompts = self.prompts
        if not all(prompts):
            raise invalid("prompt", "'prompt' must not contain empty prompts" if len(prompts) > 1 else
                          "'prompt' must not be empty")  # fmt: skip
        for prompt in prompts:
            if not isinstance(prompt, str):
                check_prompt_ids(prompt)
        sampling = self.sampling()
        if self.max_completion_tokens is not None:
            sampling.max_tokens = self.max_completion_tokens
        if self.logprobs is not None:
            sampling.logprobs = True
            sampling.top_logprobs = self.logprobs
        proto = inference_pb2.GenerateRequest(
            model=self.model or "", sampling=sampling, user=self.user or "", request_id=request_id, echo=self.echo
        )
        _put_prompt(proto, prompts[0])
        return proto


def _put_prompt(proto: inference_pb2.GenerateRequest, prompt: str | list[int]) -> None:
    if isinstance(prompt, str):
        proto.prompt = prompt
    else:
        proto.prompt_token_ids.CopyFrom(inference_pb2.TokenIds(ids=prompt))


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _default_encoding(cls, value: Any) -> Any:
        return "float" if value is None else value  # null asks for nothing: OpenAI's default

    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="wrap")
    @classmethod
    def _text_input(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, list) and _token_ids(value):
            raise invalid("input", "input of token ids is not supported: send the input as text")
        return _named("input", value, handler, "a string or a list of strings")

    def to_proto(self) -> inference_pb2.EmbedRequest:
        if self.dimensions is not None:
            raise invalid("dimensions", "choosing the embedding dimensions is not supported")
        inputs = [self.input] if isinstance(self.input, str) else self.input
        return inference_pb2.EmbedRequest(model=self.model or "", inputs=inputs)


# --- responses ---------------------------------------------------------------------------------------


def new_id(prefix: str, separator: str = "-") -> str:
    """A fresh object id: `chatcmpl-...` as chat completions write them, `resp_...` (separator "_") as the
    Responses API does."""
    return f"{prefix}{separator}{uuid.uuid4().hex}"


def usage_json(usage: inference_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


Logprobs = Sequence[inference_pb2.TokenLogprob]


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: a JSON body, or a bare string such as `[DONE]`."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _chat_logprob(entry: inference_pb2.TokenLogprob | inference_pb2.TopLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token_bytes)}


@dataclasses.dataclass
class Choices:
    """A generation's choices as its events arrive, by index: each one's text, logprobs and, with n > 1,
    finish reason (its ChoiceEnd). An echoed prompt (PromptEcho) begins the text and logprobs of the `n`
    choices it begins; the generated tokens' text offsets then count from the prompt's start."""

    n: int = 1  # choices per prompt
    texts: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    logprobs: dict[int, list[inference_pb2.TokenLogprob]] = dataclasses.field(default_factory=dict)
    finishes: dict[int, inference_pb2.FinishReason] = dataclasses.field(default_factory=dict)
    shifts: dict[int, int] = dataclasses.field(default_factory=dict)  # per choice: its echoed prompt's length

    def add(self, event: inference_pb2.GenerateResponse) -> None:
        if event.HasField("delta"):
            delta = event.delta
            self.texts.setdefault(delta.index, []).append(delta.text)
            if delta.logprobs:
                entries = self.logprobs.setdefault(delta.index, [])
                shift = self.shifts.get(delta.index, 0)
                for entry in delta.logprobs:
                    entry.text_offset += shift
                    entries.append(entry)
        elif event.HasField("choice_end"):
            self.finishes[event.choice_end.index] = event.choice_end.finish_reason
        elif event.HasField("prompt"):
            echo = event.prompt
            for index in range(echo.index, echo.index + self.n):
                self.texts.setdefault(index, []).append(echo.text)
                self.shifts[index] = self.shifts.get(index, 0) + len(echo.text)
                if echo.logprobs:
                    self.logprobs.setdefault(index, []).extend(echo.logprobs)


class CompletionShape:
    """Builds the bodies of one chat or text completion, streamed or not."""

    def __init__(self, chat: bool, model: str, request_id: str, logprobs: bool = False) -> None:
        self.chat = chat
        self.logprobs = logprobs
        self.model = model
        self.id = request_id
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self._text_events: dict[int, tuple[bytes, bytes]] = {}  # per choice index
        self.shifts: dict[int, int] = {}  # per choice index: its echoed prompt's length (prompt_chunks)

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def logprobs_json(self, entries: Logprobs, streamed: bool = False, shift: int = 0) -> dict[str, Any] | None:
        """OpenAI's `logprobs` of a choice: chat's `content` list, or the completions API's parallel
        lists, the text offsets moved by `shift` (an echoed prompt's length). None when not asked for, and
        on a streamed chunk that carries no tokens."""
        if not self.logprobs or (streamed and not entries):
            return None
        if self.chat:
            return {
                "content": [
                    {**_chat_logprob(e), "top_logprobs": [_chat_logprob(t) for t in e.top_logprobs]} for e in entries
                ]
            }
        # An echoed prompt's first token has no logprob (NaN: nothing before it): null, as OpenAI shows it.
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [None if math.isnan(e.logprob) else e.logprob for e in entries],
            "top_logprobs": [
                None if math.isnan(e.logprob) else {t.token: t.logprob for t in e.top_logprobs} for e in entries
            ],
            "text_offset": [e.text_offset + shift for e in entries],
        }

    def full(self, choices: Choices, result: inference_pb2.GenerateResult) -> dict[str, Any]:
        """The whole body: one choice per index (a choice's finish reason is its ChoiceEnd's, or, for a
        single choice, the result's). A reply's tool calls (n = 1 only) are the first choice's."""
        listed = []
        for index in range(max(1, len(choices.finishes))):
            text = "".join(choices.texts.get(index, ()))
            reason = FINISH_REASONS.get(choices.finishes.get(index, result.finish_reason), "stop")
            scores = self.logprobs_json(choices.logprobs.get(index, ()))
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if index == 0 and result.tool_calls:
                    message["content"] = text or None  # as OpenAI: a reply of calls only has null content
                    message["tool_calls"] = [tool_call_json(call) for call in result.tool_calls]
                listed.append({"index": index, "message": message, "finish_reason": reason, "logprobs": scores})
            else:
                listed.append({"index": index, "text": text, "finish_reason": reason, "logprobs": scores})
        body = self._envelope(self.object, listed, usage=usage_json(result.usage), system_fingerprint=result.node_id)
        body["model"] = result.model or self.model  # the model that served it: an offload may differ
        return body

    def chunk(
        self,
        text: str | None,
        finish: str | None = None,
        first: bool = False,
        logprobs: Logprobs = (),
        index: int = 0,
        prompt: bool = False,
    ) -> dict[str, Any]:
        """One chunk of choice `index`: its text, or `first` (chat's role), or its finish reason. Its logprobs'
        offsets count from the choice's echoed prompt's start, except in the chunks of the `prompt` itself."""
        shift = 0 if prompt else self.shifts.get(index, 0)
        scores = self.logprobs_json(logprobs, streamed=True, shift=shift)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": scores}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": scores}
        return self._envelope(self.chunk_object, [choice])

    def delta_event(self, text: str, logprobs: Logprobs = (), index: int = 0) -> bytes:
        """The SSE event of a chunk of text. Without logprobs it is the hot path, so the envelope, which is
        the same for every chunk of a choice, is rendered once per choice."""
        if logprobs:
            return sse(self.chunk(text, logprobs=logprobs, index=index))
        event = self._text_events.get(index)
        if event is None:
            marker = "\x00"
            rendered = json.dumps(self.chunk(marker, index=index), separators=(",", ":"))
            head, tail = rendered.split(json.dumps(marker), 1)
            event = self._text_events[index] = (f"data: {head}".encode(), f"{tail}\n\n".encode())
        before, after = event
        return before + json.dumps(text).encode() + after

    def prompt_chunks(self, echo: inference_pb2.PromptEcho, n: int) -> list[bytes]:
        """The SSE events of an echoed prompt (one PromptEcho event), one for each of the `n` choices it
        begins; their generated tokens' text offsets count from the prompt's start from now on."""
        events = []
        for index in range(echo.index, echo.index + n):
            events.append(sse(self.chunk(echo.text, logprobs=echo.logprobs, index=index, prompt=True)))
            self.shifts[index] = self.shifts.get(index, 0) + len(echo.text)
        return events

    def tool_call_chunk(self, delta: inference_pb2.ToolCallDelta) -> dict[str, Any]:
        """A chunk with part of a tool call, as OpenAI streams them: the call's first has its index, id, type
        and name (arguments ""), the later ones the index and the next piece of the arguments."""
        call: dict[str, Any] = {"index": delta.index}
        if delta.id:
            call.update(id=delta.id, type="function", function={"name": delta.name, "arguments": delta.arguments})
        else:
            call["function"] = {"arguments": delta.arguments}
        choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None, "logprobs": None}
        return self._envelope(self.chunk_object, [choice])

    def usage_chunk(self, usage: inference_pb2.Usage) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [], usage=usage_json(usage))


def tool_call_json(call: inference_pb2.ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


def embeddings_json(response: inference_pb2.EmbedResponse, model: str, encoding: str) -> dict[str, Any]:
    data = []
    for i, embedding in enumerate(response.embeddings):
        values = list(embedding.values)
        vector: Any = values
        if encoding == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "total_tokens": response.usage.total_tokens,
        },
    }


def models_json(models: list[inference_pb2.ModelInfo], created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "fleetlm",
                "state": inference_pb2.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower(),
                "context_size": m.context_size,
                "ready_replicas": m.ready_replicas,
            }
            for m in models
        ],
    }
