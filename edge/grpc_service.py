"""The edge's InferenceService: the fleet's gRPC front door, a thin adapter over the Gateway.

Errors leave as FleetError, which the server's interceptor (mesh.grpc_server) turns into a status with
the fleetlm ErrorInfo, before or after a stream has started. Anything else is logged here with the
request's id and leaves as INTERNAL, with the same ErrorInfo shape and no traceback.

Every call has an id: the caller's `x-request-id` metadata (for Generate, else its `request_id` field), or a
fresh `req_...`; it comes back in the initial metadata, before anything else, so a caller has it even
when the call fails. One access-log line per call (edge.access_log), as over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import grpc

from edge import access_log, auth
from edge.gateway import Gateway
from edge.openai_protocol import FINISH_REASONS
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh import request_context, tracing
from mesh.errors import ErrorCode, FleetError

log = logging.getLogger(__name__)


def _client_timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


def _internal(request_id: str) -> FleetError:
    log.exception("request %s: unhandled error", request_id)
    return FleetError(ErrorCode.INTERNAL, f"internal error (request {request_id}); see the edge's log")


@contextlib.contextmanager
def _outcome(access: access_log.Access) -> Iterator[None]:
    """Note how the call ended in its access record: 200, or the error's HTTP status and code."""
    try:
        yield
    except FleetError as error:
        access.status, access.error = error.http_status, str(error.code)
        raise
    except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
        if isinstance(exc, asyncio.CancelledError):
            access.status, access.error = 499, str(ErrorCode.CANCELLED)  # the caller went away
        raise
    except BaseException:
        access.status, access.error = 500, str(ErrorCode.INTERNAL)
        raise
    if not access.status:
        access.status = 200


async def _call(
    context: grpc.aio.ServicerContext, method: str, field_id: str = ""
) -> tuple[contextlib.ExitStack, access_log.Access]:
    """Open one call's record: its id (checked; an invalid one is a 400 naming where it came from, sent
    with a fresh id), sent back in the initial metadata; the caller's trace context as the span's parent."""
    metadata = context.invocation_metadata() or ()
    given, where = "", ""
    for key, value in metadata:
        if key == request_context.METADATA_KEY:
            given, where = (value if isinstance(value, str) else value.decode("latin-1")), key
    if not where and field_id:
        given, where = field_id, "request_id"
    request_id = given if given and request_context.is_valid(given) else request_context.make()
    carrier = tracing.carrier_from(metadata) if tracing.TRACER is not None else None
    stack = contextlib.ExitStack()
    access = stack.enter_context(access_log.request(request_id, method, "grpc", carrier))
    try:
        await context.send_initial_metadata(((request_context.METADATA_KEY, request_id),))
        if given and given != request_id:
            request_context.checked(given, where)
    except FleetError as error:
        access.status, access.error = error.http_status, str(error.code)
        stack.close()
        raise
    return stack, access


class EdgeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._auth = auth.for_gateway(gateway)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        stack, access = await _call(context, "Generate", request.request_id)
        with stack, _outcome(access):
            request.request_id = access.request_id
            access.model = request.model
            if request.WhichOneof("input") == "prompt":
                access.operation = "text_completion"
            admission = await auth.admit_grpc(self._auth, context, request.model)
            tokens = 0
            stream = self._gateway.generate(request, _client_timeout(context))
            try:
                async for response in stream:
                    if response.HasField("result"):
                        result = response.result
                        tokens = result.usage.total_tokens
                        access.usage(result.usage.prompt_tokens, result.usage.completion_tokens,
                                     FINISH_REASONS.get(result.finish_reason, ""))  # fmt: skip
                        access.node = result.node_id or access.node
                    elif response.HasField("delta") or response.HasField("tool_call"):
                        access.token()  # the first output of either kind, as over HTTP
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
        stack, access = await _call(context, "Embed")
        with stack, _outcome(access):
            access.model = request.model
            admission = await auth.admit_grpc(self._auth, context, request.model)
            try:
                response = await self._gateway.embed(request, _client_timeout(context), access.request_id)
                admission.finish(response.usage.total_tokens)
                access.usage(response.usage.prompt_tokens, 0)
                return response
            except (FleetError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                raise _internal(access.request_id) from exc

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        stack, access = await _call(context, "Tokenize")
        with stack, _outcome(access):
            access.model = request.model
            admission = await auth.admit_grpc(self._auth, context, request.model)
            admission.finish(0)
            try:
                return await self._gateway.tokenize(request, _client_timeout(context), access.request_id)
            except (FleetError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                raise _internal(access.request_id) from exc

    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.DetokenizeResponse:
        stack, access = await _call(context, "Detokenize")
        with stack, _outcome(access):
            access.model = request.model
            admission = await auth.admit_grpc(self._auth, context, request.model)
            admission.finish(0)
            try:
                return await self._gateway.detokenize(request, _client_timeout(context), access.request_id)
            except (FleetError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                raise _internal(access.request_id) from exc

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
