"""The node's MultiplexService: many Generate calls over one stream from the edge.

Each call opened on a stream runs the node's own Generate handler (`NodeInference.Generate`, counted by the
node's metrics when they are on) in a task of its own, with the metadata and deadline the frame gave. Its
responses and its end (OK after its result, or its error as the status a Generate call would end with)
go to the stream's outbox; the stream sends what the outbox holds as one message each time it runs, so
the tokens one decode step produced for several calls travel together. An open frame that reuses the id of a
call still open on the stream ends the whole stream with INVALID_ARGUMENT (an `end` for that id would read as
the live call's end).

Shutdown (`close`): the node stops taking calls on its streams (each new one is refused with a retryable
error, so the edge tries another replica), lets the running ones finish, and ends each stream once its
calls have ended. The gRPC server's grace period bounds the wait: just before it is spent, the calls still
running are ended with the node's own error (`cut`: "node X is shutting down", retryable), not left for the
server to cancel with a transport error that reads as a node gone unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from fleetlm.inference.v1 import multiplex_pb2, multiplex_pb2_grpc
from mesh import durations
from mesh.errors import ErrorCode, FleetError

log = logging.getLogger(__name__)

# A response message's events, at most, unless one event alone is larger (an echoed prompt's event may be up
# to 1 MiB): well under the 4 MiB a gRPC client receives by default.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024


class _CallContext:
    """What a Generate handler reads from its context, for a call carried on a stream."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def _status(error: FleetError) -> multiplex_pb2.CallStatus:
    details = b"".join(value for _, value in error.grpc_trailing_metadata())
    return multiplex_pb2.CallStatus(code=error.grpc_code.value[0], message=error.message, details=details)


def _timeout(call: multiplex_pb2.OpenCall) -> float | None:
    """The call's timeout in seconds (None: no deadline); INVALID_REQUEST naming `timeout` for a Duration
    that is negative or out of protobuf's range."""
    if not call.HasField("timeout"):
        return None
    seconds, nanos = call.timeout.seconds, call.timeout.nanos
    if not durations.non_negative(call.timeout):
        raise FleetError(
            ErrorCode.INVALID_REQUEST,
            f"timeout must be a duration from 0 to {durations.MAX_SECONDS} s; got {seconds} s and {nanos} ns",
            param="timeout",
        )
    return seconds + nanos / 1e9


class _Stream:
    """One Multiplex stream: its calls' tasks and the events waiting to be sent."""

    def __init__(self, generate: Any, closing: asyncio.Event) -> None:
        self._generate = generate
        self._closing = closing
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.outbox: list[multiplex_pb2.CallEvent] = []
        self.ready = asyncio.Event()  # the outbox has events, or the stream may be able to end

    def post(self, event: multiplex_pb2.CallEvent) -> None:
        self.outbox.append(event)
        self.ready.set()

    def apply(self, frame: multiplex_pb2.MultiplexFrame) -> None:
        if frame.HasField("open"):
            self._open(frame.open)
        elif frame.WhichOneof("frame") == "cancel":
            task = self.calls.pop(frame.cancel, None)
            if task is not None:
                task.cancel()  # the caller has stopped listening: nothing more is sent for it

    def _open(self, call: multiplex_pb2.OpenCall) -> None:
        if call.id in self.calls:
            # Not an `end` for the id: that would read as the live call's end, and its events would go on after
            # it. A caller that reuses a live id has lost track of its calls, so the whole stream ends with the
            # error (INVALID_ARGUMENT), and every call on it with the stream.
            raise FleetError(
                ErrorCode.INVALID_REQUEST,
                f"call {call.id} is already open on this stream: an id may be used again only after its call has"
                " ended or been cancelled; the stream ends",
                param="open.id",
            )
        if self._closing.is_set():
            error = FleetError(ErrorCode.BACKEND_UNAVAILABLE, "the node is shutting down", retry_after_seconds=1)
            self.post(multiplex_pb2.CallEvent(id=call.id, end=_status(error)))
            return
        try:
            timeout = _timeout(call)
        except FleetError as error:
            self.post(multiplex_pb2.CallEvent(id=call.id, end=_status(error)))
            return
        task = asyncio.ensure_future(self._run(call, timeout))
        self.calls[call.id] = task

    async def _run(self, call: multiplex_pb2.OpenCall, timeout: float | None) -> None:
        id_ = call.id
        try:
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    context = _CallContext(tuple(call.metadata.items()))
                    async for response in self._generate(call.request, context):
                        self.post(multiplex_pb2.CallEvent(id=id_, response=response))
            except FleetError as error:
                status = _status(error)
            except Exception as exc:
                if isinstance(exc, TimeoutError) and deadline.expired():
                    code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
                    status = multiplex_pb2.CallStatus(code=code, message="Deadline Exceeded")
                else:
                    log.exception("unhandled error in a multiplexed Generate call")
                    status = _status(FleetError(ErrorCode.INTERNAL, "internal error; see the server log"))
            else:
                status = multiplex_pb2.CallStatus(code=grpc.StatusCode.OK.value[0])
            if self.calls.pop(id_, None) is not None:  # not cancelled meanwhile
                self.post(multiplex_pb2.CallEvent(id=id_, end=status))
        finally:
            self.calls.pop(id_, None)
            self.ready.set()  # a closing stream may end now

    def take(self) -> multiplex_pb2.MultiplexResponse:
        """The outbox's events, up to MAX_MESSAGE_BYTES (at least one), as one message."""
        size, count = 0, 0
        for event in self.outbox:
            size += event.ByteSize()
            if count and size > MAX_MESSAGE_BYTES:
                break
            count += 1
        taken, self.outbox = self.outbox[:count], self.outbox[count:]
        return multiplex_pb2.MultiplexResponse(events=taken)

    def cut(self, error: FleetError) -> int:
        """End every running call with `error` (its task cancelled: the engine frees its slot at the next
        step) and say so to the caller; the number of calls ended."""
        calls = list(self.calls.items())
        self.calls.clear()
        for id_, task in calls:
            self.post(multiplex_pb2.CallEvent(id=id_, end=_status(error)))
            task.cancel()
        return len(calls)

    async def cancel_all(self) -> None:
        tasks = list(self.calls.values())
        self.calls.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


class NodeMultiplex(multiplex_pb2_grpc.MultiplexServiceServicer):
    """MultiplexService over the node's InferenceService servicer (its Generate handler)."""

    def __init__(self, inference: Any) -> None:
        self._generate = inference.Generate
        self._closing = asyncio.Event()
        self._streams: set[_Stream] = set()
        self.calls = 0  # calls opened on the streams, for the metrics

    @property
    def streams(self) -> int:
        """Streams open now (one per edge)."""
        return len(self._streams)

    def close(self) -> None:
        """Take no new calls; each stream ends once its running calls have."""
        self._closing.set()
        for stream in self._streams:
            stream.ready.set()

    def cut(self, error: FleetError) -> int:
        """End the calls still running with `error`, which the edge reads as this node's own (a retryable
        BACKEND_UNAVAILABLE sends a reply its client waits for whole to another replica); each stream then
        ends, since it was closed. The number of calls ended."""
        return sum(stream.cut(error) for stream in self._streams)

    async def Multiplex(
        self, requests: AsyncIterator[multiplex_pb2.MultiplexRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[multiplex_pb2.MultiplexResponse]:
        # Headers at once: the edge writes nothing until it has them (edge.node_multiplex._Session), so that
        # a server without this service is told apart by its UNIMPLEMENTED rather than a failed write.
        await context.send_initial_metadata(())
        stream = _Stream(self._generate, self._closing)
        self._streams.add(stream)
        done = asyncio.Event()  # the caller closed its side

        async def receive() -> None:
            try:
                async for request in requests:
                    for frame in request.frames:
                        self.calls += frame.HasField("open")
                        stream.apply(frame)
            finally:
                done.set()
                stream.ready.set()

        receiving = asyncio.ensure_future(receive())
        try:
            while True:
                await stream.ready.wait()
                # A frame that breaks the protocol (a reused live id, an undecodable message) ends the stream at
                # once, ahead of the events still waiting: the calls on it end with the stream's error.
                if receiving.done() and receiving.exception() is not None:
                    raise receiving.exception()  # type: ignore[misc]
                if stream.outbox:
                    yield stream.take()
                    continue
                # Cleared only here, right before the checks: a call that ended while the last message was
                # sent set it, and is seen now.
                stream.ready.clear()
                if not stream.calls and (self._closing.is_set() or done.is_set()):
                    return
        finally:
            self._streams.discard(stream)
            receiving.cancel()
            with contextlib.suppress(BaseException):
                await receiving
            await stream.cancel_all()
