"""A stream never ends silently: whatever goes wrong after an SSE stream or a gRPC stream has started —
the node's own error, a bare status from something that is not fleetlm, a message that does not parse,
an event with nothing in it, a stream that stops without its result, a bug in the edge — the client
hears it. Over HTTP: one `data:` event in OpenAI's error shape, then `data: [DONE]`. Over gRPC: a
status carrying the fleetlm ErrorInfo, never a bare UNKNOWN.

The edge is real (GenerationRoutes over a real Gateway, EdgeInference on the real gRPC server with its
interceptor), driven by real clients (httpx over its ASGI transport, a grpc.aio channel); the nodes and
the control plane are stand-ins on real grpc.aio servers on 127.0.0.1, because what is tested is how the
edge handles the node's failure.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from edge.gateway import Gateway
from edge.grpc_service import EdgeInference
from edge.http_app import create_app
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.grpc_server import GrpcServer
from tests.test_gateway_attempts import INFERENCE, Fleet, Node, reply, standin_fleet


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with standin_fleet() as fleet:
        yield fleet


DELTA = inference_pb2.GenerateResponse(delta=inference_pb2.TextDelta(text="Once"))


class FailsMidStream(Node):
    """Streams one delta, then fails the way `how` says."""

    def __init__(self, node_id: str, how: str) -> None:
        super().__init__(node_id)
        self.how = how

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.calls.append(request.model)
        yield DELTA
        if self.how == "fleet error":
            raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, "engine crashed", retry_after_seconds=1)
        if self.how == "bare status":  # a peer that is not fleetlm: no ErrorInfo
            await context.abort(grpc.StatusCode.UNKNOWN, "something broke")
        if self.how == "empty event":
            yield inference_pb2.GenerateResponse()
        if self.how == "edge bug":  # the node ends well: the edge alone fails
            result = inference_pb2.GenerateResult(finish_reason=inference_pb2.FINISH_REASON_STOP, model=request.model)
            yield inference_pb2.GenerateResponse(result=result)
        # "no result": the stream just stops


class Garbled(Node):
    """Streams one delta, then bytes that are not a GenerateResponse (served with a raw serializer)."""

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        self.calls.append(request.model)
        yield DELTA.SerializeToString()
        yield b"\x0a\x10truncated"  # field 1, 16 bytes long, then 9


async def garbled_node(fleet: Fleet) -> Node:
    node = Garbled("garbled")
    server = GrpcServer([INFERENCE])
    handler = grpc.unary_stream_rpc_method_handler(
        node.Generate,
        request_deserializer=inference_pb2.GenerateRequest.FromString,
        response_serializer=lambda raw: raw,
    )
    server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(INFERENCE, {"Generate": handler})])
    node.address = f"127.0.0.1:{await server.start('127.0.0.1:0')}"
    fleet.servers.append(server)
    return node


class BuggyGateway(Gateway):
    """The real gateway with a bug after the first event: an exception that is not a FleetError."""

    async def generate(
        self, request: inference_pb2.GenerateRequest, client_timeout: float | None = None, **options: Any
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        async for event in super().generate(request, client_timeout, **options):
            yield event
            raise KeyError("a bug")


# (how the node fails, the reason the client must hear)
FAILURES = [
    ("fleet error", "BACKEND_UNAVAILABLE"),
    ("bare status", "BACKEND_UNAVAILABLE"),
    ("empty event", "BACKEND_UNAVAILABLE"),
    ("no result", "BACKEND_UNAVAILABLE"),
    ("garbled", "BACKEND_UNAVAILABLE"),
    ("edge bug", "INTERNAL"),
]


async def edge_for(fleet: Fleet, how: str) -> Gateway:
    node = await garbled_node(fleet) if how == "garbled" else await fleet.node(FailsMidStream("n", how))
    fleet.routing.routes["m"] = lambda: reply(node)
    cls = BuggyGateway if how == "edge bug" else Gateway
    return cls(fleet.routing_address, 30, 5, 0, 0)


async def sse_events(gateway: Gateway, path: str, body: dict[str, Any]) -> list[str]:
    transport = httpx.ASGITransport(app=create_app(gateway))
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://edge") as client,
        client.stream("POST", path, json=body, timeout=30) as response,
    ):
        assert response.status_code == 200  # the stream had started: the error must come inside it
        return [line.removeprefix("data: ") async for line in response.aiter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize(("how", "reason"), FAILURES)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_an_sse_stream_that_fails_ends_with_an_error_event_then_done(
    fleet: Fleet, how: str, reason: str, path: str
) -> None:
    gateway = await edge_for(fleet, how)
    body: dict[str, Any] = {"model": "m", "stream": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    try:
        events = await sse_events(gateway, path, body)
    finally:
        await gateway.close()
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
    assert error["error"]["code"] == reason and error["error"]["type"] == "server_error"
    assert "Traceback" not in error["error"]["message"]
    text = "".join(
        choice.get("text") or choice.get("delta", {}).get("content") or ""
        for event in events[:-2]
        for choice in json.loads(event)["choices"]
    )
    assert text == "Once"  # what came before the failure, and nothing that looks like a finish
    assert all(choice["finish_reason"] is None for e in events[:-2] for choice in json.loads(e)["choices"])


@pytest.mark.parametrize(("how", "reason"), FAILURES)
async def test_a_grpc_stream_that_fails_ends_with_a_fleetlm_status(fleet: Fleet, how: str, reason: str) -> None:
    gateway = await edge_for(fleet, how)
    server = GrpcServer([INFERENCE])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(EdgeInference(gateway), server.server)
    port = await server.start("127.0.0.1:0")
    received: list[inference_pb2.GenerateResponse] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for event in stub.Generate(inference_pb2.GenerateRequest(model="m", prompt="hi"), timeout=30):
                    received.append(event)
    finally:
        await server.stop(0)
        await gateway.close()
    assert received == [DELTA]
    assert caught.value.code() != grpc.StatusCode.UNKNOWN
    sent = FleetError.sent_by_peer(caught.value)
    assert sent is not None, (caught.value.code(), caught.value.details())
    assert sent.code == reason and sent.grpc_code == caught.value.code()
    assert "Traceback" not in (caught.value.details() or "")


@pytest.mark.parametrize(("how", "reason"), FAILURES)
async def test_the_same_failures_without_streaming_are_plain_http_errors(fleet: Fleet, how: str, reason: str) -> None:
    gateway = await edge_for(fleet, how)
    transport = httpx.ASGITransport(app=create_app(gateway))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
            response = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=30)
    finally:
        await gateway.close()
    assert response.status_code == (500 if reason == "INTERNAL" else 503), response.text
    assert response.json()["error"]["code"] == reason
