"""Secrets in model specs (an engine's `api-key`, a hub token) never leave the node that uses them.

A spec travels from a deployment to a node's assignment, because the node needs the key to reach or start
its engine. Everywhere else a spec is shown (AdminService replies, a node's reports, logs, error
messages) it goes through `redact_spec`, and a command line through `redact_argv`. `redact_message` does
both for any message that holds specs (a reply, a node record), and also cuts the known secret values out
of its free text (an engine's last output in a replica's error, say).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from fleetlm.controlplane.v1 import node_pb2

REDACTED = "[redacted]"
# A flag is secret when one of its words is one of these: api-key, hf-token, client-secret, db-password.
# Whole words only, so that max-total-tokens or tokenizer-path stay readable.
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})
# Values this short are not cut out of free text: they would mangle every word that contains them, and a
# key this short protects nothing anyway. They are still redacted where a spec names them.
MIN_SCRUBBED_LENGTH = 6

M = TypeVar("M", bound=Message)


def is_secret_flag(name: str) -> bool:
    words = name.lstrip("-").lower().replace("_", "-").split("-")
    return any(word in _SECRET_WORDS for word in words)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line with the value of every secret flag (`--api-key V` or `--api-key=V`) replaced."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and "=" in arg:
            flag, _ = arg.split("=", 1)
            out.append(f"{flag}={REDACTED}" if is_secret_flag(flag) else arg)
            continue
        out.append(arg)
        hide_next = arg.startswith("-") and is_secret_flag(arg)
    return out


def secret_values(spec: node_pb2.ModelSpec) -> set[str]:
    """The values `redact_spec` hides: secret engine_args and the values of secret flags in the command."""
    values = {value for name, value in spec.engine_args.items() if is_secret_flag(name)}
    for original, shown in zip(spec.command, redact_argv(spec.command), strict=True):
        if original != shown:
            values.add(original.split("=", 1)[1] if shown.endswith(f"={REDACTED}") else original)
    return {v for v in values if v and v.lower() not in ("true", "false")}


def _redact_spec_in_place(spec: node_pb2.ModelSpec) -> None:
    # The names first: writing to a protobuf map while iterating over it can skip entries.
    for name in [name for name in spec.engine_args if is_secret_flag(name)]:
        spec.engine_args[name] = REDACTED
    command = redact_argv(spec.command)
    if command != list(spec.command):
        del spec.command[:]
        spec.command.extend(command)


def redact_spec(spec: node_pb2.ModelSpec) -> node_pb2.ModelSpec:
    """A copy of the spec with secret engine_args and secret values in its command replaced."""
    if not any(is_secret_flag(name) for name in spec.engine_args) and redact_argv(spec.command) == list(spec.command):
        return spec
    out = node_pb2.ModelSpec()
    out.CopyFrom(spec)
    _redact_spec_in_place(out)
    return out


def redacted_fields(spec: node_pb2.ModelSpec) -> list[str]:
    """The fields of a spec that hold the placeholder instead of a secret: a spec copied from a redacted
    reply and sent back. Such a spec would hand the engine "[redacted]" as its key."""
    fields = [f"engine_args.{name}" for name, value in spec.engine_args.items() if value == REDACTED]
    if any(part == REDACTED or part.endswith(f"={REDACTED}") for part in spec.command):
        fields.append("command")
    return fields


_HOLDS_SPEC: dict[str, bool] = {}  # message type -> can it hold a spec


def _holds_spec(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold a ModelSpec at any depth (walked once per type)."""
    name = descriptor.full_name
    if name not in _HOLDS_SPEC:
        seen, todo = {name}, [descriptor]
        while todo:
            for field in todo.pop().fields:
                child = field.message_type
                if child is not None and child.full_name not in seen:
                    seen.add(child.full_name)
                    todo.append(child)
        _HOLDS_SPEC[name] = node_pb2.ModelSpec.DESCRIPTOR.full_name in seen
    return _HOLDS_SPEC[name]


def _children(entry: Descriptor, field: FieldDescriptor, value: Any) -> Iterable[Message]:
    """The messages a message-typed field holds: one, a repeated field's items, a map's values."""
    if entry.GetOptions().map_entry:
        return value.values() if entry.fields_by_name["value"].message_type is not None else ()
    return value if field.is_repeated else (value,)


def _specs(message: Message) -> Iterable[node_pb2.ModelSpec]:
    if isinstance(message, node_pb2.ModelSpec):
        yield message
        return
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is not None and _holds_spec(entry):
            for child in _children(entry, field, value):
                yield from _specs(child)


def _scrub(text: str, hidden: Sequence[str]) -> str:
    for value in hidden:
        text = text.replace(value, REDACTED)
    return text


def _redact_in_place(message: Message, hidden: Sequence[str]) -> None:
    if isinstance(message, node_pb2.ModelSpec):
        _redact_spec_in_place(message)
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is None:
            if field.type == FieldDescriptor.TYPE_STRING and hidden:
                if field.is_repeated:
                    value[:] = [_scrub(v, hidden) for v in value]
                else:
                    setattr(message, field.name, _scrub(value, hidden))
        elif hidden or _holds_spec(entry):
            if entry.GetOptions().map_entry and entry.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING:
                for key in list(value):
                    value[key] = _scrub(value[key], hidden)
            for child in _children(entry, field, value):
                _redact_in_place(child, hidden)


def redact_message(message: M, secrets: Iterable[str] = ()) -> M:
    """A copy of any message with every ModelSpec in it redacted, and every secret value (those of its own
    specs, plus `secrets`) cut out of its text fields wherever it appears."""
    out = type(message)()
    out.CopyFrom(message)
    known = set(secrets)
    for spec in _specs(out):
        known |= secret_values(spec)
    # Longest first, so that a secret that contains another is cut whole.
    hidden = sorted((v for v in known if len(v) >= MIN_SCRUBBED_LENGTH), key=len, reverse=True)
    _redact_in_place(out, hidden)
    return out
