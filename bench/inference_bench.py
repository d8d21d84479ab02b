"""Inference benchmark: fleetlm against the engine called directly and against llama_cpp.server.

    .venv/bin/python -m bench.inference_bench [--tokens 128] [--threads 2] [--rounds 3] [--replicas 1]
                                              [--llama-server PATH]
                                              [--ttft-only [--gap-ms MS] [--asyncio-edge] [--plain-edge]
                                               [--sessions-apart]]

Same model (SmolLM2-135M-Instruct Q4_1), same thread count, same greedy prompt, in one run. Every
server is started first and stays up (idle, it costs nothing); then each round measures every row in
turn, and the table gives each figure's median over the rounds, so a machine whose speed drifts over
minutes (this one does, by +-15%) favours no row. The rows:
  direct        llama-cpp-python in-process (the limit for one stream; it cannot batch)
  llama_cpp.server  llama-cpp-python's OpenAI server (what a user would pick instead)
  fleetlm HTTP  the edge's OpenAI API over SSE (httpx, the OpenAI SDK's client): edge -> node agent -> llama.cpp;
                with --ttft-only also through a minimal HTTP/1.1 client, the edge's cost without httpx's
  fleetlm gRPC  the edge's InferenceService.Generate stream, same path
  node gRPC     the node agent's InferenceService.Generate called directly (no edge): what the edge adds
  llama-server  llama.cpp's own C++ server with 8 slots, when --llama-server is given
  asyncio edge  with --ttft-only --asyncio-edge: HTTP and gRPC through a second edge on the standard
                library's event loop (FLEETLM_EVENT_LOOP=asyncio), beside the first on uvloop
  plain calls   with --ttft-only --plain-edge: HTTP (minimal client) and gRPC through a second edge that
                makes a gRPC call to the node per request (--no-node-streams), as before 2026-12-06, beside
                the first, which carries them all on one stream per node (MultiplexService). Then, paired:
                `--pairs` requests to each of the two edges (gRPC and HTTP) and the node, interleaved in a
                shuffled order (they share one engine), and the median of each request's difference from
                the node's request of its set, with a 95% interval: what the stream saves, resolved below
                the rounds' noise
  nice fleet    with --ttft-only --nice-fleet: a second fleet whose node runs llama.cpp's compute threads at
                nice 10 (FLEETLM_NODE_ENGINE_IDLE=false), as before 2026-12-06, not in the SCHED_IDLE class
  sessions apart  with --ttft-only --sessions-apart: a second fleet whose processes each run in a session of
                their own, as they did before 2026-12-05; with Linux's autogroup scheduling each session is a
                CPU group of its own, so the engine's low-priority threads no longer yield to the edge
For 1 stream: TTFT p50 and decode tokens/s. For 8 concurrent streams: aggregate tokens/s, TTFT p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import yaml

from bench.transport_floor_bench import interval
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.default_model import default_model_path
from tests.cluster import Cluster, Proc, free_port, wait_for

PROMPT = "Write a very long story."
MODEL = "smollm2-135m"


@dataclass
class Run:
    ttft: float  # seconds to the first text
    duration: float  # seconds from request to last text
    tokens: int


Stream = Callable[[int], Awaitable[Run]]


def rotated(names: list[str], round_: int) -> list[str]:
    """`names` starting at another one each round, so that no row always follows the same row."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def measure(stream: Stream, tokens: int, concurrency: int = 8) -> dict[str, float]:
    """One round for one row: time to first token from 20 short requests, the decode rate of one long
    request, then `concurrency` long requests at once."""
    firsts = [(await stream(4)).ttft for _ in range(20)]
    single = await stream(tokens)
    start = time.perf_counter()
    runs = await asyncio.gather(*(stream(tokens) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {
        "ttft_1": statistics.median(firsts) * 1000,
        "tps_1": (single.tokens - 1) / (single.duration - single.ttft),
        "agg_8": sum(r.tokens for r in runs) / wall,
        "ttft_8_p50": percentile([r.ttft for r in runs], 50) * 1000,
        "ttft_8_p99": percentile([r.ttft for r in runs], 99) * 1000,
    }


def direct_stream(threads: int) -> Stream:
    import llama_cpp

    # Flash attention on, as the node's context has it (llama.cpp's default, "auto", is on for the CPU):
    # llama-cpp-python's Llama turns it off by default, which made this row another engine than the node's.
    llm = llama_cpp.Llama(
        str(default_model_path()),
        n_ctx=2048,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        verbose=False,
    )
    # One context, so requests take turns, as they must without batching; and every call comes from one
    # thread: llama.cpp's OpenMP keeps a team of worker threads per calling thread, and the idle teams of
    # other callers spin on the same cores (measured here: 94 tokens/s from one thread, 31 once eight
    # threads had taken turns).
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="direct")

    def blocking(tokens: int, start: float) -> Run:
        first = 0.0
        chunks = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, repeat_penalty=1.0, stream=True)
        for chunk in chunks:
            if chunk["choices"][0]["text"]:
                first = first or time.perf_counter() - start
        return Run(first, time.perf_counter() - start, tokens)

    async def stream(tokens: int) -> Run:
        start = time.perf_counter()  # before the queue: waiting for the context is part of the latency
        return await asyncio.get_running_loop().run_in_executor(worker, blocking, tokens, start)

    return stream


def sse_stream(base_url: str, model: str) -> Stream:
    # One client with a connection pool, as an application holds one: a new client per request would
    # add its own set-up (an SSL context, a TCP handshake) to every time to first token.
    client = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=16))

    async def stream(tokens: int) -> Run:
        # repeat_penalty: llama_cpp.server's own default is 1.1; every row decodes plain greedy.
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
                "repeat_penalty": 1.0}  # fmt: skip
        start = time.perf_counter()
        first, last, finish = 0.0, 0.0, None
        for attempt in range(2):
            try:
                async with client.stream("POST", f"{base_url}/v1/completions", json=body) as reply:
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        choice = event["choices"][0] if event.get("choices") else {}
                        if choice.get("text"):
                            last = time.perf_counter() - start
                            first = first or last
                        finish = choice.get("finish_reason") or finish
                break
            except httpx.RemoteProtocolError:
                # llama-server closes a kept-alive connection after 5 requests; a pooled client that
                # picks it up in that moment sends again on a new one, as real clients do.
                if attempt or first:
                    raise
        assert finish == "length", f"generation ended early ({finish}): the figures would be wrong"
        return Run(first, last, tokens)

    return stream


def lean_sse_stream(base_url: str, model: str) -> Stream:
    """The same SSE request through a minimal HTTP/1.1 client on asyncio streams (kept-alive connections,
    one per request in flight; the chunked body decoded by hand): what the server path costs without the
    client library's own per-request work (httpx's adds 1-3 ms here, for every server alike)."""
    host, _, port = base_url.removeprefix("http://").rpartition(":")
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, start: float) -> Run:
        writer.write(head)
        status = await reader.readuntil(b"\r\n\r\n")
        if not status.startswith(b"HTTP/1.1 200") or b"chunked" not in status.lower():
            raise RuntimeError(f"unexpected reply: {status[:200]!r}")
        first, last, finish, pending = 0.0, 0.0, None, b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not line.startswith(b"data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("text"):
                    last = time.perf_counter() - start
                    first = first or last
                finish = choice.get("finish_reason") or finish
        await reader.readexactly(2)  # the last chunk's CRLF
        assert finish == "length", f"generation ended early ({finish}): the figures would be wrong"
        return Run(first, last, 0)

    async def stream(tokens: int) -> Run:
        body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
                           "repeat_penalty": 1.0}).encode()  # fmt: skip
        head = (b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s") % (host.encode(), len(body), body)  # fmt: skip
        while idle and idle[-1][0].at_eof():
            idle.pop()[1].close()
        connection = idle.pop() if idle else await asyncio.open_connection(host, int(port))
        start = time.perf_counter()
        try:
            run = await one(*connection, head, start)
        except (asyncio.IncompleteReadError, ConnectionError):
            # a kept-alive connection the server closed while idle (uvicorn: after 5 s): a new one, once
            connection[1].close()
            connection = await asyncio.open_connection(host, int(port))
            run = await one(*connection, head, start := time.perf_counter())
        idle.append(connection)
        return Run(run.ttft, run.duration, tokens)

    return stream


def grpc_stream(address: str) -> Stream:
    channel = grpc.aio.insecure_channel(address)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)

    async def stream(tokens: int) -> Run:
        request = inference_pb2.GenerateRequest(
            model=MODEL, prompt=PROMPT, sampling=inference_pb2.SamplingParams(max_tokens=tokens, temperature=0)
        )
        start = time.perf_counter()
        first, last, n = 0.0, 0.0, 0
        async for response in stub.Generate(request, timeout=300):
            if response.HasField("delta") and response.delta.text:
                last = time.perf_counter() - start
                first = first or last
            elif response.HasField("result"):
                n = response.result.usage.completion_tokens
        assert n == tokens, f"generated {n} tokens, not {tokens}"
        return Run(first, last, n)

    return stream


def start_http_server(argv: list[str], ready_url: str, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    wait_for(lambda: httpx.get(ready_url, timeout=1).status_code == 200, 120, argv[0], None)
    return proc


def llama_cpp_server(model_path: str, threads: int, log: Path) -> tuple[subprocess.Popen[bytes], Stream]:
    port = free_port()
    server = start_http_server(
        [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--n_threads", str(threads),
         "--n_threads_batch", str(threads), "--n_ctx", "2048", "--port", str(port), "--model_alias", MODEL,
         # By default a new request interrupts the one streaming; queue them instead, as a user serving
         # several clients would.
         "--interrupt_requests", "False"],
        f"http://127.0.0.1:{port}/v1/models", log,
    )  # fmt: skip
    return server, sse_stream(f"http://127.0.0.1:{port}", MODEL)


def start_llama_server(
    binary: str, model_path: str, threads: int, log: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    """llama.cpp's llama-server with 8 slots of 2048 tokens (fleetlm's deployment here); its base URL."""
    port = free_port()
    server = start_http_server(
        [binary, "-m", model_path, "-t", str(threads), "-np", "8", "-c", str(8 * 2048), "--port", str(port), *extra],
        # /v1/models answers while the model is still loading; /health waits for it
        f"http://127.0.0.1:{port}/health",
        log,
    )
    return server, f"http://127.0.0.1:{port}"


def llama_server(binary: str, model_path: str, threads: int, log: Path) -> tuple[subprocess.Popen[bytes], Stream]:
    server, url = start_llama_server(binary, model_path, threads, log)
    return server, sse_stream(url, MODEL)


def start_fleetlm(cluster: Cluster, model_path: str, threads: int, replicas: int = 1) -> tuple[str, str, str]:
    """etcd, a control plane, `replicas` node agents (one replica each) and an edge; returns the edge's HTTP
    and gRPC addresses and the first node's."""
    catalog = cluster.dir / "deployments.yaml"
    entry = {"name": MODEL, "path": model_path, "format": "gguf", "context_size": 2048,
             "min_replicas": replicas, "max_replicas": replicas, "max_running_requests": 8}  # fmt: skip
    catalog.write_text(yaml.safe_dump({"models": [entry]}))
    cluster.start_etcd()
    cluster.start_controlplane(10, "--deployments", str(catalog), "--log-level", "WARNING")
    nodes = [
        cluster.start_node(f"bench-{i}", models_dirs=[str(Path(model_path).parent)], threads=threads)[1]
        for i in range(replicas)
    ]
    _, http, grpc_address = cluster.start_edge("--log-level", "WARNING")
    cluster.wait_model_state(http, MODEL)
    if replicas > 1:
        wait_for(lambda: ready_replicas(http) >= replicas, 120, f"{replicas} ready replicas", None)
    return http, grpc_address, nodes[0]


def ready_replicas(http: str) -> int:
    models = httpx.get(f"{http}/v1/models", timeout=5).json()["data"]
    return next((int(m["ready_replicas"]) for m in models if m["id"] == MODEL), 0)


DIRECT = "direct (llama-cpp-python in-process)"
ALTERNATIVE = "llama_cpp.server"
FLEETLM_HTTP = "fleetlm, OpenAI HTTP (SSE) through the edge"
FLEETLM_GRPC = "fleetlm, gRPC through the edge"
NODE_GRPC = "fleetlm node agent, gRPC, no edge"
LEAN_HTTP = "fleetlm HTTP (SSE), minimal client"
ASYNCIO_HTTP = "fleetlm HTTP, edge on the asyncio loop"
ASYNCIO_GRPC = "fleetlm gRPC, edge on the asyncio loop"
APART_HTTP = "sessions apart: HTTP (SSE) through the edge"
APART_LEAN = "sessions apart: HTTP (SSE), minimal client"
APART_GRPC = "sessions apart: gRPC through the edge"
APART_NODE = "sessions apart: node agent, gRPC, no edge"
PLAIN_LEAN = "plain calls: HTTP (SSE), minimal client"
PLAIN_GRPC = "plain calls: gRPC through the edge"
NICE_LEAN = "engine at nice 10: HTTP (SSE), minimal client"
NICE_GRPC = "engine at nice 10: gRPC through the edge"
NICE_NODE = "engine at nice 10: node agent, gRPC, no edge"


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    table = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    direct, alternative = table[DIRECT], table[ALTERNATIVE]
    print(f"\n{args.tokens} tokens per request, greedy, {args.threads} threads, SmolLM2-135M-Instruct Q4_1, "
          f"fleetlm with {args.replicas} replica(s), "
          f"median of {args.rounds} rounds\n")  # fmt: skip
    print(f"{'':<46} {'1 stream':>31} {'8 concurrent streams':>47}")
    header = ["TTFT p50 ms", "decode tok/s", "aggregate tok/s", "TTFT p50 ms", "TTFT p99 ms"]
    ratios = ["x direct 1-stream", "x llama_cpp.server"]
    print(f"{'':<46} " + " ".join(f"{h:>15}" for h in header) + " " + " ".join(f"{h:>19}" for h in ratios))
    for name, r in table.items():
        cells = [r["ttft_1"], r["tps_1"], r["agg_8"], r["ttft_8_p50"], r["ttft_8_p99"]]
        ratio = [r["agg_8"] / direct["tps_1"], r["agg_8"] / alternative["agg_8"]]
        print(f"{name:<46} " + " ".join(f"{c:>15.1f}" for c in cells) + " " + " ".join(f"{x:>19.2f}" for x in ratio))
    for name in (FLEETLM_HTTP, FLEETLM_GRPC, NODE_GRPC):
        r = table[name]
        line = (f"\n{name}: 1 stream {r['tps_1'] / direct['tps_1']:.2f}x the direct decode rate, "
                f"TTFT {r['ttft_1'] - direct['ttft_1']:+.1f} ms against direct")  # fmt: skip
        if "llama-server (C++, 8 slots)" in table:
            line += f"; 8 streams {r['agg_8'] / table['llama-server (C++, 8 slots)']['agg_8']:.2f}x llama-server"
        print(line, end="")
    node = table[NODE_GRPC]["ttft_1"]
    http, grpc_ = table[FLEETLM_HTTP]["ttft_1"] - node, table[FLEETLM_GRPC]["ttft_1"] - node
    print(
        f"\nthe edge's own share of TTFT (against the node called directly): HTTP {http:+.1f} ms, gRPC {grpc_:+.1f} ms"
    )


def start_plain_edge(cluster: Cluster) -> tuple[Proc, str, str]:
    """A second edge in front of the same fleet that makes a gRPC call to the node per Generate request
    (FLEETLM_EDGE_NODE_STREAMS=false), where the first carries them on one stream."""
    with cluster.env_added({"FLEETLM_EDGE_NODE_STREAMS": "false"}):
        return cluster.start_edge("--log-level", "WARNING")


def start_asyncio_edge(cluster: Cluster) -> tuple[Proc, str, str]:
    """A second edge in front of the same fleet, on the standard library's event loop (FLEETLM_EVENT_LOOP=
    asyncio) where the first runs the default (uvloop): its process and its HTTP and gRPC addresses."""
    with cluster.env_added({"FLEETLM_EVENT_LOOP": "asyncio"}):
        return cluster.start_edge("--log-level", "WARNING")


async def paired_streams(rows: dict[str, Stream], pairs: int, gap: float) -> None:
    """`pairs` sets of one short request per row (rows that share one engine), in a shuffled order; prints
    each row's median difference from NODE_GRPC's request of the same set, and the multiplexing edge's from
    the plain one's, with 95% intervals."""
    rng = random.Random(11)
    firsts: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(pairs):
        order = list(rows)
        rng.shuffle(order)
        for name in order:
            if gap:
                await asyncio.sleep(gap)
            firsts[name].append((await rows[name](4)).ttft * 1000)
    pause = f"{gap * 1000:g} ms idle before each request" if gap else "back to back"
    print(f"\npaired, {pairs} sets of one request per row, {pause} (ms, median of the differences, 95% interval):")
    comparisons = [(name, NODE_GRPC) for name in rows if name != NODE_GRPC]
    comparisons += [(FLEETLM_GRPC, PLAIN_GRPC), (LEAN_HTTP, PLAIN_LEAN)]
    for name, against in comparisons:
        diffs = [a - b for a, b in zip(firsts[name], firsts[against], strict=True)]
        low, high = interval(diffs)
        print(f"  {name:<46} {statistics.median(diffs):+6.2f} [{low:+.2f}, {high:+.2f}] against {against}")


async def ttft_round(
    rows: dict[str, Stream], edge_of: Callable[[str], Proc], n: int = 40, gap: float = 0.0
) -> dict[str, dict[str, float]]:
    """One round of the --ttft-only mode: per row in turn, `n` short requests one at a time, each `gap`
    seconds after the last ended; the median time to first token and the CPU time the row's edge spent per
    request. A row's requests follow each other, not other rows': an engine's OpenMP threads spin for a few
    milliseconds after a request, so a request that follows another engine's would share the cores with
    that engine's spin."""
    figures = {}
    for name, stream in rows.items():  # in the order given: the caller rotates it from round to round
        edge = edge_of(name)
        before = edge.cpu_seconds()
        firsts = []
        for _ in range(n):
            if gap:
                await asyncio.sleep(gap)
            firsts.append((await stream(4)).ttft)
        cpu = edge.cpu_seconds() - before
        figures[name] = {"ttft_1": statistics.median(firsts) * 1000, "edge_cpu": cpu * 1000 / n}
    return figures


def report_ttft(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    """Time to first token only (40 short requests per row and round, one at a time), and
    the CPU time the edge spent per request (on this machine every core is the engine's while it computes,
    so the edge's CPU during a request is time its prefill waits)."""
    table = {name: statistics.median(r["ttft_1"] for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r["edge_cpu"] for r in runs) for name, runs in results.items()}
    pause = f", each {args.gap_ms:g} ms after the last" if args.gap_ms else ", back to back"
    print(f"\ntime to first token, 1 stream, {args.threads} threads, fleetlm with {args.replicas} replica(s), "
          f"median of {args.rounds} rounds of 40 requests{pause}\n")  # fmt: skip
    for name, ttft in table.items():
        node = table[NICE_NODE if name in (NICE_LEAN, NICE_GRPC, NICE_NODE) else NODE_GRPC]  # its own fleet's
        print(f"{name:<46} {ttft:8.1f} ms   {ttft - table[DIRECT]:+6.1f} ms against direct   "
              f"{ttft - node:+6.1f} ms against the node   edge CPU {cpu[name]:5.2f} ms/req")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per request (128)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all rows; figures are medians (3)")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="replicas of the model, one per node agent (1); with 2 or more the edge chooses",
    )
    parser.add_argument(
        "--ttft-only",
        action="store_true",
        help="measure only the time to first token of single requests (quick; several replicas)",
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="with --ttft-only: idle milliseconds before each request (0: back to back), as a client with think "
        "time sends them: the processes and the engine's threads are asleep when it comes",
    )
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server binary, for another row")
    parser.add_argument(
        "--sessions-apart",
        action="store_true",
        help="with --ttft-only: four more rows from a second fleet whose processes each run in a session of "
        "their own, as before 2026-12-05 (each its own CPU group under Linux's autogroup scheduling)",
    )
    parser.add_argument(
        "--nice-fleet",
        action="store_true",
        help="with --ttft-only: three more rows from a second fleet whose engine threads run at nice 10, not in"
        " the SCHED_IDLE class (--no-engine-idle), as before 2026-12-06",
    )
    parser.add_argument(
        "--plain-edge",
        action="store_true",
        help="with --ttft-only: two more rows through a second edge that makes a gRPC call to the node per request",
    )
    parser.add_argument(
        "--pairs", type=int, default=150, help="with --plain-edge: sets of paired requests after the rounds (150)"
    )
    parser.add_argument(
        "--asyncio-edge",
        action="store_true",
        help="with --ttft-only: two more rows through a second edge on the standard asyncio event loop",
    )
    args = parser.parse_args()
    model_path = str(default_model_path())
    servers: list[subprocess.Popen[bytes]] = []
    others: list[Cluster] = []
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            rows: dict[str, Stream] = {DIRECT: direct_stream(args.threads)}
            server, rows[ALTERNATIVE] = llama_cpp_server(model_path, args.threads, Path(tmp) / "llama_cpp_server.log")
            servers.append(server)
            if args.llama_server:
                server, stream = llama_server(args.llama_server, model_path, args.threads, Path(tmp) / "llama.log")
                servers.append(server)
                rows["llama-server (C++, 8 slots)"] = stream
            http, grpc_address, node_address = start_fleetlm(cluster, model_path, args.threads, args.replicas)
            rows[FLEETLM_HTTP] = sse_stream(http, MODEL)
            if args.ttft_only:
                rows[LEAN_HTTP] = lean_sse_stream(http, MODEL)
            rows[FLEETLM_GRPC] = grpc_stream(grpc_address)
            rows[NODE_GRPC] = grpc_stream(node_address)
            first_edge = next(p for p in cluster.procs if p.name.startswith("edge"))
            edge_of: dict[str, Proc] = {}  # the edge whose CPU a row reports, when not the first
            if args.asyncio_edge:
                other_edge, other_http, other_grpc = start_asyncio_edge(cluster)
                rows[ASYNCIO_HTTP], rows[ASYNCIO_GRPC] = sse_stream(other_http, MODEL), grpc_stream(other_grpc)
                edge_of.update({ASYNCIO_HTTP: other_edge, ASYNCIO_GRPC: other_edge})
            if args.plain_edge:
                plain_edge, plain_http, plain_grpc = start_plain_edge(cluster)
                rows[PLAIN_LEAN], rows[PLAIN_GRPC] = lean_sse_stream(plain_http, MODEL), grpc_stream(plain_grpc)
                edge_of.update({PLAIN_LEAN: plain_edge, PLAIN_GRPC: plain_edge})
            if args.sessions_apart:
                apart = Cluster(Path(tmp) / "apart", sessions_apart=True)
                others.append(apart)
                apart.dir.mkdir()
                apart_http, apart_grpc, apart_node = start_fleetlm(apart, model_path, args.threads, args.replicas)
                rows[APART_HTTP], rows[APART_LEAN] = sse_stream(apart_http, MODEL), lean_sse_stream(apart_http, MODEL)
                rows[APART_GRPC], rows[APART_NODE] = grpc_stream(apart_grpc), grpc_stream(apart_node)
                apart_edge = next(p for p in apart.procs if p.name.startswith("edge"))
                edge_of.update(dict.fromkeys((APART_HTTP, APART_LEAN, APART_GRPC, APART_NODE), apart_edge))
            if args.nice_fleet:
                nice = Cluster(Path(tmp) / "nice", env={"FLEETLM_NODE_ENGINE_IDLE": "false"})
                others.append(nice)
                nice.dir.mkdir()
                nice_http, nice_grpc, nice_node = start_fleetlm(nice, model_path, args.threads, args.replicas)
                rows[NICE_LEAN], rows[NICE_GRPC] = lean_sse_stream(nice_http, MODEL), grpc_stream(nice_grpc)
                rows[NICE_NODE] = grpc_stream(nice_node)
                nice_edge = next(p for p in nice.procs if p.name.startswith("edge"))
                edge_of.update(dict.fromkeys((NICE_LEAN, NICE_GRPC, NICE_NODE), nice_edge))
            for stream in rows.values():
                await stream(8)  # warm-up
            results: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
            for round_ in range(args.rounds):
                if args.ttft_only:
                    turn = {name: rows[name] for name in rotated(list(rows), round_)}
                    for name, figures in (
                        await ttft_round(turn, lambda name: edge_of.get(name, first_edge), gap=args.gap_ms / 1000)
                    ).items():
                        results[name].append(figures)
                else:
                    for name, stream in rows.items():
                        results[name].append(await measure(stream, args.tokens))
                print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
            if args.ttft_only and args.plain_edge and args.pairs:
                shared = (FLEETLM_GRPC, PLAIN_GRPC, LEAN_HTTP, PLAIN_LEAN, NODE_GRPC)
                await paired_streams({name: rows[name] for name in shared}, args.pairs, args.gap_ms / 1000)
        finally:
            for fleet in (cluster, *others):
                fleet.close()
            for server in servers:
                server.terminate()
                server.wait(30)
    (report_ttft if args.ttft_only else report)(results, args)


if __name__ == "__main__":
    asyncio.run(main())
