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
an engine server as HTTP headers (`inject`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

SERVICE_NAMES = {"edge": "fleetlm-edge", "node": "fleetlm-node", "controlplane": "fleetlm-controlplane"}
CONTEXT_KEYS = ("traceparent", "tracestate")  # W3C trace context: HTTP headers and gRPC metadata keys alike
FLUSH_MILLIS = 5000  # what a shutdown waits for the last spans to leave, at most

# Set by `setup` when tracing is on; None means off.
TRACER: Tracer | None = None
_PROPAGATOR: Any = None  # the W3C propagator, imported by `setup`
_SERVER: Any = None  # SpanKind.SERVER


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
    global TRACER, _PROPAGATOR, _SERVER
    env = os.environ if environ is None else environ
    if not configured(env):
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES; the attributes given here would win over
    # OTEL_SERVICE_NAME, so the variable is applied here.
    name = env.get("OTEL_SERVICE_NAME", "").strip() or SERVICE_NAMES[component]
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _PROPAGATOR, _SERVER = TraceContextTextMapPropagator(), SpanKind.SERVER
    TRACER = provider.get_tracer("fleetlm")
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    log.info("tracing on: service %s, OTLP/gRPC to %s", name, endpoint)
    return Tracing(provider, name)


def start_span(
    name: str, carrier: Mapping[str, str] | None = None, attributes: Mapping[str, Any] | None = None
) -> Span:
    """A server span (call only when TRACER is set): a child of the trace context in `carrier` (a client's
    headers, the edge's metadata) when it holds a valid one, else a new trace. Make it current with
    `opentelemetry.trace.use_span` so that `inject` passes it on."""
    assert TRACER is not None
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    return TRACER.start_span(name, context=parent, kind=_SERVER, attributes=attributes)


def carrier_from(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The trace context among gRPC metadata or decoded HTTP headers (keys in lower case)."""
    return {k: v for k, v in pairs or () if k in CONTEXT_KEYS and isinstance(v, str)}


def inject(carrier: dict[str, str]) -> dict[str, str]:
    """Add the current span's trace context to `carrier` (headers or metadata) when tracing is on."""
    if TRACER is not None:
        _PROPAGATOR.inject(carrier)
    return carrier
