"""What logprobs cost the llama.cpp engine: tokens/s with none, with each token's logprob, and with 20
alternatives a token, for 1 and 8 concurrent streams, side by side in one run.

    .venv/bin/python -m bench.logprobs_bench [--tokens 128] [--threads 2] [--rounds 3]

The engine alone (no gRPC, no edge), so that the figure is the engine's own cost. Rows are measured in
turns, round after round, and the table gives medians (this machine's speed drifts over minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from launcher.default_model import default_model_path
from node_agent.engines.base import Finished, SamplingOptions
from node_agent.engines.llamacpp import LlamaCppConfig, LlamaCppEngine


async def tokens_per_second(engine: LlamaCppEngine, options: SamplingOptions, streams: int) -> float:
    async def one(i: int) -> int:
        async for event in engine.generate(f"Story number {i}. Once upon a time", options):
            if isinstance(event, Finished):
                return event.completion_tokens
        raise AssertionError("no Finished event")

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts) / (time.perf_counter() - start)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request (128)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians (3)")
    args = parser.parse_args()
    engine = LlamaCppEngine(LlamaCppConfig(str(default_model_path()), context_size=512, threads=args.threads,
                                           slots=8, nice=10))  # fmt: skip
    await engine.start()
    rows = {
        "no logprobs": SamplingOptions(max_tokens=args.tokens, temperature=0),
        "logprobs": SamplingOptions(max_tokens=args.tokens, temperature=0, logprobs=True),
        "logprobs, top_logprobs 20": SamplingOptions(
            max_tokens=args.tokens, temperature=0, logprobs=True, top_logprobs=20
        ),
    }
    try:
        results: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for streams in (1, 8):
                for name, options in rows.items():
                    results.setdefault((name, streams), []).append(await tokens_per_second(engine, options, streams))
    finally:
        await engine.close()
    base = {s: statistics.median(results[("no logprobs", s)]) for s in (1, 8)}
    print(f"\n{args.tokens} tokens per request, greedy, {args.threads} threads, median of {args.rounds} rounds\n")
    print(f"{'':<28} {'1 stream tok/s':>15} {'x none':>8} {'8 streams tok/s':>16} {'x none':>8}")
    for name in rows:
        one, eight = (statistics.median(results[(name, s)]) for s in (1, 8))
        print(f"{name:<28} {one:>15.1f} {one / base[1]:>8.2f} {eight:>16.1f} {eight / base[8]:>8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
