"""An edge stopped (SIGTERM) while requests run longer than its shutdown grace, with real processes: etcd, a
control plane, a node serving SmolLM2 on llama.cpp, and an edge with a 3 s grace. A streamed completion and
a non-streamed one, each asked for far more tokens than 3 s give, are running when the edge is told to stop.

The edge ends them itself just before its grace is spent, each with a clear error: the stream with an
error event ("this edge is shutting down") and `[DONE]`, the other with a 503 BACKEND_UNAVAILABLE and
Retry-After. Before, the server cut them when the grace ran out: the non-streamed request got a 500
INTERNAL, the stream stopped with no error event and no `[DONE]`, and the edge logged tracebacks
("aclose(): asynchronous generator is already running")."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from tests.cluster import MODEL, Cluster, Proc, smollm_entry

pytestmark = [pytest.mark.model, pytest.mark.cluster]

GRACE = 3
# "Count on" from a list of numbers: SmolLM2 goes on counting far past the grace, whatever it would say next.
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
LONG = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0}


@dataclass
class Fleet:
    cluster: Cluster
    edge: Proc
    http: str
    grpc: str


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path)
    try:
        cluster.start_etcd()
        cluster.start_controlplane()
        cluster.start_node("shut-n1", models=[smollm_entry()], threads=1)
        with cluster.env_added({"FLEETLM_EDGE_SHUTDOWN_GRACE_SECONDS": str(GRACE)}):
            edge, http, grpc_address = cluster.start_edge()
        cluster.wait_model_state(http, MODEL)
        yield Fleet(cluster, edge, http, grpc_address)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def test_requests_running_past_the_grace_end_with_a_clear_error_not_a_cut(fleet: Fleet) -> None:
    streamed: list[str] = []  # the stream's data lines
    whole: dict[str, Any] = {}
    started = threading.Event()

    def stream() -> None:
        body = {**LONG, "stream": True}
        with httpx.stream("POST", f"{fleet.http}/v1/completions", json=body, timeout=60) as reply:
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    streamed.append(line.removeprefix("data: "))
                    started.set()

    def non_streamed() -> None:
        reply = httpx.post(f"{fleet.http}/v1/completions", json=LONG, timeout=60)
        whole.update(status=reply.status_code, retry_after=reply.headers.get("retry-after"), body=reply.json())

    over_grpc: dict[str, Any] = {"deltas": 0}
    grpc_started = threading.Event()

    def grpc_stream() -> None:
        with grpc.insecure_channel(fleet.grpc) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            sampling = inference_pb2.SamplingParams(max_tokens=1500, temperature=0)
            call = stub.Generate(inference_pb2.GenerateRequest(model=MODEL, prompt=PROMPT, sampling=sampling))
            try:
                for event in call:
                    over_grpc["deltas"] += event.HasField("delta")
                    over_grpc["result"] = event.HasField("result")
                    grpc_started.set()
            except grpc.RpcError as exc:
                over_grpc.update(code=exc.code(), details=exc.details())

    threads = [threading.Thread(target=f) for f in (stream, non_streamed, grpc_stream)]
    for thread in threads:
        thread.start()
    assert started.wait(60), "the stream never started"
    assert grpc_started.wait(60), "the gRPC stream never started"
    time.sleep(0.5)  # all three running (one node, four slots)
    stopped_at = time.monotonic()
    fleet.edge.signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a request outlived the edge"
    exit_code = fleet.edge.popen.wait(30)
    took = time.monotonic() - stopped_at

    assert len(streamed) >= 3, streamed
    assert streamed[-1] == "[DONE]", f"the stream was cut without [DONE]: {streamed[-3:]}"
    last = json.loads(streamed[-2])
    assert "shutting down" in last["error"]["message"], last
    assert whole["status"] == 503, whole
    error = whole["body"]["error"]
    assert error["code"] == "BACKEND_UNAVAILABLE" and "shutting down" in error["message"], error
    assert whole["retry_after"] == "1"
    # Over gRPC the same: UNAVAILABLE saying why, after the events sent (not CANCELLED by the server).
    assert over_grpc["deltas"] >= 1 and not over_grpc.get("result"), over_grpc
    assert over_grpc.get("code") == grpc.StatusCode.UNAVAILABLE, over_grpc
    assert "this edge is shutting down" in over_grpc["details"], over_grpc
    assert exit_code == 0 and took < GRACE + 10, (exit_code, took)
    log = fleet.edge.log_path.read_text()
    assert "Traceback" not in log and "aclose()" not in log, log[-3000:]
