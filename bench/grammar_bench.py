"""The cost of structured outputs (`response_format`) in the llama.cpp engine, in-process.

    .venv/bin/python -m bench.grammar_bench [--rounds 5]

One engine (SmolLM2-135M, 8 slots, 2 threads). Rows interleaved, medians over the rounds:
- one stream alone, free vs constrained by a JSON schema (temperature 0.8, 128 tokens at most): time to the
  first token and tokens/s after it;
- 8 greedy streams together, none constrained vs one constrained: aggregate tokens/s and the time of one
  decode step (a constrained request is one more sequence of the same step).

The 8-stream rows compare equal work: every stream must generate exactly --tokens tokens. The schema's story
is at least 800 characters, so the constrained document cannot end sooner (a shorter document, ending before
the others, left the batch with 7 sequences for its last steps and its aggregate looked 12 % lower for a
reason that was not the grammar's); the free prompts are ones that run past --tokens. A round in which a
stream ended early is reported and left out of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from node_agent.engines.base import Chat, Finished, Message, ResponseFormat, SamplingOptions, TextChunk, ToolCallChunk
from node_agent.engines.llamacpp import LlamaCppEngine
from tests.model_engine import default_model_engine

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 80}, "story": {"type": "string", "minLength": 800}},
    "required": ["title", "story"],
}
STORY = ResponseFormat("json_schema", json.dumps(SCHEMA), "story")
ASK = Chat((Message("user", "Write a long story about a lighthouse keeper, as JSON with a title and the story."),))
# The 8-stream rows' eighth stream, free or constrained: a raw prompt, which the model goes on with (a chat
# reply can end before --tokens when free, and must not), greedy like the other seven (sampled, it ended
# early in some rounds).
STORY_PROMPT = "The lighthouse keeper's long story:\n"
PROMPTS = [
    "Once upon a time, in a small village,",
    "The history of the Roman empire",
    "A recipe for pancakes:",
    "def fibonacci(n):",
    "In 1969, astronauts",
    "The history of the printing press",
    "The three primary colors are",
]


async def one(engine: LlamaCppEngine, prompt: Chat | str, options: SamplingOptions) -> tuple[float, int, float]:
    """(seconds to the first output, text or a tool call; completion tokens; seconds from then to the end)."""
    start, first = time.perf_counter(), 0.0
    async for event in engine.generate(prompt, options):
        if isinstance(event, TextChunk | ToolCallChunk):
            first = first or time.perf_counter()
        elif isinstance(event, Finished):
            end = time.perf_counter()
            first = first or end
            return first - start, event.completion_tokens, end - first
    raise RuntimeError("the stream ended without a result")


async def batch(engine: LlamaCppEngine, tokens: int, fmt: ResponseFormat | None) -> tuple[float, float, list[int]]:
    """8 greedy streams together, the eighth free or constrained: (tokens/s, seconds per decode step, each
    stream's completion tokens)."""
    stats = engine.stats
    assert stats is not None
    jobs = [one(engine, p, SamplingOptions(max_tokens=tokens, temperature=0)) for p in PROMPTS]
    jobs.append(one(engine, STORY_PROMPT, SamplingOptions(max_tokens=tokens, temperature=0, response_format=fmt)))
    steps, start = stats.steps, time.perf_counter()
    runs = await asyncio.gather(*jobs)
    wall = time.perf_counter() - start
    counts = [n for _, n, _ in runs]
    return sum(counts) / wall, wall / max(1, stats.steps - steps), counts


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream (128)")
    args = parser.parse_args()
    async with default_model_engine(8) as engine:
        stats = engine.stats
        assert stats is not None, "the batched engine keeps step counts"
        await one(engine, ASK, SamplingOptions(max_tokens=8))  # warm-up
        alone: dict[str, list[tuple[float, float]]] = {"free": [], "constrained": []}
        together: dict[str, list[tuple[float, float]]] = {"7 greedy + 1 free": [], "7 greedy + 1 constrained": []}
        short: list[str] = []
        checks, resamples = stats.grammar_checks, stats.grammar_resamples
        for r in range(args.rounds):
            for name, fmt in (("free", None), ("constrained", STORY)):
                await one(engine, ASK, SamplingOptions(max_tokens=1))  # the prompt cached for both alike
                options = SamplingOptions(max_tokens=args.tokens, temperature=0.8, seed=r, response_format=fmt)
                ttft, tokens, rest = await one(engine, ASK, options)
                alone[name].append((ttft * 1000, (tokens - 1) / rest if rest > 0 else 0.0))
            order = [("7 greedy + 1 free", None), ("7 greedy + 1 constrained", STORY)]
            for name, fmt in order if r % 2 == 0 else order[::-1]:
                rate, step, counts = await batch(engine, args.tokens, fmt)
                if min(counts) < args.tokens:
                    short.append(f"round {r}, {name}: {counts}")
                    continue
                together[name].append((rate, step))
        checks, resamples = stats.grammar_checks - checks, stats.grammar_resamples - resamples
    print(f"\nSmolLM2-135M, in-process llama.cpp engine, 8 slots, 2 threads; medians of {args.rounds} rounds\n")
    base = alone["free"]
    for name, rows in alone.items():
        ttft, rate = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        ratio = rate / statistics.median(r[1] for r in base)
        print(f"1 stream, {name:<12} TTFT p50 {ttft:6.1f} ms   {rate:6.1f} tok/s ({ratio:.2f}x)")
    medians = {}
    for name, rows in together.items():
        if not rows:
            print(f"8 streams, {name:<25} no round where every stream generated {args.tokens} tokens")
            continue
        rate, step = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        medians[name] = (rate, step)
        print(f"8 streams, {name:<25} {rate:6.1f} tok/s   {step * 1000:5.1f} ms per decode step"
              f"   ({len(rows)} rounds, every stream {args.tokens} tokens;"
              f" tok/s by round {' '.join(f'{r[0]:.1f}' for r in rows)})")  # fmt: skip
    if len(medians) == 2:
        (free_rate, free_step), (rate, step) = medians["7 greedy + 1 free"], medians["7 greedy + 1 constrained"]
        print(f"\n8 streams with one constrained: {rate / free_rate:.2f}x the tokens/s of none,"
              f" {step / free_step:.2f}x the decode step")  # fmt: skip
    print(f"grammar: {checks} constrained tokens, {resamples} ({resamples / max(1, checks):.0%}) sampled again under"
          " the grammar")  # fmt: skip
    for line in short:
        print(f"left out (a stream ended before {args.tokens} tokens): {line}")


if __name__ == "__main__":
    asyncio.run(main())
