"""The edge's access log and request spans: one record per request, filled as the request goes, written as
ONE line (logger `fleetlm.access`, INFO) when it ends, and ended as one span when tracing is on.

The front doors (edge.http_app's RequestIds, edge.grpc_service) open the record and close it; the routes
fill in the model, the tokens and the first token's time; the gateway says which node served
(`served_by`). The record travels in a context variable, so the tasks a request spawns (the disconnect
watch of edge.http_app) fill the same record.

Span names are bounded, as the metrics' labels are (edge.metrics): a client must not be able to make a new
name per request. A span is named for its GenAI operation, with the model only when the fleet serves it (a
node answered, or the routing table holds it): `chat smollm2-135m`, but `chat` for a model no one serves,
which stays in gen_ai.request.model. A route with no operation is named for its route (`/v1/models`,
`/v1/models/{model_id}`), and a path the edge does not serve is `other`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from mesh import request_context, tracing

log = logging.getLogger("fleetlm.access")

# The OpenTelemetry GenAI operation of each route (the span is named "<operation> <model>").
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",  # OpenAI's Responses API: a chat (GenAI's semantic conventions have no other name)
    "/v1/embeddings": "embeddings",
    "Generate": "chat",  # text_completion for a prompt: the servicer says (`Access.operation`)
    "Embed": "embeddings",
    "Tokenize": "tokenize",
    "Detokenize": "detokenize",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
}
# The span name of the HTTP routes that have no GenAI operation; any other path's span is OTHER_ROUTE.
ROUTE_SPANS = {"/v1/models": "/v1/models", "/docs": "/docs", "/openapi.json": "/openapi.json"}
MODEL_ROUTE = "/v1/models/"  # GET /v1/models/{model_id}
OTHER_ROUTE = "other"


@dataclass
class Access:
    request_id: str
    route: str  # the HTTP path or the gRPC method
    protocol: str  # "http" or "grpc"
    operation: str = ""
    model: str = ""
    node: str = ""
    status: int = 0  # HTTP status (over gRPC: the HTTP status of the same outcome, mesh.errors)
    error: str = ""  # the error code, when it failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter time the first token reached the edge
    span: tracing.ServerSpan | None = None  # the request's span when tracing is on
    quiet: bool = False  # a probe's or a scraper's request: its line at DEBUG
    # Whether the fleet serves a model (the routing table's models): only such a model names the span.
    serves: Callable[[str], bool] | None = field(default=None, repr=False)

    def token(self) -> None:
        """Note the first token (later calls keep the first time)."""
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def usage(self, prompt_tokens: int, completion_tokens: int, finish_reason: str = "") -> None:
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.finish_reason = finish_reason or self.finish_reason


CURRENT: ContextVar[Access | None] = ContextVar("fleetlm_access", default=None)


def served_by(node_id: str) -> None:
    """The node that answered the current request (called by the gateway once a replica has)."""
    access = CURRENT.get()
    if access is not None:
        access.node = node_id


def current() -> Access | None:
    return CURRENT.get()


def note_error(code: str) -> None:
    """The error code the current request ended with."""
    access = CURRENT.get()
    if access is not None:
        access.error = str(code)


@contextlib.contextmanager
def request(
    request_id: str,
    route: str,
    protocol: str,
    trace_carrier: Mapping[str, str] | None = None,
    traced: bool = True,
    quiet: bool = False,
    serves: Callable[[str], bool] | None = None,
) -> Iterator[Access]:
    """The record of one request, current inside the block (with REQUEST_ID bound, and its span current
    when tracing is on and `traced`); written to the access log (at DEBUG when `quiet`) and its span ended
    at the end of the block. `serves`: whether the fleet serves a model (see the module's docstring)."""
    access = Access(request_id, route, protocol, OPERATIONS.get(route, ""), quiet=quiet, serves=serves)
    token = CURRENT.set(access)
    try:
        if tracing.TRACER is not None and traced:
            access.span = tracing.ServerSpan(span_name(access), trace_carrier, {"fleetlm.request_id": request_id})
        with request_context.bound(request_id):
            if access.span is None:
                yield access
            else:
                with tracing.current(access.span):
                    yield access
    finally:
        # A gRPC handler cancelled at a `yield` is closed by grpc.aio from a task of its own, in another
        # Context, where the token is not valid: the line is written all the same.
        with contextlib.suppress(ValueError):
            CURRENT.reset(token)
        finish(access)


def finish(access: Access) -> None:
    now = time.perf_counter()
    ttft = None if access.first_token is None else round((access.first_token - access.started) * 1000, 2)
    duration = round((now - access.started) * 1000, 2)
    fields = {
        "request_id": access.request_id,
        "protocol": access.protocol,
        "route": access.route,
        "model": access.model,
        "node": access.node,
        "status": access.status,
        "error": access.error,
        "prompt_tokens": access.prompt_tokens,
        "completion_tokens": access.completion_tokens,
        "ttft_ms": ttft,
        "duration_ms": duration,
    }
    log.log(
        logging.DEBUG if access.quiet else logging.INFO,
        "%s %s %s model=%s node=%s prompt_tokens=%d completion_tokens=%d ttft_ms=%s duration_ms=%.2f%s",
        access.protocol,
        access.route,
        access.status,
        access.model or "-",
        access.node or "-",
        access.prompt_tokens,
        access.completion_tokens,
        "-" if ttft is None else f"{ttft:.2f}",
        duration,
        f" error={access.error}" if access.error else "",
        extra=fields,
    )
    if access.span is not None:
        _end_span(access)


def span_name(access: Access) -> str:
    """The request's span name, from a bounded set (see the module's docstring)."""
    if access.operation:
        served = access.model and (access.node or (access.serves is not None and access.serves(access.model)))
        return f"{access.operation} {access.model}" if served else access.operation
    if access.protocol == "grpc":
        return access.route  # a method of the service: grpc answers UNIMPLEMENTED for any other
    if access.route.startswith(MODEL_ROUTE):
        return MODEL_ROUTE + "{model_id}"
    return ROUTE_SPANS.get(access.route, OTHER_ROUTE)


def _end_span(access: Access) -> None:
    span = access.span
    assert span is not None
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": access.operation,
        "gen_ai.request.model": access.model,
        "gen_ai.usage.input_tokens": access.prompt_tokens,
        "gen_ai.usage.output_tokens": access.completion_tokens,
        "fleetlm.node.id": access.node,
        "http.response.status_code" if access.protocol == "http" else "fleetlm.status_code": access.status,
    }
    if access.finish_reason:
        attributes["gen_ai.response.finish_reasons"] = [access.finish_reason]
    if access.first_token is not None:
        attributes["fleetlm.time_to_first_token_ms"] = round((access.first_token - access.started) * 1000, 3)
    span.attributes.update({k: v for k, v in attributes.items() if v not in ("", None)})
    span.end(span_name(access), (access.error, access.error) if access.error else None)
