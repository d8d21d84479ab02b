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
from typing import Any

import grpc

from edge import access_log, auth
from edge.gateway import Gateway, shutting_down
from edge.openai_protocol import FINISH_REASONS
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh import request_context, tracing
from mesh.errors import ErrorCode, FleetError
from mesh.grpc_server import ended_by_deadline

log = logging.getLogger(__name__)


def _client_timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


def _internal(request_id: str) -> FleetError:
    log.exception("request %s: unhandled error", request_id)
    return FleetError(ErrorCode.INTERNAL, f"internal error (request {request_id}); see the edge's log")


@contextlib.contextmanager
def _outcome(access: access_log.Access, context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Note how the call ended in its access record: 200, or the error's HTTP status and code; a call its
    client cancelled is 499 CANCELLED, one whose deadline passed 504 DEADLINE_EXCEEDED."""
    try:
        yield
    except (FleetError, asyncio.CancelledError, GeneratorExit) as exc:
        # The caller went away: the call is cancelled, or (cancelled while its handler waited at a `yield`)
        # closed by grpc.aio from a task of its own; or its deadline passed.
        if ended_by_deadline(exc, context):
            access.status, access.error = 504, grpc.StatusCode.DEADLINE_EXCEEDED.name
        elif isinstance(exc, FleetError):
            access.status, access.error = exc.http_status, str(exc.code)
        else:
            access.status, access.error = 499, str(ErrorCode.CANCELLED)
        raise
    except grpc.aio.AbortError:
        raise
    except BaseException:
        access.status, access.error = 500, str(ErrorCode.INTERNAL)
        raise
    if not access.status:
        access.status = 200


class _Call:
    """One call's record (`access`) and the sending of its id in the initial metadata, which is started
    here and not awaited: Generate routes the request and opens the node's stream meanwhile (waiting
    for it cost every stream's first token a round trip through grpc's completion queue). `sent` waits
    for it, as everything else the call sends must."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str, field_id: str, gateway: Gateway) -> None:
        metadata = context.invocation_metadata() or ()
        given, where = "", ""
        for key, value in metadata:
            if key == request_context.METADATA_KEY:
                given, where = (value if isinstance(value, str) else value.decode("latin-1")), key
        if not where and field_id:
            given, where = field_id, "request_id"
        request_id = given if given and request_context.is_valid(given) else request_context.make()
        if where != "request_id" and field_id and not request_context.is_valid(field_id):
            given, where = field_id, "request_id"  # the metadata's id wins, but an invalid field is not passed over
        carrier = tracing.carrier_from(metadata) if tracing.TRACER is not None else None
        self.stack = contextlib.ExitStack()
        self.access = self.stack.enter_context(
            access_log.request(request_id, method, "grpc", carrier, serves=lambda model: model in gateway.feed.models)
        )
        # An invalid caller-given id is answered with a 400 naming where it came from, sent with the fresh id.
        self.rejected = (given, where) if given and given != request_id else None
        self.sending = asyncio.ensure_future(
            context.send_initial_metadata(((request_context.METADATA_KEY, request_id),))
        )
        self.sending.add_done_callback(_retrieved)

    async def sent(self) -> None:
        """The id has gone (a call the client ended meanwhile fails here as on its next write); an invalid
        caller-given id is refused now."""
        if not self.sending.done():
            await asyncio.shield(self.sending)
        self.sending.result()
        if self.rejected is not None:
            rejected, self.rejected = self.rejected, None
            request_context.checked(*rejected)


def _retrieved(sending: asyncio.Future[None]) -> None:
    if not sending.cancelled():
        sending.exception()  # looked at: a call that went away before its metadata left is no unhandled error


@contextlib.asynccontextmanager
async def _call(
    context: grpc.aio.ServicerContext, gateway: Gateway, method: str, field_id: str = ""
) -> AsyncIterator[_Call]:
    """One call (`_Call`) with its outcome noted in its access record (`_outcome`); however the block ends,
    the initial metadata has gone before the call's status does."""
    call = _Call(context, method, field_id, gateway)
    with call.stack, _outcome(call.access, context):
        try:
            yield call
        finally:
            if not call.sending.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(call.sending)


class EdgeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._auth = auth.for_gateway(gateway)
        # Generate calls waiting for their next event, and those of them the edge's stop cancelled: when the
        # shutdown grace is nearly spent (Gateway.stopped) each ends with `shutting_down()`, as over HTTP,
        # not with the CANCELLED of a server whose grace ran out. A call writing its last event then sees
        # the stop before it reads the next one.
        self._reading: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()
        self._watching = False

    def _watch_the_stop(self) -> None:
        if not self._watching:
            self._watching = True
            self._gateway.stopped().add_done_callback(self._stop_reading)

    def _stop_reading(self, stopped: asyncio.Future[Any]) -> None:
        if stopped.cancelled():  # the gateway closed
            return
        for task in self._reading:
            self._cut.add(task)
            task.cancel()

    async def _next(
        self, stream: AsyncIterator[inference_pb2.GenerateResponse], task: asyncio.Task[Any]
    ) -> inference_pb2.GenerateResponse | None:
        """The stream's next event (None at its end), or `shutting_down()` once the edge's stop came."""
        if self._gateway.stopping.is_set():
            raise shutting_down()
        self._reading.add(task)
        try:
            return await anext(stream, None)
        except asyncio.CancelledError:
            if task in self._cut:
                raise shutting_down() from None
            raise
        finally:
            self._reading.discard(task)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async with _call(context, self._gateway, "Generate", request.request_id) as call:
            access = call.access
            if call.rejected:
                await call.sent()
            request.request_id = access.request_id
            access.model = request.model
            if request.WhichOneof("input") in ("prompt", "prompt_token_ids"):
                access.operation = "text_completion"
            admission = await auth.admit_grpc(self._auth, context, request.model)
            stream = self._gateway.generate(request, _client_timeout(context))
            self._watch_the_stop()
            task = asyncio.current_task()
            assert task is not None
            try:
                while (response := await self._next(stream, task)) is not None:
                    if response.HasField("result"):
                        result = response.result
                        admission.charge(result.usage.total_tokens)
                        access.usage(result.usage.prompt_tokens, result.usage.completion_tokens,
                                     FINISH_REASONS.get(result.finish_reason, ""))  # fmt: skip
                        access.node = result.node_id or access.node
                    elif response.HasField("delta") or response.HasField("tool_call"):
                        access.token()  # the first output of either kind, as over HTTP
                    await call.sent()
                    yield response
            except (FleetError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                raise _internal(request.request_id) from exc
            finally:
                self._cut.discard(task)
                try:
                    await stream.aclose()  # a stream cut before its result charges what it sent (Generation)
                finally:
                    admission.finish()

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        async with _call(context, self._gateway, "Embed") as call:
            await call.sent()
            access = call.access
            access.model = request.model
            admission = await auth.admit_grpc(self._auth, context, request.model)
            try:
                response = await self._gateway.embed(request, _client_timeout(context), access.request_id)
                admission.charge(response.usage.total_tokens)
                access.usage(response.usage.prompt_tokens, 0)
                return response
            except (FleetError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                raise _internal(access.request_id) from exc
            finally:  # on every path: a failed call holds none of the key's requests at once
                admission.finish()

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        async with _call(context, self._gateway, "Tokenize") as call:
            await call.sent()
            access = call.access
            access.model = request.model
            admission = await auth.admit_grpc(self._auth, context, request.model)
            admission.finish()
            try:
                return await self._gateway.tokenize(request, _client_timeout(context), access.request_id)
            except (FleetError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                raise _internal(access.request_id) from exc

    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.DetokenizeResponse:
        async with _call(context, self._gateway, "Detokenize") as call:
            await call.sent()
            access = call.access
            access.model = request.model
            admission = await auth.admit_grpc(self._auth, context, request.model)
            admission.finish()
            try:
                return await self._gateway.detokenize(request, _client_timeout(context), access.request_id)
            except (FleetError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                raise _internal(access.request_id) from exc

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        async with _call(context, self._gateway, "ListModels") as call:  # its id sent, its access line written
            await call.sent()
            models = await self._gateway.list_models()
            if self._auth is not None:
                metadata = context.invocation_metadata() or ()
                value = next((v for k, v in metadata if k == "authorization"), None)
                key = self._auth.authenticate(value.decode() if isinstance(value, bytes) else value, None)
                models = [m for m in models if self._auth.may_use(key, m.name)]
            return inference_pb2.ListModelsResponse(models=models)
