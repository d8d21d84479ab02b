"""The cost of API keys and limits: the same fleet through an edge without auth and one that requires keys.

    .venv/bin/python -m bench.auth_bench [--rounds 3] [--tokens 128]

One run, one fleet (etcd, a control plane with a fleet secret and an admin token, one node agent with
SmolLM2 on llama.cpp) and two edges on it: one that requires API keys (`--require-api-key`) and one that
does not. Two keys are measured on the second: one without limits (the check alone) and one with all three
limits set (requests and tokens per minute, concurrency), high enough never to refuse, so every request
pays for the check, the fleet-wide allowance and the token charge. Each round measures the rows in turn
(rows interleaved, medians over the rounds): time to first token of 40 short streamed requests one at a
time, and 8 concurrent streams of `--tokens` tokens (aggregate tokens/s). Then the check alone,
in-process: `EdgeAuth.admit` with 10,000 keys in the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import yaml

from controlplane.api_keys import key_hash, new_secret
from edge.auth import EdgeAuth
from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from launcher.default_model import default_model_path
from mesh.auth import create_secret_file
from tests.cluster import Cluster, wait_for

MODEL = "smollm2-135m"
PROMPT = "Write a very long story."
KEYED = "edge, API key with rpm, tpm and concurrency limits"


async def stream(client: httpx.AsyncClient, url: str, key: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first text, tokens) of one streamed completion."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    start, first, n = time.perf_counter(), 0.0, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as reply:
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("text"):
                    first = first or time.perf_counter() - start
                    n += 1
    return first, n


async def measure(client: httpx.AsyncClient, url: str, key: str, tokens: int) -> dict[str, float]:
    firsts = [(await stream(client, url, key, 4))[0] for _ in range(40)]
    start = time.perf_counter()
    runs = await asyncio.gather(*(stream(client, url, key, tokens) for _ in range(8)))
    wall = time.perf_counter() - start
    return {"ttft": statistics.median(firsts) * 1000, "agg": sum(n for _, n in runs) / wall}


async def check_alone() -> tuple[float, float]:
    """p50 and p99 (µs) of admitting a request with a limited key, 10,000 keys in the table."""
    secret = b"s" * 32
    auth = EdgeAuth(secret, [grpc.aio.insecure_channel("127.0.0.1:9")], "bench")  # never dialled: allowance held
    records, key = [], ""
    for i in range(10_000):
        s = new_secret()
        record = admin_pb2.ApiKeyRecord(hash=key_hash(secret, s))
        record.key.id, record.key.name = f"k{i}", "bench"
        if i == 1234:
            key = s
            record.key.limits.requests_per_minute = 10**6
            record.key.limits.tokens_per_minute = 10**9
            record.key.limits.max_concurrent_requests = 100
        records.append(record)
    auth.table.replace(admin_pb2.WatchApiKeysResponse(keys=records))
    await auth.admit(f"Bearer {key}", MODEL)  # the first lease of allowance
    samples = []
    for _ in range(20_000):
        t = time.perf_counter_ns()
        admitted = await auth.admit(f"Bearer {key}", MODEL)
        admitted.finish(10)
        samples.append((time.perf_counter_ns() - t) / 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    path = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        secret, token = work / "fleet.secret", work / "admin.token"
        create_secret_file(secret)
        create_secret_file(token)
        catalog = work / "deployments.yaml"
        catalog.write_text(yaml.safe_dump({"models": [{"name": MODEL, "path": str(path), "format": "gguf",
                                                       "context_size": 2048, "min_replicas": 1, "max_replicas": 1,
                                                       "max_running_requests": 8}]}))  # fmt: skip
        cluster = Cluster(work)
        try:
            cluster.start_etcd()
            cluster.start_controlplane(10, "--deployments", str(catalog), "--log-level", "WARNING",
                                       "--auth-secret-file", str(secret), "--admin-token-file", str(token))  # fmt: skip
            cluster.start_node("bench", models_dirs=[str(path.parent)], threads=2)
            _, open_url, _ = cluster.start_edge("--log-level", "WARNING")
            _, keyed_url, _ = cluster.start_edge("--log-level", "WARNING", "--require-api-key",
                                                 "--auth-secret-file", str(secret))  # fmt: skip
            cluster.wait_model_state(open_url, MODEL)
            admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cluster.controlplane))
            request = admin_pb2.CreateApiKeyRequest(name="bench")
            request.limits.requests_per_minute = 100_000
            request.limits.tokens_per_minute = 100_000_000
            request.limits.max_concurrent_requests = 64
            reply = admin.CreateApiKey(request, metadata=(("authorization", f"Bearer {token.read_text().strip()}"),))
            key = reply.secret
            plain = admin.CreateApiKey(
                admin_pb2.CreateApiKeyRequest(name="bench-no-limits"),
                metadata=(("authorization", f"Bearer {token.read_text().strip()}"),),
            ).secret

            def serves() -> bool:
                got = httpx.get(f"{keyed_url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=2)
                return got.status_code == 200 and any(m["state"] == "ready" for m in got.json()["data"])

            wait_for(serves, 60, "the keyed edge to know the key", None)
            rows = {
                "edge, no auth": (open_url, ""),
                "edge, API key without limits": (keyed_url, plain),
                "edge, API key with rpm, tpm and concurrency limits": (keyed_url, key),
            }
            results: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=16)) as client:
                for url, k in rows.values():
                    await stream(client, url, k, 8)  # warm-up
                for round_ in range(args.rounds):
                    for name, (url, k) in rows.items():
                        results[name].append(await measure(client, url, k, args.tokens))
                    print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
        finally:
            cluster.close()
    p50, p99 = await check_alone()
    table = {name: {m: statistics.median(r[m] for r in runs) for m in runs[0]} for name, runs in results.items()}
    base = table["edge, no auth"]
    print(f"\nSmolLM2-135M Q4_1, 2 threads, one node; medians of {args.rounds} rounds\n")
    print(f"{'':<54}{'TTFT p50 ms':>12}{'8 streams tok/s':>17}{'TTFT vs off':>13}{'tok/s vs off':>14}")
    for name, row in table.items():
        print(f"{name:<54}{row['ttft']:>12.1f}{row['agg']:>17.1f}{row['ttft'] - base['ttft']:>+12.1f}ms"
              f"{row['agg'] / base['agg']:>13.2f}x")  # fmt: skip
    print(f"\nthe check alone (EdgeAuth.admit, 10,000 keys, all three limits): p50 {p50:.1f} us, p99 {p99:.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
