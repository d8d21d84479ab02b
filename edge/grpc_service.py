"""The edge's InferenceService: the fleet's gRPC front door, a thin adapter over the Gateway."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from edge.gateway import Gateway
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc


def _client_timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


class EdgeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        if not request.request_id:
            request.request_id = f"req-{uuid.uuid4().hex}"
        stream = self._gateway.generate(request, _client_timeout(context))
        try:
            async for response in stream:
                yield response
        finally:
            await stream.aclose()

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        return await self._gateway.embed(request, _client_timeout(context))

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        return await self._gateway.tokenize(request, _client_timeout(context))

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=await self._gateway.list_models())
