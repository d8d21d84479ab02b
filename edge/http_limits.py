"""Limits of the edge's HTTP server against slow or oversized clients.

The body limit and the body deadline are ASGI (`RequestLimits`), in front of every route: a body larger
than `max_body_bytes` is refused with 413 as soon as its Content-Length says so, or, for a chunked body,
as soon as that many bytes have arrived, so the edge never holds more than that in memory; a body that
has not fully arrived within `body_timeout_seconds` of the request's headers is refused with 408. Both
answers close the connection, so what the client still sends is not read.

The header deadline cannot be ASGI: uvicorn calls the app only once the headers are complete, and it
starts no timer before that (its keep-alive timer runs only between requests). `HeaderTimeoutProtocol`
(uvicorn's httptools protocol with a timer from the connection's start, and from the start of each
further request on it) answers 408 and closes a connection whose headers do not arrive in time, so a
client that trickles them (slowloris) holds a socket for `header_timeout_seconds` at most.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edge import access_log
from mesh import request_context


@dataclass(frozen=True)
class HttpLimits:
    """The defaults are what a deployment would pick: a body far above any prompt the engines take (the
    prompt itself is bounded by mesh.inference_requests.MAX_PROMPT_CHARS) and deadlines that a client on
    a slow link meets by far, while a stalled one lets go of its socket within seconds."""

    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_seconds: float = 30.0
    header_timeout_seconds: float = 10.0
    keep_alive_seconds: int = 5
    # Largest headers the edge takes (431 beyond; nginx takes 32 kB by default, Node.js 16 kB); also h11's
    # buffer before a request is complete.
    max_incomplete_event_bytes: int = 64 * 1024


class RequestRefused(Exception):
    """An HTTP-level refusal raised while the body is read (413, 408): answered in OpenAI's error shape,
    and the connection is closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": None, "code": self.code}}

    def messages(self) -> tuple[Message, Message]:
        content = json.dumps(self.openai_body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"connection", b"close"),
        ]
        return (
            {"type": "http.response.start", "status": self.status, "headers": headers},
            {"type": "http.response.body", "body": content, "more_body": False},
        )


def too_large(limit: int) -> RequestRefused:
    return RequestRefused(413, "REQUEST_TOO_LARGE", f"the request body is larger than {limit} bytes")


def body_too_slow(seconds: float) -> RequestRefused:
    return RequestRefused(
        408, "REQUEST_TIMEOUT", f"the request body did not arrive within {seconds:g} s of the request's headers"
    )


class RequestLimits:
    """ASGI: every HTTP request's body bounded in size and in time (see the module's docstring)."""

    def __init__(self, app: ASGIApp, limits: HttpLimits) -> None:
        self._app = app
        self._limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limits = self._limits
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            # Refused before a byte of the body is read (a malformed length never gets this far: the
            # HTTP parser answers 400 itself).
            for message in too_large(limits.max_body_bytes).messages():
                await send(message)
            return
        deadline = time.monotonic() + limits.body_timeout_seconds
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive() only waits for the client to go away: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    message = await receive()
            except TimeoutError:
                raise body_too_slow(limits.body_timeout_seconds) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limits.max_body_bytes:
                    raise too_large(limits.max_body_bytes)
                complete = not message.get("more_body", False)
            return message

        await self._app(scope, limited_receive, send)


def _loop_time(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


_REFUSAL_STATUS_LINES = {
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}
_REFUSAL_RESPONSE = (
    b"content-type: application/json\r\nconnection: close\r\nx-request-id: %s\r\ncontent-length: %d\r\n\r\n%s"
)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers, and a bound on their size:
    httptools (llhttp) buffers a header of any length, so a client could make the edge hold megabytes per
    connection before it is authenticated (a 16 MB header took 1.3 s to parse, then a 401). Headers larger
    than `max_header_bytes` are answered 431 and the connection closed. Both are set by `uvicorn_options`
    (uvicorn builds the protocol itself, with its own arguments only)."""

    header_timeout_seconds = HttpLimits.header_timeout_seconds
    max_header_bytes = HttpLimits.max_incomplete_event_bytes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._headers_done = False
        self._header_bytes = 0
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._headers_done or self.transport.is_closing():
            return
        self._header_bytes += len(data)  # what arrived of a request whose headers are not complete yet
        if self._header_bytes > self.max_header_bytes:
            self._disarm_header_timer()
            self._refuse(
                431, "REQUEST_HEADERS_TOO_LARGE", f"the request's headers exceed {self.max_header_bytes} bytes"
            )

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_seconds, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_message_begin(self) -> None:
        self._arm_header_timer()  # a further request on a kept-alive connection gets its own deadline
        self._headers_done, self._header_bytes = False, 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._headers_done = True
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests uvicorn's keep-alive timer applies; the next request's first byte re-arms ours.

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served (its headers came); its body has a deadline of its own
        self._refuse(
            408, "REQUEST_TIMEOUT", f"the request's headers did not arrive within {self.header_timeout_seconds:g} s"
        )

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer a request whose headers never completed, in OpenAI's error shape, and close."""
        refusal = RequestRefused(status, code, message)
        body = json.dumps(refusal.openai_body()).encode()
        # No X-Request-Id was read (the headers did not complete): the answer carries one of the edge's, in
        # its access log too.
        with access_log.request(request_context.make(), "-", "http", traced=False) as access:
            access.status, access.error = refusal.status, refusal.code
            head = _REFUSAL_STATUS_LINES[status]
            self.transport.write(head + _REFUSAL_RESPONSE % (access.request_id.encode(), len(body), body))
        self.transport.close()


def uvicorn_options(limits: HttpLimits) -> dict[str, Any]:
    """Keyword arguments for uvicorn.Config that put `limits` on the server's connections."""
    protocol = type(
        "EdgeHttpProtocol",
        (HeaderTimeoutProtocol,),
        {
            "header_timeout_seconds": limits.header_timeout_seconds,
            "max_header_bytes": limits.max_incomplete_event_bytes,
        },
    )
    return {
        "http": protocol,
        "timeout_keep_alive": limits.keep_alive_seconds,
        "h11_max_incomplete_event_size": limits.max_incomplete_event_bytes,
    }
