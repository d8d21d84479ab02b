"""Continuous arrival: fleetlm against llama.cpp's llama-server when requests keep coming.

    .venv/bin/python -m bench.arrival_bench --llama-server PATH [--clients 8 12] [--requests 48]
                                            [--rounds 3] [--threads 2] [--seed 15] [--probes 12]

`bench.inference_bench` starts 8 streams together and they end together. Real traffic arrives while
others decode: here K clients (8, then 12 > the 8 slots) each send their next request as soon as their
last one ends (a closed loop), client i the requests i, i + K, ... of one list drawn from a fixed seed, so
every row gets the same requests: prompts of mixed length (about half short, ~15 tokens; a third
medium, ~100; the rest long, ~400) and answers of 16-256 tokens, greedy. Aggregate tokens/s counts the
tokens each server reports it generated (its usage), over the wall time of the whole list. The table
prints each row's total: a few greedy answers end (end of text) a little sooner or later on one server
than on the other, as their numerics differ in the last bits; the totals show by how much.

Every server starts first and stays up; each round measures every row in turn (rows interleaved), and
the table gives medians over the rounds. The rows, all with 8 slots, the same model, 2 threads and 2048
tokens of context per slot:
  fleetlm HTTP streamed / non-streamed   the edge's OpenAI API (SSE, or one JSON reply)
  fleetlm gRPC                           the edge's InferenceService.Generate stream
  node gRPC                              the node agent's Generate, no edge
  llama-server streamed / non-streamed   llama.cpp's own C++ server, the same OpenAI requests
Ratios: each fleetlm row against llama-server's row of the same kind (streamed or not).

Then the time to first token of a short prompt while 7 other sequences decode: 7 clients keep long
generations running, and a probe sends `--probes` short prompts one after another (a random pause of
0-80 ms before each, so that they land anywhere in a decode step), per row and round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from bench.inference_bench import MODEL, start_fleetlm, start_llama_server
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.default_model import default_model_path
from tests.cluster import Cluster

ADJECTIVES = ["old", "quiet", "small", "bright", "cold", "distant", "tired", "brave", "silver", "hidden"]
NOUNS = ["sailor", "village", "river", "lantern", "forest", "teacher", "castle", "garden", "storm", "letter",
         "market", "painter", "bridge", "mountain", "kitchen", "traveller"]  # fmt: skip
VERBS = ["found", "watched", "followed", "remembered", "crossed", "carried", "opened", "painted"]
# (share of the requests, sentences of about 8 tokens): short, medium and long prompts
PROMPT_SIZES = [(0.5, 1), (0.35, 12), (0.15, 48)]


@dataclass(frozen=True)
class Job:
    prompt: str
    max_tokens: int


@dataclass
class Reply:
    first: float  # seconds to the first text (streamed) or to the whole reply
    seconds: float
    tokens: int  # completion tokens, as the server counted them


Call = Callable[[Job], Awaitable[Reply]]


def sentence(rng: random.Random) -> str:
    a, b = rng.sample(NOUNS, 2)
    return f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {b}."


def story(rng: random.Random, sentences: int) -> str:
    """A prompt of about 8 tokens a sentence that the model goes on with (a story, not a question)."""
    body = " ".join(sentence(rng) for _ in range(sentences))
    return f"Chapter {rng.randint(1000, 9999)}. {body} Then"


def workload(seed: int, n: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        sentences = rng.choices([s for _, s in PROMPT_SIZES], [w for w, _ in PROMPT_SIZES])[0]
        jobs.append(Job(story(rng, sentences), rng.randint(16, 256)))
    return jobs


def http_call(base_url: str, streamed: bool) -> Call:
    client = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=32))

    async def streamed_call(job: Job) -> Reply:
        body = {"model": MODEL, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
                "repeat_penalty": 1.0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        start = time.perf_counter()
        first, tokens = 0.0, None
        for attempt in range(2):
            try:
                async with client.stream("POST", f"{base_url}/v1/completions", json=body) as reply:
                    reply.raise_for_status()
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if event.get("choices") and event["choices"][0].get("text"):
                            first = first or time.perf_counter() - start
                        if event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
                break
            except httpx.RemoteProtocolError:
                # llama-server closes a kept-alive connection after some requests; a pooled client that
                # picks it up in that moment sends again on a new one, as real clients do.
                if attempt or first:
                    raise
        assert tokens is not None, f"{base_url} sent no usage"
        return Reply(first, time.perf_counter() - start, tokens)

    async def whole_call(job: Job) -> Reply:
        body = {"model": MODEL, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
                "repeat_penalty": 1.0}  # fmt: skip
        start = time.perf_counter()
        for attempt in range(2):
            try:
                reply = await client.post(f"{base_url}/v1/completions", json=body)
                break
            except httpx.RemoteProtocolError:
                if attempt:
                    raise
        reply.raise_for_status()
        seconds = time.perf_counter() - start
        return Reply(seconds, seconds, reply.json()["usage"]["completion_tokens"])

    return streamed_call if streamed else whole_call


def grpc_call(address: str) -> Call:
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.aio.insecure_channel(address))

    async def call(job: Job) -> Reply:
        sampling = inference_pb2.SamplingParams(max_tokens=job.max_tokens, temperature=0)
        request = inference_pb2.GenerateRequest(model=MODEL, prompt=job.prompt, sampling=sampling)
        start = time.perf_counter()
        first, tokens = 0.0, 0
        async for response in stub.Generate(request, timeout=600):
            if response.HasField("delta") and response.delta.text:
                first = first or time.perf_counter() - start
            elif response.HasField("result"):
                tokens = response.result.usage.completion_tokens
        return Reply(first, time.perf_counter() - start, tokens)

    return call


async def closed_loop(call: Call, jobs: list[Job], clients: int) -> dict[str, float]:
    """`clients` clients, client i sending jobs i, i + clients, i + 2 * clients, ..., each when its last
    one has ended. Each client's list is fixed, not taken from a shared queue, so that the last requests,
    which run with fewer beside them, are the same ones in every row."""
    replies: list[Reply] = []

    async def client(mine: list[Job]) -> None:
        for job in mine:
            replies.append(await call(job))

    start = time.perf_counter()
    await asyncio.gather(*(client(jobs[i::clients]) for i in range(clients)))
    wall = time.perf_counter() - start
    tokens = sum(r.tokens for r in replies)
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "req_s": len(replies) / wall,
        "first_p50": statistics.median(r.first for r in replies) * 1000,
        "latency_p50": statistics.median(r.seconds for r in replies) * 1000,
    }


async def busy_first_token(call: Call, probes: int, seed: int) -> float:
    """Median time to the first token of a short prompt (max_tokens 4) while 7 other sequences decode."""
    rng = random.Random(seed)

    async def background(i: int) -> None:
        long = Job(story(random.Random(1000 + i), 1), 1500)  # minutes of decoding: it outlasts the probes
        while True:
            await call(long)

    tasks = [asyncio.ensure_future(background(i)) for i in range(7)]
    try:
        await asyncio.sleep(2.0)  # their short prompts are in and they decode
        firsts = []
        for _ in range(probes):
            await asyncio.sleep(rng.uniform(0, 0.08))
            firsts.append((await call(Job(story(rng, 1), 4))).first)
        return statistics.median(firsts) * 1000
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


HTTP_STREAMED = "fleetlm HTTP (SSE) through the edge"
HTTP_WHOLE = "fleetlm HTTP non-streamed through the edge"
GRPC = "fleetlm gRPC through the edge"
NODE = "fleetlm node agent gRPC, no edge"
PLAIN_HTTP = "plain calls: HTTP (SSE) through the edge"
PLAIN_GRPC = "plain calls: gRPC through the edge"
SERVER_STREAMED = "llama-server streamed (C++, 8 slots)"
SERVER_WHOLE = "llama-server non-streamed"
# Each row's reference: llama-server answering the same way.
AGAINST = {HTTP_STREAMED: SERVER_STREAMED, HTTP_WHOLE: SERVER_WHOLE, GRPC: SERVER_STREAMED, NODE: SERVER_STREAMED,
           PLAIN_HTTP: SERVER_STREAMED, PLAIN_GRPC: SERVER_STREAMED}  # fmt: skip
PROBED = [HTTP_STREAMED, GRPC, NODE, SERVER_STREAMED]  # rows whose first token under load is measured


def report(loops: dict[tuple[int, str], list[dict[str, float]]], firsts: dict[str, list[float]],
           args: argparse.Namespace) -> None:  # fmt: skip
    print(
        f"\ncontinuous arrival: {args.requests} requests per row (prompts ~15/100/400 tokens, answers 16-256"
        f" tokens, greedy, seed {args.seed}), {args.threads} threads, 8 slots, median of {args.rounds} rounds"
    )
    header = ["tok/s", "x llama-server", "req/s", "first p50 ms", "latency p50 ms", "tokens"]
    for clients in args.clients:
        print(f"\n{clients} clients{'':<42} " + " ".join(f"{h:>15}" for h in header))
        table = {
            name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for (k, name), runs in loops.items()
            if k == clients
        }
        for name, row in table.items():
            against = table[AGAINST[name]]["tok_s"] if name in AGAINST else row["tok_s"]
            cells = [row["tok_s"], row["tok_s"] / against, row["req_s"], row["first_p50"], row["latency_p50"]]
            print(f"{name:<52} " + " ".join(f"{c:>15.2f}" for c in cells) + f" {row['tokens']:>15.0f}")
        if len({row["tokens"] for row in table.values()}) > 1:
            print("  the rows generated different numbers of tokens: their answers ended differently")
    print(
        f"\nfirst token of a short prompt while 7 other sequences decode, median of {args.probes} probes, "
        "median of the rounds"
    )
    reference = statistics.median(firsts[SERVER_STREAMED])
    for name in firsts:
        value = statistics.median(firsts[name])
        print(f"{name:<52} {value:8.1f} ms   {value - reference:+6.1f} ms against llama-server")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 12], help="closed-loop clients (8 12)")
    parser.add_argument("--requests", type=int, default=48, help="requests per row, round and client count (48)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all rows; figures are medians (3)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (2)")
    parser.add_argument("--seed", type=int, default=15, help="seed of the requests (15)")
    parser.add_argument("--probes", type=int, default=12, help="short prompts per row and round under load (12)")
    parser.add_argument(
        "--plain-edge",
        action="store_true",
        help="two more rows (HTTP streamed, gRPC) through a second edge that makes a gRPC call to the node per"
        " request (--no-node-streams), as before 2026-12-06; the first carries them on one stream per node",
    )
    args = parser.parse_args()
    model_path = str(default_model_path())
    jobs = workload(args.seed, args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        # Without its RAM prompt cache: the rows and rounds send the same prompts again, which new traffic
        # would not, and fleetlm keeps only each slot's last prompt (as llama-server's slots do).
        log = Path(tmp) / "llama.log"
        server, url = start_llama_server(args.llama_server, model_path, args.threads, log, "--cache-ram", "0")
        try:
            http, grpc_address, node_address = start_fleetlm(cluster, model_path, args.threads)
            rows: dict[str, Call] = {
                HTTP_STREAMED: http_call(http, streamed=True),
                HTTP_WHOLE: http_call(http, streamed=False),
                GRPC: grpc_call(grpc_address),
                NODE: grpc_call(node_address),
                SERVER_STREAMED: http_call(url, streamed=True),
                SERVER_WHOLE: http_call(url, streamed=False),
            }
            probed = list(PROBED)
            if args.plain_edge:
                with cluster.env_added({"FLEETLM_EDGE_NODE_STREAMS": "false"}):
                    _, plain_http, plain_grpc = cluster.start_edge("--log-level", "WARNING")
                rows[PLAIN_HTTP], rows[PLAIN_GRPC] = http_call(plain_http, streamed=True), grpc_call(plain_grpc)
                probed += [PLAIN_GRPC]
            for call in rows.values():
                await call(Job(story(random.Random(0), 2), 8))  # warm-up
            loops: dict[tuple[int, str], list[dict[str, float]]] = {(k, n): [] for k in args.clients for n in rows}
            firsts: dict[str, list[float]] = {name: [] for name in probed}
            for round_ in range(args.rounds):
                for clients in args.clients:
                    for name, call in rows.items():
                        loops[clients, name].append(await closed_loop(call, jobs, clients))
                for name in probed:
                    firsts[name].append(await busy_first_token(rows[name], args.probes, args.seed + round_))
                print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
        finally:
            cluster.close()
            server.terminate()
            server.wait(30)
    report(loops, firsts, args)


if __name__ == "__main__":
    asyncio.run(main())
