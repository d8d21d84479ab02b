"""Secrets in model specs (an engine's `api-key`, a hub token) never leave the node that uses them.

A spec travels from a deployment to a node's assignment, because the node needs the key to reach or start
its engine. Everywhere else a spec is shown (AdminService replies, a node's reports, logs, error
messages) it goes through `redact_spec`, and a command line through `redact_argv`.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleetlm.controlplane.v1 import node_pb2

REDACTED = "[redacted]"
# A flag is secret when one of its words is one of these: api-key, hf-token, client-secret, db-password.
# Whole words only, so that max-total-tokens or tokenizer-path stay readable.
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})


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


def redact_spec(spec: node_pb2.ModelSpec) -> node_pb2.ModelSpec:
    """A copy of the spec with secret engine_args and secret values in its command replaced."""
    secret_args = [name for name in spec.engine_args if is_secret_flag(name)]
    command = redact_argv(spec.command)
    if not secret_args and command == list(spec.command):
        return spec
    out = node_pb2.ModelSpec()
    out.CopyFrom(spec)
    for name in secret_args:
        out.engine_args[name] = REDACTED
    del out.command[:]
    out.command.extend(command)
    return out
