"""llama.cpp engine (llama-cpp-python) for GGUF models, on CPU or GPU.

Generation is continuously batched (`llamacpp_batch.DecodeLoop`): one context with `slots` sequences,
driven by its own thread, so the event loop never blocks on llama.cpp. Requests beyond the slots wait
in the loop's queue; its length is the load the scheduler sees. A cancelled request leaves the batch
at the next step. Embeddings run on a second, embedding-mode context on their own thread.

A request's output can be constrained by a grammar: a response_format's (json_grammar), or its tools'
(tool_calls: the tools in the prompt, the model's template's own format or the generic one, and the
grammar of the calls, lazy under tool_choice "auto"; with a response_format beside the tools, "auto" allows
calls or content in its schema from the first token); a reply with tools is parsed into content and calls
as it streams (tool_call_stream).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    PermanentEngineError,
    Prompt,
    PromptEcho,
    SamplingOptions,
    Tally,
    TextChunk,
    TokenLogprob,
    TokenPrompt,
    check_context,
)
from node_agent.engines.embedding_batch import EmbeddingBatcher
from node_agent.engines.json_grammar import content_schema, grammar_for
from node_agent.engines.llamacpp_batch import BatchRequest, BatchStats, DecodeLoop, lower_thread_priority
from node_agent.engines.tool_call_stream import CLOSE, OPEN, ToolCallStream
from node_agent.engines.tool_calls import renders_tools, template_input, tool_grammar

log = logging.getLogger(__name__)

# llama-cpp-python silences a model's loading by pointing the process's stdout and stderr (fds 1 and 2)
# at /dev/null and back. Two loads at once on two threads can restore each other's /dev/null, and then
# everything the agent logs is lost for good: one load at a time in the whole process.
_LOADING = threading.Lock()
# Load progress is reported in steps of this fraction (llama.cpp calls back once per tensor, hundreds of
# times): each step is one report to the control plane.
PROGRESS_STEP = 0.05
# A prompt of at most this many characters (or token ids) is tokenized (or checked) on the event loop, a
# longer one on a thread. Tokenizing costs about 0.4 µs a character here (0.4 ms for 1,024), and a
# thread's round trip about 0.5 ms of the request's first token (two threads woken on these cores): timed
# across the node's threads, tokenizing went from 0.46 ms on a thread to 0.21 inline (README, issue 11).
INLINE_TOKENIZE_CHARS = 1024
INLINE_TOKEN_IDS = 4096
# Stands in for the final message's text when a conversation is rendered to be continued (_render_chat).
_FINAL_MARK = "\ue000fleetlm-final-message\ue000"


@dataclass(frozen=True)
class LlamaCppConfig:
    path: str
    context_size: int = 2048  # per request
    threads: int = 2
    gpu_layers: int = 0  # -1 offloads every layer when the node has a GPU
    slots: int = 4  # sequences decoded together (continuous batching)
    batch_size: int = 512  # most tokens per decode step
    unified_kv: bool = False  # see _new_batch_context
    # Nice value of the compute threads (decode and embeddings). On a node whose cores llama.cpp keeps
    # busy, every token must still cross the node's gRPC, the edge and the client; at equal priority
    # those short wake-ups wait for a time slice and stall llama.cpp's threads at their barriers. Measured
    # here (2 cores, 8 streams through the edge): 6.2 s at nice 0, 4.8 s at nice 10, as fast as
    # calling the node directly; time to first token through the edge fell by 2-3 ms.
    nice: int = 0
    # The compute threads in Linux's SCHED_IDLE class instead (llamacpp_batch.lower_thread_priority): they
    # run only when no other thread wants the core. The node's default.
    idle_priority: bool = False
    embed_window_seconds: float = 0.005  # how long concurrent embedding inputs are gathered
    embed_max_batch: int = 64  # inputs per embedding call
    embed_cache_size: int = 4096  # inputs remembered (LRU)
    # Per request; more is a 400. OpenAI's own limit: clients send that many at once (LangChain's
    # OpenAIEmbeddings, 1,000 a request by default). The work is bounded by the edge's 1,000,000 characters
    # of input a request (mesh.inference_requests), not by the count.
    embed_max_inputs: int = 2048
    embed_max_chars: int = 32_768  # per input; longer is a 400


@contextlib.contextmanager
def _progress_reported(report: Callable[[float], None]) -> Iterator[None]:
    """llama-cpp-python's Llama takes no progress callback: it loads with the params that
    llama_model_default_params() returns, so that function gives params carrying `report` for the length
    of one load. Only under _LOADING: no other load in the process can see it."""
    import llama_cpp.llama_cpp as low  # the module Llama calls it through

    original = low.llama_model_default_params

    def reported(progress: float, _: Any) -> bool:
        report(progress)
        return True  # go on loading

    callback = low.llama_progress_callback(reported)

    def with_progress() -> Any:
        params = original()
        params.progress_callback = callback
        return params

    low.llama_model_default_params = with_progress
    try:
        yield
    finally:
        low.llama_model_default_params = original


class LlamaCppEngine:
    def __init__(self, config: LlamaCppConfig) -> None:
        self.config = config
        # Fraction of the weights read while start() runs (None before), and who is told when it moves.
        self.load_progress: float | None = None
        self.on_load_progress: Callable[[], None] | None = None
        self._llm: Any = None
        self._ctx: Any = None
        self._loop: DecodeLoop | None = None
        self._embedder: Any = None
        self._template: Any = None
        self._continuing: Any = None  # the template without the generation prompt (continue_final_message)
        self._native_tools = False  # the template has Hermes' tool format (node_agent.engines.tool_calls)
        self._developer_role = False  # the template has a "developer" role of its own
        self._tool_tokens: tuple[int, ...] = ()  # the tool-call tags, where the vocabulary has them as tokens
        self._setup_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama-setup")
        self._embed_thread = concurrent.futures.ThreadPoolExecutor(
            1,
            thread_name_prefix="llama-emb",
            initializer=lower_thread_priority,
            initargs=(config.nice, config.idle_priority),
        )
        self._embedder_lock = asyncio.Lock()
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.embedder = EmbeddingBatcher(
            self._embed_batch, config.embed_window_seconds, config.embed_max_batch, config.embed_cache_size
        )

    @property
    def load(self) -> EngineLoad:
        loop = self._loop
        return EngineLoad(loop.running, loop.queued) if loop is not None else EngineLoad()

    @property
    def stats(self) -> BatchStats | None:
        return self._loop.stats if self._loop is not None else None

    def _new_llama(self, embedding: bool) -> Any:
        import llama_cpp

        if not Path(self.config.path).is_file():
            raise PermanentEngineError(f"model file not found: {self.config.path}")
        extra: dict[str, Any] = {"pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN} if embedding else {}
        progress = contextlib.nullcontext() if embedding else _progress_reported(self._loaded)
        try:
            with _LOADING, progress:
                return llama_cpp.Llama(
                    model_path=self.config.path,
                    # Generation runs on the batched context below; this one only serves the tokenizer,
                    # metadata and (for embeddings) its own small batches.
                    n_ctx=self.config.context_size if embedding else 256,
                    # An input to embed is one batch, so one batch holds the longest the engine takes (the
                    # context): llama-cpp-python's embed cuts every input to the batch size.
                    n_batch=self.config.context_size if embedding else 256,
                    n_ubatch=self.config.context_size if embedding else 256,
                    n_threads=self.config.threads,
                    n_threads_batch=self.config.threads,
                    n_gpu_layers=self.config.gpu_layers,
                    embedding=embedding,
                    verbose=False,
                    **extra,
                )
        except (ValueError, RuntimeError) as exc:
            # The file is there and llama.cpp refuses it. Retried: it may still be being copied, or the
            # node short of memory for now; a file that stays broken costs one attempt a minute.
            raise EngineError(f"llama.cpp could not load {self.config.path}: {exc}") from exc

    def _loaded(self, fraction: float) -> None:
        """On the loading thread: keep the fraction, in PROGRESS_STEP steps, and tell the event loop."""
        stepped = round(min(1.0, int(fraction / PROGRESS_STEP) * PROGRESS_STEP), 2)
        if self.load_progress is not None and stepped <= self.load_progress:
            return
        self.load_progress = stepped
        listener, loop = self.on_load_progress, self._event_loop
        if listener is not None and loop is not None:
            loop.call_soon_threadsafe(listener)

    def _new_batch_context(self, loop: asyncio.AbstractEventLoop) -> None:
        import llama_cpp

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.config.context_size * self.config.slots
        params.n_batch = self.config.batch_size
        params.n_ubatch = self.config.batch_size
        params.n_seq_max = self.config.slots
        # Separate KV streams per sequence keep every request's output bit-identical to running it alone
        # (a unified buffer changes attention's reduction order with the batch), and with every slot busy
        # they measured ~10% faster here. Unified lets a prompt share a prefix cached by another slot; an
        # operator can choose it.
        params.kv_unified = self.config.unified_kv
        params.n_threads = self.config.threads
        params.n_threads_batch = self.config.threads
        params.no_perf = True
        model = self._llm._model
        self._ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not self._ctx:
            raise EngineError("llama.cpp could not create a context of "
                              f"{params.n_ctx} tokens for {self.config.slots} sequences")  # fmt: skip
        # Kept on self from this thread: a start cancelled meanwhile still leaves it for close() to stop.
        self._loop = DecodeLoop(
            llama_cpp,
            model.vocab,
            self._ctx,
            self.config.slots,
            self.config.batch_size,
            self.config.unified_kv,
            loop.call_soon_threadsafe,
            self.config.nice,
            self.config.idle_priority,
        )

    async def _on(self, pool: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def start(self) -> EngineInfo:
        self._event_loop = asyncio.get_running_loop()
        self._llm = await self._on(self._setup_thread, self._new_llama, False)
        await self._on(self._setup_thread, self._new_batch_context, asyncio.get_running_loop())
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            vocab_text = self._llm._model.token_get_text
            tokens = {"eos_token": vocab_text(self._llm.token_eos()), "bos_token": vocab_text(self._llm.token_bos())}
            self._template = Jinja2ChatFormatter(template=template, **tokens)
            # For a conversation whose final assistant message the model continues: no new turn after it.
            self._continuing = Jinja2ChatFormatter(template=template, add_generation_prompt=False, **tokens)
            self._native_tools = renders_tools(template, self._template)
            # OpenAI's developer messages are its system messages for newer models; a template that has no
            # such role (most) would write one as a turn of a role the model never saw.
            self._developer_role = "developer" in template
        self._tool_tokens = self._special_tokens(OPEN, CLOSE)
        log.info("%s: tool calls in %s format", self.config.path,
                 "the chat template's" if self._native_tools else "the generic")  # fmt: skip
        return EngineInfo(context_size=self.config.context_size)

    def _special_tokens(self, *texts: str) -> tuple[int, ...]:
        """The tokens that are each of these texts whole, where the vocabulary has such special tokens
        (Qwen's `<tool_call>`): they must be rendered as their text for the calls to be parsed."""
        found = []
        for text in texts:
            ids = self._llm.tokenize(text.encode(), add_bos=False, special=True)
            if len(ids) == 1 and len(self._llm.tokenize(text.encode(), add_bos=False, special=False)) > 1:
                found.append(ids[0])
        return tuple(found)

    async def close(self) -> None:
        import llama_cpp

        await self.embedder.close()
        # A start or an embedding still running on the worker threads (the replica was unloaded while
        # loading) finishes first, off the event loop, so that nothing it creates is missed below.
        for pool in (self._setup_thread, self._embed_thread):
            await asyncio.to_thread(pool.shutdown, True)
        if self._loop is not None:
            await asyncio.to_thread(self._loop.close)  # the decode thread finishes its step first
            self._loop = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        for attr in ("_llm", "_embedder"):
            llm = getattr(self, attr)
            if llm is not None:
                setattr(self, attr, None)
                await asyncio.to_thread(llm.close)

    def _render_chat(self, chat: Chat) -> str:
        """The conversation as the model's template writes it, ending with the generation prompt; or, to
        continue the final (assistant) message, cut just after that message's text."""
        if self._template is None or self._continuing is None:
            raise InvalidInput("this model has no chat template; use the completions API", "messages")
        messages, tools = template_input(chat, self._native_tools)
        if not self._developer_role:
            for message in messages:
                if message["role"] == "developer":
                    message["role"] = "system"
        if not chat.continue_final_message:
            return self._render(self._template if chat.add_generation_prompt else self._continuing, messages, tools)
        # vLLM finds the final message's text in the rendered conversation (its last occurrence) and cuts
        # there. A mark in its place finds the same spot even when the text is empty, only whitespace or
        # trimmed by the template, and the text that follows it is then exactly what the client was sent.
        messages[-1]["content"] = _FINAL_MARK
        rendered = self._render(self._continuing, messages, tools)
        at = rendered.rfind(_FINAL_MARK)
        if at < 0:
            raise InvalidInput(
                "this model's chat template does not write the final assistant message's text, so it cannot be"
                " continued",
                "continue_final_message",
            )
        return rendered[:at] + chat.messages[-1].content

    @staticmethod
    def _render(template: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        try:
            return str(template(messages=messages, tools=tools).prompt)
        except Exception as exc:
            raise InvalidInput(f"the model's chat template rejected the messages: {exc}", "messages") from exc

    def _begins_with_bos(self, text: str) -> bool:
        """Whether the text itself begins with the beginning-of-text token (then the tokenizer adds none)."""
        bos_text = self._llm._model.token_get_text(self._llm.token_bos())
        return bool(bos_text) and text.startswith(bos_text)

    def _tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=not self._begins_with_bos(text), special=True))

    def _known_ids(self, ids: Sequence[int]) -> list[int]:
        """A prompt of token ids as it is, or InvalidInput naming `prompt` for the first the model lacks."""
        size = self._llm.n_vocab()
        unknown = next(((i, t) for i, t in enumerate(ids) if not 0 <= t < size), None)
        if unknown is not None:
            i, token = unknown
            raise InvalidInput(f"prompt[{i}] is {token}; this model's token ids are 0 to {size - 1}", "prompt")
        return list(ids)

    async def tokenize(self, prompt: Prompt) -> list[int]:
        # See INLINE_TOKENIZE_CHARS. The tokenizer reads only the vocabulary, never a context: safe beside
        # generation.
        if isinstance(prompt, TokenPrompt):
            if len(prompt.ids) <= INLINE_TOKEN_IDS:
                return self._known_ids(prompt.ids)
            return await asyncio.to_thread(self._known_ids, prompt.ids)  # up to a million
        text = prompt if isinstance(prompt, str) else self._render_chat(prompt)
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self._tokenize(text)
        return await asyncio.to_thread(self._tokenize, text)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        size = self._llm.n_vocab()
        for i, token in enumerate(tokens):
            if not 0 <= token < size:
                raise InvalidInput(f"token {i} is {token}; this model's token ids are 0 to {size - 1}", "token_ids")
        return await asyncio.to_thread(self._detokenize, list(tokens))

    def _detokenize(self, tokens: list[int]) -> str:
        import llama_cpp

        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        vocab = self._llm._model.vocab
        size = 4 * len(tokens) + 16
        for _ in range(2):  # llama.cpp answers a buffer too small with the size it needs
            text = ctypes.create_string_buffer(size)
            # Special tokens written out (a template's turn markers): the text tokenizes to the same ids.
            n = llama_cpp.llama_detokenize(vocab, ids, len(tokens), text, size, False, True)
            if n >= 0:
                return text.raw[:n].decode(errors="replace")
            size = -n
        raise EngineUnavailable("llama.cpp could not detokenize")

    async def watch(self) -> str:
        await asyncio.Event().wait()  # in-process: a failure surfaces in the request that meets it
        return ""

    async def generate(
        self, prompt: Prompt, options: SamplingOptions, tally: Tally | None = None
    ) -> AsyncIterator[GenerationEvent]:
        assert self._loop is not None, "engine not started"
        if options.n > self.config.slots:
            raise InvalidInput(
                f"n is {options.n}; this model's replicas decode at most {self.config.slots} sequences at once", "n"
            )
        size = self._llm.n_vocab()
        unknown = next((token for token, _ in options.logit_bias if token >= size), None)
        if unknown is not None:
            raise InvalidInput(
                f"logit_bias names token {unknown}; this model's token ids are 0 to {size - 1}", "logit_bias"
            )
        tokens = await self.tokenize(prompt)
        if not tokens:
            # The decode loop needs a token to sample after (one request's empty batch would fail the step,
            # and with it every sequence in it): a model that adds no BOS gives none for an empty text.
            raise InvalidInput(
                "the prompt has no tokens: send some text", "messages" if isinstance(prompt, Chat) else "prompt"
            )
        context = self.config.context_size
        check_context(len(tokens), context, options.max_tokens)
        limit = context - len(tokens) if options.max_tokens is None else options.max_tokens
        if options.echo and not options.logprobs:
            yield PromptEcho()  # the prompt's text is the caller's; only its scores come from the model
            if limit == 0:  # nothing to compute
                for index in range(options.n) if options.n > 1 else ():
                    yield ChoiceEnd(index, "length")
                yield Finished("length", len(tokens), 0)
                return
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        request = BatchRequest(tokens, options, limit, events.put_nowait, shown=frozenset(self._tool_tokens))
        if tally is not None:
            request.tally = tally  # the decode thread keeps it current
        if options.echo and options.logprobs:
            request.score_prompt = True
            # A beginning-of-text token the tokenizer added is not in the prompt's text.
            added = isinstance(prompt, str) and tokens[0] == self._llm.token_bos() and not self._begins_with_bos(prompt)
            request.unwritten = int(added)
        parser = await self._constrain(request, prompt, options)
        decode = self._loop
        if decode is None:  # the engine closed (its model unloaded) while the request was being prepared
            raise EngineUnavailable("the model was unloaded")
        decode.submit(request)
        try:
            stream = _events(events)
            async for event in _tool_calls(stream, parser) if parser is not None else stream:
                yield event
        finally:
            request.cancelled.set()  # the decode thread drops the sequence at its next step

    async def _constrain(
        self, request: BatchRequest, prompt: Prompt, options: SamplingOptions
    ) -> ToolCallStream | None:
        """Give the request the grammar its tools or its response_format asks for, converted off the event
        loop (a few ms; cached by the schemas' text): what the grammar cannot enforce is refused here,
        before the request takes a slot. The parser of its reply's tool calls, when it may make some."""
        if not (isinstance(prompt, Chat) and prompt.calls_tools):
            if options.response_format is not None:
                request.grammar = await asyncio.to_thread(grammar_for, options.response_format)
            return None
        content = content_schema(options.response_format) if options.response_format is not None else ""
        request.grammar, request.trigger = await asyncio.to_thread(tool_grammar, prompt, self._tool_tokens[:1], content)
        request.grammar_of = "tools"
        # Beside a schema the reply is calls or a document from its first character: a tag inside the
        # document's strings is its text, not a call.
        return ToolCallStream(content_or_calls=bool(content))

    async def _get_embedder(self) -> Any:
        async with self._embedder_lock:
            if self._embedder is None:
                self._embedder = await self._on(self._embed_thread, self._new_llama, True)
            return self._embedder

    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        embedder = await self._get_embedder()
        vectors = await self._on(self._embed_thread, lambda: embedder.embed(texts, normalize=True, truncate=False))
        return [list(map(float, v)) for v in vectors]

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        config = self.config
        if len(texts) > config.embed_max_inputs:
            raise InvalidInput(f"at most {config.embed_max_inputs} inputs per request; got {len(texts)}", "input")
        for i, text in enumerate(texts):
            if len(text) > config.embed_max_chars:
                raise InvalidInput(
                    f"input[{i}] is {len(text)} characters; the limit is {config.embed_max_chars}", "input"
                )
        # One trip to a worker thread for all inputs, not one per input.
        # Counted as llama-cpp-python's embed reads them: a beginning token, and special tokens' text as text.
        counts = await asyncio.to_thread(lambda: [len(self._llm.tokenize(t.encode(), special=False)) for t in texts])
        # An input with no token at all (a control character alone, say) would make llama_decode fail on an
        # empty batch, which corrupts llama.cpp's state: it is the request's error, not the engine's.
        empty = [i for i, n in enumerate(counts) if n == 0]
        if empty:
            raise InvalidInput(f"input[{empty[0]}] has no tokens for this model's tokenizer", "input")
        too_long = [i for i, n in enumerate(counts) if n > config.context_size]
        if too_long:
            i = too_long[0]
            raise ContextLengthExceeded(
                f"input[{i}] is {counts[i]} tokens;"
                f" this model's maximum context length is {config.context_size} tokens",
                param="input",
            )
        vectors = await self.embedder.embed(list(texts))
        return Embeddings(vectors=vectors, prompt_tokens=sum(counts))


async def _events(queue: asyncio.Queue[GenerationEvent | BaseException]) -> AsyncIterator[GenerationEvent]:
    """A request's events from the decode thread, up to its Finished; a failure raised as the engine's."""
    while True:
        item = await queue.get()
        if isinstance(item, InvalidInput):
            raise item  # the request's fault (a grammar llama.cpp refused), not the engine's
        if isinstance(item, BaseException):
            raise EngineUnavailable(f"llama.cpp generation failed: {item}")
        yield item
        if isinstance(item, Finished):
            return


async def _tool_calls(events: AsyncIterator[GenerationEvent], parser: ToolCallStream) -> AsyncIterator[GenerationEvent]:
    """The events with the reply's text parsed into content and tool calls. Log probabilities go with the
    content they belong to (held back with it); those of a call's text are not reported."""
    pending: tuple[TokenLogprob, ...] = ()
    async for item in events:
        if isinstance(item, Finished):
            for text in parser.flush():
                yield TextChunk(str(text), pending)
                pending = ()
            called = item.reason == "stop" and parser.complete_calls > 0  # ended by the grammar, after calls
            reason = "tool_calls" if called else item.reason
            yield Finished(reason, item.prompt_tokens, item.completion_tokens, parser.calls)
            return
        if not isinstance(item, TextChunk):
            continue
        pending += item.logprobs
        for event in parser.feed(item.text):
            if isinstance(event, str):
                yield TextChunk(event, pending)
                pending = ()
            else:
                yield event
        if not parser.in_content:
            pending = ()
