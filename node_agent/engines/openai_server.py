"""An engine that is an OpenAI-compatible HTTP server: one already running (vLLM, llama.cpp's
llama-server, another SGLang), or one the agent runs as a child (SGLang, a launched server).

Generation streams `/v1/chat/completions` (a conversation: the server applies its own chat template)
or `/v1/completions` (a raw prompt) over SSE and turns the chunks into the engine's events; closing the
iterator closes the HTTP stream, which is how these servers learn to abort the request. Embeddings go
to `/v1/embeddings`. The agent's own limits hold in front of the server: at most `slots` sequences run
upstream (a request for n choices is n), the rest wait here in line, so the load the scheduler sees is
true. `watch` health-checks the server. Each request carries the fleet's request id (`X-Request-Id`)
and, with tracing on, the node's span as W3C `traceparent`, so the server's own logs and traces join the
fleet's. A server that refuses ids that are not UUIDs (llama_cpp.server answers 400 to every such request)
is found at start and gets none.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from mesh import request_context, tracing
from mesh.inference_requests import seed_to_openai
from node_agent.engines.base import (
    Chat,
    ChoiceEnd,
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    EngineInfo,
    EngineLoad,
    EngineUnavailable,
    Finished,
    GenerationEvent,
    InvalidInput,
    Prompt,
    ResponseFormat,
    SamplingOptions,
    Tally,
    TextChunk,
    TokenLogprob,
    TopLogprob,
)
from node_agent.engines.openai_tools import ToolCallDeltas, demanded_calls, message_json, tools_json

log = logging.getLogger(__name__)

# How servers word a prompt that is too long: vLLM "maximum context length", SGLang "longer than the
# model's context length", llama.cpp "exceed context window".
_CONTEXT_WORDS = re.compile(
    r"context (length|window|size)|too long|maximum context|too large to process", re.IGNORECASE
)  # llama-server's embeddings: "input (3001 tokens) is too large to process"
# And a response_format it refuses (vLLM and SGLang name the field, llama.cpp the schema or grammar).
_FORMAT_WORDS = re.compile(r"response_format|json.?schema|grammar", re.IGNORECASE)
# And tools it refuses (vLLM: "auto" tool choice requires --enable-auto-tool-choice ...).
_TOOL_WORDS = re.compile(r"\btools?\b|tool.?choice|tool.?call|function", re.IGNORECASE)
# llama_cpp.server answers a body its own request model refuses with a 500 carrying pydantic's error: that
# is the request's fault, not the server's.
_REFUSED_BODY = re.compile(r"validation error.*'loc': \('body',", re.DOTALL)


def _reported_context(entry: dict[str, Any]) -> int:
    """The context a server's /models entry says a request has: vLLM's and SGLang's `max_model_len`,
    llama-server's `meta.n_ctx` (a slot's); 0 when it says none (llama_cpp.server)."""
    meta = entry.get("meta")
    for value in (entry.get("max_model_len"), meta.get("n_ctx") if isinstance(meta, dict) else None):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


@dataclass(frozen=True)
class OpenAIServerConfig:
    base_url: str  # http://host:port, with or without /v1
    name: str  # the model's name in fleetlm
    context_size: int = 0  # the deployment's; what the server reports wins (`_reported_context`); 0: unknown
    slots: int = 4  # sequences sent upstream at once (a request for n choices is n)
    upstream_model: str = ""  # the model id the server knows; "": the name, if listed, else its first
    api_key: str = ""
    connect_timeout: float = 5.0
    health_interval: float = 5.0  # seconds between health checks
    health_failures: int = 3  # failed checks in a row before the replica is failed


def api_root(url: str) -> str:
    """The /v1 root of an OpenAI-compatible server, from its URL with or without /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def request_body(prompt: Prompt, options: SamplingOptions, model: str) -> tuple[str, dict[str, Any]]:
    """The endpoint and JSON body for one generation, in OpenAI's terms plus the extensions SGLang, vLLM
    and llama.cpp's servers read (top_k, min_p, repetition_penalty / repeat_penalty)."""
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": options.temperature,
        "top_p": options.top_p,
        # Sent even at 1.0: llama.cpp's servers default to 1.1, OpenAI's semantics to none.
        "repetition_penalty": options.repetition_penalty,
        "repeat_penalty": options.repetition_penalty,
    }
    if options.max_tokens is not None:
        body["max_tokens"] = options.max_tokens
    elif not isinstance(prompt, Chat):
        body["max_tokens"] = None  # completions default to 16 tokens; fleetlm's default is the context
    if options.seed is not None:
        body["seed"] = seed_to_openai(options.seed)  # within every server's range, and never its "random"
    if options.n > 1:
        body["n"] = options.n  # the server's choices come back with their index
    if options.stops:
        body["stop"] = list(options.stops)
    if options.presence_penalty:
        body["presence_penalty"] = options.presence_penalty
    if options.frequency_penalty:
        body["frequency_penalty"] = options.frequency_penalty
    if options.top_k > 0:
        body["top_k"] = options.top_k
    if options.min_p > 0:
        body["min_p"] = options.min_p
    if options.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in options.logit_bias}
    if options.response_format is not None:
        # On both endpoints: vLLM, SGLang and llama-server take it on completions too.
        body["response_format"] = response_format_json(options.response_format)
    if not isinstance(prompt, Chat):
        body["prompt"] = prompt if isinstance(prompt, str) else list(prompt.ids)  # ids: OpenAI's own form
        if options.logprobs:
            body["logprobs"] = options.top_logprobs  # the completions API's form: how many alternatives
        return "/completions", body
    body["messages"] = [message_json(m) for m in prompt.messages]
    body.update(tools_json(prompt))
    if prompt.continue_final_message:
        # vLLM's and SGLang's extra parameters for going on with the final assistant message. A server that
        # does not know them (llama_cpp.server, OpenAI itself) ignores them and starts a new turn.
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    if options.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = options.top_logprobs
    return "/chat/completions", body


def response_format_json(response_format: ResponseFormat) -> dict[str, Any]:
    """OpenAI's `response_format`, passed through for the server to enforce (or refuse, with its 400)."""
    if response_format.kind == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": response_format.name, "schema": json.loads(response_format.schema)}
    if response_format.description:
        spec["description"] = response_format.description
    spec["strict"] = response_format.strict
    return {"type": "json_schema", "json_schema": spec}


def _finish_reason(reason: str) -> str:
    if reason in ("tool_calls", "function_call"):
        return "tool_calls"
    return "length" if reason == "length" else "stop"


def request_headers(with_id: bool = True) -> dict[str, str]:
    """The headers that tie an upstream request to the fleet's: the request's id and its trace context."""
    request_id = request_context.REQUEST_ID.get() if with_id else ""
    headers = {request_context.HTTP_HEADER: request_id} if request_id else {}
    return tracing.inject(headers)


def _raw(token: str, raw: Any) -> bytes:
    return bytes(raw) if isinstance(raw, list) else token.encode()


def parse_logprobs(data: Any, offset: int) -> tuple[TokenLogprob, ...]:
    """A chunk's `logprobs` in either of OpenAI's shapes (chat's `content` list, or the completions
    API's parallel lists) as the engine's entries; `offset` is where the chunk's text starts."""
    if not isinstance(data, dict):
        return ()
    out: list[TokenLogprob] = []
    if isinstance(data.get("content"), list):
        for entry in data["content"]:
            token = str(entry.get("token", ""))
            top = tuple(
                TopLogprob(str(t.get("token", "")), _raw(str(t.get("token", "")), t.get("bytes")), float(t["logprob"]))
                for t in entry.get("top_logprobs") or ()
            )
            out.append(TokenLogprob(token, _raw(token, entry.get("bytes")), float(entry["logprob"]), top, offset))
            offset += len(token)
        return tuple(out)
    tops = data.get("top_logprobs") or []
    for i, (token, logprob) in enumerate(zip(data.get("tokens") or [], data.get("token_logprobs") or [], strict=False)):
        alternatives = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        top = tuple(TopLogprob(t, t.encode(), float(p)) for t, p in sorted(alternatives.items(), key=lambda kv: -kv[1]))
        out.append(TokenLogprob(token, token.encode(), float(logprob or 0.0), top, offset))
        offset += len(token)
    return tuple(out)


def _choice_index(choice: dict[str, Any], n: int) -> int:
    """A streamed choice's index, checked: a server that sends one outside 0..n-1 is broken."""
    index = choice.get("index", 0)
    if not isinstance(index, int) or not 0 <= index < n:
        raise EngineUnavailable(f"the engine's server sent a choice with index {index!r} for n={n}")
    return index


def _error_message(reply: httpx.Response) -> str:
    try:
        data = reply.json()
    except ValueError:
        return reply.text[:500] or reply.reason_phrase
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)


# What a server answers for an operation it does not serve: a route it lacks (404, 405) or has turned off
# (llama-server's 501 "This server does not support embeddings"). Asking again cannot help.
_NOT_SERVED = (404, 405, 501)
# Or words to that effect with a 500 (llama_cpp.server without embeddings: "Llama model must be created with
# embedding=True to call this method").
_NOT_SERVED_WORDS = re.compile(r"embedding=True|--embeddings?\b|does not support", re.IGNORECASE)


def upstream_error(status: int, message: str, input_param: str, tools: bool = False) -> EngineError:
    """A server's refusal in the engine's terms: the caller's fault (400s, an input too long whatever the
    status, an operation the server does not serve) or the server's (the rest: retried elsewhere)."""
    message = message.split('\n\n  File "')[0]  # a server's traceback is not for the client
    text = f"the engine's server answered {status}: {message}"
    if status in _NOT_SERVED or (status == 500 and _NOT_SERVED_WORDS.search(message)):
        return InvalidInput(f"this model's server does not serve this request ({text})", input_param)
    refused = status in (400, 413, 422) or (status == 500 and _REFUSED_BODY.search(message))
    if refused or (status == 500 and _CONTEXT_WORDS.search(message)):
        if _CONTEXT_WORDS.search(message):
            if "maximum context length" not in message:
                text = f"the input exceeds this model's maximum context length ({text})"  # OpenAI's words
            return ContextLengthExceeded(text, input_param)
        if _FORMAT_WORDS.search(message):
            return InvalidInput(text, "response_format")  # a schema the server cannot enforce
        if tools and _TOOL_WORDS.search(message):
            return InvalidInput(text, "tools")  # tools, or a tool_choice, the server does not take
        return InvalidInput(text, input_param)
    return EngineUnavailable(text)


# How long an idle connection to the engine's server is kept for the next request (see OpenAIServerEngine).
KEEPALIVE_SECONDS = 2.0


class OpenAIServerEngine:
    def __init__(self, config: OpenAIServerConfig) -> None:
        self.config = config
        self._root = api_root(config.base_url)
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        # No read timeout on streams: the edge's deadline bounds a request, and cancels it here. An idle
        # connection is kept KEEPALIVE_SECONDS, well inside the 5 s after which uvicorn (vLLM, SGLang,
        # llama_cpp.server) and llama-server close one: with httpx's own 5 s, a request sent 5 s after the
        # last (the health check's interval) could go out on a connection the server was closing, and fail.
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(None, connect=config.connect_timeout),
            limits=httpx.Limits(
                max_connections=config.slots + 4,
                max_keepalive_connections=config.slots,
                keepalive_expiry=KEEPALIVE_SECONDS,
            ),
        )
        self._model = config.upstream_model or config.name
        self._context_size = config.context_size
        # Requests waiting for sequences, first come first served: (how many, woken when they are granted).
        self._line: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._sends_ids = True  # whether requests carry X-Request-Id (`_takes_request_ids`)
        self._running = 0
        self._waiting = 0
        self._heard = 0.0  # time.monotonic() when a request last started here or got bytes from the server

    @property
    def load(self) -> EngineLoad:
        return EngineLoad(self._running, self._waiting)

    async def models(self) -> list[dict[str, Any]]:
        """The server's /v1/models entries; raises EngineUnavailable when it does not answer."""
        try:
            reply = await self._client.get(f"{self._root}/models", timeout=self.config.connect_timeout)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the engine's server at {self._root} is unreachable: {exc!r}") from exc
        if reply.status_code != 200:
            raise EngineUnavailable(f"the engine's server at {self._root} answered {reply.status_code} to /models")
        data = reply.json().get("data", [])
        return [m for m in data if isinstance(m, dict)]

    async def start(self) -> EngineInfo:
        listed = await self.models()
        ids = [str(m.get("id")) for m in listed]
        if not self.config.upstream_model and self.config.name not in ids:
            if not ids:
                raise EngineError(f"the engine's server at {self._root} lists no models")
            self._model = ids[0]
        entry = next((m for m in listed if m.get("id") == self._model), None)
        if entry is None:
            raise EngineError(f"the engine's server at {self._root} has no model '{self._model}' (it lists {ids})")
        reported = _reported_context(entry)
        if reported:
            if self._context_size and self._context_size != reported:
                log.info(
                    "engine server %s serves %s with a context of %d tokens (the deployment says %d): %d is used",
                    self._root, self.config.name, reported, self._context_size, reported,
                )  # fmt: skip
            self._context_size = reported
        self._sends_ids = await self._takes_request_ids()
        log.info("engine server %s serves %s as %s", self._root, self.config.name, self._model)
        return EngineInfo(context_size=self._context_size)

    async def _takes_request_ids(self) -> bool:
        """Whether the server takes fleetlm's ids as X-Request-Id. llama_cpp.server (its starlette-context
        request-id plugin) answers 400 to any request whose id is not a UUID: sending ids to it would fail
        every request, so it gets none, said once here."""
        headers = {request_context.HTTP_HEADER: request_context.make()}
        try:
            reply = await self._client.get(f"{self._root}/models", headers=headers, timeout=self.config.connect_timeout)
        except httpx.HTTPError:
            return True  # it answered a moment ago; a failure now is no verdict on the header
        if reply.status_code == 400:
            log.warning("engine server %s refuses X-Request-Id values that are not UUIDs (400): fleetlm's request"
                        " ids are not sent to it (trace context still is)", self._root)  # fmt: skip
            return False
        return True

    async def close(self) -> None:
        await self._client.aclose()

    async def watch(self) -> str:
        failures = 0
        loop = asyncio.get_running_loop()
        check_at = loop.time()
        while True:
            # A check every interval from the last one's start, not after it: a check that times out (a
            # frozen server: connect_timeout) does not stretch the three checks to twice as long.
            check_at += self.config.health_interval
            await asyncio.sleep(max(0.0, check_at - loop.time()))
            check_at = max(check_at, loop.time() - self.config.health_interval)
            if (
                self._running
                and time.monotonic() - self._heard < self.config.health_interval * self.config.health_failures
            ):
                # A request is running and the server has answered it lately: that is the check. And a check
                # sent now could cut it: llama_cpp.server (interrupt_requests, on by default) ends a stream
                # with [DONE] and no finish reason when any other request, /v1/models too, comes in.
                failures = 0
                continue
            try:
                await self.models()
                failures = 0
            except EngineUnavailable as exc:
                failures += 1
                if failures >= self.config.health_failures:
                    return f"{exc} ({failures} health checks in a row failed)"

    async def tokenize(self, prompt: Prompt) -> list[int]:
        raise InvalidInput(
            f"model '{self.config.name}' runs on an OpenAI-compatible server, which fleetlm cannot tokenize for",
            "model",
        )

    async def detokenize(self, tokens: Sequence[int]) -> str:
        raise InvalidInput(
            f"model '{self.config.name}' runs on an OpenAI-compatible server, which fleetlm cannot detokenize for",
            "model",
        )

    @contextlib.asynccontextmanager
    async def _slot(self, sequences: int = 1) -> AsyncIterator[None]:
        """Run with `sequences` of the `slots` sequences the server is sent at once (a request for n choices
        is n). Requests wait in line, first come first served, so that one for several sequences is not
        passed over by single ones for ever."""
        entry = (sequences, asyncio.get_running_loop().create_future())
        self._line.append(entry)
        self._waiting += sequences
        try:
            self._grant()
            await entry[1]
        except BaseException:
            if entry in self._line:
                self._line.remove(entry)  # left while waiting
            elif not entry[1].cancelled():
                self._running -= sequences  # granted, and cancelled before it could start
            self._grant()
            raise
        finally:
            self._waiting -= sequences
        self._heard = time.monotonic()
        try:
            yield
        finally:
            self._running -= sequences
            self._grant()

    def _grant(self) -> None:
        """Start the requests at the head of the line that fit in the sequences left."""
        while self._line and self._running + self._line[0][0] <= self.config.slots:
            sequences, granted = self._line.popleft()
            if not granted.done():
                self._running += sequences
                granted.set_result(None)

    def generate(
        self, prompt: Prompt, options: SamplingOptions, tally: Tally | None = None
    ) -> AsyncIterator[GenerationEvent]:
        events = self._generate(prompt, options, tally or Tally())
        if isinstance(prompt, Chat) and prompt.tools and prompt.tool_choice.mode in ("required", "function"):
            return demanded_calls(events)  # a server that ignores tool_choice is found out, not passed on
        return events

    async def _generate(self, prompt: Prompt, options: SamplingOptions, tally: Tally) -> AsyncIterator[GenerationEvent]:
        """The server's stream as the engine's events. With n > 1 its choices are told apart by their
        `index` (each with its own text offsets for logprobs), and each choice's finish_reason is a ChoiceEnd
        as it comes; the request's Finished carries the first choice's reason, the server's usage and the
        reply's tool calls (n = 1: the edge refuses tools with several choices)."""
        if options.echo:
            # Its stream would carry the prompt inside the first choice's text, in each server's own way.
            raise InvalidInput("echo is not supported by this model's engine (an OpenAI-compatible server)", "echo")
        if options.n > self.config.slots:  # it would wait in line for ever, and hold up those behind it
            raise InvalidInput(f"n is {options.n}; this engine runs at most {self.config.slots} sequences at once", "n")
        path, body = request_body(prompt, options, self._model)
        input_param = "messages" if isinstance(prompt, Chat) else "prompt"
        with_tools = "tools" in body
        chunks, usage = 0, None
        offsets: dict[int, int] = {}  # per choice: characters received so far
        finishes: dict[int, str] = {}
        calls = ToolCallDeltas(single=isinstance(prompt, Chat) and not prompt.parallel_tool_calls)
        async with self._slot(options.n):
            try:
                async with self._client.stream(
                    "POST", f"{self._root}{path}", json=body, headers=request_headers(self._sends_ids)
                ) as reply:
                    if reply.status_code != 200:
                        await reply.aread()
                        raise upstream_error(reply.status_code, _error_message(reply), input_param, with_tools)
                    async for line in reply.aiter_lines():
                        self._heard = time.monotonic()
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        event = json.loads(data)
                        if "error" in event:
                            raise EngineUnavailable(f"the engine's server failed mid-stream: {event['error']}")
                        usage = event.get("usage") or usage
                        if usage:
                            tally.prompt_tokens = int(usage.get("prompt_tokens", 0))
                        for choice in event.get("choices") or ():
                            index = _choice_index(choice, options.n)
                            text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                            offset = offsets.get(index, 0)
                            logprobs = parse_logprobs(choice.get("logprobs"), offset) if options.logprobs else ()
                            if text or logprobs:
                                chunks += 1
                                tally.completion_tokens = chunks  # about a token a chunk (its usage comes last)
                                offsets[index] = offset + len(text)
                                yield TextChunk(text, logprobs, index)
                            for call in calls.feed((choice.get("delta") or {}).get("tool_calls")):
                                chunks += 1 if call.arguments else 0
                                tally.completion_tokens = chunks
                                yield call
                            if calls.over:  # a second call though parallel_tool_calls is false: the first ends it
                                finishes[index] = "tool_calls"
                                break
                            if choice.get("finish_reason") and index not in finishes:
                                finishes[index] = _finish_reason(choice["finish_reason"])
                                if options.n > 1:
                                    yield ChoiceEnd(index, finishes[index])  # type: ignore[arg-type]
                        if calls.over:
                            break  # leaving the stream ends the request: the server stops generating
            except httpx.HTTPError as exc:
                raise EngineUnavailable(f"the engine's server at {self._root} failed: {exc!r}") from exc
            except ValueError as exc:
                raise EngineUnavailable(f"the engine's server sent a chunk that is not JSON: {exc}") from exc
        if not finishes:
            # llama_cpp.server, for one, ends a stream this way when the request fails after its 200.
            raise EngineUnavailable("the engine's server ended the stream without a finish reason (see its log)")
        if len(finishes) < options.n:
            # llama_cpp.server drops `n` from the request and answers with one choice.
            raise InvalidInput(
                f"n is {options.n}, and the engine's server returned {len(finishes)} choice(s): it does not support n",
                "n",
            )
        # Servers that do not report usage in streams (llama_cpp.server): one chunk is about one token.
        prompt_tokens = int(usage.get("prompt_tokens", 0)) if usage else 0
        completion_tokens = int(usage.get("completion_tokens", chunks)) if usage else chunks
        finish = finishes[0]
        if finish == "stop" and calls.calls:
            finish = "tool_calls"  # a server that says "stop" after calls (llama_cpp.server's named choice)
        yield Finished(finish, prompt_tokens, completion_tokens, calls.calls)  # type: ignore[arg-type]

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        async with self._slot():
            try:
                reply = await self._client.post(
                    f"{self._root}/embeddings",
                    json={"model": self._model, "input": list(texts)},
                    headers=request_headers(self._sends_ids),
                )
            except httpx.HTTPError as exc:
                raise EngineUnavailable(f"the engine's server at {self._root} failed: {exc!r}") from exc
        if reply.status_code != 200:
            raise upstream_error(reply.status_code, _error_message(reply), "input")
        data = reply.json()
        rows = sorted(data.get("data", []), key=lambda row: row.get("index", 0))
        if len(rows) != len(texts) or any(
            not row["embedding"] or isinstance(row["embedding"][0], list) for row in rows
        ):
            # llama_cpp.server, for one, returns one vector per token for a model without pooling.
            raise InvalidInput(
                f"model '{self.config.name}' does not give one embedding per input (its server returned token"
                " embeddings); it cannot serve embeddings",
                "model",
            )
        vectors = [[float(x) for x in row["embedding"]] for row in rows]
        return Embeddings(vectors=vectors, prompt_tokens=int((data.get("usage") or {}).get("prompt_tokens", 0)))
