"""OpenTelemetry traces of requests, edge -> node -> engine server, exported over OTLP/gRPC.

Off unless an OTLP endpoint is configured by the usual variables (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_EXPORTER_OTLP_ENDPOINT; OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED=true turn it off again);
OTEL_SERVICE_NAME replaces the component's name (fleetlm-edge, fleetlm-node, fleetlm-controlplane), and the
exporter reads the rest of its OTEL_EXPORTER_OTLP_* variables itself (headers, TLS, timeout), as do the
batch processor's OTEL_BSP_*.

Off, it costs a request one check of `TRACER is None`: no SDK is imported, no provider exists, no span or
context object is made. That is why the tracer is a module attribute set once at start-up (like the logging
root, mesh.logs) rather than an object passed down every call path.

The trace context travels as W3C `traceparent` (and `tracestate`): the edge honours a client's header as the
parent of its request span, passes its span on to the node in gRPC metadata, and the node passes its own to
an engine server as HTTP headers (`inject`). A request's span is a `ServerSpan`: its ids and the sampler's
decision are taken when the request arrives, the SDK's span is made when it ends (the SDK's span start
cost a traced request a tenth of a millisecond of its first token on a busy machine).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

SERVICE_NAMES = {"edge": "fleetlm-edge", "node": "fleetlm-node", "controlplane": "fleetlm-controlplane"}
CONTEXT_KEYS = ("traceparent", "tracestate")  # W3C trace context: HTTP headers and gRPC metadata keys alike
FLUSH_MILLIS = 5000  # what a shutdown waits for the last spans to leave, at most

# Set by `setup` when tracing is on; None means off.
TRACER: Tracer | None = None
_PROPAGATOR: Any = None  # the W3C propagator, imported by `setup`
_SERVER: Any = None  # SpanKind.SERVER
_SAMPLER: Any = None  # the sampler the OTEL_TRACES_SAMPLER variables ask for (the SDK's default: parent-based, on)
_IDS: Any = None  # the SDK's random id generator
_API: Any = None  # opentelemetry.trace
# The ServerSpan being made by its `end` (its ids and sampling decision are given), and the one current.
_MAKING: ContextVar[ServerSpan | None] = ContextVar("fleetlm_span_making", default=None)
_CURRENT: ContextVar[ServerSpan | None] = ContextVar("fleetlm_span", default=None)


def configured(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces; ValueError for a setting fleetlm cannot honour (an exporter
    or protocol other than OTLP/gRPC), so that it is refused at start-up instead of dropped silently."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
    if exporters == ["none"]:
        return False
    if any(e != "otlp" for e in exporters):
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: fleetlm exports traces with otlp (or none)"
        )
    if not (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return False
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip().lower()
        if protocol:
            if protocol != "grpc":
                raise ValueError(f"{name}={protocol!r}: fleetlm exports traces over OTLP/gRPC (grpc) only")
            break
    return True


class Tracing:
    """Traces on: the SDK's provider, whose `shutdown` flushes the spans not yet exported."""

    def __init__(self, provider: TracerProvider, service_name: str) -> None:
        self._provider = provider
        self.service_name = service_name

    def shutdown(self) -> None:
        """Flush and stop, after the servers have stopped (their last spans have ended). Blocking: a
        receiver that is away costs at most FLUSH_MILLIS, then the spans are dropped with a warning."""
        global TRACER
        TRACER = None
        if not self._provider.force_flush(FLUSH_MILLIS):
            log.warning("tracing: spans not exported within %d ms of shutdown were dropped", FLUSH_MILLIS)
        self._provider.shutdown()


def setup(component: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Turn tracing on for this process when the environment asks for it (see the module's docstring);
    None when it is off. ValueError for settings it cannot honour."""
    global TRACER, _PROPAGATOR, _SERVER, _SAMPLER, _IDS, _API
    env = os.environ if environ is None else environ
    if not configured(env):
        return None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import Sampler, SamplingResult
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES; the attributes given here would win over
    # OTEL_SERVICE_NAME, so the variable is applied here.
    name = env.get("OTEL_SERVICE_NAME", "").strip() or SERVICE_NAMES[component]

    class Drawn(RandomIdGenerator):
        """The SDK's ids, but those a ServerSpan drew on arrival for the span its `end` makes."""

        def generate_span_id(self) -> int:
            making = _MAKING.get()
            return making.context.span_id if making is not None else super().generate_span_id()

        def generate_trace_id(self) -> int:
            making = _MAKING.get()
            return making.context.trace_id if making is not None else super().generate_trace_id()

    class Decided(Sampler):
        """The configured sampler, but the decision a ServerSpan took on arrival for the span its `end` makes
        (a sampler need not decide the same twice: one that limits a rate would not)."""

        def __init__(self, configured: Sampler) -> None:
            self._configured = configured

        def should_sample(
            self, parent_context: Any, trace_id: int, name: str, kind: Any = None, attributes: Any = None,
            links: Any = None, trace_state: Any = None,
        ) -> SamplingResult:  # fmt: skip
            making = _MAKING.get()
            if making is None:
                return self._configured.should_sample(parent_context, trace_id, name, kind, attributes, links,
                                                      trace_state)  # fmt: skip
            decided = making.sampling
            return SamplingResult(decided.decision, attributes if decided.decision.is_sampled() else None,
                                  decided.trace_state)  # fmt: skip

        def get_description(self) -> str:
            return str(self._configured.get_description())

    # The sampler OTEL_TRACES_SAMPLER(_ARG) configure, asked once per span, when its request arrives.
    _SAMPLER, _IDS = TracerProvider(shutdown_on_exit=False).sampler, Drawn()
    provider = TracerProvider(
        resource=Resource.create({"service.name": name}), sampler=Decided(_SAMPLER), id_generator=_IDS
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _PROPAGATOR, _SERVER, _API = TraceContextTextMapPropagator(), SpanKind.SERVER, trace
    TRACER = provider.get_tracer("fleetlm")
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    log.info("tracing on: service %s, OTLP/gRPC to %s", name, endpoint)
    return Tracing(provider, name)


class ServerSpan:
    """One request's server span, decided when the request arrives and made when it ends (call only when
    TRACER is set).

    On arrival it takes its ids (a child of the trace context in `carrier` when that holds a valid one, else a
    new trace) and the sampler's decision: all a call made for the request needs to pass the span on
    (`inject`, while it is current: `current`). The SDK's span, its attributes and its processors' work come
    at `end`, with the arrival as its start time and the same ids and decision (`setup`'s Drawn and Decided): a
    traced request pays a few random bits and one sampler call before its first token, not the SDK's span."""

    __slots__ = ("_context", "_name", "_parent", "_start", "attributes", "sampling")

    def __init__(self, name: str, carrier: Mapping[str, str] | None, attributes: dict[str, Any]) -> None:
        assert TRACER is not None
        trace = _API
        self._start = time.time_ns()
        self._name = name
        self.attributes = attributes  # the span's attributes: the caller adds to them until `end`
        self._parent = _PROPAGATOR.extract(carrier) if carrier else None
        parent = trace.get_current_span(self._parent).get_span_context() if self._parent is not None else None
        if parent is not None and parent.is_valid:
            trace_id, random_id = parent.trace_id, parent.trace_flags.random_trace_id
        else:
            self._parent = None
            trace_id, random_id = _IDS.generate_trace_id(), _IDS.is_trace_id_random()
        self.sampling = _SAMPLER.should_sample(self._parent, trace_id, name, _SERVER, attributes)
        flags = trace.TraceFlags.SAMPLED if self.sampling.decision.is_sampled() else trace.TraceFlags.DEFAULT
        if random_id:
            flags |= trace.TraceFlags.RANDOM_TRACE_ID
        self._context = trace.SpanContext(
            trace_id, _IDS.generate_span_id(), False, trace.TraceFlags(flags), self.sampling.trace_state
        )

    @property
    def context(self) -> Any:
        """The span's SpanContext (its trace and span ids)."""
        return self._context

    def inject(self, carrier: dict[str, str]) -> dict[str, str]:
        """Add the span's trace context to `carrier` (HTTP headers or gRPC metadata)."""
        _PROPAGATOR.inject(carrier, context=_API.set_span_in_context(_API.NonRecordingSpan(self._context)))
        return carrier

    def end(self, name: str | None = None, error: tuple[str, str] | None = None) -> None:
        """Make the span (named `name`, else as it was started) with its attributes and, for a failed
        request, `error` (its error.type and message), and end it now. A span not sampled is not made."""
        if TRACER is None or not self.sampling.decision.is_recording():
            return
        from opentelemetry.trace import Status, StatusCode

        token = _MAKING.set(self)
        try:
            span = TRACER.start_span(
                name or self._name,
                context=self._parent,
                kind=_SERVER,
                attributes=self.attributes,
                start_time=self._start,
            )
        finally:
            _MAKING.reset(token)
        if error is not None:
            span.set_attribute("error.type", error[0])
            span.set_status(Status(StatusCode.ERROR, error[1]))
        span.end()


@contextlib.contextmanager
def current(span: ServerSpan | None) -> Iterator[None]:
    """`span` is the one `inject` passes on inside the block (and in tasks created there)."""
    token = _CURRENT.set(span)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # ended in another Context (a generator closed by another task)
            _CURRENT.reset(token)


def carrier_from(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The trace context among gRPC metadata or decoded HTTP headers (keys in lower case)."""
    return {k: v for k, v in pairs or () if k in CONTEXT_KEYS and isinstance(v, str)}


def inject(carrier: dict[str, str]) -> dict[str, str]:
    """Add the current span's trace context (`current`) to `carrier` (headers or metadata) when tracing is on."""
    span = _CURRENT.get()
    if TRACER is not None and span is not None:
        span.inject(carrier)
    return carrier
