"""The id of the request a task is working for, from the edge to the node and the engine.

The edge takes a client's `X-Request-Id` (or makes one), returns it on every response and sends it on in
gRPC metadata (`x-request-id`); the node passes it to an engine server as the same HTTP header. While a
request is served, REQUEST_ID holds it, so every log line written on its behalf carries it (mesh.logs).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

from mesh import tracing
from mesh.errors import invalid

HTTP_HEADER = "X-Request-Id"
METADATA_KEY = "x-request-id"  # gRPC metadata keys are lower case
MAX_LENGTH = 128
# What a client's id may hold: enough for UUIDs, ULIDs, OpenAI's `req_...` and trace-style ids; nothing that
# could break a log line or a header (no spaces, quotes or control characters).
_VALID = re.compile(rf"[A-Za-z0-9._:/+=@-]{{1,{MAX_LENGTH}}}")

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")


def make() -> str:
    """A fresh id: OpenAI's shape (`req_` and 32 hex digits)."""
    return f"req_{uuid.uuid4().hex}"


def is_valid(value: str) -> bool:
    return _VALID.fullmatch(value) is not None


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The id a caller sent in gRPC metadata, if it is a valid one; else ''."""
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str) and is_valid(value):
            return value
    return ""


def checked(value: str, where: str) -> str:
    """A client's id as given, or a 400 naming where it came from (`where`: the header or metadata key).
    Never replaced silently: the client would look for its id in vain."""
    if not is_valid(value):
        raise invalid(
            where,
            f"invalid {where}: at most {MAX_LENGTH} characters of letters, digits and ._:/+=@- (got"
            f" {len(value)} characters{'' if value.isprintable() else ', some unprintable'})",
        )
    return value


def sent_in(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The id a gRPC caller sent (checked: a 400 when it is not valid), or a fresh one."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return checked(value if isinstance(value, str) else value.decode("latin-1"), METADATA_KEY)
    return make()


def outgoing(request_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata of a call made for a request: its id and, with tracing on, the current span's trace
    context (mesh.tracing)."""
    if tracing.TRACER is None:
        return ((METADATA_KEY, request_id),)
    return ((METADATA_KEY, request_id), *tracing.inject({}).items())


@contextlib.contextmanager
def bound(request_id: str) -> Iterator[None]:
    """REQUEST_ID is `request_id` inside the block (and in tasks created there)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # ended in another Context (a generator closed by another task)
            REQUEST_ID.reset(token)
