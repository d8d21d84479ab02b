"""OpenAI's Responses API (`POST /v1/responses`): its request and response shapes, and their translation to
and from fleetlm's protos. A Responses request is a chat underneath: `instructions` and the `input` items
become the conversation (messages, the assistant's `function_call`s and their `function_call_output`s),
function `tools`, `tool_choice` and `text.format` map onto the same proto fields as chat's, and the reply's
text and calls come back as `output` items, whole or as the API's typed stream events.

fleetlm keeps no responses: `previous_response_id`, `conversation`, `background` and stored `prompt`
templates are refused (a 400 naming the field; send the whole conversation in `input`), `store` is
accepted and nothing is stored.
OpenAI's built-in tools (web search, file search, computer use...) and non-text input are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from edge.openai_protocol import TOOL_CHOICE_MODES, new_id
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import FleetError, invalid
from mesh.inference_requests import MAX_MESSAGES, SAMPLING_BOUNDS

INPUT_TEXT = ("input_text", "output_text", "text")  # content parts that are text
ROLES = ("user", "system", "developer", "assistant")


def _text_of(content: Any, where: str) -> str:
    """A message's or a tool output's content: a string, or a list of text parts (others refused by name)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, f"'{where}' must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in INPUT_TEXT and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in INPUT_TEXT:
            raise invalid(f"{where}[{j}].text", f"'{where}[{j}].text' must be a string")
        elif isinstance(kind, str) and kind.startswith("input_"):
            raise invalid(
                f"{where}[{j}]", f"'{kind}' content is not supported: fleetlm passes text only, to every model"
            )
        else:
            raise invalid(f"{where}[{j}]", f"'{where}[{j}]' must be a text part (input_text or output_text)")
    return "\n".join(texts)  # parts as chat joins them (edge.openai_protocol.ChatMessageIn)


def _string(item: dict[str, Any], key: str, where: str, empty: bool = True) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise invalid(f"{where}.{key}", f"'{where}.{key}' must be a {'' if empty else 'non-empty '}string")
    return value


def conversation(instructions: str | None, given: str | list[Any]) -> list[inference_pb2.ChatMessage]:
    """`instructions` and `input` as the chat's messages: an assistant's function calls join its message
    (or start one), a function call's output is a `tool` message answering its call_id."""
    messages = [inference_pb2.ChatMessage(role="system", content=instructions)] if instructions else []
    if isinstance(given, str):
        return [*messages, inference_pb2.ChatMessage(role="user", content=given)]
    if not given:
        raise invalid("input", "'input' must not be empty")
    if len(given) > MAX_MESSAGES:
        raise invalid("input", f"at most {MAX_MESSAGES} input items are allowed; got {len(given)}")
    call_ids: set[str] = set()  # of the function calls so far: an output answers one of them
    unanswered: dict[str, int] = {}  # call_id -> the item of a function call no output has answered yet
    for i, item in enumerate(given):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, f"'{where}' must be an object")
        kind = item.get("type", "message")
        if kind == "message" or (kind == "function_call" and messages and messages[-1].role == "tool"):
            _answered(unanswered)  # the model's next turn: every call before it has its output
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise invalid(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}")
            if "content" not in item:
                raise invalid(f"{where}.content", f"'{where}.content' is missing: a message needs content")
            messages.append(inference_pb2.ChatMessage(role=role, content=_text_of(item["content"], f"{where}.content")))
        elif kind == "function_call":
            call = inference_pb2.ToolCall(
                id=_string(item, "call_id", where, empty=False),
                function=inference_pb2.FunctionCall(
                    name=_string(item, "name", where, empty=False), arguments=_string(item, "arguments", where)
                ),
            )
            if call.id in unanswered:
                raise invalid(f"{where}.call_id", f"'{where}.call_id' '{call.id[:80]}' is an earlier function_call's")
            call_ids.add(call.id)
            unanswered[call.id] = i
            if not messages or messages[-1].role != "assistant":
                messages.append(inference_pb2.ChatMessage(role="assistant"))
            messages[-1].tool_calls.append(call)
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where, empty=False)
            if call_id not in call_ids:
                raise invalid(
                    f"{where}.call_id", f"'{where}.call_id' '{call_id[:80]}' answers no function_call before it"
                )
            content = _text_of(item.get("output"), f"{where}.output")
            unanswered.pop(call_id, None)
            messages.append(inference_pb2.ChatMessage(role="tool", content=content, tool_call_id=call_id))
        elif kind == "reasoning":
            continue  # a reasoning model's thoughts, handed back: fleetlm's models have none to read
        else:
            raise invalid(f"{where}.type", f"input items of type '{kind}' are not supported here")
    _answered(unanswered)
    return messages


def _answered(unanswered: dict[str, int]) -> None:
    """Every function call is answered by its function_call_output before the model's next turn (as
    OpenAI requires: the model would go on from a call it never heard the result of)."""
    if unanswered:
        call_id, i = next(iter(unanswered.items()))  # the earliest
        raise invalid(
            f"input[{i}]",
            f"'input[{i}]' is a function_call (call_id '{call_id[:80]}') that no function_call_output answers:"
            " send its output after it",
        )


# The chat's fields that a refusal from further on (the gateway's checks, a node's) may name, as the
# Responses API names them: (chat's, the Responses API's), the longer first.
_CHAT_NAMES = (
    ("'messages'", "'input'"),
    ("max_tokens", "max_output_tokens"),
    ("response_format.json_schema.", "text.format."),
    ("response_format", "text.format"),
)
# A chat's function tool holds its fields under `function`; a response's tool holds them itself.
_FUNCTION = re.compile(r"((?:tools\[\d+\])|tool_choice)\.function\b")


def renamed(error: FleetError) -> FleetError:
    """A refusal about the chat underneath a response, naming the Responses API's fields instead: `input`
    for the messages (the input items' own checks in `conversation` come first, naming the item),
    `max_output_tokens`, `text.format`, `tools[i].name` for a chat's `tools[i].function.name`."""
    param = error.param or ""
    if param == "messages" or param.startswith("messages["):
        param = "input"
    message = error.message
    for chat, responses in _CHAT_NAMES:
        param = param.replace(chat.strip("'"), responses.strip("'"))
        message = message.replace(chat, responses)
    param, message = (_FUNCTION.sub(r"\1", text) for text in (param, message))
    return dataclasses.replace(error, param=param or error.param, message=message)


def _tool(tool: Any, where: str) -> inference_pb2.Tool:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise invalid(
            f"{where}.type", f"'{kind}' tools are built into OpenAI's own service; fleetlm serves function tools"
        )
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise invalid(f"{where}.parameters", f"'{where}.parameters' must be a JSON schema object")
    description = tool.get("description")
    return inference_pb2.Tool(
        function=inference_pb2.FunctionDefinition(
            name=_string(tool, "name", where),
            description=description if isinstance(description, str) else "",
            parameters=json.dumps(parameters) if parameters is not None else "",
            strict=tool.get("strict") is not False,  # the Responses API's default is strict
        )
    )


def _format(text: Any) -> inference_pb2.ResponseFormat | None:
    spec = text.get("format") if isinstance(text, dict) else None
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return inference_pb2.ResponseFormat(json_object=inference_pb2.JsonObjectFormat())
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise invalid("text.format.schema", "'text.format.schema' must be a JSON schema object")
        description = spec.get("description")
        return inference_pb2.ResponseFormat(
            json_schema=inference_pb2.JsonSchemaFormat(
                name=_string(spec, "name", "text.format"),
                description=description if isinstance(description, str) else "",
                schema=json.dumps(schema),
                strict=bool(spec.get("strict")),
            )
        )
    raise invalid("text.format.type", "'text.format.type' must be one of text, json_object, json_schema")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None  # accepted (its type checked, as documented); nothing is stored
    # What needs responses kept on the server, which fleetlm does not do: refused, never ignored.
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None  # a prompt template stored in OpenAI's dashboard
    include: list[str] | None = None
    # What would change the answer and is not implemented here: refused, never ignored.
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        for field, bound in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
            value = getattr(self, field)
            if value is not None:
                SAMPLING_BOUNDS[bound].check(field, value)
        for field in ("previous_response_id", "conversation"):
            if getattr(self, field) is not None:
                raise invalid(
                    field,
                    f"'{field}' is not supported: fleetlm keeps no responses; send the whole conversation in 'input'",
                )
        if self.prompt is not None:
            raise invalid("prompt", "stored prompt templates are not supported: send 'instructions' and 'input'")
        if self.background:
            raise invalid("background", "'background' responses are not supported: fleetlm keeps no responses")
        if self.top_logprobs:
            raise invalid(
                "top_logprobs", "logprobs are not given by the Responses API here: chat completions give them"
            )
        asked = {k: v for k, v in (self.reasoning or {}).items() if v is not None}
        if asked:
            field = f"reasoning.{next(iter(asked))}"
            raise invalid(field, f"'{field}' is not supported: fleetlm's engines have no reasoning budget or summary")
        if self.truncation == "auto":
            raise invalid(
                "truncation",
                "'truncation: auto' is not supported: fleetlm drops nothing from a conversation; an input beyond the"
                " model's context is a 400",
            )
        for entry in self.include or ():
            if entry != "reasoning.encrypted_content":  # fleetlm's models give no reasoning items to encrypt
                raise invalid("include", f"'include' of '{entry}' is not supported")
        return self

    def to_proto(self, request_id: str) -> inference_pb2.GenerateRequest:
        chat = inference_pb2.ChatConversation(
            messages=conversation(self.instructions, self.input),
            tools=[_tool(t, f"tools[{i}]") for i, t in enumerate(self.tools or ())],
        )
        if isinstance(self.tool_choice, str):
            chat.tool_choice.mode = TOOL_CHOICE_MODES[self.tool_choice]
        elif self.tool_choice is not None:
            if self.tool_choice.get("type") != "function" or not isinstance(self.tool_choice.get("name"), str):
                raise invalid(
                    "tool_choice", '\'tool_choice\' must be none, auto, required or {"type": "function", "name": ...}'
                )
            chat.tool_choice.function_name = self.tool_choice["name"]
        if self.parallel_tool_calls is not None:
            chat.parallel_tool_calls = self.parallel_tool_calls
        sampling = inference_pb2.SamplingParams()
        if self.max_output_tokens is not None:
            sampling.max_tokens = self.max_output_tokens
        if self.temperature is not None:
            sampling.temperature = self.temperature
        if self.top_p is not None:
            sampling.top_p = self.top_p
        response_format = _format(self.text)
        if response_format is not None:
            sampling.response_format.CopyFrom(response_format)
        return inference_pb2.GenerateRequest(
            model=self.model or "", chat=chat, sampling=sampling, user=self.user or "", request_id=request_id
        )


def status_of(result: inference_pb2.GenerateResult) -> str:
    """A finished response's status: `incomplete` when max_output_tokens cut it."""
    return "incomplete" if result.finish_reason == inference_pb2.FINISH_REASON_LENGTH else "completed"


def usage_json(usage: inference_pb2.Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


class ResponseShape:
    """One response's envelope (what the request asked for, echoed as OpenAI does) and its output items."""

    def __init__(self, request: ResponsesRequest, model: str) -> None:
        self.id = new_id("resp", "_")
        self.created_at = int(time.time())
        self.request = request
        self.model = model

    def envelope(self, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        r = self.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": r.text if r.text and r.text.get("format") else {"format": {"type": "text"}},
            "tool_choice": r.tool_choice if r.tool_choice is not None else "auto",
            "tools": r.tools or [],
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": r.user,
            "metadata": r.metadata or {},
            **extra,
        }

    @staticmethod
    def message(item_id: str, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}

    @staticmethod
    def function_call(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
                "status": status}  # fmt: skip

    def finished(self, output: list[dict[str, Any]], result: inference_pb2.GenerateResult) -> dict[str, Any]:
        body = self.envelope(status_of(result), output, usage=usage_json(result.usage))
        if body["status"] == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        body["model"] = result.model or self.model
        return body

    def full(self, text: str, result: inference_pb2.GenerateResult) -> dict[str, Any]:
        """The whole response: the text as a message (when there is any, or no call), then each call. The
        last item is the one max_output_tokens cut, if it cut one: it has the response's status (a call's
        arguments may then be half a JSON object), the others are completed, as the stream says."""
        status = status_of(result)
        calls = list(result.tool_calls)
        output = []
        if text or not calls:
            output.append(self.message(new_id("msg", "_"), text, "completed" if calls else status))
        for i, call in enumerate(calls):
            done = status if i == len(calls) - 1 else "completed"
            output.append(self.function_call(new_id("fc", "_"), call.id, call.function.name, call.function.arguments,
                                             done))  # fmt: skip
        return self.finished(output, result)


class ResponseEvents:
    """The Responses API's stream: typed events with a sequence number, each output item added, filled by
    deltas and done in order, then `response.completed` (or `response.incomplete`) with the whole response."""

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item being filled
        self._call_index = -1  # the ToolCallDelta index the open call item is for

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

    def start(self) -> list[bytes]:
        response = self.shape.envelope("in_progress", [])
        return [
            self.event("response.created", response=response),
            self.event("response.in_progress", response=response),
        ]

    def text(self, delta: str) -> list[bytes]:
        events = []
        if self._open is None or self._open["type"] != "message":
            events += self._close()
            events += self._open_message()
        item = self._open
        assert item is not None
        item["content"][0]["text"] += delta
        events.append(self.event("response.output_text.delta", item_id=item["id"], output_index=len(self.output),
                                 content_index=0, delta=delta, logprobs=[]))  # fmt: skip
        return events

    def tool_call(self, delta: inference_pb2.ToolCallDelta) -> list[bytes]:
        events = []
        if self._open is None or self._open["type"] != "function_call" or delta.index != self._call_index:
            events += self._close()
            item = self.shape.function_call(new_id("fc", "_"), delta.id, delta.name, "", "in_progress")
            self._open, self._call_index = item, delta.index
            events.append(self.event("response.output_item.added", output_index=len(self.output), item=dict(item)))
        item = self._open
        if delta.arguments:
            item["arguments"] += delta.arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                     output_index=len(self.output), delta=delta.arguments))  # fmt: skip
        return events

    def _open_message(self) -> list[bytes]:
        item = self.shape.message(new_id("msg", "_"), "", "in_progress")
        self._open = item
        index = len(self.output)
        return [
            self.event("response.output_item.added", output_index=index, item={**item, "content": []}),
            self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                       part=item["content"][0]),
        ]  # fmt: skip

    def _close(self, status: str = "completed") -> list[bytes]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.output)
        item["status"] = status
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=part["text"], logprobs=[]))  # fmt: skip
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))  # fmt: skip
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     arguments=item["arguments"]))  # fmt: skip
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return events

    def finish(self, result: inference_pb2.GenerateResult) -> list[bytes]:
        status = status_of(result)
        # A reply with no text and no call is one empty message, as the whole response has it (ResponseShape.full)
        events = self._open_message() if self._open is None and not self.output else []
        events += self._close(status)
        response = self.shape.finished(self.output, result)
        return [*events, self.event(f"response.{status}", response=response)]

    def error(self, body: dict[str, Any]) -> bytes:
        error = body.get("error", {})
        return self.event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))
