"""The edge's Prometheus metrics, served at /metrics on its HTTP port.

One `EdgeMetrics` per edge owns every series. The two transports open a `Call` per request (`asgi` wraps
the HTTP app, `grpc_servicer` the InferenceService) and count it when it ends; the gateway and the
Generate stream fill in what only they know (the model once it is routable, the first token, the usage,
retries, failovers, offloads and routing decisions) on the `Call` of the running request (`CURRENT`).

What is counted:
  requests_total{model,route,status,code}  every OpenAI HTTP request and vLLM's /tokenize and /detokenize
                                           (route: the path) and every gRPC call (route: grpc:<Method>);
                                           status is the HTTP status sent or the gRPC code's name, code the
                                           fleet's error code ("" on success). A request whose client went
                                           away has code CANCELLED on both transports: over gRPC status
                                           CANCELLED (DEADLINE_EXCEEDED when its deadline ended it), over
                                           HTTP the status already sent (200 once a stream has started, as
                                           for any error after it) or 499, nginx's "client closed request",
                                           when none was.
  time_to_first_token_seconds{model}       from the request's arrival to its first text, for every
                                           generation that produced text (streamed or not, as vLLM counts).
  inter_token_latency_seconds{model}       the gap between consecutive text events of a streamed generation
                                           (a whole reply's text comes in one or two, TEXT_DELIVERY_WHOLE).
  e2e_request_latency_seconds{model}       arrival to the result, once for every generation request that
                                           finished (a completion of several prompts: to its last prompt's).
  prompt_tokens_total, generation_tokens_total{model}  the usage the client was sent (embeddings' prompts too);
                                           a request its client left mid-stream adds the output events it was
                                           sent (about a token each as a stream sends them) to generation
                                           tokens: it was sent no usage, and its prompt is the node's to count.
  retries_total, failovers_total, offloads_total{model}  see `Gateway` and `edge.generation`.
  rate_limited_total{model,code}           answers of 429 / RESOURCE_EXHAUSTED (API-key limits, full replicas).
  routing_decisions_total{model,reason}    each routing of a request: prefix_affinity, user_affinity,
                                           least_load (mesh.replica_choice), controlplane (PickReplica:
                                           scale from zero, a model the table does not know, no table yet).
  requests_in_flight{model}                requests this edge is serving now.
  routing_table_fresh, routing_table_age_seconds, nodes_unreachable  read when scraped.

`model` is "" until the request names a model the fleet serves (a bad body, an unknown model, a refusal
before the model was looked at), so a client cannot grow the series by inventing names; nothing is ever
labelled by API key or user. The hot path costs a few dictionary lookups and histogram observations per
request and one per text event: the label children of each model are made once and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.errors import ErrorCode, FleetError, vocabulary_code
from mesh.grpc_server import ended_by_deadline
from mesh.metrics import E2E_BUCKETS, ITL_BUCKETS, PREFIX, TTFT_BUCKETS, new_registry

if TYPE_CHECKING:
    from edge.gateway import Gateway

P = f"{PREFIX}_edge_"
# vLLM's routes beside the OpenAI API, counted as its routes are.
VLLM_ROUTES = frozenset({"/tokenize", "/detokenize"})
# The HTTP routes counted, by path; any other /v1 path is "other" (a client must not grow the series).
HTTP_ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models", *VLLM_ROUTES}
)
MAX_ERROR_BODY = 64 * 1024  # an error body is read for its code up to this size


class Call:
    """One request as the metrics see it; the transports open it, the gateway fills it in."""

    __slots__ = ("code", "cut", "last_output_at", "model", "result_at", "route", "series", "started", "status")

    def __init__(self, route: str) -> None:
        self.route = route
        self.started = time.perf_counter()
        self.model = ""
        self.series: _ModelSeries | None = None
        self.status = ""
        self.code = ""
        # perf_counter of the last output event (text or a tool call) of each choice; empty before the first
        self.last_output_at: dict[int, float] = {}
        self.result_at: float | None = None  # perf_counter of its (last prompt's) result
        self.cut = 0  # output events streamed by generations that ended before their result


def client_gone() -> None:
    """The running request's client went away: it is counted with code CANCELLED, whatever status its
    answer had started with (edge.http_app.until_disconnect; over gRPC the servicer's cancellation says)."""
    call = CURRENT.get()
    if call is not None:
        call.code = ErrorCode.CANCELLED.value


CURRENT: ContextVar[Call | None] = ContextVar("fleetlm_edge_call", default=None)


class _ModelSeries:
    """The label children of one model, made once."""

    __slots__ = ("e2e", "failovers", "generated", "in_flight", "itl", "offloads", "prompt", "retries", "ttft")

    def __init__(self, m: EdgeMetrics, model: str) -> None:
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.e2e = m.e2e.labels(model)
        self.prompt = m.prompt_tokens.labels(model)
        self.generated = m.generation_tokens.labels(model)
        self.in_flight = m.in_flight.labels(model)
        self.retries = m.retries.labels(model)
        self.failovers = m.failovers.labels(model)
        self.offloads = m.offloads.labels(model)


class _RoutingCollector(Collector):
    """Whether the routing table is fresh, read from the gateway when scraped (nothing on the hot path)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterable[Metric]:
        feed = self._gateway.feed
        fresh = feed.synced.is_set() and feed.stale_seconds is None
        yield GaugeMetricFamily(
            P + "routing_table_fresh",
            "1 while the edge follows the control plane's routing table live; 0 while it routes on a stale table"
            " (the control plane is away) or has none yet",
            value=float(fresh),
        )
        # RouteFeed keeps the time it last heard from the control plane (an update or a keepalive, every 2 s)
        heard = feed.heard_at
        if heard:
            yield GaugeMetricFamily(
                P + "routing_table_age_seconds",
                "seconds since the control plane last sent the routing table an update or a keepalive",
                value=max(0.0, time.monotonic() - heard),
            )
        yield GaugeMetricFamily(
            P + "nodes_unreachable",
            "nodes the edge skips now because it could not reach them (their circuit breaker is open)",
            value=float(len(self._gateway.breakers.open_nodes())),
        )


class EdgeMetrics:
    def __init__(self, gateway: Gateway, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or new_registry()
        self._gateway = gateway
        self.requests = Counter(
            P + "requests",
            "requests by model, route (HTTP path or grpc:<Method>), status (HTTP status or gRPC code) and fleet"
            " error code ('' on success)",
            ["model", "route", "status", "code"],
            registry=r,
        )
        self.ttft = Histogram(
            P + "time_to_first_token_seconds",
            "from a generation request's arrival at the edge to its first output (text or a tool call)",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds",
            "time between consecutive output events of one choice of a streamed generation",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds",
            "from a generation request's arrival at the edge to its result",
            ["model"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            P + "prompt_tokens", "prompt tokens of finished requests, as their usage said", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            P + "generation_tokens", "generated tokens of finished requests, as their usage said", ["model"], registry=r
        )
        self.retries = Counter(
            P + "retries",
            "attempts sent to another replica after one refused before starting (full, unloading, unreachable)",
            ["model"],
            registry=r,
        )
        self.failovers = Counter(
            P + "failovers",
            "streams whose node failed after they started, continued on another replica (continue_on_failure)",
            ["model"],
            registry=r,
        )
        self.offloads = Counter(
            P + "offloads",
            "requests sent on to the model's cpu_offload_model because its replicas were full",
            ["model"],
            registry=r,
        )
        self.rate_limited = Counter(
            P + "rate_limited",
            "requests answered 429 / RESOURCE_EXHAUSTED, by fleet error code (API-key limit, full replicas)",
            ["model", "code"],
            registry=r,
        )
        self.routing_decisions = Counter(
            P + "routing_decisions",
            "routing decisions by reason: prefix_affinity, user_affinity, least_load, controlplane",
            ["model", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(P + "requests_in_flight", "requests this edge is serving now", ["model"], registry=r)
        r.register(_RoutingCollector(gateway))
        self._models: dict[str, _ModelSeries] = {}
        self._requests: dict[tuple[str, str, str, str], Any] = {}
        self._decisions: dict[tuple[str, str], Any] = {}

    # --- the gateway's hooks ---------------------------------------------------------------------------

    def series(self, model: str) -> _ModelSeries:
        series = self._models.get(model)
        if series is None:
            series = self._models[model] = _ModelSeries(self, model)
        return series

    def serving(self, call: Call, model: str) -> None:
        """The request is for `model`, which the fleet serves: from now on it is counted under it."""
        if call.series is None:
            call.model = model
            call.series = self.series(model)
            call.series.in_flight.inc()

    def text(self, call: Call, streamed: bool = True, index: int = 0) -> None:
        """An output event of a generation (text, or part of a tool call) of choice `index` is on its way to
        the client. The first of the request is its first token; after it, the gap since the same choice's
        last event is timed (the choices of n > 1 decode side by side, so a gap between two choices' events
        is no inter-token latency), and only when the reply is `streamed` (a whole reply's text comes in
        one or two events)."""
        now = time.perf_counter()
        series = call.series
        if series is not None:
            last = call.last_output_at.get(index)
            if not call.last_output_at:
                series.ttft.observe(now - call.started)
            elif last is not None and streamed:
                series.itl.observe(now - last)
        call.last_output_at[index] = now

    def result(self, call: Call, prompt_tokens: int, completion_tokens: int) -> None:
        """A generation's result (its usage as the client sees it) is on its way to the client. A request
        of several prompts has one per prompt: their usage adds up, and the request's end-to-end latency is
        observed once, to the last of them, when it ends (`finish`)."""
        call.result_at = time.perf_counter()
        series = call.series
        if series is not None:
            series.prompt.inc(prompt_tokens)
            series.generated.inc(completion_tokens)

    def cut(self, call: Call, events: int) -> None:
        """A generation ended before its result, after `events` output events were streamed on."""
        call.cut += events

    def embedded(self, call: Call, prompt_tokens: int) -> None:
        if call.series is not None:
            call.series.prompt.inc(prompt_tokens)

    def routed(self, model: str, reason: str) -> None:
        child = self._decisions.get((model, reason))
        if child is None:
            child = self._decisions[(model, reason)] = self.routing_decisions.labels(model, reason)
        child.inc()

    # --- the end of a request ----------------------------------------------------------------------------

    def page(self) -> bytes:
        """The /metrics page."""
        return generate_latest(self.registry)

    def finish(self, call: Call) -> None:
        key = (call.model, call.route, call.status, call.code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()
        if call.status in ("429", "RESOURCE_EXHAUSTED"):
            self.rate_limited.labels(call.model, call.code).inc()
        series = call.series
        if series is not None:
            if call.result_at is not None and not call.code:
                series.e2e.observe(call.result_at - call.started)
            if call.code == ErrorCode.CANCELLED.value and call.cut:
                # It was sent no usage: the tokens it was streamed count (about one an event, as streamed).
                series.generated.inc(call.cut)
            series.in_flight.dec()

    # --- the transports ----------------------------------------------------------------------------------

    def asgi(self, app: Any) -> Callable[..., Any]:
        """The HTTP app with every /v1 request (and /tokenize, /detokenize) counted; the page itself is a
        route of the app (edge.http_app), so it carries a request id as every answer does."""
        return _MetricsAsgi(app, self)

    def grpc_servicer(self, servicer: Any) -> Any:
        """The edge's InferenceService with every call counted."""
        return _CountedServicer(servicer, self)


# --- HTTP ------------------------------------------------------------------------------------------------------


def _error_code(body: bytes) -> str:
    """The `code` of an error body in OpenAI's shape, or ''."""
    try:
        error = json.loads(body).get("error")
        code = error.get("code") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return ""
    return vocabulary_code(code) if isinstance(code, str) else ""  # as a gRPC call's is counted


class _MetricsAsgi:
    def __init__(self, app: Any, metrics: EdgeMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/v1/") and path not in VLLM_ROUTES:
            await self._app(scope, receive, send)
            return
        route = path if path in HTTP_ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        call = Call(route)
        token = CURRENT.set(call)
        error_body: list[bytes] | None = None

        async def counted_send(message: Any) -> None:
            nonlocal error_body
            kind = message["type"]
            if kind == "http.response.start":
                call.status = str(message["status"])
                if message["status"] >= 400:
                    error_body = []
            elif error_body is not None and kind == "http.response.body" and sum(map(len, error_body)) < MAX_ERROR_BODY:
                error_body.append(message.get("body", b""))
            await send(message)

        try:
            await self._app(scope, receive, counted_send)
        finally:
            if not call.status:
                call.status = "499"  # the client went away before an answer started
            if error_body is not None and not call.code:
                call.code = _error_code(b"".join(error_body))
            self._metrics.finish(call)
            CURRENT.reset(token)


# --- gRPC ------------------------------------------------------------------------------------------------------


class _CountedServicer:
    """The InferenceService's methods, each counted as one request (ListModels too)."""

    def __init__(self, servicer: Any, metrics: EdgeMetrics) -> None:
        self._servicer = servicer
        self._metrics = metrics

    def _open(self, method: str, request: Any) -> Call:
        call = Call(f"grpc:{method}")
        model = getattr(request, "model", "")
        if model and model in self._metrics._gateway.feed.models:
            self._metrics.serving(call, model)  # known before the API key's check: a 429 carries its model
        return call

    def _close(self, call: Call, error: BaseException | None, context: grpc.aio.ServicerContext) -> None:
        if isinstance(error, FleetError):
            call.status, call.code = error.grpc_code.name, call.code or error.code.value
        elif error is None:
            call.status = grpc.StatusCode.OK.name
        elif isinstance(error, (GeneratorExit, asyncio.CancelledError)):
            # the client cancelled (or went away): counted as over HTTP, with the code CANCELLED
            call.status, call.code = grpc.StatusCode.CANCELLED.name, ErrorCode.CANCELLED.value
        else:
            call.status = grpc.StatusCode.INTERNAL.name
        if error is not None and ended_by_deadline(error, context):  # the status is what the client heard
            call.status = grpc.StatusCode.DEADLINE_EXCEEDED.name
        self._metrics.finish(call)

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = self._open("Generate", request)
        token = CURRENT.set(call)
        error: BaseException | None = None
        try:
            async for response in self._servicer.Generate(request, context):
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._close(call, error, context)
            with contextlib.suppress(ValueError):  # closed from another context (a dropped stream's finalizer)
                CURRENT.reset(token)

    async def _unary(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = self._open(method, request)
        token = CURRENT.set(call)
        error: BaseException | None = None
        try:
            return await getattr(self._servicer, method)(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._close(call, error, context)
            CURRENT.reset(token)

    async def Embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Embed", request, context)

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Tokenize", request, context)

    async def Detokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("Detokenize", request, context)

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary("ListModels", request, context)
