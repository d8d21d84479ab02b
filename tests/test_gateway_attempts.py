"""The gateway's attempt loop, in-process over real gRPC: a RoutingService stand-in that answers
PickReplica as told (and, in the routing-table tests below, publishes a table over WatchRoutes), and
InferenceService stand-ins for nodes, each a real grpc.aio server on 127.0.0.1:0 behind the same error
interceptor the real services use. What is tested is the edge's decision: which replica is tried, in
which order, and what the client hears. The tests that use PickReplica only are the edge before it has
a routing table (just started, no control plane yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import httpx
import pytest

from edge.breaker import Breakers
from edge.gateway import Gateway
from edge.http_app import create_app
from fleetlm.controlplane.v1 import node_pb2, routing_pb2, routing_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.grpc_server import GrpcServer
from mesh.lifecycle import free_port

ROUTING = routing_pb2.DESCRIPTOR.services_by_name["RoutingService"].full_name
INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def full(node: str) -> FleetError:
    return FleetError(ErrorCode.NO_CAPACITY, f"full on {node}", retry_after_seconds=1)


@dataclass
class Node(inference_pb2_grpc.InferenceServiceServicer):
    """A node stand-in. `refuse` (if set) is raised before any event; otherwise it streams "a", "b" and
    a result naming itself and the model it was asked for."""

    node_id: str
    refuse: FleetError | None = None
    calls: list[str] = field(default_factory=list)  # the model of each call, in order
    request_ids: list[str] = field(default_factory=list)
    address: str = ""

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.calls.append(request.model)
        self.request_ids.append(request.request_id)
        if self.refuse is not None:
            raise self.refuse
        for text in ("a", "b"):
            yield inference_pb2.GenerateResponse(delta=inference_pb2.TextDelta(text=text))
        yield inference_pb2.GenerateResponse(
            result=inference_pb2.GenerateResult(
                finish_reason=inference_pb2.FINISH_REASON_STOP, model=request.model, node_id=self.node_id
            )
        )

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        self.calls.append(request.model)
        if self.refuse is not None:
            raise self.refuse
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=[1.0])] * len(request.inputs), model=request.model
        )

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        self.calls.append(request.model)
        if self.refuse is not None:
            raise self.refuse
        return inference_pb2.TokenizeResponse(token_ids=[1, 2, 3], context_size=2048)


class BreaksAfterFirstToken(Node):
    """Streams one delta, then fails as a crashed engine does."""

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.calls.append(request.model)
        yield inference_pb2.GenerateResponse(delta=inference_pb2.TextDelta(text="a"))
        raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, "engine crashed", retry_after_seconds=1)


class Routing(routing_pb2_grpc.RoutingServiceServicer):
    """Answers PickReplica from `routes` (model -> a function giving the reply, called once per pick), and
    WatchRoutes with `table` (then holds the stream open) when a test sets one."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[], routing_pb2.PickReplicaResponse]] = {}
        self.picks: list[str] = []
        self.table: routing_pb2.WatchRoutesResponse | None = None
        self.updates: asyncio.Queue[routing_pb2.WatchRoutesResponse] = asyncio.Queue()

    async def WatchRoutes(
        self, request: routing_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[routing_pb2.WatchRoutesResponse]:
        if self.table is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no table in this test")
        yield self.table  # type: ignore[misc]
        while True:
            try:
                async with asyncio.timeout(0.2):
                    yield await self.updates.get()
            except TimeoutError:
                yield routing_pb2.WatchRoutesResponse()  # keepalive

    async def PickReplica(
        self, request: routing_pb2.PickReplicaRequest, context: grpc.aio.ServicerContext
    ) -> routing_pb2.PickReplicaResponse:
        self.picks.append(request.model)
        route = self.routes.get(request.model)
        if route is None:
            raise FleetError(ErrorCode.MODEL_NOT_FOUND, f"model '{request.model}' does not exist", param="model")
        return route()


def reply(*nodes: Node, offload: str = "", device: str = "cpu") -> routing_pb2.PickReplicaResponse:
    best, *others = nodes
    return routing_pb2.PickReplicaResponse(
        node_id=best.node_id,
        inference_address=best.address,
        alternates=[routing_pb2.ReplicaEndpoint(node_id=n.node_id, inference_address=n.address) for n in others],
        cpu_offload_model=offload,
        device=device,
    )


@dataclass
class Fleet:
    routing: Routing
    routing_address: str
    servers: list[GrpcServer]

    async def node(self, node: Node, address: str = "127.0.0.1:0") -> Node:
        """`node` served on a port of its own, or on `address` (a node that comes back where it was)."""
        server = GrpcServer([INFERENCE])
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(node, server.server)
        node.address = f"127.0.0.1:{await server.start(address)}"
        self.servers.append(server)
        return node

    def gateway(self, breakers: Breakers | None = None) -> Gateway:
        return Gateway(self.routing_address, 30, 5, 0, breakers=breakers)


@contextlib.asynccontextmanager
async def standin_fleet() -> AsyncIterator[Fleet]:
    """A RoutingService stand-in on 127.0.0.1; nodes are added with `Fleet.node`. All stop at the end."""
    routing = Routing()
    server = GrpcServer([ROUTING])
    routing_pb2_grpc.add_RoutingServiceServicer_to_server(routing, server.server)
    port = await server.start("127.0.0.1:0")
    fleet = Fleet(routing, f"127.0.0.1:{port}", [server])
    try:
        yield fleet
    finally:
        for each in fleet.servers:
            await each.stop(0)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with standin_fleet() as fleet:
        yield fleet


def unreachable(node_id: str) -> Node:
    """A node whose address answers nothing (its machine died before its lease ran out)."""
    return Node(node_id, address=f"127.0.0.1:{free_port()}")


def chat(model: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=model,
        chat=inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(role="user", content="hi")]),
    )


async def generate(gateway: Gateway, request: inference_pb2.GenerateRequest) -> list[inference_pb2.GenerateResponse]:
    return [event async for event in gateway.generate(request)]


async def test_alternates_are_tried_in_order_until_one_serves(fleet: Fleet) -> None:
    a = await fleet.node(Node("a", refuse=full("a")))
    b = unreachable("b")
    c = await fleet.node(Node("c"))
    d = await fleet.node(Node("d"))
    fleet.routing.routes["m"] = lambda: reply(a, b, c, d)
    gateway = fleet.gateway()
    try:
        events = await generate(gateway, chat("m"))
    finally:
        await gateway.close()
    assert [e.delta.text for e in events[:-1]] == ["a", "b"] and events[-1].result.node_id == "c"
    assert (a.calls, c.calls, d.calls) == (["m"], ["m"], [])
    assert fleet.routing.picks == ["m"]
    # Every attempt carried the same request id, which the edge set.
    assert a.request_ids == c.request_ids and a.request_ids[0].startswith("req-")


async def test_every_replica_full_goes_to_the_cpu_offload_model(fleet: Fleet) -> None:
    a = await fleet.node(Node("a", refuse=FleetError(ErrorCode.GPU_OVERLOADED, "full", retry_after_seconds=1)))
    b = await fleet.node(Node("b", refuse=FleetError(ErrorCode.GPU_OVERLOADED, "full", retry_after_seconds=1)))
    cpu = await fleet.node(Node("cpu"))
    fleet.routing.routes["big"] = lambda: reply(a, b, offload="big-cpu", device="gpu")
    fleet.routing.routes["big-cpu"] = lambda: reply(cpu)
    gateway = fleet.gateway()
    try:
        events = await generate(gateway, chat("big"))
    finally:
        await gateway.close()
    assert events[-1].result.model == "big-cpu" and events[-1].result.node_id == "cpu"
    assert (a.calls, b.calls, cpu.calls) == (["big"], ["big"], ["big-cpu"])
    assert fleet.routing.picks == ["big", "big-cpu"]


@pytest.mark.parametrize(("device", "code"), [("gpu", ErrorCode.GPU_OVERLOADED), ("cpu", ErrorCode.NO_CAPACITY)])
async def test_every_replica_full_and_no_offload_is_a_429(fleet: Fleet, device: str, code: ErrorCode) -> None:
    a = await fleet.node(Node("a", refuse=full("a")))
    b = await fleet.node(Node("b", refuse=full("b")))
    fleet.routing.routes["m"] = lambda: reply(a, b, device=device)
    gateway = fleet.gateway()
    try:
        with pytest.raises(FleetError) as caught:
            await generate(gateway, chat("m"))
    finally:
        await gateway.close()
    assert caught.value.code == code and caught.value.http_status == 429
    assert caught.value.http_headers()["Retry-After"] == "1"
    assert "every replica is busy" in caught.value.message
    assert (a.calls, b.calls) == (["m"], ["m"])


async def test_an_offload_that_cannot_serve_still_answers_429(fleet: Fleet) -> None:
    a = await fleet.node(Node("a", refuse=full("a")))
    fleet.routing.routes["m"] = lambda: reply(a, offload="m-cpu")  # m-cpu: the control plane knows none
    gateway = fleet.gateway()
    try:
        with pytest.raises(FleetError) as caught:
            await generate(gateway, chat("m"))
    finally:
        await gateway.close()
    assert caught.value.code == ErrorCode.NO_CAPACITY and "m-cpu" in caught.value.message
    assert fleet.routing.picks == ["m", "m-cpu"]


async def test_a_refusal_that_is_the_requests_fault_is_not_retried(fleet: Fleet) -> None:
    too_long = FleetError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, "prompt too long", param="messages")
    a = await fleet.node(Node("a", refuse=too_long))
    b = await fleet.node(Node("b"))
    fleet.routing.routes["m"] = lambda: reply(a, b, offload="m-cpu")
    gateway = fleet.gateway()
    try:
        with pytest.raises(FleetError) as caught:
            await generate(gateway, chat("m"))
    finally:
        await gateway.close()
    assert caught.value.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED and caught.value.param == "messages"
    assert (a.calls, b.calls) == (["m"], [])
    assert fleet.routing.picks == ["m"]


async def test_an_error_after_the_first_token_is_not_retried(fleet: Fleet) -> None:
    a = await fleet.node(BreaksAfterFirstToken("a"))
    b = await fleet.node(Node("b"))
    fleet.routing.routes["m"] = lambda: reply(a, b)
    gateway = fleet.gateway()
    received: list[str] = []
    try:
        with pytest.raises(FleetError) as caught:
            async for event in gateway.generate(chat("m")):
                received.append(event.delta.text)
    finally:
        await gateway.close()
    assert received == ["a"]  # the client already has output from a: b would repeat it
    assert caught.value.code == ErrorCode.BACKEND_UNAVAILABLE and "engine crashed" in caught.value.message
    assert (a.calls, b.calls) == (["m"], [])


async def test_embed_and_tokenize_share_the_loop(fleet: Fleet) -> None:
    a = await fleet.node(Node("a", refuse=full("a")))
    b = await fleet.node(Node("b"))
    fleet.routing.routes["m"] = lambda: reply(a, b)
    gateway = fleet.gateway()
    try:
        embedded = await gateway.embed(inference_pb2.EmbedRequest(model="m", inputs=["x", "y"]))
        tokens = await gateway.tokenize(inference_pb2.TokenizeRequest(model="m", text="x"))
        a.refuse = FleetError(ErrorCode.INVALID_REQUEST, "bad input", param="input")
        with pytest.raises(FleetError) as caught:
            await gateway.embed(inference_pb2.EmbedRequest(model="m", inputs=["x"]))
    finally:
        await gateway.close()
    assert len(embedded.embeddings) == 2 and list(tokens.token_ids) == [1, 2, 3]
    assert caught.value.code == ErrorCode.INVALID_REQUEST and caught.value.param == "input"
    assert a.calls == ["m", "m", "m"] and b.calls == ["m", "m"]  # the last one never reached b


async def test_a_model_the_control_plane_does_not_know_is_its_404(fleet: Fleet) -> None:
    gateway = fleet.gateway()
    try:
        with pytest.raises(FleetError) as caught:
            await generate(gateway, chat("nope"))
    finally:
        await gateway.close()
    assert caught.value.code == ErrorCode.MODEL_NOT_FOUND and caught.value.param == "model"


async def test_the_request_id_reaches_the_node_and_every_log_line_about_it(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    a = await fleet.node(Node("a", refuse=full("a")))
    b = await fleet.node(Node("b"))
    fleet.routing.routes["m"] = lambda: reply(a, b)
    fleet.routing.routes["solo"] = lambda: reply(a)
    gateway = fleet.gateway()
    caplog.set_level(logging.DEBUG, logger="edge")
    try:
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            served = await client.post("/v1/chat/completions", json=body)
            refused = await client.post("/v1/chat/completions", json=body | {"model": "solo"})
    finally:
        await gateway.close()
    # Over HTTP the id is the request's (X-Request-Id, made by the edge here): both nodes tried got it, the
    # client got it back, and the refusal and 429 logs name it. The completion keeps an id of its own.
    assert a.request_ids[0] == b.request_ids[0] == served.headers["x-request-id"]
    assert served.headers["x-request-id"].startswith("req_") and served.json()["id"].startswith("chatcmpl-")
    assert refused.status_code == 429 and refused.headers["x-request-id"] == a.request_ids[1]
    about = [r.getMessage() for r in caplog.records if r.name.startswith("edge")]
    assert about and all(any(i in line for i in a.request_ids) for line in about), about
    assert any("refused" in line and a.request_ids[1] in line for line in about)


# --- routing from the edge's own table ------------------------------------------------------------------


def table(*entries: tuple[Node, int], model: str = "m", deployed: bool = True) -> routing_pb2.WatchRoutesResponse:
    """A routing table: each (node, reported load) serving `model`, ready."""
    nodes = [
        routing_pb2.NodeRoutes(
            node_id=node.node_id,
            inference_address=node.address,
            replicas=[
                routing_pb2.ReplicaRoute(
                    model=model, state=node_pb2.REPLICA_STATE_READY, running_requests=load, capacity=8
                )
            ],
        )
        for node, load in entries
    ]
    info = inference_pb2.ModelInfo(name=model, state=inference_pb2.MODEL_STATE_READY, ready_replicas=len(nodes))
    return routing_pb2.WatchRoutesResponse(
        snapshot=True, nodes=nodes, models=[routing_pb2.ModelRoute(info=info, deployed=deployed)]
    )


@contextlib.asynccontextmanager
async def following(gateway: Gateway) -> AsyncIterator[Gateway]:
    """The gateway with its routing-table feed running, once the first table has arrived."""
    task = asyncio.ensure_future(gateway.run())
    try:
        await asyncio.wait_for(gateway.feed.synced.wait(), 10)
        yield gateway
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await gateway.close()


async def test_requests_are_routed_from_the_table_with_no_control_plane_round_trip(fleet: Fleet) -> None:
    a = await fleet.node(Node("a"))
    b = await fleet.node(Node("b"))
    fleet.routing.table = table((a, 0), (b, 3))
    async with following(fleet.gateway()) as gateway:
        for _ in range(3):
            await generate(gateway, chat("m"))
        assert fleet.routing.picks == []
        assert a.calls == ["m", "m", "m"] and b.calls == []  # a is the least loaded, and each request ended
        assert (await gateway.list_models())[0].name == "m"
        assert gateway.routing_status() == {"routing_table": "fresh"}


async def test_an_unreachable_replica_is_skipped_until_a_probe_finds_it_back(fleet: Fleet) -> None:
    live = await fleet.node(Node("live"))
    dead = unreachable("dead")
    fleet.routing.table = table((dead, 0), (live, 5))  # the dead one looks best
    async with following(fleet.gateway(Breakers(failures=1, cooldown=0.3))) as gateway:
        events = await generate(gateway, chat("m"))  # tries dead, is refused at once, then live
        assert events[-1].result.node_id == "live"
        assert gateway.routing_status()["unreachable_nodes"] == [dead.address]
        await generate(gateway, chat("m"))
        assert live.calls == ["m", "m"]
        # It comes back on the same address: after the cool-down one request probes it, and it serves again.
        revived = await fleet.node(Node("dead"), dead.address)
        for _ in range(100):  # bounded: 10 s at most
            events = await generate(gateway, chat("m"))
            if events[-1].result.node_id == "dead":
                break
            await asyncio.sleep(0.1)
        assert revived.calls, "the revived node was never tried again"
        assert "unreachable_nodes" not in gateway.routing_status()


async def test_a_lone_replica_started_again_is_probed_as_soon_as_its_channel_connects(fleet: Fleet) -> None:
    # The only replica dies: requests are refused at once (503, retry shortly) while its breaker is open. When
    # it comes back, gRPC, which keeps reconnecting, reports the channel READY, and the next request probes
    # it then, not once the cool-down (30 s here) is over: `fleetlm up` starting a killed node again answered
    # 1.4 s after the node was ready, while the breaker waited.
    dead = unreachable("dead")
    fleet.routing.table = table((dead, 0))
    async with following(fleet.gateway(Breakers(failures=1, cooldown=30.0))) as gateway:
        with pytest.raises(FleetError) as refused:
            await generate(gateway, chat("m"))
        assert refused.value.code == ErrorCode.BACKEND_UNAVAILABLE
        assert gateway.routing_status()["unreachable_nodes"] == [dead.address]
        await fleet.node(Node("dead"), dead.address)
        outcomes: list[str] = []
        deadline = time.monotonic() + 10  # a third of the cool-down
        while time.monotonic() < deadline:
            try:
                outcomes.append((await generate(gateway, chat("m")))[-1].result.node_id)
                break
            except FleetError as error:
                assert error.code == ErrorCode.BACKEND_UNAVAILABLE, error
                outcomes.append("refused")
            await asyncio.sleep(0.1)
        assert outcomes[-1] == "dead", f"not served within 10 s of the node's return: {outcomes}"
        assert "unreachable_nodes" not in gateway.routing_status()


async def test_a_node_back_after_a_cut_is_probed_even_when_another_replica_looks_better(fleet: Fleet) -> None:
    # The partition test's case: after the heal the other replica is the one the table prefers (less load,
    # or the warm tie-break). The probe of the healed node must still be sent; before the fix it was taken
    # for a replica listed second and never sent, and the node got no traffic from this edge again.
    live = await fleet.node(Node("live"))
    dead = unreachable("dead")
    fleet.routing.table = table((dead, 0), (live, 5))  # the dead one looks best: it is tried, its breaker opens
    async with following(fleet.gateway(Breakers(failures=1, cooldown=0.3))) as gateway:
        # The probe path alone: without the watch of the node's channel, which closes the breaker on its own
        # once the node connects again (the next tests), only a probe brings the node back.
        gateway.breakers.on_open = None
        assert (await generate(gateway, chat("m")))[-1].result.node_id == "live"
        assert gateway.routing_status()["unreachable_nodes"] == [dead.address]
        fleet.routing.updates.put_nowait(table((dead, 5), (live, 0)))  # now the other one looks best
        revived = await fleet.node(Node("dead"), dead.address)
        served = []
        for _ in range(60):  # bounded: 6 s at most, 20 cool-downs
            served.append((await generate(gateway, chat("m")))[-1].result.node_id)
            if "unreachable_nodes" not in gateway.routing_status():
                break
            await asyncio.sleep(0.1)
        assert revived.calls == ["m"], f"the revived node was probed {len(revived.calls)} times; served: {served}"
        assert "unreachable_nodes" not in gateway.routing_status()
        assert served[-1] == "dead"  # the probe was this request, and it served it


async def test_a_lone_replica_started_again_takes_a_burst_with_no_request_to_probe_it_first(fleet: Fleet) -> None:
    # The edge watches an unreachable node's channel: once the node answers connections again its breaker
    # closes with no traffic (health and metrics say so at once), and a burst that comes later is served,
    # every request of it. Before, only one request of a burst probed and the others were refused at once:
    # 29 of 30 got 503 from an edge whose only node had been ready again for 16 s.
    dead = unreachable("dead")
    fleet.routing.table = table((dead, 0))
    async with following(fleet.gateway(Breakers(failures=1, cooldown=30.0))) as gateway:
        with pytest.raises(FleetError):
            await generate(gateway, chat("m"))
        assert gateway.routing_status()["unreachable_nodes"] == [dead.address]
        revived = await fleet.node(Node("dead"), dead.address)
        deadline = time.monotonic() + 10  # grpc reconnects at most 2 s apart; a third of the cool-down
        while "unreachable_nodes" in gateway.routing_status() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "unreachable_nodes" not in gateway.routing_status(), "the node's return was not seen without traffic"
        assert revived.calls == []  # no request had to find out
        outcomes = await asyncio.gather(*(generate(gateway, chat("m")) for _ in range(8)), return_exceptions=True)
        assert [o[-1].result.node_id if isinstance(o, list) else repr(o) for o in outcomes] == ["dead"] * 8


async def test_an_unreachable_node_that_leaves_the_table_is_no_longer_reported(fleet: Fleet) -> None:
    live = await fleet.node(Node("live"))
    dead = unreachable("dead")
    fleet.routing.table = table((dead, 0), (live, 5))
    async with following(fleet.gateway(Breakers(failures=1, cooldown=30.0))) as gateway:
        assert (await generate(gateway, chat("m")))[-1].result.node_id == "live"
        assert gateway.routing_status()["unreachable_nodes"] == [dead.address]
        fleet.routing.updates.put_nowait(table((live, 0)))  # its lease expired: the table drops it
        deadline = time.monotonic() + 10
        while "unreachable_nodes" in gateway.routing_status() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "unreachable_nodes" not in gateway.routing_status()


async def test_the_edge_routes_on_its_last_table_when_the_control_plane_is_gone(fleet: Fleet) -> None:
    a = await fleet.node(Node("a"))
    fleet.routing.table = table((a, 0))
    async with following(fleet.gateway()) as gateway:
        control_plane = fleet.servers.pop(0)
        await control_plane.stop(0)
        for _ in range(100):  # bounded: the feed notices the stream is gone within a second or so
            if gateway.routing_status()["routing_table"] == "stale":
                break
            await asyncio.sleep(0.05)
        events = await generate(gateway, chat("m"))
        assert events[-1].result.node_id == "a"
        status = gateway.routing_status()
        assert status["routing_table"] == "stale" and status["routing_table_stale_seconds"] >= 0
        assert [m.name for m in await gateway.list_models()] == ["m"]
        # A model the table does not know is a 404 from the table when no control plane can be asked.
        with pytest.raises(FleetError) as caught:
            await generate(gateway, chat("nope"))
        assert caught.value.code == ErrorCode.MODEL_NOT_FOUND and "available models: m" in caught.value.message


async def test_a_deployment_with_no_ready_replica_and_an_unknown_model_ask_the_control_plane(fleet: Fleet) -> None:
    a = await fleet.node(Node("a"))
    fleet.routing.table = table(model="cold")  # deployed, no replica: scale from zero
    fleet.routing.routes["cold"] = lambda: reply(a)
    fleet.routing.routes["brand-new"] = lambda: reply(a)
    async with following(fleet.gateway()) as gateway:
        assert (await generate(gateway, chat("cold")))[-1].result.node_id == "a"
        assert (await generate(gateway, chat("brand-new")))[-1].result.node_id == "a"
        with pytest.raises(FleetError) as caught:
            await generate(gateway, chat("nope"))
        assert caught.value.code == ErrorCode.MODEL_NOT_FOUND
    assert fleet.routing.picks == ["cold", "brand-new", "nope"]


async def test_a_catalog_model_with_no_ready_replica_is_unavailable_with_the_reason(fleet: Fleet) -> None:
    a = await fleet.node(Node("a"))
    snapshot = table((a, 0), deployed=False)
    snapshot.nodes[0].replicas[0].state = node_pb2.REPLICA_STATE_FAILED
    snapshot.nodes[0].replicas[0].error = "model file not found: /x.gguf"
    fleet.routing.table = snapshot
    async with following(fleet.gateway()) as gateway:
        with pytest.raises(FleetError) as caught:
            await generate(gateway, chat("m"))
    assert caught.value.code == ErrorCode.MODEL_UNAVAILABLE
    assert "a: replica is failed: model file not found: /x.gguf" in caught.value.message
    assert fleet.routing.picks == [] and a.calls == []


async def test_each_attempt_counts_against_its_replica_until_it_ends(fleet: Fleet) -> None:
    a = await fleet.node(Node("a"))
    b = await fleet.node(Node("b"))
    fleet.routing.table = table((a, 0), (b, 0))
    async with following(fleet.gateway()) as gateway:
        first = gateway.generate(chat("m"))
        second = gateway.generate(chat("m"))
        await anext(first)
        await anext(second)  # both open: the second went to the other replica, the first being busier
        assert sorted(a.calls + b.calls) == ["m", "m"] and a.calls and b.calls
        assert sorted(r.own for r in gateway.feed.table.replicas("m")) == [1, 1]
        await first.aclose()
        await second.aclose()
        assert [r.own for r in gateway.feed.table.replicas("m")] == [0, 0]


async def test_replicas_going_away_are_routed_again_as_the_table_changes(fleet: Fleet) -> None:
    # A drain: the only replica in the edge's table is unloading; its replacement reaches the table a
    # moment later. The request waits for it (jittered backoff) instead of failing.
    going = await fleet.node(Node("going", refuse=FleetError(ErrorCode.MODEL_UNAVAILABLE, "model 'm' is unloading")))
    replacement = await fleet.node(Node("replacement"))
    fleet.routing.table = table((going, 0))
    async with following(fleet.gateway()) as gateway:

        async def publish_replacement() -> None:
            await asyncio.sleep(0.3)
            fleet.routing.updates.put_nowait(table((replacement, 0)))

        publishing = asyncio.ensure_future(publish_replacement())
        events = await generate(gateway, chat("m"))
        await publishing
    assert events[-1].result.node_id == "replacement"
    assert len(going.calls) >= 1 and replacement.calls == ["m"]


async def test_replicas_that_stay_gone_fail_once_the_failover_time_is_spent(fleet: Fleet) -> None:
    going = await fleet.node(Node("going", refuse=FleetError(ErrorCode.MODEL_UNAVAILABLE, "model 'm' is unloading")))
    fleet.routing.table = table((going, 0))
    gateway = Gateway(fleet.routing_address, 30, 5, 0, failover_seconds=0.5)
    async with following(gateway):
        started = asyncio.get_running_loop().time()
        with pytest.raises(FleetError) as caught:
            await generate(gateway, chat("m"))
        waited = asyncio.get_running_loop().time() - started
    assert caught.value.code == ErrorCode.MODEL_UNAVAILABLE and "unloading" in caught.value.message
    assert len(going.calls) >= 2  # it was asked again
    assert waited < 5  # generous (0.5 s of failover on a busy machine): it does not wait for the request timeout


async def test_a_control_plane_that_answers_unavailable_is_quoted_not_said_not_to_answer(fleet: Fleet) -> None:
    """A control plane whose etcd is away answers PickReplica UNAVAILABLE with its reason: the client hears
    that reason, not "control plane did not answer" (which sent an operator looking at a healthy control
    plane); one that cannot be reached at all is said not to answer."""

    def etcd_away() -> routing_pb2.PickReplicaResponse:
        raise FleetError(
            ErrorCode.BACKEND_UNAVAILABLE, "etcd at http://etcd:2379 is unreachable (timeout)", retry_after_seconds=1
        )

    async def refusal(gateway: Gateway) -> FleetError:
        try:
            with pytest.raises(FleetError) as caught:
                await generate(gateway, chat("m"))
        finally:
            await gateway.close()
        return caught.value

    fleet.routing.routes["m"] = etcd_away
    answered = await refusal(fleet.gateway())
    assert answered.code == ErrorCode.BACKEND_UNAVAILABLE
    assert answered.message == "the control plane answered: etcd at http://etcd:2379 is unreachable (timeout)"
    silent = await refusal(Gateway(f"127.0.0.1:{free_port()}", 30, 5, 0))
    assert silent.code == ErrorCode.BACKEND_UNAVAILABLE and "did not answer" in silent.message
