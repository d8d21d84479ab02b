"""Embedding micro-batching: concurrent requests are gathered for a short window (or until a batch is
full) and embedded in one call; repeated inputs are answered from an LRU cache.

Every caller gets an answer: its vectors, the embedding call's error, or, once the batcher is closed
(its engine unloaded), EngineUnavailable at once, whether its inputs were still gathering or already in
a call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from node_agent.engines.base import EngineUnavailable

Vector = list[float]
_CLOSED = "the model was unloaded while its embeddings were computed"


class EmbeddingBatcher:
    def __init__(
        self,
        embed: Callable[[list[str]], Awaitable[list[Vector]]],
        window_seconds: float = 0.005,
        max_batch: int = 64,
        cache_size: int = 4096,
    ) -> None:
        self._embed = embed
        self._window = window_seconds
        self._max_batch = max_batch
        self._cache: collections.OrderedDict[str, Vector] = collections.OrderedDict()
        self._cache_size = cache_size
        self._pending: list[tuple[str, asyncio.Future[Vector]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._closed = False
        self.batches = 0  # embedding calls made, for tests and metrics
        self.cache_hits = 0
        self.cache_misses = 0  # inputs that had to be embedded

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        if self._closed:
            raise EngineUnavailable(_CLOSED)
        loop = asyncio.get_running_loop()
        # Cached vectors are taken now, not after the wait: others' inputs may evict them meanwhile.
        found: dict[str, Vector] = {}
        waiting: dict[str, asyncio.Future[Vector]] = {}
        for text in texts:
            if text in found or text in waiting:
                continue
            vector = self._cache.get(text)
            if vector is not None:
                self._cache.move_to_end(text)
                found[text] = vector
                continue
            future: asyncio.Future[Vector] = loop.create_future()
            waiting[text] = future
            self._pending.append((text, future))
        self.cache_hits += sum(1 for t in texts if t in found)
        self.cache_misses += len(texts) - sum(1 for t in texts if t in found)
        if len(self._pending) >= self._max_batch:
            self._flush_now()
        elif self._pending and self._timer is None:
            self._timer = loop.call_later(self._window, self._flush_now)
        if waiting:
            # Every future is awaited to its end, so that none is left with an unread error.
            for outcome in await asyncio.gather(*waiting.values(), return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome
        return [found[t] if t in found else waiting[t].result() for t in texts]

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            task = asyncio.ensure_future(self._run(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _run(self, batch: list[tuple[str, asyncio.Future[Vector]]]) -> None:
        self.batches += 1
        try:
            vectors = await self._embed([text for text, _ in batch])
        except asyncio.CancelledError:
            _fail(batch, EngineUnavailable(_CLOSED))  # close() cancelled the call: its callers learn now
            raise
        except Exception as exc:
            _fail(batch, exc)
            return
        for (text, future), vector in zip(batch, vectors, strict=True):
            self._cache[text] = vector
            if not future.done():
                future.set_result(vector)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        """Fail every caller still waiting (gathering or in a call) and stop the calls in flight."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        _fail(pending, EngineUnavailable(_CLOSED))
        flushes = list(self._flushes)
        for task in flushes:
            task.cancel()
        for task in flushes:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _fail(batch: list[tuple[str, asyncio.Future[Vector]]], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
