"""The cost of structured outputs (`response_format`) in the llama.cpp engine, in-process.

    .venv/bin/python -m bench.grammar_bench [--rounds 5]

One engine (SmolLM2-135M, 8 slots, 2 threads). Rows interleaved, medians over the rounds:
- one stream alone, free vs constrained by a JSON schema (temperature 0.8, 128 tokens at most): time to the
  first token and tokens/s after it;
- 8 streams together, 7 greedy and 1 free vs 7 greedy and 1 constrained: aggregate tokens/s and the time of
  one decode step (a constrained request is one more sequence of the same step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from launcher.default_model import default_model_path
from node_agent.engines.base import Chat, Finished, Message, ResponseFormat, SamplingOptions, TextChunk
from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}
STORY = ResponseFormat("json_schema", json.dumps(SCHEMA), "story")
ASK = Chat((Message("user", "Write a long story about a lighthouse keeper, as JSON with a title and the story."),))
PROMPTS = [
    "Once upon a time, in a small village,",
    "The history of the Roman empire",
    "A recipe for pancakes:",
    "def fibonacci(n):",
    "In 1969, astronauts",
    "My favourite book is",
    "The three primary colors are",
]


async def one(engine: LlamaCppEngine, prompt: Chat | str, options: SamplingOptions) -> tuple[float, int, float]:
    """(seconds to the first text, completion tokens, seconds from the first text to the end)."""
    start, first = time.perf_counter(), 0.0
    async for event in engine.generate(prompt, options):
        if isinstance(event, TextChunk):
            first = first or time.perf_counter()
        elif isinstance(event, Finished):
            end = time.perf_counter()
            first = first or end
            return first - start, event.completion_tokens, end - first
    raise RuntimeError("the stream ended without a result")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    engine = LlamaCppEngine(LlamaCppConfig(str(default_model_path()), context_size=1024, threads=2, slots=8))
    await engine.start()
    stats = engine.stats
    assert stats is not None, "the batched engine keeps step counts"
    try:
        await one(engine, ASK, SamplingOptions(max_tokens=8))  # warm-up
        alone: dict[str, list[tuple[float, float]]] = {"free": [], "constrained": []}
        together: dict[str, list[tuple[float, float]]] = {"7 greedy + 1 free": [], "7 greedy + 1 constrained": []}
        for r in range(args.rounds):
            for name, fmt in (("free", None), ("constrained", STORY)):
                options = SamplingOptions(max_tokens=128, temperature=0.8, seed=r, response_format=fmt)
                ttft, tokens, rest = await one(engine, ASK, options)
                alone[name].append((ttft * 1000, (tokens - 1) / rest if rest > 0 else 0.0))
            for name, fmt in (("7 greedy + 1 free", None), ("7 greedy + 1 constrained", STORY)):
                jobs = [one(engine, p, SamplingOptions(max_tokens=128, temperature=0)) for p in PROMPTS]
                options = SamplingOptions(max_tokens=128, temperature=0.8, seed=r, response_format=fmt)
                jobs.append(one(engine, ASK, options))
                steps, start = stats.steps, time.perf_counter()
                runs = await asyncio.gather(*jobs)
                wall = time.perf_counter() - start
                together[name].append((sum(n for _, n, _ in runs) / wall, wall / max(1, stats.steps - steps)))
    finally:
        await engine.close()
    print(f"\nSmolLM2-135M, in-process llama.cpp engine, 8 slots, 2 threads; medians of {args.rounds} rounds\n")
    base = alone["free"]
    for name, rows in alone.items():
        ttft, rate = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        ratio = rate / statistics.median(r[1] for r in base)
        print(f"1 stream, {name:<12} TTFT p50 {ttft:6.1f} ms   {rate:6.1f} tok/s ({ratio:.2f}x)")
    for name, rows in together.items():
        rate, step = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"8 streams, {name:<25} {rate:6.1f} tok/s   {step * 1000:5.1f} ms per decode step")


if __name__ == "__main__":
    asyncio.run(main())
