"""A node SIGKILLed in the middle of streams, with real processes: etcd, a control plane, two node agents
with the real model, an edge, and the official openai client. Two deployments of two replicas each, one
with continue_on_failure and one without; two streams of each are running (the edge spreads them over
both nodes, counting its own in-flight work) when one node is killed. The opted-in streams both end with
a finish_reason and no error (one of them continued on the other node); of the others, the one that was
on the killed node ends with an explicit error event. Then the same for chat streams: the continued one
is, at temperature 0, the very reply an uncut run gives, with the same usage.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from launcher.default_model import default_model_path
from tests.cluster import Cluster, Proc, wait_for

pytestmark = [pytest.mark.model, pytest.mark.cluster]

CONTINUED = "smol-continue"
PLAIN = "smol-plain"
NODES = ("ce-1", "ce-2")
PROMPT = "Count: 1, 2, 3, 4, 5, 6,"  # at temperature 0 the model counts on: a duplicated or lost piece shows
MAX_TOKENS = 400  # long enough (seconds on a busy 2-core machine) that the kill lands mid-stream
WAIT = 180  # seconds: generous bounds for a machine other test runs share; a normal stream takes ~10 s
# At temperature 0 SmolLM2 counts on for hundreds of tokens, sure of each one. (In prose, where its two
# most likely tokens can be close, a continuation may pick the other one: the partial reply is read in
# one batch, which llama.cpp rounds differently from decoding it token by token. tests/test_continue_chat.py
# checks that the continued conversation is exactly the tokens generated.)
QUESTION = "Count from 1 to 100, separated by commas."
CHAT_MAX_TOKENS = 300


@dataclass
class Fleet:
    cluster: Cluster
    http: str
    nodes: dict[str, Proc]


def ready_nodes(admin: admin_pb2_grpc.AdminServiceStub, model: str) -> set[str]:
    listed = admin.ListDeployments(admin_pb2.ListDeploymentsRequest(), timeout=5).deployments
    status = next((d for d in listed if d.deployment.spec.name == model), None)
    if status is None:
        return set()
    return {r.node_id for r in status.replicas if r.state == node_pb2.REPLICA_STATE_READY}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path)
    catalog = tmp_path / "deployments.yaml"
    path = default_model_path()
    common = f"path: {path}, format: gguf, context_size: 1024, min_replicas: 2, max_replicas: 2"
    catalog.write_text(
        f"models:\n  - {{name: {CONTINUED}, {common}, continue_on_failure: true}}\n  - {{name: {PLAIN}, {common}}}\n"
    )
    try:
        cluster.start_etcd()
        cluster.start_controlplane(3, "--deployments", str(catalog))
        nodes = {n: cluster.start_node(n, models_dirs=[str(path.parent)], threads=1)[0] for n in NODES}
        _, http, _ = cluster.start_edge()
        admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(cluster.controlplane))
        for model in (CONTINUED, PLAIN):
            wait_for(lambda m=model: ready_nodes(admin, m) == set(NODES), WAIT, f"{model} ready on both nodes")

        def in_edge_table() -> bool:
            listed = httpx.get(f"{http}/v1/models", timeout=2).json()["data"]
            return all(any(m["id"] == name and m["ready_replicas"] == 2 for m in listed) for name in (CONTINUED, PLAIN))

        wait_for(in_edge_table, 60, "both replicas of both models in the edge's table")
        yield Fleet(cluster, http, nodes)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


@dataclass
class Stream:
    """One streaming completion (or chat completion), read in its own thread: its first text, then (after
    `go`) the rest."""

    model: str
    chat: bool = False
    started: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    text: str = ""
    before_kill: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    usage: openai.types.CompletionUsage | None = None
    error: str = ""

    def run(self, http: str) -> None:
        client = openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=WAIT)
        try:
            stream: openai.Stream[Any]
            if self.chat:
                stream = client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": QUESTION}],
                    max_tokens=CHAT_MAX_TOKENS,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            else:
                stream = client.completions.create(
                    model=self.model,
                    prompt=PROMPT,
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    seed=7,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    self.text += (choice.delta.content or "") if self.chat else choice.text
                    if chunk.choices[0].finish_reason:
                        self.finish_reasons.append(chunk.choices[0].finish_reason)
                if chunk.usage is not None:
                    self.usage = chunk.usage
                if self.text and not self.started.is_set():
                    self.started.set()
                    self.go.wait(WAIT)
                    self.before_kill = self.text
        except (openai.APIError, httpx.HTTPError) as exc:
            self.error = str(exc)
        finally:
            self.started.set()


def numbers(text: str) -> list[int]:
    """The whole numbers the model counted (the last one may be cut by max_tokens, so it is left out)."""
    return [int(n) for n in re.findall(r"\d+", text)[:-1]]


def run_streams(fleet: Fleet, streams: list[Stream], kill: str) -> None:
    """Start the streams, SIGKILL node `kill` once each has its first text, let them finish."""
    threads = [threading.Thread(target=s.run, args=(fleet.http,), daemon=True) for s in streams]
    for thread in threads:
        thread.start()
    try:
        for stream in streams:
            assert stream.started.wait(WAIT), "a stream never started"
        assert all(s.text and not s.error and not s.finish_reasons for s in streams), [
            (s.model, s.text[:40], s.error, s.finish_reasons) for s in streams
        ]
        fleet.nodes[kill].signal(signal.SIGKILL)
    finally:
        for stream in streams:
            stream.go.set()
        for thread in threads:
            thread.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a stream hung"


def test_a_killed_node_s_streams_continue_when_opted_in_and_end_with_an_error_when_not(fleet: Fleet) -> None:
    streams = [Stream(CONTINUED), Stream(CONTINUED), Stream(PLAIN), Stream(PLAIN)]
    run_streams(fleet, streams, "ce-1")
    continued, plain = streams[:2], streams[2:]
    report = [(s.model, s.error, s.finish_reasons, s.usage, s.text[-60:]) for s in streams]
    # Opted in: both streams end with one finish_reason and no error, their text counts on with nothing
    # repeated or skipped across the cut, and the usage counts the original prompt (the same for both).
    for stream in continued:
        assert stream.error == "" and len(stream.finish_reasons) == 1, report
        assert stream.text.startswith(stream.before_kill), report
        counted = numbers(stream.text)
        assert counted == list(range(7, 7 + len(counted))) and len(counted) > 20, report
        assert stream.usage is not None, report
    assert continued[0].usage and continued[1].usage
    assert continued[0].usage.prompt_tokens == continued[1].usage.prompt_tokens, report
    for stream in continued:
        assert stream.usage is not None
        if stream.finish_reasons == ["length"]:
            # Tokens before the cut are counted by tokenizing the text again: within a few of max_tokens.
            assert abs(stream.usage.completion_tokens - MAX_TOKENS) <= 3, report
    # Not opted in: the stream on the killed node ends with an explicit error, the other one finishes.
    errors = [s for s in plain if s.error]
    assert len(errors) == 1, report
    assert "unreachable" in errors[0].error or "BACKEND_UNAVAILABLE" in errors[0].error, report
    assert [s.finish_reasons for s in plain if not s.error] == [["length"]] or [
        s.finish_reasons for s in plain if not s.error
    ] == [["stop"]], report
    health = httpx.get(f"{fleet.http}/health", timeout=10).json()
    assert health["continued_streams"] == 1, health
    log = fleet.cluster.logs()
    assert re.search(r"request req_\w+: node ce-1 failed after \d+ characters .*continued on node ce-2", log), (
        "the continuation was not logged with its request id"
    )


def test_a_killed_node_s_chat_stream_goes_on_on_the_other_replica_as_if_never_cut(fleet: Fleet) -> None:
    # The uncut reply, from the other deployment of the same model and settings: the replicas of CONTINUED
    # carry no load from it (which could make the edge put both streams below on one node).
    uncut = Stream(PLAIN, chat=True)
    uncut.go.set()
    uncut.run(fleet.http)
    assert uncut.error == "" and len(uncut.finish_reasons) == 1 and uncut.usage is not None, uncut
    assert len(uncut.text) > 200, uncut.text  # long enough for the kill below to land mid-stream
    # Two at once: the edge puts one on each node (it counts its own in-flight work); ce-1 is killed.
    streams = [Stream(CONTINUED, chat=True), Stream(CONTINUED, chat=True)]
    run_streams(fleet, streams, "ce-1")
    report = [(s.error, s.finish_reasons, s.usage, s.before_kill[-40:], s.text[-60:]) for s in streams]
    health = httpx.get(f"{fleet.http}/health", timeout=10).json()
    assert health["continued_streams"] == 1, (health, report)
    for stream in streams:
        # One stream each, no error, one finish_reason. Greedy decoding of the same model on the same
        # conversation: the continued reply (the partial reply rendered as an assistant turn to go on with)
        # is the uncut one, and the tokens before the cut, counted by tokenizing it, add up to its usage.
        assert stream.error == "" and stream.finish_reasons == uncut.finish_reasons, report
        assert stream.text.startswith(stream.before_kill) and stream.text == uncut.text, report
        counted = numbers(stream.text)
        assert counted == list(range(1, 1 + len(counted))) and len(counted) > 50, report
        assert stream.usage is not None, report
        assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (
            uncut.usage.prompt_tokens,
            uncut.usage.completion_tokens,
        ), report
        if stream.finish_reasons == ["length"]:
            assert stream.usage.completion_tokens == CHAT_MAX_TOKENS, report
    log = fleet.cluster.logs()
    assert re.search(r"request req_\w+: node ce-1 failed after \d+ characters .*continued on node ce-2", log), (
        "the continuation was not logged with its request id"
    )
