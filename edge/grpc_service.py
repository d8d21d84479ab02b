"""The edge's InferenceService: the fleet's gRPC front door, a thin adapter over the Gateway.

Errors leave as FleetError, which the server's interceptor (mesh.grpc_server) turns into a status with
the fleetlm ErrorInfo, before or after a stream has started. Anything else is logged here with the
request's id and leaves as INTERNAL, with the same ErrorInfo shape and no traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from edge import auth
from edge.gateway import Gateway, new_request_id
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError

log = logging.getLogger(__name__)


def _client_timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


def _internal(request_id: str) -> FleetError:
    log.exception("request %s: unhandled error", request_id)
    return FleetError(ErrorCode.INTERNAL, f"internal error (request {request_id}); see the edge's log")


class EdgeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._auth = auth.for_gateway(gateway)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        if not request.request_id:
            request.request_id = new_request_id()
        admission = await auth.admit_grpc(self._auth, context, request.model)
        tokens = 0
        stream = self._gateway.generate(request, _client_timeout(context))
        try:
            async for response in stream:
                if response.HasField("result"):
                    tokens = response.result.usage.total_tokens
                yield response
        except (FleetError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            raise _internal(request.request_id) from exc
        finally:
            admission.finish(tokens)
            await stream.aclose()

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        request_id = new_request_id("embed")
        admission = await auth.admit_grpc(self._auth, context, request.model)
        try:
            response = await self._gateway.embed(request, _client_timeout(context), request_id)
            admission.finish(response.usage.total_tokens)
            return response
        except (FleetError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            raise _internal(request_id) from exc

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        request_id = new_request_id("tokenize")
        admission = await auth.admit_grpc(self._auth, context, request.model)
        admission.finish(0)
        try:
            return await self._gateway.tokenize(request, _client_timeout(context), request_id)
        except (FleetError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            raise _internal(request_id) from exc

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        models = await self._gateway.list_models()
        if self._auth is not None:
            metadata = context.invocation_metadata() or ()
            value = next((v for k, v in metadata if k == "authorization"), None)
            key = self._auth.authenticate(value.decode() if isinstance(value, bytes) else value, None)
            models = [m for m in models if self._auth.may_use(key, m.name)]
        return inference_pb2.ListModelsResponse(models=models)
