"""The cost of tool calling in the llama.cpp engine, in-process.

    .venv/bin/python -m bench.tools_bench [--rounds 3]

One engine (SmolLM2-135M, 8 slots, 2 threads). Rows interleaved, medians over the rounds:
- one stream alone (temperature 0.8, 128 tokens at most), a story asked for: without tools; the same
  prompt text as with tools but no tools (the generic format's section as a plain system message: what
  the longer prompt alone costs); with two tools under "auto" (that section, a lazy grammar that waits for
  `<tool_call>` while the model writes text, and the reply parsed); and with "required" (a grammar from
  the first token, calls until max_tokens): time to the first token or call with the prompt computed
  (cold) and with it in the prefix cache (warm: the same tools sent again, as an agent does), and
  tokens/s after the first;
- 8 streams together, 7 greedy and 1 free vs 7 greedy and 1 with tools "required": aggregate tokens/s and
  the time of one decode step (the request with tools is one more sequence of the same step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from bench.grammar_bench import one
from node_agent.engines.base import (
    Chat,
    Function,
    Message,
    SamplingOptions,
    ToolChoice,
)
from node_agent.engines.tool_calls import template_input
from tests.model_engine import default_model_engine

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TIMEZONE = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
TOOLS = (
    Function("get_weather", "Get the current weather in a city", json.dumps(WEATHER)),
    Function("get_time", "Get the current time in a timezone", json.dumps(TIMEZONE)),
)
ASK = (Message("user", "Write a long story about a lighthouse keeper."),)
AUTO = Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("auto"))
KINDS = {
    "no tools": Chat(ASK),
    "tools' prompt only": Chat(tuple(Message(m["role"], m["content"]) for m in template_input(AUTO, False)[0])),
    "tools, auto": AUTO,
    "tools, required": Chat(ASK, tools=TOOLS, tool_choice=ToolChoice("required")),
}
PROMPTS = [
    "Once upon a time, in a small village,",
    "The history of the Roman empire",
    "A recipe for pancakes:",
    "def fibonacci(n):",
    "In 1969, astronauts",
    "My favourite book is",
    "The three primary colors are",
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    async with default_model_engine(8) as engine:
        stats = engine.stats
        assert stats is not None, "the batched engine keeps step counts"
        for chat in KINDS.values():
            await one(engine, chat, SamplingOptions(max_tokens=8))  # warm-up, and the prompts cached alike
        alone: dict[str, list[tuple[float, float, float]]] = {name: [] for name in KINDS}
        together: dict[str, list[tuple[float, float]]] = {"7 greedy + 1 free": [], "7 greedy + 1 with tools": []}
        for r in range(args.rounds):
            for name, chat in KINDS.items():
                # Every slot's cache made to hold something else, so that the next prompt is computed whole.
                await asyncio.gather(
                    *(one(engine, f"{i} {p}", SamplingOptions(max_tokens=1)) for i, p in enumerate(PROMPTS * 2))
                )
                options = SamplingOptions(max_tokens=128, temperature=0.8, seed=r)
                cold, _, _ = await one(engine, chat, options)
                warm, tokens, rest = await one(engine, chat, options)
                alone[name].append((cold * 1000, warm * 1000, (tokens - 1) / rest if rest > 0 else 0.0))
            for name, chat in (
                ("7 greedy + 1 free", KINDS["no tools"]),
                ("7 greedy + 1 with tools", KINDS["tools, required"]),
            ):
                jobs = [one(engine, p, SamplingOptions(max_tokens=128, temperature=0)) for p in PROMPTS]
                jobs.append(one(engine, chat, SamplingOptions(max_tokens=128, temperature=0.8, seed=r)))
                steps, start = stats.steps, time.perf_counter()
                runs = await asyncio.gather(*jobs)
                wall = time.perf_counter() - start
                together[name].append((sum(n for _, n, _ in runs) / wall, wall / max(1, stats.steps - steps)))
    print(f"\nSmolLM2-135M, in-process llama.cpp engine, 8 slots, 2 threads; medians of {args.rounds} rounds\n")
    base = statistics.median(r[2] for r in alone["no tools"])
    for name, rows in alone.items():
        cold, warm, rate = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"1 stream, {name:<18} TTFT p50 cold {cold:6.1f} ms, warm {warm:6.1f} ms   {rate:6.1f} tok/s"
              f" ({rate / base:.2f}x)")  # fmt: skip
    base = statistics.median(r[0] for r in together["7 greedy + 1 free"])
    for name, measured in together.items():
        rate, step = statistics.median(r[0] for r in measured), statistics.median(r[1] for r in measured)
        print(f"8 streams, {name:<24} {rate:6.1f} tok/s ({rate / base:.2f}x)   {step * 1000:5.1f} ms per decode step")


if __name__ == "__main__":
    asyncio.run(main())
