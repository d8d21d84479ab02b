"""Tools over OpenAI's chat API, both ways, for engines that are OpenAI-compatible servers
(node_agent.engines.openai_server): the tool history, tools, tool_choice and parallel_tool_calls a request
carries, and the `delta.tool_calls` a server streams back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from node_agent.engines.base import (
    Chat,
    Finished,
    GenerationEvent,
    InvalidInput,
    Message,
    TextChunk,
    ToolCall,
    ToolCallChunk,
)
from node_agent.engines.tool_call_stream import new_call_id


def message_json(message: Message) -> dict[str, Any]:
    """A message in OpenAI's shape: an assistant's tool calls, a tool result's call id. An assistant message
    of calls only has content "" (OpenAI also takes null or none, but llama_cpp.server refuses null, and
    templates that write `message['content']` fail without it)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
    return out


def tools_json(chat: Chat) -> dict[str, Any]:
    """OpenAI's tools, tool_choice and parallel_tool_calls, for the server to render and enforce (or refuse,
    with its 400). Nothing when the conversation has no tools."""
    if not chat.tools:
        return {}
    tools = []
    for f in chat.tools:
        function: dict[str, Any] = {"name": f.name, "description": f.description}
        function["parameters"] = json.loads(f.parameters) if f.parameters else {"type": "object", "properties": {}}
        if f.strict:
            function["strict"] = True
        tools.append({"type": "function", "function": function})
    choice = chat.tool_choice
    named = {"type": "function", "function": {"name": choice.function}}
    return {
        "tools": tools,
        "tool_choice": named if choice.mode == "function" else choice.mode,
        "parallel_tool_calls": chat.parallel_tool_calls,
    }


class ToolCallDeltas:
    """A server's streamed `delta.tool_calls` as the engine's chunks: a call is announced once (index, id,
    name; an id is made for a server that sends none), then its argument pieces. Keeps the whole calls.
    With `single` (parallel_tool_calls false) a second call is not taken: `over` says one came, and the
    reply ends with the first (OpenAI's rule, for a server that ignores the flag)."""

    def __init__(self, single: bool = False) -> None:
        self._calls: dict[int, ToolCall] = {}
        self._single = single
        self.over = False

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(self._calls[i] for i in sorted(self._calls))

    def feed(self, deltas: Any) -> list[ToolCallChunk]:
        out = []
        for delta in deltas if isinstance(deltas, list) else ():
            index = int(delta.get("index", len(self._calls)))
            if self._single and self._calls and index not in self._calls:
                self.over = True
                break
            function = delta.get("function") or {}
            arguments = str(function.get("arguments") or "")
            call = self._calls.get(index)
            if call is None:
                call = ToolCall(str(delta.get("id") or new_call_id()), str(function.get("name") or ""), "")
                out.append(ToolCallChunk(index, call.id, call.name, ""))
            if arguments:
                out.append(ToolCallChunk(index, arguments=arguments))
            self._calls[index] = ToolCall(call.id, call.name, call.arguments + arguments)
        return out


async def demanded_calls(events: AsyncIterator[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
    """A server's reply to a tool_choice that demands a call ("required", a named function): text is held
    back until a call comes, and a reply that ends without one is refused naming `tool_choice` instead of
    passed on as if the server had honoured it (llama_cpp.server's default chat format ignores
    "required" and answers in text)."""
    held: list[GenerationEvent] = []
    called = False
    async for event in events:
        called = called or isinstance(event, ToolCallChunk)
        if called:
            for earlier in held:
                yield earlier
            held = []
            yield event
        elif isinstance(event, Finished):
            raise InvalidInput(
                "the engine's server answered with no tool call although tool_choice demands one: it does not"
                " enforce tool_choice",
                "tool_choice",
            )
        elif isinstance(event, TextChunk):
            held.append(event)
