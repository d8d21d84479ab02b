"""The cost of metrics and tracing: the same request load through fleets that differ only in observability.

    .venv/bin/python -m bench.observability_bench [--rounds 3] [--tokens 128] [--one-fleet]

One run, four fleets side by side on this machine (each: etcd, a control plane, one node agent with
SmolLM2 on llama.cpp, one edge), idle but for the row being measured:
- off: no metrics anywhere (edge --no-metrics, no metrics port on the control plane and the node), no tracing;
- off again: a second such fleet, so that the table shows what two equal fleets differ by;
- metrics: Prometheus metrics on every service (the default), scraped once a second as Prometheus would;
- metrics + tracing: the same, and OpenTelemetry spans from the edge and the node exported over OTLP/gRPC to
  a receiver in this process (a real gRPC TraceService server that keeps what it is sent).
Each round measures the four in turn (rows interleaved, medians over the rounds): time to first token of
40 short streamed requests one at a time, and 8 concurrent streams of `--tokens` tokens (aggregate
tokens/s). The issue's aim: >= 0.98x throughput and <= +0.2 ms to the first token with both on.

Latencies on a 2-core machine that also runs the engine move by a millisecond from run to run; what the
hooks cost is also read off directly: the CPU time the edge and the node spend per short request (their
processes' user + system time over 200 more requests, the scrapes' own cost included, one a second as
Prometheus would), which no other fleet's noise reaches.

With --one-fleet instead: the hooks side by side in one fleet (see one_fleet), the lean HTTP client of
bench.inference_bench, the edges' short requests taking turns one by one; and, since a difference of
medians moves with the machine, the median of the request-by-request differences against off (each turn's
pair taken moments apart) with its 95% confidence interval, which narrows with the number of rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.auth_bench import MODEL, measure, stream
from bench.inference_bench import Stream, grpc_stream, lean_sse_stream, rotated
from launcher.default_model import default_model_path
from tests.cluster import Cluster, Proc
from tests.test_tracing import OtlpReceiver

# "off again" is a second fleet like the first: the difference between the two is what two fleets differ by
# with nothing changed (the noise floor of the comparison).
ROWS = ("off", "off again", "metrics", "metrics + tracing")


def cpu_seconds(cluster: Cluster, prefix: str) -> float:
    """User + system CPU seconds of the cluster's process whose name starts with `prefix` (edge, node)."""
    return next(p for p in cluster.procs if p.name.startswith(prefix)).cpu_seconds()


async def cpu_per_request(client: httpx.AsyncClient, cluster: Cluster, url: str, n: int = 200) -> dict[str, float]:
    """Milliseconds of edge and node CPU per short streamed request (n of them, one at a time)."""
    before = {part: cpu_seconds(cluster, part) for part in ("edge", "node")}
    start = time.perf_counter()
    for _ in range(n):
        await stream(client, url, "", 4)
    per_request = time.perf_counter() - start
    cpu = {f"{part}_cpu": (cpu_seconds(cluster, part) - before[part]) * 1000 / n for part in before}
    return cpu | {"seconds_per_request": per_request / n}


def scrape_cost(cluster: Cluster, edge_url: str, n: int = 50) -> dict[str, float]:
    """Milliseconds of CPU the edge and the node spend on one scrape of their /metrics (n back to back, with
    no traffic and no other scraper)."""
    urls = {"edge": f"{edge_url}/metrics", "node": cluster.metrics["bench"]}
    out = {}
    with httpx.Client(timeout=5) as client:
        for part, url in urls.items():
            client.get(url).raise_for_status()
            before = cpu_seconds(cluster, part)
            for _ in range(n):
                client.get(url).raise_for_status()
            out[part] = (cpu_seconds(cluster, part) - before) * 1000 / n
    return out


def start_fleet(work: Path, name: str, path: Path, receiver: OtlpReceiver) -> tuple[Cluster, str, list[str]]:
    """A fleet of its own for one row; returns it, its edge's HTTP base and the metrics URLs to scrape."""
    env = None
    if name == "metrics + tracing":
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"}
    directory = work / name.replace(" ", "").replace("+", "-")
    directory.mkdir()
    cluster = Cluster(directory, env=env)
    off = name.startswith("off")
    cluster.start_etcd()
    cluster.start_controlplane(10, "--log-level", "WARNING", *(["--metrics-listen", ""] if off else []))
    entry = {"name": MODEL, "path": str(path), "format": "gguf", "context_size": 2048, "max_running_requests": 8}
    cluster.start_node("bench", [entry], threads=2, extra=("--metrics-listen", "") if off else ())
    _, http, _ = cluster.start_edge("--log-level", "WARNING", *(["--no-metrics"] if off else []))
    cluster.wait_model_state(http, MODEL, timeout=120)
    scraped = [] if off else [f"{http}/metrics", *cluster.metrics.values()]
    return cluster, http, scraped


def scrape_every_second(urls: list[str], stop: threading.Event) -> None:
    """What a Prometheus server does to the fleet while it serves: GET /metrics of each service each second."""
    with httpx.Client(timeout=5) as client:
        while not stop.wait(1.0):
            for url in urls:
                try:
                    client.get(url)
                except httpx.HTTPError:
                    pass


async def one_fleet(args: argparse.Namespace, path: Path, receiver: OtlpReceiver) -> None:
    """The hooks side by side in ONE fleet, so that no two rows differ by their engine: three edges (no
    metrics; metrics; metrics + tracing) in front of the same node, then three nodes alike called directly
    over gRPC. The edges' short requests take turns one by one, the nodes' come 40 in a row; medians of the
    rounds; the metrics scraped once a second as Prometheus would; CPU per request of the process measured."""
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"}
    variants = {"off": (None, False), "metrics": (None, True), "metrics + tracing": (otel, True)}
    entry = {"name": MODEL, "path": str(path), "format": "gguf", "context_size": 2048, "max_running_requests": 8}
    stop = threading.Event()
    scraped: list[str] = []  # the scraper's list: it reads it each second, this adds to it
    scraper = threading.Thread(target=scrape_every_second, args=(scraped, stop), daemon=True)
    scraper.start()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.start_etcd()
            cluster.start_controlplane(10, "--log-level", "WARNING")
            node, _ = cluster.start_node("bench", [entry], threads=2, extra=("--metrics-listen", ""))
            rows: dict[str, tuple[Stream, Proc]] = {}
            for name, (env, on) in variants.items():
                flags = ("--log-level", "WARNING", *(() if on else ("--no-metrics",)))
                with cluster.env_added(env):
                    proc, http, grpc_address = cluster.start_edge(*flags)
                cluster.wait_model_state(http, MODEL, timeout=120)
                if on:
                    scraped.append(f"{http}/metrics")
                # the minimal client: httpx's own 1-3 ms per request would only add noise to the difference
                rows[f"edge, {name}, HTTP"] = (lean_sse_stream(http, MODEL), proc)
                rows[f"edge, {name}, gRPC"] = (grpc_stream(grpc_address), proc)
            edges = await side_by_side(rows, args.rounds, args.tokens, interleave=True)  # one engine behind them
            node.stop()  # the nodes' rows: three nodes alike but for their hooks, each called directly
            scraped.clear()
            rows = {}
            for name, (env, on) in variants.items():
                node_id = name.replace(" + ", "-")
                flags = () if on else ("--metrics-listen", "")
                with cluster.env_added(env):
                    proc, address = cluster.start_node(node_id, [entry], extra=flags)
                if on:
                    scraped.append(cluster.metrics[node_id])
                rows[f"node, {name}, gRPC"] = (grpc_stream(address), proc)
            for stream_, _ in rows.values():
                await until_it_answers(stream_)
            nodes = await side_by_side(rows, args.rounds, args.tokens, interleave=False)  # an engine each
        finally:
            stop.set()
            cluster.close()
    print(f"\nThe hooks side by side in one fleet (SmolLM2-135M Q4_1, 2 threads), medians of {args.rounds} rounds"
          f" of 40 short streamed requests and of 8 concurrent streams of {args.tokens} tokens; the CPU of the"
          " process the row is about\n")  # fmt: skip
    for table in (edges, nodes):
        for name, (ttft, cpu, agg, _) in table.items():
            base = table[_off(name)]
            print(f"{name:<36}{ttft:8.2f} ms  {ttft - base[0]:+6.2f} ms vs off  CPU {cpu:6.2f} ms/request"
                  f"  8 streams {agg:6.1f} tok/s  {agg / base[2]:5.3f}x off")  # fmt: skip
    print("\nThe edges' first token against off, request by request (each of the edges' turns gives one pair: the"
          " row's request and off's over the same protocol, moments apart): the median of the differences and its"
          " 95% confidence interval\n")  # fmt: skip
    for name, (*_, samples) in edges.items():
        if name != _off(name):
            median, low, high = paired_difference(samples, edges[_off(name)][3])
            print(f"{name:<36}{median:+6.2f} ms  [{low:+.2f}, {high:+.2f}]  over {len(samples)} pairs")


def _off(name: str) -> str:
    """The row without the hooks that `name` is compared with."""
    return name.replace("metrics + tracing", "off").replace("metrics", "off")


def paired_difference(row: list[float], base: list[float]) -> tuple[float, float, float]:
    """The median of row[i] - base[i] and a distribution-free 95% confidence interval for it: the order
    statistics at n/2 -+ 1.96 sqrt(n)/2 of the sorted differences (the sign test's interval)."""
    differences = sorted(a - b for a, b in zip(row, base, strict=True))
    n = len(differences)
    half = 1.96 * n**0.5 / 2
    low, high = max(0, int(n / 2 - half)), min(n - 1, int(n / 2 + half + 0.5))
    return statistics.median(differences), differences[low], differences[high]


async def until_it_answers(stream_: Stream) -> None:
    """Wait (bounded) for a node's replica to load: its first request that succeeds."""
    for _ in range(240):
        try:
            await stream_(2)
            return
        except Exception:
            await asyncio.sleep(0.5)
    raise TimeoutError("a node's replica did not become ready in 2 minutes")


async def side_by_side(
    rows: dict[str, tuple[Stream, Proc]], rounds: int, tokens: int, interleave: bool
) -> dict[str, tuple[float, float, float, list[float]]]:
    """Per row: the median over `rounds` of (median first token of 40 short requests in ms, the row's process
    CPU ms per request, the aggregate tokens/s of 8 concurrent streams of `tokens`), and every first token
    in the order of the turns (with `interleave`, the rows' i-th were taken moments apart). With `interleave` (rows
    in front of one engine) the short requests of the rows take turns one by one, so that a drift of the
    machine's speed reaches every row alike; else each row's 40 in a row (requests that take turns between
    engines wait for an idle engine to wake: 16 ms to the first token instead of 9-10 here). The rounds
    rotate the order."""
    for stream_, _ in rows.values():
        for _ in range(5):
            await stream_(4)  # warm-up
    firsts: dict[str, list[float]] = {name: [] for name in rows}
    every: dict[str, list[float]] = {name: [] for name in rows}
    cpus: dict[str, list[float]] = {name: [] for name in rows}
    aggs: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for round_ in range(rounds):
        order = rotated(names, round_)
        samples: dict[str, list[float]] = {name: [] for name in rows}
        cpu = dict.fromkeys(rows, 0.0)
        for turn in [order] * 40 if interleave else [[name] * 40 for name in order]:
            for name in turn:
                stream_, proc = rows[name]
                before = proc.cpu_seconds()
                samples[name].append((await stream_(4)).ttft * 1000)
                cpu[name] += proc.cpu_seconds() - before
        for name in order:
            every[name] += samples[name]
            firsts[name].append(statistics.median(samples[name]))
            cpus[name].append(cpu[name] * 1000 / 40)
            stream_, _ = rows[name]
            start = time.perf_counter()
            runs = await asyncio.gather(*(stream_(tokens) for _ in range(8)))
            aggs[name].append(sum(run.tokens for run in runs) / (time.perf_counter() - start))
        print(f"round {round_ + 1} of {rounds} done", file=sys.stderr)
    return {
        name: (
            statistics.median(firsts[name]),
            statistics.median(cpus[name]),
            statistics.median(aggs[name]),
            every[name],
        )
        for name in rows
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument(
        "--one-fleet",
        action="store_true",
        help="instead: the hooks side by side in one fleet (three edges before one node, then three nodes)",
    )
    args = parser.parse_args()
    if args.one_fleet:
        receiver = OtlpReceiver()
        try:
            await one_fleet(args, default_model_path(), receiver)
        finally:
            receiver.close()
        return
    path = default_model_path()
    receiver = OtlpReceiver()
    clusters: list[Cluster] = []
    stop = threading.Event()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            urls: dict[str, str] = {}
            fleets: dict[str, Cluster] = {}
            scraped: list[str] = []
            for name in ROWS:
                cluster, urls[name], metrics = start_fleet(Path(tmp), name, path, receiver)
                clusters.append(cluster)
                fleets[name] = cluster
                scraped += metrics
            scraper = threading.Thread(target=scrape_every_second, args=(scraped, stop), daemon=True)
            scraper.start()
            results: dict[str, list[dict[str, float]]] = {name: [] for name in ROWS}
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=16)) as client:
                for url in urls.values():
                    await stream(client, url, "", 8)  # warm-up
                for round_ in range(args.rounds):
                    for name in ROWS:
                        row = await measure(client, urls[name], "", args.tokens)
                        row |= await cpu_per_request(client, fleets[name], urls[name])
                        results[name].append(row)
                    print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
            stop.set()
            scraper.join()
            scrapes = scrape_cost(fleets["metrics"], urls["metrics"])
    finally:
        stop.set()
        for cluster in clusters:
            cluster.close()
        receiver.close()
    table = {name: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for name, runs in results.items()}
    base = table["off"]
    print(f"\nSmolLM2-135M Q4_1, 2 threads, one node per fleet; medians of {args.rounds} rounds")
    print(f"spans received by the OTLP receiver: {len(receiver.spans)}\n")
    print(f"{'':<20}{'TTFT p50 ms':>12}{'8 streams tok/s':>17}{'TTFT vs off':>13}{'tok/s vs off':>14}"
          f"{'edge CPU ms/req':>17}{'node CPU ms/req':>17}")  # fmt: skip
    for name, row in table.items():
        print(f"{name:<20}{row['ttft']:>12.2f}{row['agg']:>17.1f}{row['ttft'] - base['ttft']:>+11.2f}ms"
              f"{row['agg'] / base['agg']:>13.3f}x{row['edge_cpu']:>17.2f}{row['node_cpu']:>17.2f}")  # fmt: skip
    # The CPU rows with metrics include the scrapes made while they ran, one a second: their share per request.
    share = {part: scrapes[part] * table["metrics"]["seconds_per_request"] for part in scrapes}
    print(
        f"\none scrape of /metrics (no traffic, 50 back to back): edge {scrapes['edge']:.2f} ms CPU, node"
        f" {scrapes['node']:.2f} ms CPU; at one scrape a second that is {share['edge']:.3f} ms (edge) and"
        f" {share['node']:.3f} ms (node) of each request's CPU above; Prometheus' default interval is 15 s"
    )


if __name__ == "__main__":
    asyncio.run(main())
