"""The edge's transport-free core: validate, ask the control plane where to go, call that node.

The HTTP routes and the gRPC servicer are thin adapters over `Gateway`; both get the same placement,
the same deadlines and the same errors.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc

from fleetlm.controlplane.v1 import placement_pb2, placement_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import (
    require_model,
    validate_embed,
    validate_generate,
    validate_tokenize,
)

log = logging.getLogger(__name__)


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
    ) -> None:
        self._controlplane = controlplane
        self._cp_channel = grpc.aio.insecure_channel(controlplane)
        self._placement = placement_pb2_grpc.PlacementServiceStub(self._cp_channel)
        self._node_channels: dict[str, grpc.aio.Channel] = {}
        self.request_timeout = request_timeout_seconds
        self._placement_timeout = placement_timeout_seconds

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
            return FleetError(
                error.code, f"control plane at {self._controlplane} did not answer ({exc.code().name})"
            )
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

    async def pick(self, model: str, user: str = "") -> Target:
        require_model(model)
        try:
            reply = await self._placement.PickReplica(
                placement_pb2.PickReplicaRequest(model=model, user=user),
                timeout=self._placement_timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise self._control_plane_error(exc) from exc
        return Target(reply.node_id, reply.inference_address, self._stub(reply.inference_address))

    def _timeout(self, client_timeout: float | None) -> float:
        if client_timeout is None:
            return self.request_timeout
        return max(0.001, min(self.request_timeout, client_timeout))

    async def generate(
        self, request: inference_pb2.GenerateRequest, client_timeout: float | None = None
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The node's Generate stream. Closing this iterator cancels the call on the node."""
        validate_generate(request)
        timeout = self._timeout(client_timeout)
        target = await self.pick(request.model, request.user)
        call = target.stub.Generate(request, timeout=timeout)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise self._node_error(exc, target, timeout) from exc
        finally:
            call.cancel()

    async def embed(
        self, request: inference_pb2.EmbedRequest, client_timeout: float | None = None
    ) -> inference_pb2.EmbedResponse:
        validate_embed(request)
        timeout = self._timeout(client_timeout)
        target = await self.pick(request.model)
        try:
            return await target.stub.Embed(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._node_error(exc, target, timeout) from exc

    async def tokenize(
        self, request: inference_pb2.TokenizeRequest, client_timeout: float | None = None
    ) -> inference_pb2.TokenizeResponse:
        validate_tokenize(request)
        timeout = self._timeout(client_timeout)
        target = await self.pick(request.model)
        try:
            return await target.stub.Tokenize(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._node_error(exc, target, timeout) from exc

    async def list_models(self) -> list[inference_pb2.ModelInfo]:
        try:
            reply = await self._placement.ListServedModels(
                placement_pb2.ListServedModelsRequest(), timeout=self._placement_timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise self._control_plane_error(exc) from exc
        return list(reply.models)
