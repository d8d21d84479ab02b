"""The edge's transport-free core: validate, ask the control plane where to go, call that node.

The HTTP routes and the gRPC servicer are thin adapters over `Gateway`; both get the same routing, the
same retries, the same deadlines and the same errors.

Every call goes through one attempt loop (`Gateway._first_answer`): the replica the control plane chose,
then its alternates, then the same for the model's `cpu_offload_model` when the replicas refused for
load. An attempt is retried elsewhere only when the node refused before doing anything for the request
(full, unloading, unreachable); once the first event of a stream has come, the request is that node's.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from fleetlm.controlplane.v1 import routing_pb2, routing_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import validate_embed, validate_generate, validate_tokenize

log = logging.getLogger(__name__)

# Errors a node gives before it has done anything for the request: another replica may serve it.
OVERLOADED = {ErrorCode.GPU_OVERLOADED, ErrorCode.NO_CAPACITY}
RETRYABLE = OVERLOADED | {ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.MODEL_UNAVAILABLE, ErrorCode.MODEL_NOT_FOUND}
PREFIX_CHARS = 256  # about 64 tokens: shorter shared prefixes are not worth routing for

T = TypeVar("T")


def prefix_hash(request: inference_pb2.GenerateRequest) -> str:
    """A hash of the prompt's first PREFIX_CHARS characters, or "" for a short prompt."""
    if request.WhichOneof("input") == "chat":
        text = "".join(f"{m.role}:{m.content}\n" for m in request.chat.messages)
    else:
        text = request.prompt
    if len(text) < PREFIX_CHARS:
        return ""
    return hashlib.blake2b(text[:PREFIX_CHARS].encode(), digest_size=8).hexdigest()


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _with_model(request: Any, model: str) -> Any:
    if request.model == model:
        return request
    copy = type(request)()
    copy.CopyFrom(request)
    copy.model = model
    return copy


@dataclass(frozen=True)
class Target:
    node_id: str
    address: str
    stub: inference_pb2_grpc.InferenceServiceStub


@dataclass(frozen=True)
class Route:
    """The replicas to try for one model, best first, and where its overflow goes."""

    targets: list[Target]
    cpu_offload_model: str
    device: str
    cached: bool


@dataclass
class _Refusals:
    """What the replicas said when they refused one request."""

    last: FleetError | None = None
    overloaded: FleetError | None = None  # the first refusal for load

    def add(self, error: FleetError) -> None:
        self.last = error
        if error.code in OVERLOADED and self.overloaded is None:
            self.overloaded = error

    def answer(self, device: str) -> FleetError:
        """The error the client hears when no replica served."""
        if self.overloaded is None:
            assert self.last is not None  # a route names at least one replica
            return self.last
        code = ErrorCode.GPU_OVERLOADED if device == "gpu" else ErrorCode.NO_CAPACITY
        detail = self.overloaded.message
        if self.last is not self.overloaded and self.last is not None and self.last.code not in OVERLOADED:
            detail += f"; then {self.last}"
        return FleetError(code, f"every replica is busy ({detail})", retry_after_seconds=1)


# One attempt: call `target` with the request (its model set to the one being tried). It returns what
# the caller needs to go on, or raises FleetError; only a refusal in RETRYABLE moves to the next replica.
Attempt = Callable[[Any, Target], Awaitable[T]]


def _log_failure(request_id: str, error: FleetError) -> None:
    """One line for a request the edge could not place: the fleet's failures loudly, the caller's quietly."""
    if error.http_status >= 500:
        log.warning("request %s failed: %s", request_id, error)
    elif error.http_status == 429:
        log.info("request %s refused: %s", request_id, error)
    else:
        log.debug("request %s rejected: %s", request_id, error)


class Gateway:
    def __init__(
        self,
        controlplane: str,
        request_timeout_seconds: float,
        placement_timeout_seconds: float,
        scale_from_zero_timeout_seconds: float = 120.0,
        route_cache_seconds: float = 0.0,
    ) -> None:
        self._controlplane = controlplane
        self._cp_channel = grpc.aio.insecure_channel(controlplane)
        self._routing = routing_pb2_grpc.RoutingServiceStub(self._cp_channel)
        self._node_channels: dict[str, grpc.aio.Channel] = {}
        self.request_timeout = request_timeout_seconds
        self._placement_timeout = placement_timeout_seconds
        self._scale_from_zero_timeout = scale_from_zero_timeout_seconds
        # A model served by one replica gets the same answer from the control plane every time, whatever
        # the request's user or prefix: reuse it for a moment (one round trip less before the first
        # token), until that replica refuses anything. Several replicas: the control plane balances them.
        self._route_cache_seconds = route_cache_seconds
        self._routes: dict[str, tuple[float, routing_pb2.PickReplicaResponse]] = {}

    async def close(self) -> None:
        for channel in self._node_channels.values():
            await channel.close()
        await self._cp_channel.close()

    def _target(self, node_id: str, address: str) -> Target:
        channel = self._node_channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._node_channels[address] = channel
        return Target(node_id, address, inference_pb2_grpc.InferenceServiceStub(channel))

    def _control_plane_error(self, exc: grpc.aio.AioRpcError) -> FleetError:
        error = FleetError.from_rpc_error(exc)
        if error.code in (ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.BACKEND_TIMEOUT):
            return FleetError(error.code, f"control plane at {self._controlplane} did not answer ({exc.code().name})")
        return error

    def _node_error(self, exc: grpc.aio.AioRpcError, target: Target, timeout: float) -> FleetError:
        """A failed node call as the client hears it: the node's own error when it sent one (its reason
        and message), else what the transport's status means, naming the node."""
        sent = FleetError.sent_by_peer(exc)
        if sent is not None:
            return sent
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return FleetError(
                ErrorCode.BACKEND_TIMEOUT,
                f"node {target.node_id} did not finish within the request timeout of {timeout:g}s",
            )
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return FleetError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"node {target.node_id} at {target.address} is unreachable",
                retry_after_seconds=1,
            )
        return FleetError.from_rpc_error(exc)

    # --- routing ----------------------------------------------------------------------------------------

    async def _route(self, model: str, user: str, prefix: str, reuse: bool = True) -> Route:
        """The control plane's choice of replicas for one request, or the cached one for a model with a
        single replica (when `reuse`)."""
        cached = self._routes.get(model) if reuse else None
        if cached is not None and time.monotonic() < cached[0]:
            return self._as_route(cached[1], cached=True)
        request = routing_pb2.PickReplicaRequest(model=model, user=user, prefix_hash=prefix)
        request.wait_for_ready.FromNanoseconds(int(self._scale_from_zero_timeout * 1e9))
        try:
            reply: routing_pb2.PickReplicaResponse = await self._routing.PickReplica(
                request, timeout=self._placement_timeout + self._scale_from_zero_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise self._control_plane_error(exc) from exc
        if self._route_cache_seconds > 0 and not reply.alternates:
            self._routes[model] = (time.monotonic() + self._route_cache_seconds, reply)
        return self._as_route(reply, cached=False)

    def _as_route(self, reply: routing_pb2.PickReplicaResponse, cached: bool) -> Route:
        endpoints = [(reply.node_id, reply.inference_address)]
        endpoints += [(e.node_id, e.inference_address) for e in reply.alternates]
        return Route(
            targets=[self._target(node_id, address) for node_id, address in endpoints],
            cpu_offload_model=reply.cpu_offload_model,
            device=reply.device or "cpu",
            cached=cached,
        )

    async def _first_answer(
        self, request: Any, request_id: str, attempt: Attempt[T], user: str = "", prefix: str = ""
    ) -> T:
        """Run `attempt` on each replica in turn until one answers: the chosen replica, its alternates,
        then the same for the model's cpu_offload_model when replicas refused for load. A refusal outside
        RETRYABLE is the answer at once; when every replica refused and one of them was full, the answer
        is 429 (GPU_OVERLOADED for GPU replicas, else NO_CAPACITY)."""
        model: str = request.model
        tried: set[str] = set()
        refusals = _Refusals()
        device, offload = "cpu", ""
        while model and model not in tried:
            tried.add(model)
            route = await self._route_unless_overloaded(refusals, model, user, prefix)
            while route is not None:
                device, offload = route.device, route.cpu_offload_model
                for target in route.targets:
                    try:
                        return await attempt(_with_model(request, model), target)
                    except FleetError as error:
                        self._refused(error, request_id, model, target)
                        refusals.add(error)
                # A reused route names one replica; when it refuses (full, unloading, moved, gone), the
                # control plane is asked again at once.
                route = (
                    await self._route_unless_overloaded(refusals, model, user, prefix, False) if route.cached else None
                )
            if refusals.overloaded is None or not offload:
                break
            log.info("request %s: every replica of %s is busy; offloading to %s", request_id, model, offload)
            model, offload = offload, ""
        raise refusals.answer(device)

    async def _route_unless_overloaded(
        self, refusals: _Refusals, model: str, user: str, prefix: str, reuse: bool = True
    ) -> Route | None:
        """The route for `model`, or None when routing fails after a replica was full (an offload model
        with no replica to offer, say): the request's answer is then the overload, not that failure."""
        try:
            return await self._route(model, user, prefix, reuse)
        except FleetError as error:
            if refusals.overloaded is None or error.code not in RETRYABLE:
                raise
            refusals.add(error)
            return None

    def _refused(self, error: FleetError, request_id: str, model: str, target: Target) -> None:
        """Drop the model's cached route and log the refusal; re-raise it unless another replica may serve."""
        self._routes.pop(model, None)
        if error.code not in RETRYABLE:
            raise error
        log.debug("request %s: node %s refused %s (%s); trying the next replica", request_id, target.node_id,
                  model, error)  # fmt: skip

    def _timeout(self, client_timeout: float | None) -> float:
        if client_timeout is None:
            return self.request_timeout
        return max(0.001, min(self.request_timeout, client_timeout))

    # --- calls ------------------------------------------------------------------------------------------

    async def generate(
        self, request: inference_pb2.GenerateRequest, client_timeout: float | None = None
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The node's Generate stream: deltas, then one result. A replica that refuses before the first
        event (full, unloading, unreachable) is replaced by the next one; after it, a failure ends the
        stream with that error, and so does a stream that breaks the contract (an empty event, no result).
        Closing this iterator cancels the call on the node."""
        validate_generate(request)
        if not request.request_id:
            request.request_id = new_request_id()
        request_id = request.request_id
        timeout = self._timeout(client_timeout)

        async def open_stream(
            attempt: inference_pb2.GenerateRequest, target: Target
        ) -> tuple[Any, inference_pb2.GenerateResponse, Target]:
            call = target.stub.Generate(attempt, timeout=timeout)
            try:
                return call, await self._next_event(call, target, timeout), target
            except BaseException:
                call.cancel()
                raise

        try:
            call, response, target = await self._first_answer(
                request, request_id, open_stream, request.user, prefix_hash(request)
            )
        except FleetError as error:
            _log_failure(request_id, error)
            raise
        try:
            while True:
                yield response
                if response.HasField("result"):
                    await call.code()  # its status follows at once: the call ends on the node, not cancelled
                    return
                response = await self._next_event(call, target, timeout)
        except FleetError as error:
            log.warning("request %s: stream from node %s failed after it started: %s", request_id, target.node_id,
                        error)  # fmt: skip
            raise
        finally:
            call.cancel()  # a no-op once the call has ended; otherwise the node stops the work

    async def _next_event(self, call: Any, target: Target, timeout: float) -> inference_pb2.GenerateResponse:
        """The stream's next event, checked: an error, an event with nothing in it and a stream that ends
        without its result all become a FleetError (retried elsewhere only before the first event)."""
        try:
            response = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._node_error(exc, target, timeout) from exc
        if response is grpc.aio.EOF:
            raise FleetError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"node {target.node_id} ended the stream without a result",
                retry_after_seconds=1,
            )
        if response is None:  # grpc.aio's answer to bytes that do not parse (it logs the DecodeError)
            raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, f"node {target.node_id} sent a malformed stream event")
        if response.WhichOneof("event") is None:
            raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, f"node {target.node_id} sent an empty stream event")
        return response  # type: ignore[no-any-return]

    async def _unary(self, method: str, request: Any, client_timeout: float | None, request_id: str) -> Any:
        timeout = self._timeout(client_timeout)
        request_id = request_id or new_request_id(method.lower())

        async def call(attempt: Any, target: Target) -> Any:
            try:
                return await getattr(target.stub, method)(attempt, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise self._node_error(exc, target, timeout) from exc

        try:
            return await self._first_answer(request, request_id, call)
        except FleetError as error:
            _log_failure(request_id, error)
            raise

    async def embed(
        self, request: inference_pb2.EmbedRequest, client_timeout: float | None = None, request_id: str = ""
    ) -> inference_pb2.EmbedResponse:
        """`request_id` names the call in the edge's logs (EmbedRequest has no field for it)."""
        validate_embed(request)
        return await self._unary("Embed", request, client_timeout, request_id)  # type: ignore[no-any-return]

    async def tokenize(
        self, request: inference_pb2.TokenizeRequest, client_timeout: float | None = None, request_id: str = ""
    ) -> inference_pb2.TokenizeResponse:
        validate_tokenize(request)
        return await self._unary("Tokenize", request, client_timeout, request_id)  # type: ignore[no-any-return]

    async def list_models(self) -> list[inference_pb2.ModelInfo]:
        try:
            reply = await self._routing.ListServedModels(
                routing_pb2.ListServedModelsRequest(), timeout=self._placement_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise self._control_plane_error(exc) from exc
        return list(reply.models)
