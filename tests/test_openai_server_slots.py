"""The sequences an OpenAI-compatible engine sends its server at once: a request for n choices takes n of the
`slots`, requests wait in line first come first served (one for several is not passed over by single ones),
one that leaves the line or is cancelled gives back what it held, and one for more than `slots` is refused
(it would wait for ever at the head of the line). The engine's own gate, no server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from node_agent.engines.base import InvalidInput, SamplingOptions
from node_agent.engines.openai_server import OpenAIServerConfig, OpenAIServerEngine


@pytest_asyncio.fixture
async def engine() -> AsyncIterator[OpenAIServerEngine]:
    built = OpenAIServerEngine(OpenAIServerConfig(base_url="http://127.0.0.1:9", name="m", slots=4))
    yield built
    await built.close()


async def hold(engine: OpenAIServerEngine, sequences: int, started: list[int], release: asyncio.Event) -> None:
    async with engine._slot(sequences):
        started.append(sequences)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_n_sequences_are_counted_and_the_line_is_kept(engine: OpenAIServerEngine) -> None:
    started: list[int] = []
    first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [asyncio.ensure_future(hold(engine, 3, started, first))]
    await settle()
    tasks.append(asyncio.ensure_future(hold(engine, 2, started, second)))  # 3 + 2 > 4: waits
    await settle()
    tasks.append(asyncio.ensure_future(hold(engine, 1, started, third)))  # would fit, but is behind the 2
    await settle()
    assert started == [3] and (engine.load.running, engine.load.queued) == (3, 3)
    first.set()
    await settle()
    assert started == [3, 2, 1] and (engine.load.running, engine.load.queued) == (3, 0)
    second.set()
    third.set()
    await asyncio.gather(*tasks)
    assert (engine.load.running, engine.load.queued) == (0, 0)


async def test_a_request_that_leaves_the_line_lets_the_next_one_go(engine: OpenAIServerEngine) -> None:
    started: list[int] = []
    release = asyncio.Event()
    running = asyncio.ensure_future(hold(engine, 4, started, release))
    await settle()
    leaving = asyncio.ensure_future(hold(engine, 4, started, release))
    await settle()
    behind = asyncio.ensure_future(hold(engine, 1, started, release))
    await settle()
    leaving.cancel()  # the client went away while waiting
    await settle()
    assert started == [4] and engine.load.queued == 1
    release.set()
    await asyncio.gather(running, behind)
    assert started == [4, 1] and (engine.load.running, engine.load.queued) == (0, 0)


async def test_more_choices_than_slots_is_refused_naming_n(engine: OpenAIServerEngine) -> None:
    with pytest.raises(InvalidInput) as refused:
        async for _ in engine.generate("Hello", SamplingOptions(max_tokens=4, n=5)):
            pass
    assert refused.value.param == "n" and (engine.load.running, engine.load.queued) == (0, 0)
