"""Tool calling in the llama.cpp engine: the tools and the tool history in the prompt, and the grammar that
keeps the reply's calls to their syntax and the functions' parameters. (`tool_call_stream` parses the
reply into calls.)

Calls are written in Hermes' syntax (Hermes 2 Pro, Qwen 2.5 and 3, SmolLM3, ...), one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A model whose chat template has this tool format (the template writes `<tool_call>` and renders the
`tools` it is given) gets the tools and the tool history through its own template, as it was trained to
see them. Every other model gets the generic format, documented in the README:
- a section at the end of the system prompt (a system message is added when there is none), SECTION
  below: the functions as JSON objects, one a line, inside <tools></tools>, and the call syntax;
- the assistant's calls in the history written as those blocks (after the message's text, if any);
- tool results as a user turn of <tool_response>...</tool_response> blocks, one per result (every template
  knows the user role; consecutive results share one turn, for templates that insist that roles
  alternate).

The grammar is exactly that syntax, with each function's arguments from its parameters schema
(json_grammar; a schema it cannot enforce is refused naming `tools[i].function.parameters`). tool_choice
"required" and a named function apply it from the first token; "auto" makes it lazy, started by the
first `<tool_call>` the model writes (text before it is content); "none" renders no tools and applies no
grammar. parallel_tool_calls false allows one block, true one or more.
"""

from __future__ import annotations

import json
from typing import Any

from node_agent.engines.base import Chat, Function, Message
from node_agent.engines.json_grammar import CONTENT_RULE, arguments_grammar
from node_agent.engines.llamacpp_batch import Trigger
from node_agent.engines.tool_call_stream import CLOSE, OPEN

RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
# The section does not name <tool_response>: with it there, SmolLM2 went on `<tool_` with `response>` far more
# often than with `call>` (asked to repeat a call's block, it called in 3 of 16 replies at temperature 0.5 and
# 0 of 16 at 1.0 with the sentence; in 4 of 8 at 0.7 without). Results show their wrapper where they appear.
SECTION = """# Tools

You can call functions to help you answer. Each function is described by a JSON object, one a line:
<tools>
{functions}
</tools>

To call a function, reply with its name and arguments as a JSON object in a <tool_call></tool_call> block:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments, a JSON object>}}
</tool_call>
{choice}"""
_CHOICES = {
    "auto": "Call a function when it helps; otherwise answer in text.",
    "required": "You must call at least one function.",
}
_PARALLEL = {True: "You may make several calls, one block each.", False: "Make at most one call."}
# A function named by a probe rendering: a template that shows it renders the tools it is given.
_PROBE = "fleetlm_probe_function"


def renders_tools(template: str, formatter: Any) -> bool:
    """Whether a chat template has Hermes' tool format: it writes `<tool_call>` and renders `tools`."""
    if OPEN not in template:
        return False
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {}}}]
    try:
        prompt = str(formatter(messages=[{"role": "user", "content": "hello"}], tools=probe).prompt)
    except Exception:
        return False
    return _PROBE in prompt


def call_block(name: str, arguments: str) -> str:
    """One call as the model writes it (the arguments are JSON text, written as they are)."""
    return f"{OPEN}\n{{{_header_fields(name)}{arguments or '{}'}}}\n{CLOSE}"


def _header_fields(name: str) -> str:
    return f'"name": {json.dumps(name)}, "arguments": '


def _parameters(function: Function) -> dict[str, Any]:
    return json.loads(function.parameters) if function.parameters else {"type": "object", "properties": {}}


def _arguments(text: str) -> Any:
    """A call's arguments for a template: the JSON value (HF templates write `arguments | tojson`), or
    the text when it is not JSON (a client may send back what a model wrote)."""
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text


def _tool_json(function: Function) -> dict[str, Any]:
    """A tool as OpenAI's API and chat templates write it."""
    parameters = _parameters(function)
    return {
        "type": "function",
        "function": {"name": function.name, "description": function.description, "parameters": parameters},
    }


def template_input(chat: Chat, native: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages for the chat template, and the tools it is given (None for the generic format, which
    writes them into the system prompt, and when no tool may be called)."""
    if native:
        tools = [_tool_json(f) for f in chat.tools] if chat.calls_tools else None
        return [_native_message(m, chat.messages) for m in chat.messages], tools
    messages: list[dict[str, Any]] = []
    results = False  # the last message is a turn of tool results
    for message in chat.messages:
        if message.role == "tool":
            result = f"{RESULT_OPEN}\n{message.content}\n{RESULT_CLOSE}"
            if results:
                messages[-1]["content"] += "\n" + result
            else:
                messages.append({"role": "user", "content": result})
        elif message.tool_calls:
            blocks = [call_block(c.name, c.arguments) for c in message.tool_calls]
            messages.append({"role": message.role, "content": "\n".join([message.content, *blocks]).lstrip("\n")})
        else:
            messages.append({"role": message.role, "content": message.content})
        results = message.role == "tool"
    if chat.calls_tools:
        _add_section(messages, chat)
    return messages, None


def _native_message(message: Message, history: tuple[Message, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        names = [c.name for m in history for c in m.tool_calls if c.id == message.tool_call_id]
        if names:
            out["name"] = names[0]
    return out


def _add_section(messages: list[dict[str, Any]], chat: Chat) -> None:
    functions = "\n".join(json.dumps(_tool_json(f)) for f in chat.tools)
    choice = chat.tool_choice
    wanted = f"You must call {choice.function}." if choice.mode == "function" else _CHOICES[choice.mode]
    if choice.mode != "function":
        wanted += " " + _PARALLEL[chat.parallel_tool_calls]
    section = SECTION.format(functions=functions, choice=wanted)
    if messages and messages[0]["role"] in ("system", "developer"):
        messages[0]["content"] = f"{messages[0]['content']}\n\n{section}".lstrip()
    else:
        messages.insert(0, {"role": "system", "content": section})


def _literal(text: str) -> str:
    """A GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def tool_grammar(chat: Chat, trigger_tokens: tuple[int, ...] = (), content: str = "") -> tuple[str, Trigger | None]:
    """The GBNF of the reply's calls (root `root`), and the trigger that starts it when tool_choice is
    "auto" (None: it applies from the first token). Raises InvalidInput naming the parameters of a tool
    whose schema the grammar cannot enforce.

    `content` is the JSON schema's text of a response_format beside the tools. Under "auto" the reply is
    then either calls or content that follows the schema, from the first token (no trigger: there is no
    free text for a call to follow). A reply that must call ("required", a named function) has no content,
    so the schema changes nothing there; it is still checked, so that what cannot be enforced is refused
    whatever the tool_choice."""
    choice = chat.tool_choice
    either = bool(content) and choice.mode == "auto"
    rules, names = arguments_grammar(tuple(f.parameters for f in chat.tools), content)
    callable_ = [
        (function, rule)
        for function, rule in zip(chat.tools, names, strict=True)
        if choice.mode != "function" or function.name == choice.function
    ]
    heads = ["\n{" + _header_fields(f.name) for f, _ in callable_]
    calls = " | ".join(f"{_literal(head)} {rule}" for head, (_, rule) in zip(heads, callable_, strict=True))
    parallel = chat.parallel_tool_calls and choice.mode != "function"
    root = 'tool-call ("\\n" tool-call)*' if parallel else "tool-call"
    if either:
        root = f"( {root} ) | {CONTENT_RULE}"
    grammar = f'{rules}\nroot ::= {root}\ntool-call ::= {_literal(OPEN)} ( {calls} ) "}}" "\\n" {_literal(CLOSE)}\n'
    trigger = Trigger(OPEN, tuple(heads), trigger_tokens) if choice.mode == "auto" and not either else None
    return grammar, trigger
