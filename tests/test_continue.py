"""A stream cut by a failed node, continued on another replica (a deployment's continue_on_failure), in
process: the edge's Gateway and HTTP app over real grpc.aio node stand-ins that stream a script and then
fail as a crashed engine does. What is tested is the edge's decision and bookkeeping: what the next
replica is asked (prompt + the text sent, the tokens left, the same sampling), and what the client sees
(one stream, offsets and usage over the whole output, one finish reason). The same with real processes
and the real model: tests/test_continue_e2e.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import httpx
import openai
import pytest

from edge.gateway import Gateway
from edge.http_app import create_app
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError
from tests.test_gateway_attempts import Fleet, Node, following, standin_fleet, table


@dataclass
class Scripted(Node):
    """Streams `deltas` (one token per character, as its Tokenize counts), then either fails as a crashed
    engine (`dies`) or ends with a result whose usage counts its own prompt and output."""

    deltas: list[str] = field(default_factory=list)
    dies: bool = False
    requests: list[inference_pb2.GenerateRequest] = field(default_factory=list)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.requests.append(request)
        offset = 0
        for text in self.deltas:
            delta = inference_pb2.TextDelta(text=text)
            if request.sampling.logprobs:
                delta.logprobs.append(inference_pb2.TokenLogprob(token=text, logprob=-0.5, text_offset=offset))
            offset += len(text)
            yield inference_pb2.GenerateResponse(delta=delta)
        if self.dies:
            raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, f"engine on {self.node_id} crashed", retry_after_seconds=1)
        usage = inference_pb2.Usage(prompt_tokens=len(request.prompt), completion_tokens=offset)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield inference_pb2.GenerateResponse(
            result=inference_pb2.GenerateResult(
                finish_reason=inference_pb2.FINISH_REASON_STOP, usage=usage, model=request.model, node_id=self.node_id
            )
        )

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        return inference_pb2.TokenizeResponse(token_ids=[ord(c) for c in request.text], context_size=2048)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with standin_fleet() as fleet:
        yield fleet


def prompt_request(prompt: str = "P: ", max_tokens: int = 20) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.7, seed=42, stops=["Hello", "END"], logprobs=True
    )
    return inference_pb2.GenerateRequest(model="m", prompt=prompt, sampling=sampling)


async def serve(fleet: Fleet, *nodes: Scripted, opted_in: bool = True) -> None:
    """Publish a table where the nodes serve "m", the first the least loaded (so tried first)."""
    for node in nodes:
        await fleet.node(node)
    snapshot = table(*[(node, load) for load, node in enumerate(nodes)])
    snapshot.models[0].continue_on_failure = opted_in
    fleet.routing.table = snapshot


async def events_of(gateway: Gateway, request: inference_pb2.GenerateRequest) -> list[inference_pb2.GenerateResponse]:
    return [event async for event in gateway.generate(request)]


def text_of(events: list[inference_pb2.GenerateResponse]) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def test_a_cut_stream_goes_on_on_the_next_replica_from_the_text_sent(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    a = Scripted("a", deltas=["Once", " upon"], dies=True)
    b = Scripted("b", deltas=[" a", " time"], dies=True)
    c = Scripted("c", deltas=[" there", "."])
    await serve(fleet, a, b, c)
    caplog.set_level(logging.INFO, logger="edge")
    async with following(fleet.gateway()) as gateway:
        events = await events_of(gateway, prompt_request())
        assert gateway.continued_streams == 2
    # b was asked to go on from what a sent; c from what a and b sent: the prompt followed by the text sent,
    # the tokens left of max_tokens (one token per character here), the same sampling, seed and stops.
    assert [r.prompt for r in b.requests] == ["P: Once upon"]
    assert [r.prompt for r in c.requests] == ["P: Once upon a time"]
    assert b.requests[0].sampling.max_tokens == 20 - len("Once upon")
    assert c.requests[0].sampling.max_tokens == 20 - len("Once upon a time")
    for continued in (b.requests[0], c.requests[0]):
        assert continued.sampling.seed == 42 and continued.sampling.temperature == pytest.approx(0.7)
        assert list(continued.sampling.stops) == ["Hello", "END"] and continued.sampling.logprobs
        assert continued.request_id == a.requests[0].request_id
    # The client sees one stream: every delta once, offsets over the whole output, one result whose usage
    # counts the original prompt and every token generated on the three replicas.
    assert text_of(events) == "Once upon a time there."
    assert sum(e.HasField("result") for e in events) == 1 and events[-1].HasField("result")
    offsets = [lp.text_offset for e in events[:-1] for lp in e.delta.logprobs]
    assert offsets == [0, 4, 9, 11, 16, 22]
    usage = events[-1].result.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len("P: "), len("Once upon a time there."))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert events[-1].result.finish_reason == inference_pb2.FINISH_REASON_STOP
    # Counted and logged with the request id.
    request_id = a.requests[0].request_id
    continued_lines = [r.getMessage() for r in caplog.records if "continued on node" in r.getMessage()]
    assert len(continued_lines) == 2 and all(request_id in line for line in continued_lines)


async def test_without_the_opt_in_the_cut_is_an_error(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Once"], dies=True)
    b = Scripted("b", deltas=[" upon"])
    await serve(fleet, a, b, opted_in=False)
    received: list[str] = []
    async with following(fleet.gateway()) as gateway:
        with pytest.raises(FleetError) as caught:
            async for event in gateway.generate(prompt_request()):
                received.append(event.delta.text)
        assert gateway.continued_streams == 0
    assert received == ["Once"] and b.requests == []
    assert caught.value.code == ErrorCode.BACKEND_UNAVAILABLE and "engine on a crashed" in caught.value.message


async def test_a_chat_stream_is_not_continued_yet_and_says_so(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Hi"], dies=True)
    b = Scripted("b", deltas=[" there"])
    await serve(fleet, a, b)
    request = inference_pb2.GenerateRequest(
        model="m", chat=inference_pb2.ChatConversation(messages=[inference_pb2.ChatMessage(role="user", content="x")])
    )
    async with following(fleet.gateway()) as gateway:
        with pytest.raises(FleetError) as caught:
            await events_of(gateway, request)
    assert caught.value.code == ErrorCode.BACKEND_UNAVAILABLE and b.requests == []


async def test_with_no_other_replica_the_cut_is_an_error_that_says_why(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Once"], dies=True)
    await serve(fleet, a)
    async with following(fleet.gateway()) as gateway:
        with pytest.raises(FleetError) as caught:
            await events_of(gateway, prompt_request())
        assert gateway.continued_streams == 0
        assert [r.own for r in gateway.feed.table.replicas("m")] == [0]  # nothing left counted against a
    assert caught.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "engine on a crashed" in caught.value.message
    assert "continuing on another replica failed" in caught.value.message
    assert len(a.requests) == 1  # the failed node is not asked again


async def test_a_cut_after_the_last_token_ends_with_length(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["abc", "de"], dies=True)  # max_tokens 5: all of them came before the cut
    b = Scripted("b", deltas=["never"])
    await serve(fleet, a, b)
    async with following(fleet.gateway()) as gateway:
        events = await events_of(gateway, prompt_request(max_tokens=5))
    assert text_of(events) == "abcde" and b.requests == []
    result = events[-1].result
    assert result.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (3, 5, 8)


async def test_the_openai_client_sees_one_stream_over_http(fleet: Fleet) -> None:
    a = Scripted("a", deltas=["Once", " upon"], dies=True)
    b = Scripted("b", deltas=[" a", " time"])
    await serve(fleet, a, b)
    async with following(fleet.gateway()) as gateway:
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as http:
            client = openai.AsyncOpenAI(base_url="http://edge/v1", api_key="unused", http_client=http)
            stream = await client.completions.create(
                model="m", prompt="P: ", max_tokens=20, stream=True, stream_options={"include_usage": True}
            )
            chunks = [chunk async for chunk in stream]
            whole = await client.completions.create(model="m", prompt="P: ", max_tokens=20, logprobs=1)
            health = (await http.get("/health")).json()
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == "Once upon a time" and finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, len(text))
    assert whole.choices[0].text == text and whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens == len(text)
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.text_offset == [0, 4, 9, 11]
    assert health["continued_streams"] == 2
