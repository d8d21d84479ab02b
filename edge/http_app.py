"""OpenAI-compatible HTTP API: one small route per endpoint over the Gateway (the two generation routes
as plain ASGI, the rest on FastAPI).

Errors always have OpenAI's shape. Before a stream starts they are real HTTP errors (the first event is
awaited before the response begins, so a bad prompt is a 400, not a broken stream); after it starts an
error is sent as one `data:` event, then `data: [DONE]`. A client that disconnects cancels the work on
the node, streamed or not.

Every request has an id (`RequestIds`, in front of everything else): the client's `X-Request-Id`, or a
fresh `req_...`; every response carries it back, errors included, and it reaches the node (and the engine
server) with the request. Each request is one line of the access log (edge.access_log).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge import access_log, auth, prompt_batch
from edge.gateway import WAIT_NOTES, Gateway, shutting_down
from edge.http_limits import HttpLimits, RequestLimits, RequestRefused
from edge.metrics import client_gone
from edge.openai_protocol import (
    FINISH_REASONS,
    ChatCompletionRequest,
    Choices,
    CompletionRequest,
    CompletionShape,
    EmbeddingRequest,
    embeddings_json,
    models_json,
    new_id,
    sse,
)
from edge.openapi import describe
from edge.responses_protocol import ResponseEvents, ResponseShape, ResponsesRequest
from edge.responses_protocol import renamed as responses_renamed
from edge.tokenize_protocol import DetokenizeBody, TokenizeBody, detokenize_json, renamed, tokenize_json
from fleetlm.inference.v1 import inference_pb2
from mesh import request_context
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import require_model, validate_generate

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        elif part in {
            "str",
            "list[str]",
            "list[ContentPart]",
            "function-after[_one_prompt(), union[str,list[str]]]",
        }:
            continue  # pydantic's union-branch labels mean nothing to a client
        else:
            out += f".{part}"
    return out


def _lone_surrogate(value: Any, loc: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """Where `value` holds a string with a lone UTF-16 surrogate (JSON's escape "\\ud800" with no partner),
    which is no text: UTF-8, and so protobuf and every engine, cannot carry it. None if nowhere."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return loc
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key, loc) if isinstance(key, str) else None
        found = found if found is not None else _lone_surrogate(item, (*loc, key))
        if found is not None:
            return found
    return None


def parse_body(raw: bytes, model: type[M], gateway: Gateway | None = None) -> M:
    """A JSON request body as `model`, or a 400 naming the offending field. With the `gateway`, the request
    is logged and counted under the model its body names from here on, also when the rest of the body is
    refused (as over gRPC): the routes name it nowhere else."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FleetError(ErrorCode.INVALID_REQUEST, f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise FleetError(ErrorCode.INVALID_REQUEST, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise FleetError(ErrorCode.INVALID_REQUEST, "the request body must be a JSON object")
    require_model(data.get("model"))  # first, as over gRPC: a request without a model is MODEL_REQUIRED
    if gateway is not None and isinstance(data["model"], str):
        _name_model(gateway, data["model"])
    try:
        # A surrogate can only come escaped (the body decoded as UTF-8): look only when an escape of one is there.
        if (b"\\ud" in raw or b"\\uD" in raw) and (where := _lone_surrogate(data)) is not None:
            param = _param(where)
            raise FleetError(
                ErrorCode.INVALID_REQUEST,
                f"{repr(param) if param else 'a key'} holds a lone UTF-16 surrogate (an escape such as \\ud800"
                " without its pair), which is not text",
                param=param or None,
            )
        return model.model_validate(data)
    except RecursionError:
        raise FleetError(ErrorCode.INVALID_REQUEST, "the request body is nested too deeply") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(tuple(first["loc"]))
        raise FleetError(ErrorCode.INVALID_REQUEST, f"invalid '{param}': {first['msg']}", param=param) from exc


async def _body(receive: Receive) -> bytes | None:
    """The request's whole body, or None if the client went away first."""
    raw = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        raw += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(raw)


async def until_disconnect(receive: Receive, work: Awaitable[T], stopped: asyncio.Future[Any] | None = None) -> T:
    """Await `work`, cancelling it if the HTTP client goes away first, or once `stopped` is done (the edge's
    shutdown grace is nearly spent; Gateway.stopped, shared by every request, never cancelled here): then
    the work ends with `shutting_down()`, a stream that has started with that error as its last event (see
    _last_word), anything else as a plain 503."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher, *([stopped] if stopped else [])}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # Cancelled from outside (the server's own last resort): the work ends first, so that nothing else
        # closes its node stream while it still reads it.
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    finally:
        watcher.cancel()
    if not task.done() and stopped is not None and stopped.done():
        task.cancel()
        try:
            return await task  # a stream that had started ends itself, with the error as its last event
        except asyncio.CancelledError:
            raise shutting_down() from None
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # its clean-up (closing the node's stream) runs before we answer
        client_gone()  # counted as CANCELLED also when its stream had started (a 200 already sent)
        raise FleetError(ErrorCode.CANCELLED, "client disconnected")
    return task.result()


async def _collect(stream: AsyncIterator[inference_pb2.GenerateResponse], n: int = 1) -> tuple[Choices, Any]:
    """A whole reply's choices (`n` per prompt) and its result. Its first token's time is the access line's
    already: the generation, asked for a whole reply, noted it as it reached the edge (edge.generation)."""
    choices = Choices(n)
    result = None
    async for event in stream:
        if event.HasField("result"):
            result = event.result  # its tool_calls are the reply's, whole (the deltas streamed them)
            continue
        choices.add(event)
    if result is None:
        raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, "the node ended the stream without a result")
    access = access_log.current()
    if access is not None:
        _note_result(access, result)
    return choices, result


def _wait_note(line: str) -> bytes:
    """A line of news while a request waits for its model (edge.gateway.WAIT_NOTES), as an SSE comment:
    clients, OpenAI's SDKs among them, skip comments."""
    return b": fleetlm: " + " ".join(line.split()).encode() + b"\n\n"


async def _first_message(
    stream: AsyncIterator[inference_pb2.GenerateResponse], note: Callable[[str], Awaitable[None]]
) -> inference_pb2.GenerateResponse:
    """A streamed reply's first message. A stream starts with it, so that an error before any output is a
    plain HTTP error. One exception: a request that waits for its model to scale from zero hears how the load
    goes through `note` meanwhile, and its response starts with the first such line."""
    waiting = WAIT_NOTES.set(note)
    try:
        first = await anext(stream, None)
    finally:
        WAIT_NOTES.reset(waiting)
    if first is None:
        raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, "the node ended the stream at once")
    access = access_log.current()
    if access is not None and not first.HasField("result"):  # text or a tool call: the first token
        access.token()
    return first


def _note_result(access: access_log.Access, result: inference_pb2.GenerateResult) -> None:
    access.usage(
        result.usage.prompt_tokens, result.usage.completion_tokens, FINISH_REASONS.get(result.finish_reason, "")
    )
    access.node = result.node_id or access.node


def _stream_error(exc: Exception) -> dict[str, Any]:
    """The error body of a stream that has started (its status stays 200: the error is an event of it). One
    not of ours (a bug, a failure nobody classified) is logged, and the client still gets an error in OpenAI's
    shape and the end of the stream, never a stream that just stops. Called from the `except` block."""
    if isinstance(exc, FleetError):
        access_log.note_error(exc.code)
        return exc.openai_body()
    request_id = request_context.REQUEST_ID.get()
    log.exception("request %s: unhandled error in the stream", request_id)
    access_log.note_error(ErrorCode.INTERNAL)
    return _internal_error(request_id).openai_body()


def _plain_error_body(message: str) -> dict[str, Any]:
    """OpenAI's error shape for an HTTP-level refusal (unknown route, wrong method)."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


def _internal_error(request_id: str = "") -> FleetError:
    about = f" (request {request_id})" if request_id else ""
    return FleetError(ErrorCode.INTERNAL, f"internal error{about}; see the edge's log")


def _json_message(status: int, body: Any, headers: dict[str, str] | None = None) -> tuple[Message, Message]:
    content = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return (
        {"type": "http.response.start", "status": status, "headers": raw_headers},
        {"type": "http.response.body", "body": content, "more_body": False},
    )


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
GENERATION_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}


class GenerationRoutes:
    """ASGI: POST /v1/chat/completions and /v1/completions served directly, every other request passed
    to `app` (FastAPI). These two are the hot path, and FastAPI's routing, middleware and response
    classes cost ~0.5 ms of every request's time to first token (measured on this machine); the errors
    and shapes are the same as the rest of the API's.
    """

    def __init__(self, gateway: Gateway, app: ASGIApp) -> None:
        self._gateway = gateway
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = GENERATION_ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self._app(scope, receive, send)
            return
        if scope["method"] != "POST":
            body = _plain_error_body(f"{scope['path']} takes POST, not {scope['method']}")
            for message in _json_message(405, body, {"Allow": "POST"}):
                await send(message)
            return
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        request_id = request_context.REQUEST_ID.get()
        try:
            if kind == "responses":
                await self._respond(receive, send_started, request_id)
            else:
                await self._generate(receive, send_started, kind == "chat", request_id)
        except FleetError as error:
            access_log.note_error(error.code)
            if not started:
                for message in _json_message(error.http_status, error.openai_body(), error.http_headers()):
                    await send(message)
        except RequestRefused as refusal:  # the body was too large or too slow (edge.http_limits)
            access_log.note_error(refusal.code)
            for message in refusal.messages():
                await send(message)
        except Exception:
            log.exception("request %s: unhandled error on %s", request_id, scope["path"])
            access_log.note_error(ErrorCode.INTERNAL)
            if not started:
                for message in _json_message(500, _internal_error(request_id).openai_body()):
                    await send(message)

    async def _admit(self, model: str, operation: str) -> None:
        """What every generation route does before it generates (its body parsed, its model named: a key's
        429 below is counted under it): the access line's operation, and the API key's admission."""
        access = access_log.current()
        if access is not None:
            access.operation = operation
        await auth.admit_model(model)  # the key's model and limits (edge.auth); no-op with keys off

    async def _respond(self, receive: Receive, send: Send, request_id: str) -> None:
        """OpenAI's Responses API (edge.responses_protocol): a chat underneath, its reply as output items."""
        raw = await _body(receive)
        if raw is None:
            return
        body = parse_body(raw, ResponsesRequest, self._gateway)
        proto = body.to_proto(request_id)
        if not body.stream:
            proto.delivery = inference_pb2.TEXT_DELIVERY_WHOLE
        await self._admit(proto.model, "chat")
        shape = ResponseShape(body, proto.model)
        stream = self._gateway.generate(proto, whole=not body.stream)
        stopped = self._gateway.stopped()
        try:
            if body.stream:
                await until_disconnect(receive, self._stream_response(send, stream, ResponseEvents(shape)), stopped)
            else:
                choices, result = await until_disconnect(receive, _collect(stream), stopped)
                auth.charge(result.usage.total_tokens)
                for message in _json_message(200, shape.full("".join(choices.texts.get(0, ())), result)):
                    await send(message)
        except FleetError as error:  # before any output: a plain HTTP error, naming this API's fields
            raise responses_renamed(error) from None
        finally:
            await stream.aclose()  # cancels the node's work if the client went away

    async def _stream_response(
        self, send: Send, stream: AsyncIterator[inference_pb2.GenerateResponse], events: ResponseEvents
    ) -> None:
        """The Responses API's typed events. As with chat, an error before the first output is a plain HTTP
        error; after it, an `error` event ends the stream."""
        out = _EventStream(send)
        access = access_log.current()
        try:
            first = await _first_message(stream, out.note)
            await out.event(*events.start())
            response: inference_pb2.GenerateResponse | None = first
            while response is not None:
                if response.HasField("delta"):
                    if response.delta.text:
                        await out.event(*events.text(response.delta.text))
                elif response.HasField("tool_call"):
                    await out.event(*events.tool_call(response.tool_call))
                elif response.HasField("result"):
                    if access is not None:
                        _note_result(access, response.result)
                    auth.charge(response.result.usage.total_tokens)
                    await out.event(*events.finish(response.result))
                response = await anext(stream, None)
        except (Exception, asyncio.CancelledError) as exc:
            await out.event(events.error(_stream_error(self._last_word(exc, out.started))))
        await out.end()

    async def _generate(self, receive: Receive, send: Send, chat: bool, request_id: str) -> None:
        raw = await _body(receive)
        if raw is None:
            return
        body: ChatCompletionRequest | CompletionRequest
        if chat:
            body = parse_body(raw, ChatCompletionRequest, self._gateway)
        else:
            body = parse_body(raw, CompletionRequest, self._gateway)
        # The same id reaches the node (GenerateRequest.request_id); several prompts are a request each.
        protos = body.to_protos(request_id) if isinstance(body, CompletionRequest) else [body.to_proto(request_id)]
        proto = protos[0]
        for one in protos:
            if not body.stream:
                # The reply goes out whole: the node need not send the text a token at a time
                # (node_agent.text_delivery).
                one.delivery = inference_pb2.TEXT_DELIVERY_WHOLE
            if len(protos) > 1:
                validate_generate(one)  # every prompt before any starts: a bad one is a plain 400, not a cut stream
        await self._admit(proto.model, "chat" if chat else "text_completion")
        shape = CompletionShape(chat, proto.model, new_id("chatcmpl" if chat else "cmpl"), body.wants_logprobs)
        if len(protos) == 1:
            stream = self._gateway.generate(proto, whole=not body.stream)
        else:
            opens = [
                functools.partial(self._gateway.generate, one, first_choice=i * body.choices, whole=not body.stream)
                for i, one in enumerate(protos)
            ]
            limit = auth.concurrency_limit()  # a key's requests at once bound its prompts at once
            stream = prompt_batch.merged(opens, body.choices, min(prompt_batch.WINDOW, limit or prompt_batch.WINDOW))
        stopped = self._gateway.stopped()
        try:
            if body.stream:
                streamed = self._stream(send, stream, shape, body.include_usage, body.choices, len(protos))
                await until_disconnect(receive, streamed, stopped)
            else:
                choices, result = await until_disconnect(receive, _collect(stream, body.choices), stopped)
                auth.charge(result.usage.total_tokens)
                for message in _json_message(200, shape.full(choices, result)):
                    await send(message)
        finally:
            await stream.aclose()  # cancels the node's work if the client went away

    async def _stream(
        self,
        send: Send,
        stream: AsyncIterator[inference_pb2.GenerateResponse],
        shape: CompletionShape,
        include_usage: bool,
        n: int,
        prompts: int = 1,
    ) -> None:
        """A chat or text completion's SSE stream: `n` choices for each of `prompts` prompts."""
        # The first event comes before the response starts, so that errors before any output are plain
        # HTTP errors; after that an error is one `data:` event, then `data: [DONE]` (but see _first_message).
        out = _EventStream(send)
        event = out.event
        access = access_log.current()
        choices = n * prompts
        try:
            first = await _first_message(stream, out.note)
            if shape.chat:
                for index in range(choices):  # each choice starts with its role, as OpenAI's streams do
                    await event(sse(shape.chunk(None, first=True, index=index)))
            response: inference_pb2.GenerateResponse | None = first
            while response is not None:
                if response.HasField("delta"):
                    delta = response.delta
                    await event(shape.delta_event(delta.text, delta.logprobs, delta.index))
                elif response.HasField("choice_end"):  # n > 1: one choice ends, the others may go on
                    end = response.choice_end
                    reason = FINISH_REASONS.get(end.finish_reason, "stop")
                    await event(sse(shape.chunk(None if shape.chat else "", finish=reason, index=end.index)))
                elif response.HasField("tool_call"):
                    await event(sse(shape.tool_call_chunk(response.tool_call)))
                elif response.HasField("prompt"):  # echo: each of the prompt's choices begins with it
                    await event(*shape.prompt_chunks(response.prompt, n))
                else:
                    reason = FINISH_REASONS.get(response.result.finish_reason, "stop")
                    if access is not None:
                        _note_result(access, response.result)
                    auth.charge(response.result.usage.total_tokens)
                    if choices == 1:  # with n > 1 each choice's ChoiceEnd ended it
                        await event(sse(shape.chunk(None if shape.chat else "", finish=reason)))
                    if include_usage:
                        await event(sse(shape.usage_chunk(response.result.usage)))
                response = await anext(stream, None)
        except (Exception, asyncio.CancelledError) as exc:
            await event(sse(_stream_error(self._last_word(exc, out.started))))
        await out.end(sse("[DONE]"))

    def _last_word(self, exc: Exception | asyncio.CancelledError, started: bool) -> Exception:
        """What a stream that has started says last when `exc` ends it: the error, or 'shutting down' when
        the edge stopping cancelled it (until_disconnect). Raised instead when there is nothing to say: a
        cancellation because its client went away, or any error before the first output (a plain HTTP
        error, a 503 for the shutdown)."""
        if isinstance(exc, asyncio.CancelledError):
            if not self._gateway.stopping.is_set():
                raise exc
            if not started:
                raise shutting_down() from None
            return shutting_down()  # the edge stops: said, not a silent cut
        if not started:
            raise exc
        return exc


class _EventStream:
    """A server-sent-events response whose 200 and headers go out with its first event, so that a failure
    before any output is still a plain HTTP error (`started` says whether that moment has passed)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def event(self, *data: bytes) -> None:
        """One write of `data` (one event, or several that belong together)."""
        if not self.started:
            self.started = True
            await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await self._send({"type": "http.response.body", "body": b"".join(data), "more_body": True})

    async def note(self, line: str) -> None:
        """A wait note (an SSE comment) while the model scales from zero: see _first_message."""
        await self.event(_wait_note(line))

    async def end(self, data: bytes = b"") -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": False})


# What a web page may read of a cross-origin response: the request id and the rate limits (edge.auth).
EXPOSED_HEADERS = [
    "x-request-id",
    "retry-after",
    *(f"x-ratelimit-{what}-{unit}" for what in ("limit", "remaining", "reset") for unit in ("requests", "tokens")),
]


def create_app(gateway: Gateway, limits: HttpLimits | None = None, cors_origins: Sequence[str] = ()) -> ASGIApp:
    """The edge's HTTP API: the generation routes (GenerationRoutes) in front of a FastAPI app, every
    request's body bounded in size and time (edge.http_limits). With `cors_origins`, Starlette's CORS
    middleware in front of everything: a preflight is answered before any key is asked for, and every
    answer to a page of those origins, errors included, carries the headers that let it read it."""
    app = FastAPI(title="fleetlm edge", version="1", docs_url="/docs", redoc_url=None)
    # the generation routes, which FastAPI does not serve, in /openapi.json and /docs (and whether keys are needed)
    describe(app, auth.for_gateway(gateway) is not None)
    started = int(time.time())

    @app.exception_handler(FleetError)
    async def fleet_error(request: Request, error: FleetError) -> JSONResponse:
        access_log.note_error(error.code)
        return JSONResponse(error.openai_body(), status_code=error.http_status, headers=error.http_headers())

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, refusal: RequestRefused) -> JSONResponse:
        access_log.note_error(refusal.code)
        return JSONResponse(refusal.openai_body(), status_code=refusal.status, headers={"Connection": "close"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(_plain_error_body(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_context.REQUEST_ID.get()
        log.exception("request %s: unhandled error on %s", request_id or "-", request.url.path, exc_info=exc)
        access_log.note_error(ErrorCode.INTERNAL)
        return JSONResponse(_internal_error(request_id).openai_body(), status_code=500)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        body = parse_body(await request.body(), EmbeddingRequest, gateway)
        proto = body.to_proto()
        await auth.admit_model(proto.model)
        access = access_log.current()
        request_id = request_context.REQUEST_ID.get()
        response = await until_disconnect(request.receive, gateway.embed(proto, request_id=request_id))
        if access is not None:
            access.usage(response.usage.prompt_tokens, 0)
        auth.charge(response.usage.total_tokens)
        return embeddings_json(response, proto.model, body.encoding_format)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        """vLLM's and SGLang's /tokenize (edge.tokenize_protocol)."""
        proto = parse_body(await request.body(), TokenizeBody, gateway).to_proto()
        await auth.admit_model(proto.model)  # the key's model and request limits; no tokens are charged
        call = gateway.tokenize(proto, request_id=request_context.REQUEST_ID.get())
        try:
            return tokenize_json(await until_disconnect(request.receive, call))
        except FleetError as error:
            raise renamed(error) from None

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Any:
        """vLLM's and SGLang's /detokenize (edge.tokenize_protocol)."""
        proto = parse_body(await request.body(), DetokenizeBody, gateway).to_proto()
        await auth.admit_model(proto.model)  # the key's model and request limits; no tokens are charged
        call = gateway.detokenize(proto, request_id=request_context.REQUEST_ID.get())
        try:
            return detokenize_json(await until_disconnect(request.receive, call))
        except FleetError as error:
            raise renamed(error) from None

    @app.get("/v1/models")
    async def models() -> Any:
        return models_json(await _visible(gateway), started)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        listed = models_json(await _visible(gateway), started)["data"]
        for entry in listed:
            if entry["id"] == model_id:
                return entry
        names = ", ".join(e["id"] for e in listed) or "none"
        raise FleetError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model '{model_id}' does not exist; available models: {names}",
            param="model",
        )

    if gateway.metrics is not None:
        metrics = gateway.metrics

        @app.get("/metrics", include_in_schema=False)
        async def metrics_page() -> Response:
            """Prometheus' page (edge.metrics). Open like /health even when API keys are required: it holds
            counts and latencies by model, no secret, no key and no user."""
            return Response(metrics.page(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/health")
    async def health() -> Any:
        """200 while the edge can route: it has a routing table, fresh or not ("routing_table": "stale" and
        for how long, when the control plane is away), or the control plane answers; else 503
        (BACKEND_UNAVAILABLE). `continued_streams` counts the streams a failed node cut that went on on
        another replica (deployments with continue_on_failure), and the non-streamed replies run again."""
        infos = await gateway.list_models()
        ready = [m.name for m in infos if m.state == inference_pb2.MODEL_STATE_READY]
        return {
            "status": "ok",
            "ready_models": ready,
            **gateway.routing_status(),
            "continued_streams": gateway.continued_streams,
        }

    keys = auth.ApiKeyMiddleware(GenerationRoutes(gateway, app), auth.for_gateway(gateway))
    served: ASGIApp = RequestIds(
        RequestLimits(keys, limits or HttpLimits()), lambda model: model in gateway.feed.models
    )
    if not cors_origins:
        return served
    return CORSMiddleware(
        served,
        allow_origins=list(cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["*"],  # authorization, content-type, and what the SDKs add (x-stainless-*, openai-*)
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format, as generate_latest writes
QUIET_PATHS = frozenset({"/health", "/metrics"})  # polled by probes and scrapers: access lines at DEBUG, no span


class RequestIds:
    """ASGI, in front of everything: the request's id (the client's X-Request-Id, or a fresh one), bound
    while the request is served (log lines carry it), sent back on every response the app and the limits
    in front of it give, errors included; the request's access-log line and span (edge.access_log). An
    id that is not valid is a 400 naming the header, answered with a fresh id of the edge's own."""

    def __init__(self, app: ASGIApp, serves: Callable[[str], bool] | None = None) -> None:
        self._app = app
        self._serves = serves  # whether the fleet serves a model: only such a model names a span (edge.access_log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given: str | None = None
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"traceparent" or name == b"tracestate":
                carrier[name.decode()] = value.decode("latin-1")
        request_id = given if given is not None and request_context.is_valid(given) else request_context.make()
        header = (b"x-request-id", request_id.encode())
        path = scope["path"]
        quiet = path in QUIET_PATHS
        with access_log.request(
            request_id, path, "http", carrier, traced=not quiet, quiet=quiet, serves=self._serves
        ) as access:

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    access.status = message["status"]
                    message = {**message, "headers": [*message.get("headers", ()), header]}
                await send(message)

            if given is not None and given != request_id:
                try:
                    request_context.checked(given, request_context.HTTP_HEADER)
                except FleetError as error:
                    access.error = str(error.code)
                    for message in _json_message(error.http_status, error.openai_body()):
                        await send_with_id(message)
                    return
            await self._app(scope, receive, send_with_id)


def _name_model(gateway: Gateway, model: str) -> None:
    """The request is for `model`: its access line says so, and its metrics count under it (a model the fleet
    serves: edge.gateway.counting)."""
    access = access_log.current()
    if access is not None:
        access.model = model
    gateway.counting(model)


async def _visible(gateway: Gateway) -> list[inference_pb2.ModelInfo]:
    """The models the request's API key may use: a key never learns of the others."""
    infos = await gateway.list_models()
    allowed = set(auth.visible_models([m.name for m in infos]))
    return [m for m in infos if m.name in allowed]
