"""What `n` > 1 saves in the llama.cpp engine: one request for 4 choices against 4 separate concurrent requests
for the same prompt, and 1 request alone, in-process, side by side.

    .venv/bin/python -m bench.choices_bench [--rounds 5] [--tokens 64]

One engine (SmolLM2-135M, 4 slots, 2 threads). The prompt is a conversation of a few hundred tokens, made
fresh for every row of every round (a nonce at its start), so that no row finds it in the prefix cache.
Greedy decoding: the 4 choices and the 4 requests generate the same tokens, so the rows do the same
generation work and differ only in how the prompt is computed. Rows interleaved, medians over the rounds:
time to every choice's first token, time to the end, the prompt tokens llama_decode computed (the
engine's own counter) and aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from bench.inference_bench import rotated
from node_agent.engines.base import Chat, Finished, Message, SamplingOptions, TextChunk
from node_agent.engines.llamacpp import LlamaCppEngine
from tests.model_engine import default_model_engine

CONTEXT = (
    "You are the archivist of a small coastal town. The town has a lighthouse, a harbour with forty fishing"
    " boats, a market on Tuesdays and Saturdays, a school of two hundred children, a library founded in 1887,"
    " and a museum of maritime history whose collection includes ship models, old charts, logbooks of captains"
    " and the lamp of the first lighthouse. Visitors ask you about the history of the town, its people, its"
    " storms and its festivals. Answer kindly, with facts from the archive, and suggest a place to visit. "
)


def fresh_prompt() -> Chat:
    return Chat(
        (
            Message("system", f"[{uuid.uuid4().hex}] " + CONTEXT * 3),
            Message("user", "Tell me about the lighthouse and what I should see at the museum."),
        )
    )


async def one(engine: LlamaCppEngine, prompt: Chat, options: SamplingOptions) -> tuple[dict[int, float], float, int]:
    """(seconds to each choice's first text, seconds to the end, completion tokens)."""
    start, firsts = time.perf_counter(), {}
    async for event in engine.generate(prompt, options):
        if isinstance(event, TextChunk) and event.index not in firsts:
            firsts[event.index] = time.perf_counter() - start
        elif isinstance(event, Finished):
            return firsts, time.perf_counter() - start, event.completion_tokens
    raise RuntimeError("the stream ended without a result")


async def row(engine: LlamaCppEngine, name: str, tokens: int) -> tuple[float, float, int, int]:
    """One measurement: (seconds until every choice has its first token, seconds to the end, prompt tokens
    computed, completion tokens)."""
    stats = engine.stats
    assert stats is not None
    prompt, computed = fresh_prompt(), stats.computed_prompt_tokens
    if name == "1 request, n=4":
        firsts, wall, generated = await one(engine, prompt, SamplingOptions(max_tokens=tokens, temperature=0, n=4))
        ready = max(firsts.values())
    else:
        count = 4 if name == "4 requests, n=1 each" else 1
        options = SamplingOptions(max_tokens=tokens, temperature=0)
        runs = await asyncio.gather(*(one(engine, prompt, options) for _ in range(count)))
        ready, wall = max(r[0][0] for r in runs), max(r[1] for r in runs)
        generated = sum(r[2] for r in runs)
    return ready, wall, stats.computed_prompt_tokens - computed, generated


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per choice (64)")
    args = parser.parse_args()
    async with default_model_engine(4, context_size=2048) as engine:
        names = ["1 request, n=1", "1 request, n=4", "4 requests, n=1 each"]
        results: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name in names}
        prompt_tokens = len(await engine.tokenize(fresh_prompt()))
        await row(engine, names[0], 8)  # warm-up
        for r in range(args.rounds):
            for name in rotated(names, r):  # each row goes first in turn
                results[name].append(await row(engine, name, args.tokens))
    print(f"\nSmolLM2-135M, in-process llama.cpp engine, 4 slots, 2 threads, a {prompt_tokens}-token prompt,")
    print(f"greedy, {args.tokens} tokens per choice; medians of {args.rounds} rounds\n")
    print(f"{'':<24} {'all first tokens':>17} {'to the end':>11} {'prompt computed':>16} {'tokens':>7} {'tok/s':>7}")
    medians = {}
    for name in names:
        rows = results[name]
        ready, wall = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        computed, generated = statistics.median(r[2] for r in rows), statistics.median(r[3] for r in rows)
        medians[name] = (ready, wall)
        print(f"{name:<24} {ready * 1000:>14.0f} ms {wall * 1000:>8.0f} ms {computed:>16.0f} {generated:>7.0f}"
              f" {generated / wall:>7.1f}")  # fmt: skip
    n4, separate, single = (medians[name] for name in ("1 request, n=4", "4 requests, n=1 each", "1 request, n=1"))
    print(f"\nn=4 against 4 separate requests: {n4[1] / separate[1]:.2f}x the time to the end,"
          f" {n4[0] / separate[0]:.2f}x the time until every choice has its first token")  # fmt: skip
    print(f"n=4 against 1 request alone: {n4[1] / single[1]:.2f}x the time to the end for 4x the choices")


if __name__ == "__main__":
    asyncio.run(main())
