"""What scoring a prompt (the completions API's `echo` with logprobs, max_tokens 0: how evaluation harnesses
score text) costs the llama.cpp engine, against computing the same prompts for generation (max_tokens 1,
no echo), side by side in one run: prompt tokens/s, with 1 and with 4 requests at once.

    .venv/bin/python -m bench.echo_bench [--words 300] [--threads 2] [--rounds 3]

The engine alone (no gRPC, no edge), so that the figure is the engine's own cost. Every request's prompt
is new (no cached prefix helps either row). Rows are measured in turns, round after round, and the table
gives medians (this machine's speed drifts over minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

from launcher.default_model import default_model_path
from node_agent.engines.base import Finished, PromptEcho, SamplingOptions
from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine

FRESH = itertools.count()


def prompt(words: int) -> str:
    """A prompt of about `words` words that shares no prefix with any other of this run."""
    n = next(FRESH)
    return f"Document {n}. " + " ".join(f"word{(n * 7 + i) % 97} is here." for i in range(words // 3))


async def prompt_tokens_per_second(engine: LlamaCppEngine, options: SamplingOptions, at_once: int, words: int) -> float:
    async def one() -> int:
        scored = 0
        async for event in engine.generate(prompt(words), options):
            if isinstance(event, PromptEcho):
                scored = len(event.logprobs)
            if isinstance(event, Finished):
                assert not options.echo or scored == event.prompt_tokens, (scored, event.prompt_tokens)
                return event.prompt_tokens
        raise AssertionError("no Finished event")

    start = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(at_once)))
    return sum(counts) / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=300, help="words per prompt (300: about 400 tokens)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians (3)")
    args = parser.parse_args()
    engine = LlamaCppEngine(LlamaCppConfig(str(default_model_path()), context_size=2048, threads=args.threads,
                                           slots=4, nice=10))  # fmt: skip
    await engine.start()
    rows = {
        "prefill (max_tokens 1)": SamplingOptions(max_tokens=1, temperature=0),
        "echo, logprobs 1": SamplingOptions(max_tokens=0, temperature=0, echo=True, logprobs=True, top_logprobs=1),
        "echo, logprobs 5": SamplingOptions(max_tokens=0, temperature=0, echo=True, logprobs=True, top_logprobs=5),
    }
    try:
        await prompt_tokens_per_second(engine, rows["echo, logprobs 1"], 1, args.words)  # warm-up
        results: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for at_once in (1, 4):
                for name, options in rows.items():
                    rate = await prompt_tokens_per_second(engine, options, at_once, args.words)
                    results.setdefault((name, at_once), []).append(rate)
    finally:
        await engine.close()
    base = {s: statistics.median(results[("prefill (max_tokens 1)", s)]) for s in (1, 4)}
    print(f"\nprompts of {args.words} words, {args.threads} threads, median of {args.rounds} rounds: prompt tokens/s\n")
    print(f"{'':<26} {'1 at once':>10} {'x prefill':>10} {'4 at once':>10} {'x prefill':>10}")
    for name in rows:
        one, four = (statistics.median(results[(name, s)]) for s in (1, 4))
        print(f"{name:<26} {one:>10.1f} {one / base[1]:>10.2f} {four:>10.1f} {four / base[4]:>10.2f}")


if __name__ == "__main__":
    asyncio.run(main())
