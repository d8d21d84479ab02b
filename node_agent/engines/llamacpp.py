"""llama.cpp engine (llama-cpp-python) for GGUF models, on CPU or GPU.

llama.cpp calls block, so every call that touches a context runs on that context's own single worker
thread: a context is not thread-safe, and one thread per context also serialises access without locks.
Generation runs one request at a time per context; waiting requests are the queue the scheduler sees.
A generation checks a cancel flag between tokens, so a client that goes away frees the context after at
most one more decode step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from node_agent.engines.base import (
    ContextLengthExceeded,
    Embeddings,
    EngineError,
    EngineInfo,
    EngineLoad,
    Finished,
    GenerationEvent,
    Message,
    SamplingOptions,
    TextChunk,
)
from node_agent.engines.text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaCppConfig:
    path: str
    context_size: int = 2048
    threads: int = 2
    gpu_layers: int = 0  # -1 offloads every layer when the node has a GPU


class LlamaCppEngine:
    def __init__(self, config: LlamaCppConfig) -> None:
        self.config = config
        self.load = EngineLoad()
        self._llm: Any = None
        self._embedder: Any = None
        self._template: Any = None
        self._gen_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama-gen")
        self._embed_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama-emb")
        self._slot = asyncio.Semaphore(1)
        self._embedder_lock = asyncio.Lock()

    def _new_llama(self, embedding: bool) -> Any:
        import llama_cpp

        if not Path(self.config.path).is_file():
            raise EngineError(f"model file not found: {self.config.path}")
        extra: dict[str, Any] = {"pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN} if embedding else {}
        try:
            return llama_cpp.Llama(
                model_path=self.config.path,
                n_ctx=self.config.context_size,
                n_threads=self.config.threads,
                n_threads_batch=self.config.threads,
                n_gpu_layers=self.config.gpu_layers,
                embedding=embedding,
                verbose=False,
                **extra,
            )
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {self.config.path}: {exc}") from exc

    async def _on(self, pool: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def start(self) -> EngineInfo:
        self._llm = await self._on(self._gen_thread, self._new_llama, False)
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            vocab_text = self._llm._model.token_get_text
            self._template = Jinja2ChatFormatter(
                template=template,
                eos_token=vocab_text(self._llm.token_eos()),
                bos_token=vocab_text(self._llm.token_bos()),
            )
        return EngineInfo(context_size=self._llm.n_ctx())

    async def close(self) -> None:
        # Wait for the running generation to notice its cancel flag, then free the contexts.
        for pool, attr in ((self._gen_thread, "_llm"), (self._embed_thread, "_embedder")):
            llm = getattr(self, attr)
            if llm is not None:
                await self._on(pool, llm.close)
                setattr(self, attr, None)
            pool.shutdown(wait=True)

    async def render_chat(self, messages: Sequence[Message]) -> str:
        if self._template is None:
            raise EngineError("this model has no chat template; use the completions API")
        try:
            rendered = self._template(messages=[{"role": m.role, "content": m.content} for m in messages])
        except Exception as exc:
            raise EngineError(f"the model's chat template rejected the messages: {exc}") from exc
        return str(rendered.prompt)

    def _tokenize(self, text: str) -> list[int]:
        llm = self._llm
        bos_text = llm._model.token_get_text(llm.token_bos())
        add_bos = not (bos_text and text.startswith(bos_text))
        return list(llm.tokenize(text.encode(), add_bos=add_bos, special=True))

    async def tokenize(self, text: str) -> list[int]:
        # The tokenizer reads only the vocabulary, never the context: safe beside a generation.
        return await asyncio.to_thread(self._tokenize, text)

    async def generate(self, prompt: str, options: SamplingOptions) -> AsyncIterator[GenerationEvent]:
        tokens = await self.tokenize(prompt)
        context = self.config.context_size
        if len(tokens) >= context:
            raise ContextLengthExceeded(
                f"the prompt is {len(tokens)} tokens; this model's context is {context} tokens",
                param="messages",
            )
        if options.max_tokens is not None and len(tokens) + options.max_tokens > context:
            raise ContextLengthExceeded(
                f"the prompt ({len(tokens)} tokens) plus max_tokens ({options.max_tokens}) exceeds this"
                f" model's context of {context} tokens",
                param="max_tokens",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: GenerationEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        self.load.queued += 1
        try:
            await self._slot.acquire()
        finally:
            self.load.queued -= 1
        self.load.running += 1
        try:
            work = loop.run_in_executor(self._gen_thread, self._generate_blocking, tokens, options, emit, cancelled)
        except BaseException:
            self._release_slot(None)
            raise
        # The slot is released when the thread is done, not when the client leaves: the context is busy
        # until then.
        work.add_done_callback(self._release_slot)
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            cancelled.set()

    def _release_slot(self, _: object) -> None:
        self.load.running -= 1
        self._slot.release()

    def _generate_blocking(
        self,
        tokens: list[int],
        options: SamplingOptions,
        emit: Callable[[GenerationEvent | BaseException], None],
        cancelled: threading.Event,
    ) -> None:
        try:
            self._decode_loop(tokens, options, emit, cancelled)
        except Exception as exc:
            log.exception("generation failed")
            emit(EngineError(f"llama.cpp generation failed: {exc}"))

    def _decode_loop(
        self,
        tokens: list[int],
        options: SamplingOptions,
        emit: Callable[[GenerationEvent | BaseException], None],
        cancelled: threading.Event,
    ) -> None:
        import llama_cpp

        llm = self._llm
        vocab = llm._model.vocab
        limit = self.config.context_size - len(tokens)
        if options.max_tokens is not None:
            limit = min(limit, options.max_tokens)
        llm.set_seed(options.seed if options.seed is not None else random.getrandbits(32))
        stream = TextStream(options.stops)
        generated: list[int] = []
        reason: Literal["stop", "length"] = "length"
        if limit > 0:
            for token in llm.generate(
                tokens,
                temp=options.temperature,
                top_k=options.top_k,
                top_p=options.top_p,
                min_p=options.min_p,
                repeat_penalty=options.repetition_penalty,
                frequency_penalty=options.frequency_penalty,
                presence_penalty=options.presence_penalty,
            ):
                if cancelled.is_set():
                    return
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = "stop"
                    break
                piece = llm.detokenize([token], prev_tokens=tokens + generated)
                generated.append(token)
                text = stream.feed(piece)
                if text:
                    emit(TextChunk(text))
                if stream.stopped:
                    reason = "stop"
                    break
                if len(generated) >= limit:
                    break
        tail = stream.flush()
        if tail:
            emit(TextChunk(tail))
        emit(Finished(reason, prompt_tokens=len(tokens), completion_tokens=len(generated)))

    async def _get_embedder(self) -> Any:
        async with self._embedder_lock:
            if self._embedder is None:
                self._embedder = await self._on(self._embed_thread, self._new_llama, True)
            return self._embedder

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        counts = [len(await self.tokenize(t)) for t in texts]
        too_long = [i for i, n in enumerate(counts) if n > self.config.context_size]
        if too_long:
            i = too_long[0]
            raise ContextLengthExceeded(
                f"input[{i}] is {counts[i]} tokens; this model's context is {self.config.context_size}",
                param="input",
            )
        embedder = await self._get_embedder()
        vectors = await self._on(self._embed_thread, lambda: embedder.embed(list(texts), normalize=True))
        return Embeddings(vectors=[list(map(float, v)) for v in vectors], prompt_tokens=sum(counts))
