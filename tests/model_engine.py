"""The llama.cpp engine with the default model, started and closed around a block: what the engine-level
test modules share (each takes its own slots and context)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from launcher.default_model import default_model_path
from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine


@contextlib.asynccontextmanager
async def default_model_engine(slots: int, context_size: int = 1024, threads: int = 2) -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine(
        LlamaCppConfig(str(default_model_path()), context_size=context_size, threads=threads, slots=slots)
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()
