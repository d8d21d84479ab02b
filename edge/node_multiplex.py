"""The edge's Generate calls to a node, multiplexed: one MultiplexService stream to each node carries every
Generate call the edge routes there (the node's side is node_agent.multiplex_service).

A gRPC call costs each side grpc.aio's per-call work before its first message, on the path of every
request's first token; a call carried on a stream that is already open costs one message. The events a
node's decode step produced for several calls come back in one message.

A carried call (`CarriedCall`) reads like the grpc.aio call it replaces: `read()` gives each response, then
grpc.aio.EOF; a failure raises grpc.aio.AioRpcError with the status a Generate call would have ended with
(the node's own error, with its ErrorInfo, or the transport's), so the gateway's retries, breakers and
errors see no difference. Each call has its own deadline (kept here, and sent to the node, which keeps it
too) and its own cancellation (a frame to the node, which stops the generation). When the stream breaks
(the node died or went away), every call on it fails with the stream's status, as calls on a broken
connection do, and the next call opens a new stream. When the edge's certificate is rotated (mesh.tls), the
next call opens a new stream on the channel with the new certificate, and the old stream is ended as soon as
the calls it still carries have: left open, it would be cut with them when the replaced channel's grace
(mesh.tls.REPLACED_CHANNEL_GRACE_SECONDS) runs out.

A node that does not serve MultiplexService (an older version) answers UNIMPLEMENTED: its calls are made
as plain Generate calls, and the node's stream is not tried again for RETRY_UNSUPPORTED_SECONDS. Nothing is
written on a new stream before the node's headers (which it sends at once) or that answer arrive: a write
racing the answer would fail and grpc would replace UNIMPLEMENTED with a local INTERNAL. So the first call
on a new stream waits one round trip; every later one does not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc, multiplex_pb2, multiplex_pb2_grpc
from mesh.errors import DETAILS_KEY
from mesh.tls import current_channel

log = logging.getLogger(__name__)

RETRY_UNSUPPORTED_SECONDS = 60.0
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _error(code: grpc.StatusCode, message: str, details: bytes = b"") -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata((DETAILS_KEY, details)) if details else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


class CarriedCall:
    """One Generate call on a node's stream, read as a grpc.aio UnaryStreamCall is."""

    def __init__(self, link: NodeLink, request: inference_pb2.GenerateRequest, timeout: float | None,
                 metadata: tuple[tuple[str, str], ...]) -> None:  # fmt: skip
        self._link = link
        self._request = request
        self._metadata = metadata
        self._events: collections.deque[inference_pb2.GenerateResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._end: grpc.aio.AioRpcError | None = None  # how it ended, once it has (None: OK)
        self._ended = False
        self._done = asyncio.Event()  # set when it ends (for `code`; `read` waits on `_waiter`)
        self._received = False  # an event came: it cannot move to a plain call
        self._plain: Any = None  # the plain Generate call it became (a node without MultiplexService)
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout
        self._timer = None if self._deadline is None else loop.call_at(self._deadline, self._expire)
        self.id = 0
        self._session: _Session | None = None
        self._opening: multiplex_pb2.MultiplexFrame | None = None  # sent by the first `read`, in its task
        link.attach(self)

    # --- the grpc.aio call's surface ------------------------------------------------------------------

    async def read(self) -> Any:
        if self._plain is not None:
            return await self._plain.read()
        if self._opening is not None and self._session is not None and not self._ended:
            # Written here rather than by a task of its own: a loop turn sooner on the way to the first token.
            frame, self._opening = self._opening, None
            await self._session.write(frame)
        while not self._events:
            if self._ended:
                if self._plain is not None:
                    return await self._plain.read()
                if self._end is not None:
                    raise self._end
                return grpc.aio.EOF
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    def cancel(self) -> bool:
        if self._plain is not None:
            return bool(self._plain.cancel())
        if self._ended:
            return False
        self._finish(_error(grpc.StatusCode.CANCELLED, "Locally cancelled by application!"))
        if self._session is not None and self._opening is None:  # the node has had its open frame
            self._session.cancel(self.id)
        self._opening = None
        return True

    async def code(self) -> grpc.StatusCode:
        await self._done.wait()
        if self._plain is not None:
            return await self._plain.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK if self._end is None else self._end.code()

    # --- from the stream ------------------------------------------------------------------------------

    def opened(self, session: _Session, id_: int) -> None:
        self._session, self.id = session, id_
        open_ = multiplex_pb2.OpenCall(id=id_, request=self._request, metadata=dict(self._metadata))
        left = self._left()
        if left is not None:
            open_.timeout.FromNanoseconds(int(left * 1e9))
        self._opening = multiplex_pb2.MultiplexFrame(open=open_)

    def deliver(self, response: inference_pb2.GenerateResponse) -> None:
        if self._ended:
            return
        self._received = True
        self._events.append(response)
        self._wake()

    def ended(self, status: multiplex_pb2.CallStatus) -> None:
        code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        self._finish(None if code == grpc.StatusCode.OK else _error(code, status.message, status.details))

    def failed(self, error: grpc.aio.AioRpcError) -> None:
        """The stream broke (or the node does not serve it) before this call ended."""
        if self._ended:
            return
        if error.code() == grpc.StatusCode.UNIMPLEMENTED and not self._received:
            self._plain = self._link.plain(self._request, self._left(), self._metadata)
            self._finish(None)
            return
        self._finish(error)

    # --- inside ---------------------------------------------------------------------------------------

    def _left(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.001, self._deadline - asyncio.get_running_loop().time())

    def _expire(self) -> None:
        self._timer = None
        if not self._ended:
            self._finish(_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            if self._session is not None:
                self._session.cancel(self.id)

    def _finish(self, end: grpc.aio.AioRpcError | None) -> None:
        self._ended, self._end = True, end
        self._done.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._session is not None:
            self._session.forget(self.id)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Session:
    """One Multiplex stream to a node and the calls it carries."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel  # the channel it was opened on (not one that follows certificate files)
        self._call = multiplex_pb2_grpc.MultiplexServiceStub(channel).Multiplex()
        self._calls: dict[int, CarriedCall] = {}
        self._next_id = 1
        self._lock = asyncio.Lock()
        self._sends: set[asyncio.Task[None]] = set()
        self.broken: grpc.aio.AioRpcError | None = None
        self._retired: Callable[[_Session], None] | None = None  # told when a retired stream has ended
        self._ending: asyncio.Task[None] | None = None
        # Set when the node has answered the stream's headers (or the stream failed): nothing is written
        # before. A server without the service ends the call at once with UNIMPLEMENTED, and a write racing
        # that end would fail and replace its status with grpc's local INTERNAL, hiding that it is missing.
        self._accepted = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    def open(self, call: CarriedCall) -> None:
        id_, self._next_id = self._next_id, self._next_id + 1
        self._calls[id_] = call
        call.opened(self, id_)

    def cancel(self, id_: int) -> None:
        if self.broken is None:
            self._send(multiplex_pb2.MultiplexFrame(cancel=id_))

    def forget(self, id_: int) -> None:
        self._calls.pop(id_, None)
        if self._retired is not None and not self._calls:
            self._end_retired()

    def retire(self, ended: Callable[[_Session], None]) -> None:
        """Take no new calls (the caller opens them on another stream) and end the stream once the calls it
        carries have ended, then tell `ended`."""
        self._retired = ended
        if not self._calls:
            self._end_retired()

    def _end_retired(self) -> None:
        ended, self._retired = self._retired, None
        if ended is None:
            return
        self._ending = asyncio.ensure_future(self.close())
        self._ending.add_done_callback(lambda _: ended(self))

    def _send(self, frame: multiplex_pb2.MultiplexFrame) -> None:
        task = asyncio.ensure_future(self.write(frame))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def write(self, frame: multiplex_pb2.MultiplexFrame) -> None:
        """Send `frame`; a failure is not raised: the stream's reader has its status and fails its calls."""
        async with self._lock:
            if not self._accepted.is_set():
                await self._accepted.wait()
            if self.broken is not None:
                return
            try:
                await self._call.write(multiplex_pb2.MultiplexRequest(frames=[frame]))
            except Exception:  # the stream failed: its reader has its status and fails its calls
                log.debug("a write to a node's stream failed", exc_info=True)

    async def _read(self) -> None:
        error: grpc.aio.AioRpcError
        try:
            # The node sends its headers at once; a server without the service ends the call here instead.
            await self._call.initial_metadata()
            if not self._call.done():
                self._accepted.set()
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    error = _error(grpc.StatusCode.UNAVAILABLE, "the node ended its stream")
                    break
                calls = self._calls
                for event in message.events:
                    call = calls.get(event.id)
                    if call is None:
                        continue  # a call cancelled here meanwhile
                    if event.HasField("response"):
                        call.deliver(event.response)
                    else:
                        call.ended(event.end)
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = _error(grpc.StatusCode.CANCELLED, "the edge closed its stream to the node")
            self._fail(error)
            raise
        except Exception as exc:  # a message that does not parse, say
            log.warning("a node's stream failed: %r", exc)
            error = _error(grpc.StatusCode.UNAVAILABLE, f"the node's stream failed: {exc!r}")
        self._fail(error)
        self._call.cancel()

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        self.broken = error
        self._accepted.set()  # the writers waiting see it broken
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.failed(error)
        if self._retired is not None:
            self._end_retired()

    async def close(self) -> None:
        self._reader.cancel()
        self._call.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        for task in list(self._sends):
            task.cancel()


class NodeLink:
    """The edge's Generate calls to one node: over its stream, or plain where the node has none."""

    def __init__(
        self, channel: grpc.aio.Channel, stub: inference_pb2_grpc.InferenceServiceStub, name: str = ""
    ) -> None:
        self._name = name or "a node"  # for the log
        self._channel = channel
        self._stub = stub
        self._session: _Session | None = None
        self._retired: set[_Session] = set()  # streams on a replaced channel, ending with their last call
        self._unsupported_until = 0.0

    def generate(
        self, request: inference_pb2.GenerateRequest, timeout: float | None, metadata: tuple[tuple[str, str], ...]
    ) -> Any:
        """A Generate call to the node, carried on its stream (or a plain call, where it has none)."""
        broken = self._session.broken if self._session is not None else None
        if broken is not None and broken.code() == grpc.StatusCode.UNIMPLEMENTED:
            self._session = None
            self._unsupported_until = time.monotonic() + RETRY_UNSUPPORTED_SECONDS
            log.info("request %s: %s does not serve MultiplexService; its Generate calls are plain calls for %gs",
                     request.request_id, self._name, RETRY_UNSUPPORTED_SECONDS)  # fmt: skip
        if self._unsupported_until > time.monotonic():
            return self.plain(request, timeout, metadata)
        return CarriedCall(self, request, timeout, metadata)

    def attach(self, call: CarriedCall) -> None:
        """Open `call` on the node's stream, opening a new stream when there is none, it broke, or a
        certificate rotation replaced the channel it is on."""
        channel = current_channel(self._channel)
        session = self._session
        if session is None or session.broken is not None or session.channel is not channel:
            if session is not None and session.broken is None:
                self._retired.add(session)
                session.retire(self._retired.discard)
                log.info("a new stream to %s, on the rotated certificate; the old one ends with its last call",
                         self._name)  # fmt: skip
            session = self._session = _Session(channel)
        session.open(call)

    def plain(
        self, request: inference_pb2.GenerateRequest, timeout: float | None, metadata: tuple[tuple[str, str], ...]
    ) -> Any:
        return self._stub.Generate(request, timeout=timeout, metadata=metadata)

    async def close(self) -> None:
        for session in [*self._retired, *([self._session] if self._session is not None else [])]:
            await session.close()
