"""The edge's transport-free core: validate, ask the control plane where to go, call that node.

The HTTP routes and the gRPC servicer are thin adapters over `Gateway`; both get the same placement,
the same deadlines and the same errors.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import grpc

from fleetlm.controlplane.v1 import routing_pb2, routing_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import (
    require_model,
    validate_embed,
    validate_generate,
    validate_tokenize,
)

log = logging.getLogger(__name__)

# Errors a node gives before it has done anything for the request: another replica may serve it.
OVERLOADED = {ErrorCode.GPU_OVERLOADED, ErrorCode.NO_CAPACITY}
RETRYABLE = OVERLOADED | {ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.MODEL_UNAVAILABLE, ErrorCode.MODEL_NOT_FOUND}
PREFIX_CHARS = 256  # about 64 tokens: shorter shared prefixes are not worth routing for


def prefix_hash(request: inference_pb2.GenerateRequest) -> str:
    """A hash of the prompt's first PREFIX_CHARS characters, or "" for a short prompt."""
    if request.WhichOneof("input") == "chat":
        text = "".join(f"{m.role}:{m.content}\n" for m in request.chat.messages)
    else:
        text = request.prompt
    if len(text) < PREFIX_CHARS:
        return ""
    return hashlib.blake2b(text[:PREFIX_CHARS].encode(), digest_size=8).hexdigest()


def _with_model(request: Any, model: str) -> Any:
    copy = type(request)()
    copy.CopyFrom(request)
    copy.model = model
    return copy


@dataclass(frozen=True)
class Target:
    node_id: str
    address: str
    stub: inference_pb2_grpc.InferenceServiceStub


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
        self._placement = routing_pb2_grpc.RoutingServiceStub(self._cp_channel)
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

    def _stub(self, address: str) -> inference_pb2_grpc.InferenceServiceStub:
        channel = self._node_channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._node_channels[address] = channel
        return inference_pb2_grpc.InferenceServiceStub(channel)

    def _control_plane_error(self, exc: grpc.aio.AioRpcError) -> FleetError:
        error = FleetError.from_rpc_error(exc)
        if error.code in (ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.BACKEND_TIMEOUT):
            return FleetError(error.code, f"control plane at {self._controlplane} did not answer ({exc.code().name})")
        return error

    def _node_error(self, exc: grpc.aio.AioRpcError, target: Target, timeout: float) -> FleetError:
        error = FleetError.from_rpc_error(exc)
        if error.code == ErrorCode.BACKEND_TIMEOUT:
            return FleetError(
                ErrorCode.BACKEND_TIMEOUT,
                f"node {target.node_id} did not finish within the request timeout of {timeout:g}s",
            )
        if error.code == ErrorCode.BACKEND_UNAVAILABLE and exc.code() == grpc.StatusCode.UNAVAILABLE:
            return FleetError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"node {target.node_id} at {target.address} is unreachable",
                retry_after_seconds=1,
            )
        return error

    async def pick(self, model: str, user: str = "", prefix_hash: str = "") -> routing_pb2.PickReplicaResponse:
        """The control plane's choice of replica (and alternates) for one request."""
        return (await self._pick(model, user, prefix_hash))[0]

    async def _pick(self, model: str, user: str, prefix_hash: str) -> tuple[routing_pb2.PickReplicaResponse, bool]:
        require_model(model)
        cached = self._routes.get(model)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1], True
        request = routing_pb2.PickReplicaRequest(model=model, user=user, prefix_hash=prefix_hash)
        request.wait_for_ready.FromNanoseconds(int(self._scale_from_zero_timeout * 1e9))
        try:
            reply: routing_pb2.PickReplicaResponse = await self._placement.PickReplica(
                request, timeout=self._placement_timeout + self._scale_from_zero_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise self._control_plane_error(exc) from exc
        if self._route_cache_seconds > 0 and not reply.alternates:
            self._routes[model] = (time.monotonic() + self._route_cache_seconds, reply)
        return reply, False

    async def _targets(self, model: str, user: str, prefix: str) -> AsyncGenerator[tuple[str, Target], FleetError]:
        """(model, replica) pairs to try in order: the chosen replica, its alternates, then the same for
        the model's cpu_offload_model when every replica refused for load. The caller sends back the
        error of each failed attempt; only errors that leave the request untouched are retried."""
        seen: set[str] = set()
        error: FleetError | None = None
        device = "cpu"
        while model and model not in seen:
            seen.add(model)
            pick, cached = await self._pick(model, user, prefix)
            if cached:
                # A reused route is tried alone: if its replica refuses (full, unloading, moved, gone), the
                # control plane is asked again at once.
                error = yield model, Target(pick.node_id, pick.inference_address, self._stub(pick.inference_address))
                if error.code not in RETRYABLE:
                    raise error
                self._routes.pop(model, None)
                pick, _ = await self._pick(model, user, prefix)
            device = pick.device or device
            endpoints = [(pick.node_id, pick.inference_address)]
            endpoints += [(e.node_id, e.inference_address) for e in pick.alternates]
            for node_id, address in endpoints:
                error = yield model, Target(node_id, address, self._stub(address))
                if error.code not in RETRYABLE:
                    raise error
                self._routes.pop(model, None)
            assert error is not None
            if error.code not in OVERLOADED:
                break
            model = pick.cpu_offload_model
        assert error is not None
        if error.code in OVERLOADED:
            code = ErrorCode.GPU_OVERLOADED if device == "gpu" else ErrorCode.NO_CAPACITY
            raise FleetError(code, f"every replica is busy ({error.message})", retry_after_seconds=1)
        raise error

    def _timeout(self, client_timeout: float | None) -> float:
        if client_timeout is None:
            return self.request_timeout
        return max(0.001, min(self.request_timeout, client_timeout))

    async def generate(
        self, request: inference_pb2.GenerateRequest, client_timeout: float | None = None
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The node's Generate stream. A replica that refuses before the first token (full, unloading,
        unreachable) is replaced by the next one. Closing this iterator cancels the call on the node."""
        validate_generate(request)
        timeout = self._timeout(client_timeout)
        targets = self._targets(request.model, request.user, prefix_hash(request))
        try:
            model, target = await anext(targets)
            while True:
                if model != request.model:
                    request = _with_model(request, model)
                call = target.stub.Generate(request, timeout=timeout)
                started = False
                try:
                    async for response in call:
                        started = True
                        yield response
                    return
                except grpc.aio.AioRpcError as exc:
                    error = self._node_error(exc, target, timeout)
                    if started:
                        raise error from exc
                finally:
                    call.cancel()
                model, target = await targets.asend(error)
        finally:
            await targets.aclose()

    async def _unary(self, method: str, request: Any, client_timeout: float | None) -> Any:
        timeout = self._timeout(client_timeout)
        targets = self._targets(request.model, "", "")
        try:
            model, target = await anext(targets)
            while True:
                if model != request.model:
                    request = _with_model(request, model)
                try:
                    return await getattr(target.stub, method)(request, timeout=timeout)
                except grpc.aio.AioRpcError as exc:
                    model, target = await targets.asend(self._node_error(exc, target, timeout))
        finally:
            await targets.aclose()

    async def embed(
        self, request: inference_pb2.EmbedRequest, client_timeout: float | None = None
    ) -> inference_pb2.EmbedResponse:
        validate_embed(request)
        return await self._unary("Embed", request, client_timeout)  # type: ignore[no-any-return]

    async def tokenize(
        self, request: inference_pb2.TokenizeRequest, client_timeout: float | None = None
    ) -> inference_pb2.TokenizeResponse:
        validate_tokenize(request)
        return await self._unary("Tokenize", request, client_timeout)  # type: ignore[no-any-return]

    async def list_models(self) -> list[inference_pb2.ModelInfo]:
        try:
            reply = await self._placement.ListServedModels(
                routing_pb2.ListServedModelsRequest(), timeout=self._placement_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise self._control_plane_error(exc) from exc
        return list(reply.models)
