"""OpenAI-compatible HTTP API: one small route per endpoint over the Gateway.

Errors always have OpenAI's shape. Before a stream starts they are real HTTP errors (the first event is
awaited before the response begins, so a bad prompt is a 400, not a broken stream); after it starts an
error is sent as one `data:` event, then `data: [DONE]`. A client that disconnects cancels the work on
the node, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from edge.gateway import Gateway
from edge.openai_protocol import (
    FINISH_REASONS,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionShape,
    EmbeddingRequest,
    embeddings_json,
    models_json,
    new_id,
)
from fleetlm.inference.v1 import inference_pb2
from mesh.errors import ErrorCode, FleetError

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


async def parse(request: Request, model: type[M]) -> M:
    """The JSON body as `model`, or a 400 naming the offending field."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FleetError(ErrorCode.INVALID_REQUEST, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FleetError(ErrorCode.INVALID_REQUEST, "the request body must be a JSON object")
    if data.get("model") is None or data.get("model") == "":
        raise FleetError(ErrorCode.MODEL_REQUIRED, "the 'model' field is required", param="model")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(tuple(first["loc"]))
        raise FleetError(ErrorCode.INVALID_REQUEST, f"invalid '{param}': {first['msg']}", param=param) from exc


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the HTTP client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise FleetError(ErrorCode.CANCELLED, "client disconnected")
    return task.result()


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _collect(
    stream: AsyncIterator[inference_pb2.GenerateResponse],
) -> tuple[str, list[inference_pb2.TokenLogprob], Any]:
    parts: list[str] = []
    logprobs: list[inference_pb2.TokenLogprob] = []
    result = None
    async for event in stream:
        if event.HasField("delta"):
            parts.append(event.delta.text)
            logprobs.extend(event.delta.logprobs)
        else:
            result = event.result
    if result is None:
        raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, "the node ended the stream without a result")
    return "".join(parts), logprobs, result


async def _completion(
    request: Request,
    gateway: Gateway,
    body: ChatCompletionRequest | CompletionRequest,
    chat: bool,
) -> Any:
    request_id = new_id("chatcmpl" if chat else "cmpl")
    proto = body.to_proto(request_id)
    shape = CompletionShape(chat, proto.model, request_id, body.wants_logprobs)
    stream = gateway.generate(proto)
    if not body.stream:
        text, logprobs, result = await until_disconnect(request, _collect(stream))
        return JSONResponse(shape.full(text, result, logprobs))
    # Await the first event before answering, so that errors before any output are plain HTTP errors.
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise FleetError(ErrorCode.BACKEND_UNAVAILABLE, "the node ended the stream at once") from None

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield _sse(shape.chunk(None, first=True))
            event: inference_pb2.GenerateResponse | None = first
            while event is not None:
                if event.HasField("delta"):
                    yield _sse(shape.chunk(event.delta.text, logprobs=event.delta.logprobs))
                else:
                    reason = FINISH_REASONS.get(event.result.finish_reason, "stop")
                    yield _sse(shape.chunk(None if chat else "", finish=reason))
                    if body.include_usage:
                        yield _sse(shape.usage_chunk(event.result.usage))
                event = await anext(stream, None)
        except FleetError as error:
            yield _sse(error.openai_body())
        finally:
            await stream.aclose()  # cancels the node's work if the client went away
        yield _sse("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="fleetlm edge", version="1", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.exception_handler(FleetError)
    async def fleet_error(request: Request, error: FleetError) -> JSONResponse:
        return JSONResponse(error.openai_body(), status_code=error.http_status, headers=error.http_headers())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        body = {
            "error": {
                "message": str(exc.detail),
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        error = FleetError(ErrorCode.INTERNAL, "internal error; see the edge's log")
        return JSONResponse(error.openai_body(), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _completion(request, gateway, await parse(request, ChatCompletionRequest), True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _completion(request, gateway, await parse(request, CompletionRequest), False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        body = await parse(request, EmbeddingRequest)
        proto = body.to_proto()
        response = await until_disconnect(request, gateway.embed(proto))
        return embeddings_json(response, proto.model, body.encoding_format)

    @app.get("/v1/models")
    async def models() -> Any:
        return models_json(await gateway.list_models(), started)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        listed = models_json(await gateway.list_models(), started)["data"]
        for entry in listed:
            if entry["id"] == model_id:
                return entry
        names = ", ".join(e["id"] for e in listed) or "none"
        raise FleetError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model '{model_id}' does not exist; available models: {names}",
            param="model",
        )

    @app.get("/health")
    async def health() -> Any:
        """200 when the control plane answers; 503 (BACKEND_UNAVAILABLE) when it does not."""
        infos = await gateway.list_models()
        ready = [m.name for m in infos if m.state == inference_pb2.MODEL_STATE_READY]
        return {"status": "ok", "ready_models": ready}

    return app
