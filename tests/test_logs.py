"""`--log-format json` on every component of a real fleet: every line each one writes to stderr, from its
start through requests (served, streamed, refused, failed) to its stop, is one JSON object; the access
line and the node's request line carry their fields as keys."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.cluster import MODEL, Cluster, Proc, smollm_entry, wait_for
from tests.test_up import start_up

pytestmark = [pytest.mark.model, pytest.mark.cluster]

CHAT = [{"role": "user", "content": "Say hello."}]
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")  # mesh.logs' text format


@dataclass
class Fleet:
    cluster: Cluster
    http: str
    components: list[Proc]  # control plane, node, edge (not etcd: its own JSON logger)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = Cluster(tmp_path_factory.mktemp("json-logs"))
    json_logs = ("--log-format", "json")
    try:
        cluster.start_etcd()
        cluster.start_controlplane(3, *json_logs)
        cluster.start_node("node-a", [smollm_entry()], extra=json_logs)
        _, http, _ = cluster.start_edge(*json_logs)
        cluster.wait_model_state(http, MODEL, timeout=120)
        yield Fleet(cluster, http, [p for p in cluster.procs if p.name != "etcd"])
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()


def entries(proc: Proc) -> list[dict[str, Any]]:
    """Every line of the component's log as JSON; a line that is not fails the test, naming it."""
    out = []
    for number, line in enumerate(proc.log_path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{proc.name} line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict) and {"time", "level", "component", "logger", "message"} <= entry.keys(), line
        out.append(entry)
    return out


def test_every_line_of_every_component_is_json_through_requests_and_stop(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.http}/v1", api_key="unused", max_retries=0, timeout=120)
    client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=4, extra_headers={"X-Request-Id": "json-chat"}
    )  # fmt: skip
    for _ in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True):
        pass
    client.embeddings.create(model=MODEL, input=["hello"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    bad = httpx.post(f"{fleet.http}/v1/chat/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400
    edge = next(p for p in fleet.components if p.name.startswith("edge"))
    node = next(p for p in fleet.components if p.name.startswith("node"))
    access = [e for e in entries(edge) if e["logger"] == "fleetlm.access" and e.get("request_id") == "json-chat"]
    assert len(access) == 1
    line = access[0]
    assert line["model"] == MODEL and line["node"] == "node-a" and line["status"] == 200
    assert line["completion_tokens"] >= 1 and line["prompt_tokens"] >= 1
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    served = [e for e in entries(node) if e["logger"] == "fleetlm.node.requests" and e.get("request_id") == "json-chat"]
    assert len(served) == 1 and served[0]["outcome"] == "ok" and served[0]["replica"] == f"node-a/{MODEL}"
    # Stopping writes its lines too (shutdown order, "stopped"): still JSON.
    for proc in reversed(fleet.components):
        proc.stop()
    for proc in fleet.components:
        lines = entries(proc)
        assert len(lines) >= 2, proc.name
        assert any("stopped" in e["message"] for e in lines), proc.name


def test_uvicorns_lines_carry_no_colour_codes(fleet: Fleet) -> None:
    edge = next(p for p in fleet.components if p.name.startswith("edge"))
    uvicorn = [e for e in entries(edge) if e["logger"].startswith("uvicorn")]
    assert any("Uvicorn running on" in e["message"] for e in uvicorn), uvicorn  # its start-up line, at least
    for entry in uvicorn:
        assert "color_message" not in entry, entry  # the same message again, with ANSI escapes
        assert not any("\x1b" in str(value) for value in entry.values()), entry


def test_fleetlm_up_passes_log_format_json_to_every_component(tmp_path: Path) -> None:
    """`fleetlm up --log-format json`: the lines of all three components in its output are JSON (its own
    banner stays text), and none is in the text format."""
    up, ports, log = start_up(tmp_path, "--log-format", "json")
    try:
        reply = httpx.post(f"http://127.0.0.1:{ports['http']}/v1/completions", timeout=120,
                           json={"model": MODEL, "prompt": "One", "max_tokens": 2})  # fmt: skip
        assert reply.status_code == 200
        request_id = reply.headers["x-request-id"]
        # The access line is written as the request ends, just after the client has its answer: 15 s.
        wait_for(lambda: request_id in log.read_text(), 15, "the access line")
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    lines = log.read_text(errors="replace").splitlines()
    text_format = [line for line in lines if TEXT_LINE.match(line)]
    assert not text_format, text_format[:5]
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    components = {e["component"].split(":")[0] for e in entries if "component" in e}
    assert {"controlplane", "node", "edge"} <= components, components
    assert any(e.get("logger") == "fleetlm.access" and e.get("request_id") == request_id for e in entries)
