"""How the node's Generate stream carries the text (GenerateRequest.delivery).

Streamed (the default), each delta leaves as the engine yields it: about one message a token. With
TEXT_DELIVERY_WHOLE, which the edge asks for when its client waits for the whole reply, the first delta
still leaves at once (the caller's time to first token, and the moment the request becomes this node's,
stay what they are); the text after it is held and merged, and leaves as one delta just before the
stream's next other event (the result). Every message costs CPU in each process it crosses, the node's,
the edge's and the client's, and on a node whose cores the engine keeps busy that CPU is taken from the
engine: measured with `bench.arrival_bench`.

Deltas merge only with deltas that differ in nothing but their text and logprobs, so a delta that says
something else (a field a later version adds) keeps its own. Text held when the engine fails leaves
before the error, as it would have streamed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from fleetlm.inference.v1 import inference_pb2

# Held text (with its logprobs: about 400 bytes a token with 20 alternatives) leaves as one delta once it
# reaches this size, so that no merged message nears the 4 MiB a gRPC client takes by default.
MAX_HELD_BYTES = 1024 * 1024


def _kind(delta: inference_pb2.TextDelta) -> bytes:
    """What a delta says besides its text and logprobs: deltas of one kind may merge."""
    other = inference_pb2.TextDelta()
    other.CopyFrom(delta)
    other.ClearField("text")
    other.ClearField("logprobs")
    return other.SerializeToString(deterministic=True)


class _Held:
    """The deltas of one kind held since the last event that left."""

    def __init__(self, first: inference_pb2.TextDelta) -> None:
        self.delta = inference_pb2.TextDelta()
        self.delta.CopyFrom(first)
        self.texts = [first.text]
        self.size = first.ByteSize()

    def add(self, delta: inference_pb2.TextDelta) -> None:
        self.texts.append(delta.text)
        self.delta.logprobs.extend(delta.logprobs)
        self.size += delta.ByteSize()

    def response(self) -> inference_pb2.GenerateResponse:
        self.delta.text = "".join(self.texts)
        return inference_pb2.GenerateResponse(delta=self.delta)


async def delivered(
    responses: AsyncGenerator[inference_pb2.GenerateResponse, None], delivery: inference_pb2.TextDelivery
) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
    """`responses` as `delivery` carries them. Closing this closes `responses` (the engine stops at once)."""
    async with contextlib.aclosing(responses):
        if delivery == inference_pb2.TEXT_DELIVERY_WHOLE:
            async for response in _whole(responses):
                yield response
        else:
            async for response in responses:
                yield response


async def _whole(
    responses: AsyncIterator[inference_pb2.GenerateResponse],
) -> AsyncIterator[inference_pb2.GenerateResponse]:
    held: dict[bytes, _Held] = {}
    first = True

    def release() -> list[inference_pb2.GenerateResponse]:
        out = [h.response() for h in held.values()]
        held.clear()
        return out

    try:
        async for response in responses:
            if response.WhichOneof("event") != "delta":
                for merged in release():
                    yield merged
                yield response
            elif first:
                first = False
                yield response
            else:
                key = _kind(response.delta)
                if key in held:
                    held[key].add(response.delta)
                else:
                    held[key] = _Held(response.delta)
                if held[key].size >= MAX_HELD_BYTES:  # one message stays far below gRPC's 4 MiB default
                    yield held.pop(key).response()
    except Exception:
        for merged in release():
            yield merged
        raise
    for merged in release():
        yield merged
