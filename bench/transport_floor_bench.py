"""The floor under fleetlm's first-token figures: what grpc.aio itself costs on this machine, with no fleetlm code.

    .venv/bin/python -m bench.transport_floor_bench [--pairs 400] [--gaps-ms 0 50] [--tokens 4]

Three processes on the services' event loop (uvloop), as fleetlm's are: a server that answers a
server-streaming call with `--tokens` small messages at once; a proxy that forwards each call it gets to
that server; and the client here, which measures the time to the first message. The rows:
  direct            the client calls the server: one gRPC hop, what a client of the node agent pays
  proxy, a call each  through the proxy, which opens a call to the server for every call it gets, as the
                    edge opens a node's Generate stream for every request
  proxy, one stream  through the proxy, which sends every call's request over one long-lived
                    bidirectional stream to the server and hands the answers back by id: what a design
                    that multiplexes requests over one edge -> node stream would save on grpc.aio's
                    per-call work
Each pair (one request per row, in a shuffled order) is measured back to back, then with an idle pause
before each request (`--gaps-ms`): a client with think time finds the processes asleep, and waking them costs
every hop. Figures: median time to first message per row, and the median of each request's difference
from the direct request of its pair, with a 95% interval (bootstrap over pairs).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc

from mesh.lifecycle import free_port, loop_factory

T = TypeVar("T")
SERVICE = "floor.Floor"
PAYLOAD = b"x" * 40  # about one token's delta event
END = b"E"
MORE = b"T"


def _run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


async def serve(port: int, tokens: int) -> None:
    """The server: `Generate` streams `tokens` messages; `Multiplexed` answers each request that comes on the
    stream (an 8-byte id, then the request) with `tokens` messages carrying that id and whether it is the last."""

    async def generate(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(tokens):
            yield PAYLOAD

    async def multiplexed(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        async for request in requests:
            call_id = request[:8]
            for i in range(tokens):
                await context.write(call_id + (END if i == tokens - 1 else MORE) + PAYLOAD)

    await _serve(
        port,
        {
            "Generate": grpc.unary_stream_rpc_method_handler(generate),
            "Multiplexed": grpc.stream_stream_rpc_method_handler(multiplexed),
        },
    )


async def _serve(port: int, methods: dict[str, grpc.RpcMethodHandler]) -> None:
    """A grpc.aio server of SERVICE's `methods` on loopback `port`, until the process is killed."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def proxy(port: int, upstream: int) -> None:
    """The proxy: `Generate` opens a call upstream per call; `Multiplexed` forwards over one shared stream."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{upstream}")
    await channel.channel_ready()
    per_call = channel.unary_stream(f"/{SERVICE}/Generate")
    shared = channel.stream_stream(f"/{SERVICE}/Multiplexed")()
    waiting: dict[bytes, asyncio.Queue[bytes]] = {}
    numbered = iter(range(1, 1 << 62))

    async def dispatch() -> None:
        while True:
            message = await shared.read()
            if message is grpc.aio.EOF:
                return
            queue = waiting.get(message[:8])
            if queue is not None:
                queue.put_nowait(message[8:])

    dispatcher = asyncio.get_running_loop().create_task(dispatch())

    async def generate(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for message in per_call(request):
            yield message

    async def multiplexed(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call_id = struct.pack(">Q", next(numbered))
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        waiting[call_id] = queue
        try:
            await shared.write(call_id + request)
            while True:
                message = await queue.get()
                yield message[1:]
                if message[:1] == END:
                    return
        finally:
            del waiting[call_id]

    try:
        await _serve(
            port,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(generate),
                "Multiplexed": grpc.unary_stream_rpc_method_handler(multiplexed),
            },
        )
    finally:
        dispatcher.cancel()


def interval(diffs: list[float], draws: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of the median of `diffs` (seeded: the same figures print the same)."""
    rng = random.Random(7)
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws)]


ROWS = ("direct", "proxy, a call each", "proxy, one stream")


async def measure(server: int, proxied: int, pairs: int, gap: float) -> dict[str, list[float]]:
    """`pairs` pairs of requests (one per row, shuffled), after 20 unmeasured ones; ms to the first message."""
    direct_channel = grpc.aio.insecure_channel(f"127.0.0.1:{server}")
    proxy_channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxied}")
    calls = {
        ROWS[0]: direct_channel.unary_stream(f"/{SERVICE}/Generate"),
        ROWS[1]: proxy_channel.unary_stream(f"/{SERVICE}/Generate"),
        ROWS[2]: proxy_channel.unary_stream(f"/{SERVICE}/Multiplexed"),
    }
    for channel in (direct_channel, proxy_channel):
        await asyncio.wait_for(channel.channel_ready(), 30)
    rng = random.Random(11)
    firsts: dict[str, list[float]] = {name: [] for name in ROWS}
    for i in range(pairs + 20):
        order = list(ROWS)
        rng.shuffle(order)
        for name in order:
            if gap:
                await asyncio.sleep(gap)
            start = time.perf_counter()
            first = 0.0
            async for _ in calls[name](b"hello"):
                if not first:
                    first = time.perf_counter() - start
            if i >= 20:
                firsts[name].append(first * 1000)
    await direct_channel.close()
    await proxy_channel.close()
    return firsts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400, help="measured pairs per gap (400)")
    parser.add_argument("--gaps-ms", type=float, nargs="+", default=[0, 50], help="idle pauses to measure (0 50)")
    parser.add_argument("--tokens", type=int, default=4, help="messages a call answers with (4)")
    parser.add_argument("--role", choices=("server", "proxy"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "server":
        _run(serve(args.port, args.tokens))
        return
    if args.role == "proxy":
        _run(proxy(args.port, args.upstream))
        return
    server, proxied = free_port(), free_port()
    module = [sys.executable, "-m", "bench.transport_floor_bench", "--tokens", str(args.tokens)]
    children = [
        subprocess.Popen([*module, "--role", "server", "--port", str(server)]),
        subprocess.Popen([*module, "--role", "proxy", "--port", str(proxied), "--upstream", str(server)]),
    ]
    try:
        for gap_ms in args.gaps_ms:
            firsts = _run(measure(server, proxied, args.pairs, gap_ms / 1000))
            direct = firsts[ROWS[0]]
            pause = f"{gap_ms:g} ms idle before each request" if gap_ms else "back to back"
            print(f"\ngRPC (grpc.aio on {loop_factory().__module__.split('.')[0]}), {args.pairs} pairs, {pause}:")
            for name in ROWS:
                line = f"  {name:<20} first message {statistics.median(firsts[name]):6.3f} ms"
                if name != ROWS[0]:
                    diffs = [a - b for a, b in zip(firsts[name], direct, strict=True)]
                    low, high = interval(diffs)
                    line += f"   {statistics.median(diffs):+6.3f} ms above direct [{low:+.3f}, {high:+.3f}]"
                print(line)
    finally:
        for child in children:
            child.kill()
            child.wait(10)


if __name__ == "__main__":
    main()
