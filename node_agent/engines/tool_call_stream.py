"""Turning a reply's text into content and tool calls, as it streams: pure logic, unit-tested.

The calls are written in Hermes' syntax (node_agent.engines.tool_calls), one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text before a block is content. Content that could still be the start of `<tool_call>` is held back
until the next text says whether it is (so no part of the tag reaches the client as content), and
released at the end if it never became one. Beside a response_format the grammar allows calls or a
document in its schema from the first character, and nothing else (node_agent.engines.tool_calls): there
(`content_or_calls`) the first character that is not a space decides, and a reply that does not open with
a tag is content to its end, tags written inside its strings included.

A call is announced once its name is known (its index, a new `call_...` id and the name), then its
arguments are passed on as the model writes them, up to the end of their JSON value: a scanner follows
strings and nesting, so that the brace closing the wrapping object is not taken for the arguments' own.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from node_agent.engines.base import ToolCall, ToolCallChunk

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
# What the block holds before the arguments: `{"name": "<name>", "arguments": ` (spacing as JSON allows).
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:')
# A block whose opening has not matched _HEADER by this many characters is not a call the grammar made.
_MAX_HEADER = 1024

Event = str | ToolCallChunk  # content text, or part of a call


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class _Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    complete: bool = False


class ToolCallStream:
    """Feed the reply's text; get content and tool-call chunks in the order the model wrote them."""

    def __init__(self, content_or_calls: bool = False) -> None:
        # undecided (until the first character that is not a space) | document | content | header |
        # arguments | closing
        self._state = "undecided" if content_or_calls else "content"
        self._buffer = ""
        self._calls: list[_Call] = []
        # The arguments' JSON value being scanned: nesting depth, inside a string, after a backslash.
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._started = False

    @property
    def calls(self) -> tuple[ToolCall, ...]:
        """The calls so far (the last one's arguments may be incomplete until it is)."""
        return tuple(ToolCall(c.id, c.name, "".join(c.arguments)) for c in self._calls)

    @property
    def complete_calls(self) -> int:
        return sum(1 for c in self._calls if c.complete)

    @property
    def in_content(self) -> bool:
        """Whether the text fed last is content (not part of a call)."""
        return self._state in ("content", "document", "undecided")

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        out: list[Event] = []
        while True:
            progressed = getattr(self, f"_{self._state}")(out)
            if not progressed:
                return out

    def flush(self) -> list[Event]:
        """At the end of the reply: content held back that never became a tag. An unfinished block is
        dropped (a call cut before its name) or kept as it is (a call cut in its arguments)."""
        out: list[Event] = []
        if self.in_content:
            text = self._buffer.lstrip() if self._calls else self._buffer
            if text:
                out.append(text)
        self._buffer = ""
        return out

    def _undecided(self, out: list[Event]) -> bool:
        opening = self._buffer.lstrip()
        if not opening:
            return False
        self._state = "content" if opening.startswith("<") else "document"
        return True

    def _document(self, out: list[Event]) -> bool:
        if self._buffer:
            out.append(self._buffer)
            self._buffer = ""
        return False

    def _content(self, out: list[Event]) -> bool:
        if self._calls:
            self._buffer = self._buffer.lstrip()  # between and after calls: only the separating newlines
        at = self._buffer.find(OPEN)
        if at >= 0:
            if at:
                out.append(self._buffer[:at])
            self._buffer = self._buffer[at + len(OPEN) :]
            self._state = "header"
            return True
        keep = _held_back(self._buffer)
        if len(self._buffer) > keep:
            out.append(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep :]
        return False

    def _header(self, out: list[Event]) -> bool:
        match = _HEADER.match(self._buffer)
        if match is None:
            if len(self._buffer) > _MAX_HEADER:  # not a call after all: what was held is content
                out.append(OPEN + self._buffer)
                self._buffer, self._state = "", "content"
                return True
            return False
        call = _Call(new_call_id(), json.loads(match.group(1)))
        self._calls.append(call)
        out.append(ToolCallChunk(len(self._calls) - 1, call.id, call.name, ""))
        self._buffer = self._buffer[match.end() :]
        self._state = "arguments"
        self._depth, self._in_string, self._escaped, self._started = 0, False, False, False
        return True

    def _arguments(self, out: list[Event]) -> bool:
        call = self._calls[-1]
        end = self._scan()
        piece = self._buffer[:end].lstrip() if not call.arguments else self._buffer[:end]
        if piece:
            call.arguments.append(piece)
            out.append(ToolCallChunk(len(self._calls) - 1, arguments=piece))
        self._buffer = self._buffer[end:]
        return self._state != "arguments"  # the value ended: on to the block's end

    def _scan(self) -> int:
        """How much of the buffer belongs to the arguments' value; sets the state to closing at its end."""
        for i, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                continue
            if char.isspace() and not self._started:
                continue
            self._started = True
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                if self._depth == 0:  # the wrapping object's brace: the value (a scalar) ended before it
                    self._state = "closing"
                    return i
                self._depth -= 1
                if self._depth == 0:
                    self._state = "closing"
                    return i + 1
        return len(self._buffer)

    def _closing(self, out: list[Event]) -> bool:
        at = self._buffer.find(CLOSE)
        if at < 0:
            return False
        self._calls[-1].complete = True
        self._buffer = self._buffer[at + len(CLOSE) :]
        self._state = "content"
        return True


def _held_back(text: str) -> int:
    """The length of the longest end of `text` that begins the tag (it may still become one)."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
