"""The node's InferenceService: converts protos to engine calls and engine failures to FleetErrors.
Admission and limits are the host's (`ModelHost.serving`); every request is logged once, with its id,
model, replica, outcome and tokens, and traced when tracing is on (node_agent.request_log)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator

import grpc

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import validate_detokenize, validate_embed, validate_generate, validate_tokenize
from node_agent.engines.base import (
    Chat,
    ChoiceEnd,
    ContextLengthExceeded,
    Engine,
    EngineError,
    Finished,
    Function,
    InvalidInput,
    Message,
    Prompt,
    PromptEcho,
    ResponseFormat,
    SamplingOptions,
    Tally,
    TextChunk,
    TokenLogprob,
    TokenPrompt,
    ToolCall,
    ToolCallChunk,
    ToolChoice,
    check_context,
    may_exceed,
)
from node_agent.host import HostedModel, ModelHost
from node_agent.request_log import Served, served
from node_agent.text_delivery import delivered

log = logging.getLogger(__name__)

_FINISH = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "tool_calls": inference_pb2.FINISH_REASON_TOOL_CALLS,
}
_TOOL_CHOICES = {
    inference_pb2.TOOL_CHOICE_MODE_NONE: "none",
    inference_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    inference_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def sampling_options(params: inference_pb2.SamplingParams, echo: bool = False) -> SamplingOptions:
    """Proto -> engine options; unset fields take OpenAI's defaults. `echo`: GenerateRequest.echo."""

    def opt(name: str, default: float) -> float:
        return getattr(params, name) if params.HasField(name) else default  # type: ignore[arg-type]

    return SamplingOptions(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0),
        top_k=params.top_k if params.HasField("top_k") else 0,
        min_p=opt("min_p", 0.0),
        seed=params.seed if params.HasField("seed") else None,
        stops=tuple(params.stops),
        presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0),
        repetition_penalty=opt("repetition_penalty", 1.0),
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
        response_format=response_format(params),
        n=params.n if params.HasField("n") else 1,
        logit_bias=tuple(sorted(params.logit_bias.items())),
        echo=echo,
    )


def response_format(params: inference_pb2.SamplingParams) -> ResponseFormat | None:
    """The proto's response_format for the engine; None for free text (unset, or `text`)."""
    which = params.response_format.WhichOneof("format") if params.HasField("response_format") else None
    if which == "json_object":
        return ResponseFormat("json_object")
    if which == "json_schema":
        spec = params.response_format.json_schema
        return ResponseFormat("json_schema", spec.schema, spec.name, spec.description, spec.strict)
    return None


def _token_logprob(entry: TokenLogprob) -> inference_pb2.TokenLogprob:
    return inference_pb2.TokenLogprob(
        token=entry.token,
        token_bytes=entry.token_bytes,
        logprob=entry.logprob,
        top_logprobs=[
            inference_pb2.TopLogprob(token=t.token, token_bytes=t.token_bytes, logprob=t.logprob) for t in entry.top
        ],
        text_offset=entry.text_offset,
    )


def text_delta(chunk: TextChunk) -> inference_pb2.GenerateResponse:
    delta = inference_pb2.TextDelta(text=chunk.text, index=chunk.index)
    delta.logprobs.extend(_token_logprob(entry) for entry in chunk.logprobs)
    return inference_pb2.GenerateResponse(delta=delta)


# A PromptEcho event's logprobs stop growing past this size (a token with 20 alternatives is about 400
# bytes): a long prompt's come in several events, each far below the 4 MiB a gRPC client takes by default.
MAX_ECHO_BYTES = 1024 * 1024


def prompt_echo(echo: PromptEcho, prompt: str) -> Iterator[inference_pb2.GenerateResponse]:
    """The PromptEcho events of an echoed prompt: the text in the first, its logprobs in as many as they
    need (see MAX_ECHO_BYTES)."""
    event = inference_pb2.PromptEcho(text=prompt)
    size = 0
    for entry in echo.logprobs:
        message = _token_logprob(entry)
        grows = message.ByteSize() + 6  # with its tag and length in the repeated field
        if size and size + grows > MAX_ECHO_BYTES:
            yield inference_pb2.GenerateResponse(prompt=event)
            event, size = inference_pb2.PromptEcho(), 0
        event.logprobs.append(message)
        size += grows
    yield inference_pb2.GenerateResponse(prompt=event)


def tool_call_delta(chunk: ToolCallChunk) -> inference_pb2.GenerateResponse:
    delta = inference_pb2.ToolCallDelta(index=chunk.index, id=chunk.id, name=chunk.name, arguments=chunk.arguments)
    return inference_pb2.GenerateResponse(tool_call=delta)


def _tool_call(call: ToolCall) -> inference_pb2.ToolCall:
    return inference_pb2.ToolCall(
        id=call.id, function=inference_pb2.FunctionCall(name=call.name, arguments=call.arguments)
    )


def _message(m: inference_pb2.ChatMessage) -> Message:
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls)
    return Message(m.role, m.content, calls, m.tool_call_id)


def _tool_choice(chat: inference_pb2.ChatConversation) -> ToolChoice:
    """The proto's tool_choice (validated): unset or unspecified is auto with tools, none without."""
    choice = chat.tool_choice
    which = choice.WhichOneof("choice") if chat.HasField("tool_choice") else None
    if which == "function_name":
        return ToolChoice("function", choice.function_name)
    mode = _TOOL_CHOICES.get(choice.mode) if which == "mode" else None
    return ToolChoice(mode or ("auto" if chat.tools else "none"))  # type: ignore[arg-type]


def _chat(chat: inference_pb2.ChatConversation, add_generation_prompt: bool = True) -> Chat:
    tools = tuple(
        Function(t.function.name, t.function.description, t.function.parameters, t.function.strict) for t in chat.tools
    )
    parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True
    messages = tuple(_message(m) for m in chat.messages)
    return Chat(
        messages,
        chat.continue_final_message,
        add_generation_prompt,
        tools=tools,
        tool_choice=_tool_choice(chat),
        parallel_tool_calls=parallel,
    )


def _finished(event: Finished, model: str, node_id: str) -> inference_pb2.GenerateResponse:
    usage = inference_pb2.Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
    )
    reason = _FINISH[event.reason]
    tool_calls = [_tool_call(c) for c in event.tool_calls]
    result = inference_pb2.GenerateResult(
        finish_reason=reason, usage=usage, model=model, node_id=node_id, tool_calls=tool_calls
    )
    return inference_pb2.GenerateResponse(result=result)


def _prompt(request: inference_pb2.GenerateRequest) -> Prompt:
    which = request.WhichOneof("input")
    if which == "prompt_token_ids":
        return TokenPrompt(tuple(request.prompt_token_ids.ids))
    return request.prompt if which == "prompt" else _chat(request.chat)


def _engine_error(exc: EngineError, input_param: str = "messages") -> FleetError:
    """An engine's failure in the shared vocabulary; `input_param` names the request's input field."""
    if isinstance(exc, ContextLengthExceeded):
        param = input_param if exc.param == "messages" else exc.param
        return FleetError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc), param=param)
    if isinstance(exc, InvalidInput):
        param = input_param if exc.param == "messages" else exc.param
        return FleetError(ErrorCode.INVALID_REQUEST, str(exc), param=param)
    # Anything else is the engine's failure, not the request's.
    return FleetError(ErrorCode.BACKEND_UNAVAILABLE, str(exc), retry_after_seconds=1)


class NodeInference(inference_pb2_grpc.InferenceServiceServicer):
    """`counted` is given every request's record as it ends (node_agent.metrics: NodeMetrics.served)."""

    def __init__(self, host: ModelHost, node_id: str, counted: Callable[[Served], None] | None = None) -> None:
        self._host = host
        self._node_id = node_id
        self._counted = counted

    def _served(
        self, method: str, model: str, operation: str, context: grpc.aio.ServicerContext, field_id: str = ""
    ) -> contextlib.AbstractContextManager[Served]:
        metadata = context.invocation_metadata()
        return served(method, model, operation, metadata, self._node_id, field_id, self._counted)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        operation = "chat" if request.WhichOneof("input") == "chat" else "text_completion"
        with self._served("Generate", request.model, operation, context, request.request_id) as record:
            validate_generate(request)
            # Closed here however the call ends, so that a cancelled request's tokens are in its record
            # before it is logged and counted.
            async with contextlib.aclosing(delivered(self._generate(request, record), request.delivery)) as stream:
                async for response in stream:
                    yield response

    async def _generate(
        self, request: inference_pb2.GenerateRequest, record: Served
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        input_param = "messages" if request.WhichOneof("input") == "chat" else "prompt"
        prompt = _prompt(request)
        options = sampling_options(request.sampling, request.echo)
        tally: Tally | None = Tally()  # the engine keeps it current: a request cut short counts what it spent
        async with self._admitted(request.model, prompt, options, input_param) as (hosted, engine):
            record.replica(hosted.spec.engine, hosted.device)
            try:
                async for event in engine.generate(prompt, options, tally):
                    if isinstance(event, TextChunk):
                        yield text_delta(event)
                    elif isinstance(event, ToolCallChunk):
                        yield tool_call_delta(event)
                    elif isinstance(event, PromptEcho):
                        text = request.prompt
                        if isinstance(prompt, TokenPrompt):  # the ids' text, as Detokenize writes it
                            text = await engine.detokenize(prompt.ids)
                        for response in prompt_echo(event, text):
                            yield response
                    elif isinstance(event, ChoiceEnd):
                        end = inference_pb2.ChoiceEnd(index=event.index, finish_reason=_FINISH[event.reason])
                        yield inference_pb2.GenerateResponse(choice_end=end)
                    else:
                        record.usage(event.prompt_tokens, event.completion_tokens)
                        tally = None  # its Finished counted it
                        yield _finished(event, request.model, self._node_id)
            except EngineError as exc:
                raise _engine_error(exc, input_param) from exc
            finally:
                if tally is not None:  # ended before its Finished: cancelled, or failed
                    record.usage(tally.prompt_tokens, tally.completion_tokens)

    @contextlib.asynccontextmanager
    async def _admitted(
        self, model: str, prompt: Prompt, options: SamplingOptions, input_param: str
    ) -> AsyncIterator[tuple[HostedModel, Engine]]:
        """The host's admission of a generation (`ModelHost.serving`). A replica that is full refuses with a
        retryable error; a prompt that could never fit its context must not hear "try again" (an OpenAI SDK
        retries a 429 by itself, and an app that trims its conversation on context_length_exceeded never
        would): it is counted then, only when its size may exceed the context (`may_exceed`), and refused as
        what it is. A free replica's engine checks it as it starts, as before."""
        never_fits = functools.partial(self._never_fits, model, prompt, options, input_param)
        async with self._host.serving(model, options.n, before_refusal=never_fits) as admitted:
            yield admitted

    async def _never_fits(self, model: str, prompt: Prompt, options: SamplingOptions, input_param: str) -> None:
        """Raise CONTEXT_LENGTH_EXCEEDED when `prompt` (with max_tokens) cannot fit the replica's context."""
        hosted, engine = self._host.engine_for(model)
        context = hosted.context_size
        if not context or not may_exceed(prompt, context, options.max_tokens):
            return
        try:
            tokens = await engine.tokenize(prompt)
            check_context(len(tokens), context, options.max_tokens)
        except ContextLengthExceeded as exc:
            raise _engine_error(exc, input_param) from exc
        except EngineError:
            return  # an engine that cannot count (an OpenAI-compatible server's): the server will say

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        with self._served("Embed", request.model, "embeddings", context) as record:
            validate_embed(request)
            async with self._host.serving(request.model) as (hosted, engine):
                record.replica(hosted.spec.engine, hosted.device)
                try:
                    result = await engine.embed(list(request.inputs))
                except EngineError as exc:
                    raise _engine_error(exc, "input") from exc
            record.usage(result.prompt_tokens, 0)
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=v) for v in result.vectors],
            usage=inference_pb2.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
            model=request.model,
        )

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        with self._served("Tokenize", request.model, "tokenize", context) as record:
            validate_tokenize(request)
            hosted, engine = self._host.engine_for(request.model)
            record.replica(hosted.spec.engine, hosted.device)
            chat = request.WhichOneof("input") == "chat"
            with_prompt = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
            prompt = _chat(request.chat, with_prompt) if chat else request.text
            try:
                ids = await engine.tokenize(prompt)
            except EngineError as exc:
                raise _engine_error(exc, "chat" if chat else "text") from exc
        return inference_pb2.TokenizeResponse(token_ids=ids, context_size=hosted.context_size)

    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.DetokenizeResponse:
        with self._served("Detokenize", request.model, "detokenize", context) as record:
            validate_detokenize(request)
            hosted, engine = self._host.engine_for(request.model)
            record.replica(hosted.spec.engine, hosted.device)
            try:
                text = await engine.detokenize(list(request.token_ids))
            except EngineError as exc:
                raise _engine_error(exc, "token_ids") from exc
        return inference_pb2.DetokenizeResponse(text=text)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=self._host.model_infos())
