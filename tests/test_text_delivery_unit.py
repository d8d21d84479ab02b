"""node_agent.text_delivery: how a Generate stream carries the text (pure logic, no model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from fleetlm.inference.v1 import inference_pb2
from node_agent.text_delivery import MAX_HELD_BYTES, delivered

WHOLE = inference_pb2.TEXT_DELIVERY_WHOLE
STREAMED = inference_pb2.TEXT_DELIVERY_UNSPECIFIED


def delta(text: str, *tokens: str) -> inference_pb2.GenerateResponse:
    logprobs = [inference_pb2.TokenLogprob(token=t, logprob=-0.5) for t in tokens]
    return inference_pb2.GenerateResponse(delta=inference_pb2.TextDelta(text=text, logprobs=logprobs))


RESULT = inference_pb2.GenerateResponse(
    result=inference_pb2.GenerateResult(finish_reason=inference_pb2.FINISH_REASON_LENGTH, model="m")
)
EVENTS = [delta("Once", "Once"), delta(" upon", " upon"), delta("", "\xe2"), delta(" a time", " a", " time"), RESULT]


async def source(events: list[inference_pb2.GenerateResponse]) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
    for event in events:
        yield event


async def collect(stream: AsyncGenerator[inference_pb2.GenerateResponse, None]) -> list[inference_pb2.GenerateResponse]:
    return [event async for event in stream]


async def test_streamed_passes_every_event_as_it_is() -> None:
    assert await collect(delivered(source(EVENTS), STREAMED)) == EVENTS


async def test_whole_sends_the_first_delta_then_the_rest_merged_before_the_result() -> None:
    out = await collect(delivered(source(EVENTS), WHOLE))
    assert out == [delta("Once", "Once"), delta(" upon a time", " upon", "\xe2", " a", " time"), RESULT]


async def test_whole_sends_the_first_delta_before_the_engine_has_more() -> None:
    gate = asyncio.Event()

    async def slow() -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        yield EVENTS[0]
        await gate.wait()  # the engine is still generating
        for event in EVENTS[1:]:
            yield event

    stream = delivered(slow(), WHOLE)
    first = await asyncio.wait_for(anext(stream), 10)
    assert first == EVENTS[0]
    gate.set()
    assert [e.WhichOneof("event") for e in await collect(stream)] == ["delta", "result"]


async def test_whole_sends_the_text_it_holds_before_an_error() -> None:
    async def failing() -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        for event in EVENTS[:4]:
            yield event
        raise RuntimeError("the engine failed")

    out: list[inference_pb2.GenerateResponse] = []
    with pytest.raises(RuntimeError, match="the engine failed"):
        async for event in delivered(failing(), WHOLE):
            out.append(event)
    assert "".join(e.delta.text for e in out) == "Once upon a time"
    assert len(out) == 2


async def test_a_stream_of_no_text_is_its_result() -> None:
    assert await collect(delivered(source([RESULT]), WHOLE)) == [RESULT]


@pytest.mark.parametrize("delivery", [STREAMED, WHOLE])
async def test_closing_the_delivered_stream_closes_the_engines_at_once(delivery: inference_pb2.TextDelivery) -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        try:
            while True:
                yield delta("x", "x")
        finally:
            closed.set()  # the engine's generator frees its slot here

    stream = delivered(endless(), delivery)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()


async def test_a_long_whole_reply_leaves_in_pieces_that_each_fit_a_grpc_message() -> None:
    # 4,000 tokens with 20 alternatives each: about 3.5 MB held, which merged into one delta would pass the
    # 4 MiB a gRPC client takes by default (the edge's channel to a node among them).
    top = [inference_pb2.TopLogprob(token=f"alt{i:02d}", logprob=-2.0 - i) for i in range(20)]

    def token(i: int) -> inference_pb2.GenerateResponse:
        logprob = inference_pb2.TokenLogprob(token=f" w{i}", logprob=-0.5, top_logprobs=top)
        return inference_pb2.GenerateResponse(delta=inference_pb2.TextDelta(text=f" w{i}", logprobs=[logprob]))

    events = [token(i) for i in range(4000)] + [RESULT]
    out = await collect(delivered(source(events), WHOLE))
    deltas = [e.delta for e in out if e.HasField("delta")]
    assert out[-1] == RESULT
    assert 3 <= len(deltas) < 20, len(deltas)  # merged, but not into one
    assert all(d.ByteSize() < MAX_HELD_BYTES + 1000 for d in deltas), [d.ByteSize() for d in deltas]
    assert "".join(d.text for d in deltas) == "".join(f" w{i}" for i in range(4000))
    assert [lp.token for d in deltas for lp in d.logprobs] == [f" w{i}" for i in range(4000)]
