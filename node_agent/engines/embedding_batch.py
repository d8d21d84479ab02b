"""Embedding micro-batching: concurrent requests are gathered for a short window (or until a batch is
full) and embedded in one call; repeated inputs are answered from an LRU cache."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence

Vector = list[float]


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
        self.batches = 0  # embedding calls made, for tests and metrics
        self.cache_hits = 0

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        loop = asyncio.get_running_loop()
        waiting: dict[str, asyncio.Future[Vector]] = {}
        for text in texts:
            if text in self._cache or text in waiting:
                continue
            future: asyncio.Future[Vector] = loop.create_future()
            waiting[text] = future
            self._pending.append((text, future))
        self.cache_hits += sum(1 for t in texts if t in self._cache)
        if len(self._pending) >= self._max_batch:
            self._flush_now()
        elif self._pending and self._timer is None:
            self._timer = loop.call_later(self._window, self._flush_now)
        if waiting:
            await asyncio.gather(*waiting.values())
        out = []
        for text in texts:
            vector = self._cache.get(text)
            if vector is None:
                vector = waiting[text].result()  # evicted already by a flood of others: still ours
            else:
                self._cache.move_to_end(text)
            out.append(vector)
        return out

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
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (text, future), vector in zip(batch, vectors, strict=True):
            self._cache[text] = vector
            if not future.done():
                future.set_result(vector)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._flushes):
            task.cancel()
