"""Tracing: a real fleet of processes exports its spans over OTLP/gRPC to a receiver this test runs (a
grpc.aio server implementing opentelemetry-proto's TraceService). One request gives one trace: the
edge's span (OpenTelemetry GenAI names and attributes) and the node's, its child, through W3C
`traceparent` in gRPC metadata; the node passes its own span on to an engine server (a real
llama_cpp.server that prints the headers it gets); a client's `traceparent` becomes the edge span's
parent. And the decision when tracing is on, and what it costs when it is off.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from fleetlm.controlplane.v1 import routing_pb2, routing_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.default_model import default_model_path
from mesh import tracing
from tests.cluster import MODEL, Cluster, Proc, free_port, smollm_entry, wait_for
from tests.test_request_ids import engine_server, lines_with

ATTACHED = "smol-attached"
LAZY = "smol-lazy"  # deployed with no replica: the first request scales it from zero
CHAT = [{"role": "user", "content": "Say hello."}]


@dataclass
class Span:
    service: str
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in self.span.attributes:
            kind = a.value.WhichOneof("value")
            value = getattr(a.value, kind)
            out[a.key] = [getattr(v, v.WhichOneof("value")) for v in value.values] if kind == "array_value" else value
        return out


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on its own event loop in a thread; `spans` is what it was sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._stopping: asyncio.Event | None = None
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the OTLP receiver did not start")

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._ready.set()
        await self._stopping.wait()
        await server.stop(1)

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            names = [a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"]
            with self._lock:
                for scope in resource_spans.scope_spans:
                    self.spans.extend(Span(names[0] if names else "", s) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def with_attribute(self, key: str, value: Any) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.attributes.get(key) == value]

    def close(self) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)


@dataclass
class Fleet:
    cluster: Cluster
    http: str
    grpc: str
    receiver: OtlpReceiver
    engine: Proc

    def spans(self, request_id: str, count: int = 2) -> list[Span]:
        """The spans of one request (by its fleetlm.request_id), once `count` of them have arrived. 30 s: the
        batch processor sends every 200 ms here, but the machine is busy."""
        return wait_for(  # type: ignore[no-any-return]
            lambda: len(found := self.receiver.with_attribute("fleetlm.request_id", request_id)) >= count and found,
            30,
            f"{count} spans of {request_id}",
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("tracing")
    receiver = OtlpReceiver()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    cluster = Cluster(workdir, env=env)
    engine = engine_server(port := free_port(), workdir)
    try:
        cluster.start_etcd()
        deployments = workdir / "deployments.yaml"  # a deployment that scales from zero: PickReplica places it
        deployments.write_text(
            f"models:\n  - {{name: {LAZY}, path: {default_model_path()}, format: gguf, context_size: 1024, "
            "min_replicas: 0, max_replicas: 1}\n"
        )
        cluster.start_controlplane(3, "--deployments", str(deployments))
        attached = {"name": ATTACHED, "path": f"http://127.0.0.1:{port}/v1", "engine": "openai", "format": "gguf",
                    "context_size": 1024}  # fmt: skip
        cluster.start_node("node-a", [smollm_entry(), attached], models_dirs=[str(default_model_path().parent)])
        _, http, grpc_address = cluster.start_edge()
        cluster.wait_model_state(http, MODEL, timeout=120)
        cluster.wait_model_state(http, ATTACHED, timeout=120)
        yield Fleet(cluster, http, grpc_address, receiver, engine)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
        engine.stop()
        receiver.close()


def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.http}/v1", api_key="unused", max_retries=0, timeout=120)


def edge_and_node(spans: list[Span]) -> tuple[Span, Span]:
    by_service = {s.service: s for s in spans}
    assert set(by_service) == {"fleetlm-edge", "fleetlm-node"}, [(s.service, s.span.name) for s in spans]
    return by_service["fleetlm-edge"], by_service["fleetlm-node"]


@pytest.mark.model
@pytest.mark.cluster
def test_one_request_is_one_trace_edge_then_node(fleet: Fleet) -> None:
    raw = client(fleet).chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, extra_headers={"X-Request-Id": "traced-1"}
    )
    usage = raw.parse().usage
    assert usage is not None
    edge, node = edge_and_node(fleet.spans("traced-1"))
    assert edge.span.trace_id == node.span.trace_id
    assert node.span.parent_span_id == edge.span.span_id  # the node's span is the edge's child
    assert not edge.span.parent_span_id  # no traceparent from the client: the edge starts the trace
    assert edge.span.name == f"chat {MODEL}" and node.span.name == f"chat {MODEL}"
    assert edge.span.kind == trace_pb2.Span.SPAN_KIND_SERVER == node.span.kind
    attributes = edge.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert attributes["gen_ai.response.finish_reasons"] == [raw.parse().choices[0].finish_reason]
    assert attributes["fleetlm.node.id"] == "node-a" and attributes["http.response.status_code"] == 200
    assert node.attributes["fleetlm.node.id"] == "node-a"
    assert node.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    # The node's span lies within the edge's.
    assert edge.span.start_time_unix_nano <= node.span.start_time_unix_nano
    assert node.span.end_time_unix_nano <= edge.span.end_time_unix_nano


@pytest.mark.model
@pytest.mark.cluster
def test_a_client_traceparent_becomes_the_parent(fleet: Fleet) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    client(fleet).completions.create(
        model=MODEL,
        prompt="One, two,",
        max_tokens=3,
        extra_headers={"X-Request-Id": "traced-2", "traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    edge, node = edge_and_node(fleet.spans("traced-2"))
    assert edge.span.trace_id.hex() == trace_id == node.span.trace_id.hex()
    assert edge.span.parent_span_id.hex() == parent_id
    assert node.span.parent_span_id == edge.span.span_id
    assert edge.span.name == f"text_completion {MODEL}"


@pytest.mark.model
@pytest.mark.cluster
def test_grpc_traceparent_metadata_and_the_engine_server_gets_the_node_span(fleet: Fleet) -> None:
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    request = inference_pb2.GenerateRequest(model=ATTACHED)
    request.chat.messages.add(role="user", content="Say hello.")
    request.sampling.max_tokens = 3
    metadata = (("x-request-id", "traced-3"), ("traceparent", f"00-{trace_id}-{parent_id}-01"))
    with grpc.insecure_channel(fleet.grpc) as channel:
        events = list(inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, metadata=metadata, timeout=60))
    assert events[-1].HasField("result")
    edge, node = edge_and_node(fleet.spans("traced-3"))
    assert edge.span.trace_id.hex() == trace_id and edge.span.parent_span_id.hex() == parent_id
    assert node.span.parent_span_id == edge.span.span_id
    # The engine server got the node's span as its parent: 00-<trace>-<node span>-01.
    line = lines_with(fleet.engine, "x-request-id=traced-3")[0]
    assert f"traceparent=00-{trace_id}-{node.span.span_id.hex()}-01" in line, line


@pytest.mark.model
@pytest.mark.cluster
def test_a_trace_the_client_does_not_sample_is_passed_on_unsampled_and_not_exported(fleet: Fleet) -> None:
    """The sampling decision is taken once, when the request reaches the edge (parent-based: the client's
    flags), and travels on: no component exports a span of it, and the engine server gets flags 00."""

    def chat(request_id: str, flags: str) -> None:
        request = inference_pb2.GenerateRequest(model=ATTACHED)
        request.chat.messages.add(role="user", content="Say hello.")
        request.sampling.max_tokens = 3
        metadata = (("x-request-id", request_id), ("traceparent", f"00-{trace_id}-{parent_id}-{flags}"))
        with grpc.insecure_channel(fleet.grpc) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            assert list(stub.Generate(request, metadata=metadata, timeout=60))[-1].HasField("result")

    trace_id, parent_id = "5c0d4d0c6a4b4f9e8e3b1e1f0a2b3c4d", "1122334455667788"
    chat("traced-unsampled", "00")
    line = lines_with(fleet.engine, "x-request-id=traced-unsampled")[0]
    assert f"traceparent=00-{trace_id}-" in line and line.split("traceparent=")[1].split()[0].endswith("-00"), line
    chat("traced-sampled", "01")
    edge, node = edge_and_node(fleet.spans("traced-sampled"))  # exported after the unsampled one ended
    assert not fleet.receiver.with_attribute("fleetlm.request_id", "traced-unsampled")
    # The spans are made when their requests end, with the times the requests took.
    assert edge.span.start_time_unix_nano < node.span.start_time_unix_nano
    assert node.span.end_time_unix_nano <= edge.span.end_time_unix_nano
    assert edge.span.end_time_unix_nano - edge.span.start_time_unix_nano > 0


@pytest.mark.model
@pytest.mark.cluster
def test_a_request_that_scales_from_zero_has_the_control_plane_s_span_between(fleet: Fleet) -> None:
    client(fleet).completions.create(
        model=LAZY, prompt="One, two,", max_tokens=3, extra_headers={"X-Request-Id": "traced-lazy"}
    )
    spans = {s.service: s for s in fleet.spans("traced-lazy", count=3)}
    assert set(spans) == {"fleetlm-edge", "fleetlm-controlplane", "fleetlm-node"}
    edge, placed, node = spans["fleetlm-edge"], spans["fleetlm-controlplane"], spans["fleetlm-node"]
    assert placed.span.trace_id == edge.span.trace_id == node.span.trace_id
    assert placed.span.parent_span_id == edge.span.span_id  # PickReplica was called for the edge's request
    assert placed.span.name == f"PickReplica {LAZY}" and placed.span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert placed.attributes["gen_ai.request.model"] == LAZY and placed.attributes["fleetlm.node.id"] == "node-a"
    # It spans the wait for the replica to load: it ends before the node's span starts.
    assert edge.span.start_time_unix_nano <= placed.span.start_time_unix_nano
    assert placed.span.end_time_unix_nano <= node.span.start_time_unix_nano


@pytest.mark.model
@pytest.mark.cluster
def test_an_embedding_is_traced_too(fleet: Fleet) -> None:
    client(fleet).embeddings.create(model=MODEL, input=["hello"], extra_headers={"X-Request-Id": "traced-4"})
    edge, node = edge_and_node(fleet.spans("traced-4"))
    assert edge.span.name == f"embeddings {MODEL}" and node.span.parent_span_id == edge.span.span_id


@pytest.mark.model
@pytest.mark.cluster
def test_span_names_are_bounded_whatever_the_client_sends(fleet: Fleet) -> None:
    """A client's model names and paths never become span names (each new one would be a new name, without
    bound, as a metric label would be a new series): a model no one serves leaves the name at the operation
    and is kept in gen_ai.request.model; a path the edge does not serve is `other`."""
    ids = {name: f"bounded-{name}-{uuid.uuid4().hex[:8]}" for name in
           ("chat", "completion", "tokenize", "path", "model-route", "grpc", "node", "pick")}  # fmt: skip
    c = client(fleet)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope-chat", messages=CHAT, extra_headers={"X-Request-Id": ids["chat"]})
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope-text", prompt="x", extra_headers={"X-Request-Id": ids["completion"]})
    for path, body, request_id in (
        ("/tokenize", {"model": "zzz", "prompt": "hi"}, ids["tokenize"]),
        (f"/v1/nothing-{uuid.uuid4().hex[:6]}", None, ids["path"]),
        (f"/v1/models/nope-{uuid.uuid4().hex[:6]}", None, ids["model-route"]),
    ):
        headers = {"X-Request-Id": request_id}
        sent = (
            httpx.post(f"{fleet.http}{path}", json=body, headers=headers, timeout=30)
            if body
            else httpx.get(f"{fleet.http}{path}", headers=headers, timeout=30)
        )
        assert sent.status_code == 404, (path, sent.text)
    request = inference_pb2.GenerateRequest(model="nope-grpc")
    request.chat.messages.add(role="user", content="Say hello.")
    node_address = next(p.argv[p.argv.index("--listen") + 1] for p in fleet.cluster.procs if p.name == "node-node-a")
    for address, request_id in ((fleet.grpc, ids["grpc"]), (node_address, ids["node"])):
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            list(stub.Generate(request, metadata=(("x-request-id", request_id),), timeout=30))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value
    with grpc.insecure_channel(fleet.cluster.controlplane) as channel, pytest.raises(grpc.RpcError) as refused:
        routing_pb2_grpc.RoutingServiceStub(channel).PickReplica(
            routing_pb2.PickReplicaRequest(model="zzz-pick"), metadata=(("x-request-id", ids["pick"]),), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value

    def span_of(request_id: str, service: str) -> Span:
        return wait_for(  # type: ignore[no-any-return]
            lambda: next(
                (s for s in fleet.receiver.with_attribute("fleetlm.request_id", request_id) if s.service == service),
                None,
            ),
            30,
            f"the {service} span of {request_id}",
        )

    expected = {
        (ids["chat"], "fleetlm-edge"): "chat",
        (ids["completion"], "fleetlm-edge"): "text_completion",
        (ids["tokenize"], "fleetlm-edge"): "tokenize",
        (ids["path"], "fleetlm-edge"): "other",
        (ids["model-route"], "fleetlm-edge"): "/v1/models/{model_id}",
        (ids["grpc"], "fleetlm-edge"): "chat",
        (ids["node"], "fleetlm-node"): "chat",
        (ids["pick"], "fleetlm-controlplane"): "PickReplica",
        # The edge asks the control plane about a model its table does not know.
        (ids["chat"], "fleetlm-controlplane"): "PickReplica",
    }
    named = {key: span_of(*key).span.name for key in expected}
    assert named == expected
    # The model asked for is still there, as an attribute.
    assert span_of(ids["chat"], "fleetlm-edge").attributes["gen_ai.request.model"] == "nope-chat"
    assert span_of(ids["node"], "fleetlm-node").attributes["gen_ai.request.model"] == "nope-grpc"
    assert span_of(ids["pick"], "fleetlm-controlplane").attributes["gen_ai.request.model"] == "zzz-pick"


# --- when tracing is on, and what it costs when off ------------------------------------------------------------

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        (ENDPOINT, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"}, False),
        ({**ENDPOINT, "OTEL_SDK_DISABLED": "true"}, False),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, False),  # no endpoint: nowhere to send
    ],
)
def test_tracing_is_on_only_with_an_endpoint(environ: dict[str, str], on: bool) -> None:
    assert tracing.configured(environ) is on


@pytest.mark.parametrize(
    "environ",
    [
        {**ENDPOINT, "OTEL_TRACES_EXPORTER": "console"},
        {**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        {**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
    ],
)
def test_a_setting_fleetlm_cannot_honour_is_refused_not_ignored(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="OTEL_"):
        tracing.configured(environ)


def test_a_component_refuses_to_start_with_such_a_setting(tmp_path: Any) -> None:
    env = {**os.environ, **ENDPOINT, "OTEL_TRACES_EXPORTER": "zipkin"}
    done = subprocess.run([sys.executable, "-m", "launcher", "edge", "--http-listen", f"127.0.0.1:{free_port()}",
                           "--grpc-listen", f"127.0.0.1:{free_port()}"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "OTEL_TRACES_EXPORTER='zipkin'" in done.stderr and "Traceback" not in done.stderr


def test_otel_service_name_replaces_the_default() -> None:
    traces = tracing.setup("node", {**ENDPOINT, "OTEL_SERVICE_NAME": "gpu-box-7"})
    assert traces is not None and traces.service_name == "gpu-box-7"
    traces.shutdown()
    assert tracing.TRACER is None
    traces = tracing.setup("node", ENDPOINT)
    assert traces is not None and traces.service_name == "fleetlm-node"
    traces.shutdown()


def test_off_it_loads_no_sdk_and_makes_no_spans() -> None:
    """Off, a request costs one check: the SDK is never imported, and a request's record has no span."""
    code = (
        "import sys\n"
        "from mesh import tracing\n"
        "import edge.server, node_agent.server\n"
        "from edge import access_log\n"
        "assert tracing.setup('edge', {}) is None and tracing.TRACER is None\n"
        "with access_log.request('req_1', '/v1/chat/completions', 'http') as access:\n"
        "    assert access.span is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
