"""A node stopped in order (SIGTERM) while requests run longer than its shutdown grace, with real processes:
etcd, a control plane, two node agents serving the real model (two replicas, the default model), an edge,
and each node's shutdown grace set to 2 s. Streamed and non-streamed completions run on both nodes (which
node took each is read from the nodes' metrics, one request at a time) when one node is told to stop.

Just before its grace is spent the node ends the requests it still runs with its own retryable error:
- a non-streamed request (its client waits for the whole reply, so it was sent nothing) runs again from the
  start on the other replica: every one of them succeeds with the reply an uncut run gives;
- a stream (its deployment does not opt in to continue_on_failure) ends with an error event that says the
  node is shutting down, and `[DONE]`: not "unreachable", not a silent cut.

Before, the gRPC server cut them when the grace ran out: the non-streamed requests answered 503
"node … is unreachable" after all their work, and the streams said the node was unreachable.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import wait_for
from tests.test_fleet_faults import MODEL, HaFleet, running_ha_fleet

pytestmark = [pytest.mark.model, pytest.mark.cluster]

GRACE = 2  # the nodes' shutdown grace: requests still running 1 s after SIGTERM are ended by the node
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
# SmolLM2 counts on far past this; long enough to outlive the grace whatever the machine's speed, short
# enough for the replies run again to finish on one node.
MAX_TOKENS = 300
WAIT = 240  # seconds any one request may take on a loaded machine (~20 s here)


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[HaFleet]:
    with running_ha_fleet(tmp_path, {"FLEETLM_NODE_SHUTDOWN_GRACE_SECONDS": str(GRACE)}) as fleet:
        yield fleet


def body(stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}


@dataclass
class Request:
    """One completion through the edge, in its own thread."""

    stream: bool
    node: str = ""  # the node that took it first
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    error: dict[str, Any] = field(default_factory=dict)
    done: bool = False  # a stream's [DONE]
    fingerprint: str = ""  # the node that gave a non-streamed reply

    def run(self, http: str) -> None:
        if not self.stream:
            reply = httpx.post(f"{http}/v1/completions", json=body(False), timeout=WAIT)
            self.status = reply.status_code
            answer = reply.json()
            if reply.status_code == 200:
                choice = answer["choices"][0]
                self.text, self.finish_reason = choice["text"], choice["finish_reason"]
                self.fingerprint = answer.get("system_fingerprint", "")
            else:
                self.error = answer["error"]
            return
        with httpx.stream("POST", f"{http}/v1/completions", json=body(True), timeout=WAIT) as reply:
            self.status = reply.status_code
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    self.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    self.error = event["error"]
                elif event.get("choices"):
                    self.text += event["choices"][0]["text"]
                    self.finish_reason = event["choices"][0]["finish_reason"] or self.finish_reason


def sum_of(url: str, *names: str) -> int:
    """The sum of the samples of MODEL named `names` on a /metrics page."""
    reply = httpx.get(url, timeout=10)
    total = 0.0
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name in names and sample.labels.get("model") == MODEL:
                total += sample.value
    return int(total)


def requests_on(ha: HaFleet, node: str) -> int:
    """Requests node `node` runs or holds waiting now, from its metrics."""
    return sum_of(ha.cluster.metrics[node], "fleetlm_node_requests_running", "fleetlm_node_requests_waiting")


def first_tokens(ha: HaFleet) -> int:
    """Requests whose first token reached the edge, from its metrics (a non-streamed reply's too, though it
    leaves whole)."""
    return sum_of(f"{ha.http}/metrics", "fleetlm_edge_time_to_first_token_seconds_count")


@dataclass
class Running:
    requests: list[Request]
    threads: list[threading.Thread]
    victim: str  # a node that runs both kinds
    reference: Request  # the same request run alone, before

    def join(self) -> None:
        for thread in self.threads:
            thread.join(WAIT)
            assert not thread.is_alive(), "a request hung"

    def summary(self) -> list[Any]:
        return [(r.stream, r.node, r.status, r.finish_reason, r.error.get("message", "")[:120]) for r in self.requests]


def start_on_both_nodes(ha: HaFleet) -> Running:
    """A reference reply, then streams and non-streamed requests alternately, one at a time, each seen
    arriving on a node (which node took which is known, whatever the edge's choice), until one node holds
    both kinds; returned once each has its first token."""
    reference = Request(stream=False)
    reference.run(ha.http)
    assert reference.status == 200 and reference.finish_reason == "length", reference
    requests: list[Request] = []
    threads: list[threading.Thread] = []
    counts = {node: 0 for node in ha.nodes}
    tokens_before = first_tokens(ha)
    victim = ""
    for i in range(12):
        request = Request(stream=i % 2 == 0)
        thread = threading.Thread(target=request.run, args=(ha.http,), daemon=True)
        thread.start()
        requests.append(request)
        threads.append(thread)

        def arrived(request: Request = request) -> bool:
            for node in ha.nodes:
                now = requests_on(ha, node)
                if now > counts[node]:
                    request.node = node
                    counts[node] = now
                    return True
            return False

        wait_for(arrived, 60, f"request {i} running on a node")
        kinds = {node: {r.stream for r in requests if r.node == node} for node in ha.nodes}
        victim = next((node for node, held in kinds.items() if held == {True, False}), "")
        if victim and i >= 3:
            break
    assert victim, [(r.stream, r.node) for r in requests]
    # Each is under way (its first token came): none fails over before its first token instead.
    wait_for(lambda: first_tokens(ha) - tokens_before == len(requests), 60, "every request's first token")
    assert all(not r.status or r.stream for r in requests), "a request ended before the node was stopped"
    return Running(requests, threads, victim, reference)


def assert_outcomes(ha: HaFleet, running: Running, stream_error: str) -> str:
    """Every non-streamed request succeeded with the reply an uncut run gives (those on the victim were run
    again, on the other node: the edge's log says so for each); a stream on the victim ended with an error
    event containing `stream_error`, then [DONE], what it had sent being the start of the reply; the other
    streams finished. The edge's log."""
    victim, reference, summary = running.victim, running.reference, running.summary()
    survivor = next(node for node in ha.nodes if node != victim)
    for request in running.requests:
        if not request.stream:
            assert request.status == 200 and request.text == reference.text, summary
            assert request.fingerprint == survivor or request.node == survivor, summary
            continue
        assert request.status == 200 and request.done, summary
        if request.node == victim:
            assert request.finish_reason is None, summary
            assert request.error.get("code") == "BACKEND_UNAVAILABLE", summary
            assert stream_error in request.error["message"], summary
            assert reference.text.startswith(request.text), summary
        else:
            assert not request.error and request.text == reference.text, summary
    cut = [r for r in running.requests if r.node == victim]
    edge_log = next(p for p in ha.cluster.procs if p.name.startswith("edge")).log_path.read_text()
    again = [line for line in edge_log.splitlines() if f"running it again on node {survivor}" in line]
    assert len(again) == sum(not r.stream for r in cut), again
    return edge_log


def test_requests_outliving_a_node_s_grace_run_again_or_say_the_node_is_shutting_down(ha: HaFleet) -> None:
    running = start_on_both_nodes(ha)
    victim = running.victim
    stopped_at = time.monotonic()
    ha.nodes[victim].signal(signal.SIGTERM)
    exit_code = ha.nodes[victim].popen.wait(GRACE + 30)
    took = time.monotonic() - stopped_at  # the requests run again elsewhere are not the node's to wait for
    running.join()

    edge_log = assert_outcomes(ha, running, f"node {victim} is shutting down")
    assert all("shutting down" in line for line in edge_log.splitlines() if "running it again" in line)
    assert "unreachable" not in edge_log, edge_log[-3000:]
    # The node stopped once its grace was spent, cleanly.
    assert exit_code == 0 and took < GRACE + 15, (exit_code, took)
    node_log = ha.nodes[victim].log_path.read_text()
    assert "Traceback" not in node_log, node_log[-3000:]
    assert "end with 'node is shutting down'" in node_log
    # The control plane takes the node's leaving without an error of its own (its streams' reads, ended
    # as their calls were cancelled, were logged as "Task exception was never retrieved").
    time.sleep(2)
    controlplane_log = ha.proc("controlplane").log_text()
    assert " ERROR " not in controlplane_log and "never retrieved" not in controlplane_log, controlplane_log[-3000:]


def test_a_killed_node_s_non_streamed_requests_run_again_on_the_other_replica(ha: HaFleet) -> None:
    """SIGKILL: nothing is said by the node; the edge's non-streamed requests run again all the same, and
    its streams (not opted in) end with an error event naming the node unreachable."""
    running = start_on_both_nodes(ha)
    ha.nodes[running.victim].signal(signal.SIGKILL)
    running.join()
    # The client is told which node, not where it is: the fleet's addresses are not its to know.
    assert_outcomes(ha, running, f"node {running.victim} is unreachable")
