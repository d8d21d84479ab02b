"""Start a grpc.aio server the way every fleetlm service does: error mapping, health, reflection.

Every servicer raises `FleetError`; the interceptor turns it into a gRPC status with an ErrorInfo. Any other
exception is logged with its traceback here and reaches the client only as a plain INTERNAL status.
Shutdown order (why): health goes NOT_SERVING first so load balancers and grpcurl probes stop sending,
then the server stops accepting and drains in-flight calls within the grace period; the caller closes
engines and stores only after that, so no call runs against a closed backend.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh.channels import MAX_MESSAGE_BYTES, SERVER_KEEPALIVE_OPTIONS
from mesh.errors import ErrorCode, FleetError

log = logging.getLogger(__name__)


# A client's own cancellation at its deadline reaches the server before the server's timer for the same deadline
# fires: the server's deadline is the header's timeout counted from when the call arrived (later than the
# client counted from), and grpc rounds that timeout up when it writes it. A cancellation this close to the
# deadline is the deadline's (CI saw one 1-2 ms early and logged a client's own deadline as its cancel).
DEADLINE_SLACK_SECONDS = 0.1


def ended_by_deadline(error: BaseException, context: grpc.aio.ServicerContext) -> bool:
    """Whether a call that ended with `error` was ended by its own deadline: grpc cancelled its handler, or
    the edge's call to the node ended with the client's deadline (CANCELLED), and the deadline has passed. Its
    client hears DEADLINE_EXCEEDED, and it is logged and counted so (the access log, the metrics)."""
    cancelled = isinstance(error, asyncio.CancelledError | GeneratorExit) or (
        isinstance(error, FleetError) and error.code == ErrorCode.CANCELLED
    )
    remaining = context.time_remaining()
    return cancelled and remaining is not None and remaining <= DEADLINE_SLACK_SECONDS


async def _abort(context: grpc.aio.ServicerContext, error: FleetError) -> None:
    await context.abort(error.grpc_code, error.message, trailing_metadata=error.grpc_trailing_metadata())


def _internal(method: str, exc: BaseException) -> FleetError:
    log.exception("unhandled error in %s", method, exc_info=exc)
    return FleetError(ErrorCode.INTERNAL, "internal error; see the server log")


class _Undecodable:
    """What a request that is not a valid message deserializes to: the servicer's wrapper refuses it with
    INVALID_ARGUMENT (grpc's own answer to a deserializer that raises is UNKNOWN, a status for bugs)."""


_UNDECODABLE = _Undecodable()


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or whatever a corrupt message makes the parser raise
            return _UNDECODABLE

    return deserialize


def _undecodable(method: str) -> FleetError:
    return FleetError(ErrorCode.INVALID_REQUEST, f"the request to {method} is not a valid protobuf message")


# A check of who calls, made before a method's handler runs (with the call's context, which an interceptor
# does not see otherwise): raises FleetError to refuse the call (mesh.auth.CallerKinds).
CallerCheck = Callable[[str, grpc.aio.ServicerContext], None]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps FleetError (and anything unexpected) raised by a servicer to a gRPC status, and a request that
    does not decode to INVALID_ARGUMENT. With `check_caller`, every call is checked by it first (its refusal
    mapped like any other FleetError)."""

    def __init__(self, check_caller: CallerCheck | None = None) -> None:
        self._check_caller = check_caller
        # A method's handler is the same object on every call: it is wrapped once (method -> the handler
        # and its wrapper), not on every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)  # only methods the server has: a bounded set
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        check = self._check_caller
        options = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(method, handler.unary_unary, check=check), **options)
        if handler.unary_stream is not None:
            # A streaming handler either yields its replies (an async generator) or writes them with
            # context.write and returns (grpc_health's Watch): each is wrapped as what it is.
            if not inspect.isasyncgenfunction(handler.unary_stream):
                return grpc.unary_stream_rpc_method_handler(
                    _wrap_writer(method, handler.unary_stream, check=check), **options
                )
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream, check=check), **options
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(method, handler.stream_unary, streamed=True, check=check), **options
            )
        if handler.stream_stream is not None:
            if not inspect.isasyncgenfunction(handler.stream_stream):
                return grpc.stream_stream_rpc_method_handler(
                    _wrap_writer(method, handler.stream_stream, streamed=True, check=check), **options
                )
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(method, handler.stream_stream, streamed=True, check=check), **options
            )
        return handler


async def _checked(method: str, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is _UNDECODABLE:
            raise _undecodable(method)
        yield request


def _wrap_unary(
    method: str, behavior: Callable[..., Awaitable[Any]], streamed: bool = False, check: CallerCheck | None = None
) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if check is not None:
                check(method, context)
            if request is _UNDECODABLE:
                raise _undecodable(method)
            return await behavior(_checked(method, request) if streamed else request, context)
        except grpc.aio.AbortError:
            raise
        except FleetError as error:
            await _abort(context, error)
        except Exception as exc:
            await _abort(context, _internal(method, exc))

    return wrapped


def _wrap_writer(
    method: str, behavior: Callable[..., Any], streamed: bool = False, check: CallerCheck | None = None
) -> Callable[..., Awaitable[None]]:
    """A streaming handler that is not an async generator: one that writes with context.write (or returns an
    async iterator, whose replies are written here)."""

    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            if check is not None:
                check(method, context)
            if request is _UNDECODABLE:
                raise _undecodable(method)
            produced = behavior(_checked(method, request) if streamed else request, context)
            if hasattr(produced, "__aiter__"):
                async for response in produced:
                    await context.write(response)
            else:
                await produced
        except grpc.aio.AbortError:
            raise
        except FleetError as error:
            await _abort(context, error)
        except Exception as exc:
            await _abort(context, _internal(method, exc))

    return wrapped


def _wrap_stream(
    method: str, behavior: Callable[..., AsyncIterator[Any]], streamed: bool = False, check: CallerCheck | None = None
) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if check is not None:
                check(method, context)
            if request is _UNDECODABLE:
                raise _undecodable(method)
            async for response in behavior(_checked(method, request) if streamed else request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except FleetError as error:
            await _abort(context, error)
        except Exception as exc:
            await _abort(context, _internal(method, exc))

    return wrapped


# Streams one client connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; grpc's own
# default is no limit), so that one connection cannot hold handlers and buffers without bound. Beyond it grpc
# does not refuse a stream: the client's transport holds it until one of the open ones ends. The edge carries
# all of its requests to a node on one connection, so the limit is far above what a node admits at once
# (running plus queued: 4 + 16 per replica by default) and fleet traffic never waits on it; a client that
# opens streams by the thousand does.
MAX_CONCURRENT_STREAMS = 1024
HANDSHAKE_TIMEOUT_MS = 10_000


class BindError(OSError):
    """A server cannot listen on its address (in use, or not an address of this machine): the operator's to
    fix, said in one line by the command line (launcher.cli), not a traceback."""


def unbindable(address: str) -> str:
    """Why a server cannot listen on host:port, as the operating system says it (grpc's core logs the reason
    and raises only "Failed to bind"), found by binding plain sockets there as grpc does (SO_REUSEADDR).
    "" when one of the addresses it resolves to binds (grpc listens on those that do; a wildcard, on IPv6 or
    else IPv4, so either will do), or when the address is not host:port with a port of its own (:0)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return ""
    name = host.strip("[]")
    try:
        found = socket.getaddrinfo(
            None if name in ("", "0.0.0.0", "::") else name, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        return exc.strerror or str(exc)
    why = ""
    for family, kind, proto, _, sockaddr in found:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(sockaddr)
            return ""
        except OSError as exc:
            why = why or exc.strerror or str(exc)
    return why


class GrpcServer:
    """A grpc.aio server with health and reflection always on."""

    def __init__(
        self,
        service_names: Iterable[str],
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
        check_caller: CallerCheck | None = None,
    ) -> None:
        """`check_caller` checks every call before its handler (who may call what: mesh.auth.CallerKinds)."""
        self.service_names = list(service_names)
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(check_caller)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                ("grpc.max_concurrent_streams", max_concurrent_streams),
                # A connection that has not finished its handshake (TLS, HTTP/2's preface) within 10 s is
                # closed (grpc's default is 120 s): one that sends nothing holds a socket that long at most,
                # as the edge's HTTP header deadline does.
                ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
                # the keepalive pings of fleetlm's own channels (mesh.channels) are welcome
                *SERVER_KEEPALIVE_OPTIONS,
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = 0

    async def start(
        self, address: str, credentials: grpc.ServerCredentials | None = None, not_yet: Iterable[str] = ()
    ) -> int:
        """Bind and start (TLS with `credentials`); returns the bound port (address may end in :0). BindError
        when the address cannot be bound, with the operating system's reason: found before grpc tries, so that
        the operator reads one line, not also the error line grpc's core logs. Health: "" (the process) and
        every service SERVING, but those `not_yet` NOT_SERVING until `serving(name)`."""
        why = unbindable(address)
        if why:
            raise BindError(f"cannot serve gRPC on {address}: {why}")
        try:
            self.port = (
                self.server.add_secure_port(address, credentials)
                if credentials
                else self.server.add_insecure_port(address)
            )
        except RuntimeError as exc:  # grpc's "Failed to bind to address" (older grpc: port 0)
            if "Failed to bind" not in str(exc):
                raise
            self.port = 0
        if self.port == 0:
            why = unbindable(address) or "in use, or not an address of this machine"  # taken meanwhile
            raise BindError(f"cannot serve gRPC on {address}: {why}")
        await self.server.start()
        waiting = set(not_yet)
        for name in ["", *self.service_names]:
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if name in waiting
                else health_pb2.HealthCheckResponse.SERVING
            )
            await self.health.set(name, status)
        return self.port

    async def serving(self, name: str, serving: bool = True) -> None:
        """Say in grpc.health.v1 whether service `name` serves now."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
