"""Prometheus metrics of the three services, against a real fleet of processes: etcd, one control plane with
a fleet secret and an admin token, two nodes (node-a serves SmolLM2 with llama.cpp and a model whose weights
are missing; node-b serves nothing), one edge requiring API keys. Known traffic goes through the official
`openai` client and a gRPC stub; each service's /metrics is scraped over HTTP and parsed with
prometheus_client's parser, and the counts are compared with what the clients saw."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc, node_pb2
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.auth import create_secret_file
from tests.cluster import (
    MODEL,
    Cluster,
    Proc,
    fleetlm,
    free_port,
    serves_to_key,
    smollm_entry,
    streamed_chat,
    wait_for,
)

pytestmark = [pytest.mark.model, pytest.mark.cluster]

MISSING = "missing-weights"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, by name and labels."""
    reply = httpx.get(url, timeout=10)
    assert reply.status_code == 200, reply.text
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent: a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@dataclass
class Fleet:
    cluster: Cluster
    http: str
    grpc: str
    admin_token: str
    node_address: str  # node-a's InferenceService

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_token}"),)

    def key(self, name: str, **limits: int) -> str:
        request = admin_pb2.CreateApiKeyRequest(name=name)
        for field, limit in limits.items():
            setattr(request.limits, field, limit)
        stub = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(self.cluster.controlplane))
        return str(stub.CreateApiKey(request, metadata=self.metadata, timeout=30).secret)

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}/v1", api_key=key, max_retries=0, timeout=120)

    def edge(self) -> Samples:
        return scrape(f"{self.http}/metrics")

    def node(self) -> Samples:
        return scrape(self.cluster.metrics["node-a"])

    def log(self, prefix: str) -> Proc:
        """The first process whose name starts with `prefix` ("edge", "node-node-a")."""
        return next(p for p in self.cluster.procs if p.name.startswith(prefix))


def changes(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def log_line(proc: Proc, *texts: str) -> str:
    """The one line of `proc`'s log with every one of `texts` (written as the request ends: waited for)."""
    lines = wait_for(
        lambda: [
            line for line in proc.log_path.read_text(errors="replace").splitlines() if all(t in line for t in texts)
        ],
        15,
        f"{texts} in {proc.name}'s log",
    )
    assert len(lines) == 1, lines
    return str(lines[0])


def tokens_logged(line: str) -> tuple[int, int]:
    found = re.search(r"prompt_tokens=(\d+) completion_tokens=(\d+)", line)
    assert found, line
    return int(found[1]), int(found[2])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("metrics")
    secret_file, token_file = workdir / "fleet.secret", workdir / "admin.token"
    create_secret_file(secret_file)
    create_secret_file(token_file)
    env = {
        "FLEETLM_CP_AUTH_SECRET_FILE": str(secret_file),
        "FLEETLM_CP_ADMIN_TOKEN_FILE": str(token_file),
        "FLEETLM_EDGE_REQUIRE_API_KEY": "true",
        "FLEETLM_EDGE_AUTH_SECRET_FILE": str(secret_file),
    }
    cluster = Cluster(workdir)
    with pytest.MonkeyPatch.context() as patch:
        for name, setting in env.items():
            patch.setenv(name, setting)  # the components are started with this environment
        try:
            cluster.start_etcd()
            cluster.start_controlplane(3)
            missing = smollm_entry(MISSING, path=str(Path("/nonexistent/weights.gguf")))
            _, node_address = cluster.start_node("node-a", [smollm_entry(), missing])
            cluster.start_node("node-b")
            _, http, grpc_address = cluster.start_edge()
            fleet = Fleet(cluster, http, grpc_address, token_file.read_text().strip(), node_address)
            probe = fleet.key("probe")
            wait_for(lambda: serves_to_key(http, probe), 90, f"{http} to serve {MODEL}")
            yield fleet
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            cluster.close()


# --- the edge -------------------------------------------------------------------------------------------------


def test_edge_metrics_is_open_while_api_keys_are_required(fleet: Fleet) -> None:
    assert httpx.post(f"{fleet.http}/v1/completions", json={"model": MODEL}, timeout=10).status_code == 401
    reply = httpx.get(f"{fleet.http}/metrics", timeout=10)
    assert reply.status_code == 200
    assert "fleetlm_edge_requests_total" in reply.text
    assert "flk-" not in reply.text  # no key in it


def test_edge_counts_requests_tokens_and_latencies_as_the_clients_saw_them(fleet: Fleet) -> None:
    key = fleet.key("traffic")
    client = fleet.client(key)
    before = fleet.edge()
    prompt_tokens = completion_tokens = 0
    with_text = 0  # generations whose client received text: each has one first token
    for i in range(3):
        text, prompt, completion = streamed_chat(client, f"Count from {i} to {i + 5}.", 8)
        prompt_tokens += prompt
        completion_tokens += completion
        with_text += bool(text)
    for prompt in ("One, two,", "The capital of France is"):
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        assert completion.usage is not None
        prompt_tokens += completion.usage.prompt_tokens
        completion_tokens += completion.usage.completion_tokens
        with_text += bool(completion.choices[0].text)
    embedding = client.embeddings.create(model=MODEL, input=["metrics", "count"])
    prompt_tokens += embedding.usage.prompt_tokens
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(fleet.grpc))
    request = inference_pb2.GenerateRequest(model=MODEL, prompt="Red, green,")
    request.sampling.max_tokens = 4
    request.sampling.temperature = 0
    grpc_text = ""
    for event in stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=120):
        if event.HasField("delta"):
            grpc_text += event.delta.text
        else:
            prompt_tokens += event.result.usage.prompt_tokens
            completion_tokens += event.result.usage.completion_tokens
    with_text += bool(grpc_text)
    after = fleet.edge()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"model": MODEL, "status": "200", "code": ""}
    assert delta("fleetlm_edge_requests_total", route="/v1/chat/completions", **ok) == 3
    assert delta("fleetlm_edge_requests_total", route="/v1/completions", **ok) == 2
    assert delta("fleetlm_edge_requests_total", route="/v1/embeddings", **ok) == 1
    grpc_ok = {"model": MODEL, "route": "grpc:Generate", "status": "OK", "code": ""}
    assert delta("fleetlm_edge_requests_total", **grpc_ok) == 1
    assert delta("fleetlm_edge_prompt_tokens_total", model=MODEL) == prompt_tokens
    assert delta("fleetlm_edge_generation_tokens_total", model=MODEL) == completion_tokens
    assert with_text >= 5  # the prompts were chosen to produce text
    assert delta("fleetlm_edge_time_to_first_token_seconds_count", model=MODEL) == with_text
    assert delta("fleetlm_edge_e2e_request_latency_seconds_count", model=MODEL) == 6
    # At most one gap fewer than the tokens of each generation (a text event may carry several tokens).
    gaps = delta("fleetlm_edge_inter_token_latency_seconds_count", model=MODEL)
    assert 0 < gaps <= completion_tokens - with_text
    assert delta("fleetlm_edge_routing_decisions_total", model=MODEL, reason="least_load") == 7
    assert value(after, "fleetlm_edge_requests_in_flight", model=MODEL) == 0
    assert value(after, "fleetlm_edge_routing_table_fresh") == 1
    assert 0 <= value(after, "fleetlm_edge_routing_table_age_seconds") < 30
    # A histogram's sum is in seconds: 6 generations on a 2-core machine take well under 10 minutes.
    assert 0 < delta("fleetlm_edge_e2e_request_latency_seconds_sum", model=MODEL) < 600


def test_a_non_streamed_reply_has_a_first_token_and_no_gaps_between_tokens(fleet: Fleet) -> None:
    # The edge asks the node for the text whole (TEXT_DELIVERY_WHOLE): a first delta at once, the rest in
    # one; the client never sees the gaps between tokens, and the edge does not time them.
    client = fleet.client(fleet.key("whole"))
    before = fleet.edge()
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    after = fleet.edge()
    assert reply.usage is not None and reply.usage.completion_tokens > 2 and reply.choices[0].text
    for name, count in (("time_to_first_token", 1), ("inter_token_latency", 0), ("e2e_request_latency", 1)):
        series = f"fleetlm_edge_{name}_seconds_count"
        assert value(after, series, model=MODEL) - value(before, series, model=MODEL) == count, name


def test_edge_counts_429s_and_errors_with_their_codes(fleet: Fleet) -> None:
    limited = fleet.client(fleet.key("one-a-minute", requests_per_minute=1))
    client = fleet.client(fleet.key("errors"))
    before = fleet.edge()
    statuses = []
    for _ in range(3):
        try:
            limited.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
            statuses.append(200)
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limit_exceeded"
            statuses.append(429)
    assert statuses == [200, 429, 429]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=5)
    with pytest.raises(openai.BadRequestError):  # a bad body for a model the fleet does not serve
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=1, temperature=5)
    with pytest.raises(openai.AuthenticationError):
        fleet.client("flk-wrong").completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(fleet.grpc))
    with pytest.raises(grpc.RpcError) as failed:
        request = inference_pb2.GenerateRequest(model=MISSING, prompt="Hi")
        list(stub.Generate(request, metadata=(("authorization", f"Bearer {fleet.key('grpc')}"),), timeout=60))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    after = fleet.edge()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    completions = {"route": "/v1/completions"}
    # A key's 429 is counted under the model it asked for (a model the fleet serves), as over gRPC.
    limit = {"status": "429", "code": "RATE_LIMIT_EXCEEDED"}
    assert delta("fleetlm_edge_requests_total", model=MODEL, **completions, **limit) == 2
    assert delta("fleetlm_edge_rate_limited_total", model=MODEL, code="RATE_LIMIT_EXCEEDED") == 2
    assert delta("fleetlm_edge_requests_total", model=MODEL, status="200", code="", **completions) == 1
    not_found = {"status": "404", "code": "MODEL_NOT_FOUND"}
    assert delta("fleetlm_edge_requests_total", model="", **completions, **not_found) == 1
    # A refused body is counted under the model it names, as over gRPC (where the proto always has one),
    # if the fleet serves it.
    bad = {"status": "400", "code": "INVALID_REQUEST"}
    assert delta("fleetlm_edge_requests_total", model=MODEL, **completions, **bad) == 1
    assert delta("fleetlm_edge_requests_total", model="", **completions, **bad) == 1
    assert delta("fleetlm_edge_requests_total", model="", status="401", code="INVALID_API_KEY", **completions) == 1
    unavailable = {"route": "grpc:Generate", "status": "UNAVAILABLE", "code": "MODEL_UNAVAILABLE"}
    assert delta("fleetlm_edge_requests_total", model=MISSING, **unavailable) == 1
    assert not any(name == "fleetlm_edge_requests_total" and ("model", "no-such-model") in labels
                   for name, labels in after)  # fmt: skip


LONG = [{"role": "user", "content": "Count from 1 to 300, one number a line."}]


def test_a_client_that_leaves_mid_stream_is_cancelled_and_its_tokens_are_counted(fleet: Fleet) -> None:
    key = fleet.key("leaves")
    headers = {"Authorization": f"Bearer {key}"}
    whole = fleet.client(key).chat.completions.create(model=MODEL, messages=LONG, max_tokens=1, temperature=0)
    assert whole.usage is not None
    prompt_tokens = whole.usage.prompt_tokens  # the same prompt's, as the node counts it
    before_edge, before_node = fleet.edge(), fleet.node()
    body = {"model": MODEL, "messages": LONG, "max_tokens": 400, "temperature": 0, "stream": True}
    received = 0
    with httpx.stream("POST", f"{fleet.http}/v1/chat/completions", json=body, timeout=120,
                      headers={**headers, "X-Request-Id": "leaves-mid-stream"}) as reply:  # fmt: skip
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                received += bool(json.loads(line[6:])["choices"][0]["delta"].get("content"))
            if received == 10:
                break  # and the connection closes: the client is gone, 390 tokens before the end
    wait_for(lambda: value(fleet.edge(), "fleetlm_edge_requests_in_flight", model=MODEL) == 0, 30, "the edge")
    edge = fleet.edge()
    route = {"model": MODEL, "route": "/v1/chat/completions"}
    # One rule on both transports: code CANCELLED; over HTTP the status it was sent, 200 (not a success).
    assert changes(before_edge, edge, "fleetlm_edge_requests_total", **route, status="200", code="CANCELLED") == 1
    assert changes(before_edge, edge, "fleetlm_edge_requests_total", **route, status="200", code="") == 0
    # The edge counts what the client was streamed (no usage was sent: no prompt tokens)...
    streamed = changes(before_edge, edge, "fleetlm_edge_generation_tokens_total", model=MODEL)
    assert received <= streamed < 400
    assert changes(before_edge, edge, "fleetlm_edge_prompt_tokens_total", model=MODEL) == 0
    assert changes(before_edge, edge, "fleetlm_edge_e2e_request_latency_seconds_count", model=MODEL) == 0
    cancelled = {"model": MODEL, "method": "Generate", "outcome": "cancelled"}
    wait_for(lambda: changes(before_node, fleet.node(), "fleetlm_node_requests_total", **cancelled) == 1, 60,
             "the node to count the cancelled request")  # fmt: skip
    node = fleet.node()
    # ...the node what its engine spent: the prompt, and every token generated before it stopped.
    generated = changes(before_node, node, "fleetlm_node_generation_tokens_total", model=MODEL)
    assert streamed <= generated < 400
    assert changes(before_node, node, "fleetlm_node_prompt_tokens_total", model=MODEL) == prompt_tokens
    # And both log lines say so.
    served = log_line(fleet.log("node-node-a"), "fleetlm.node.requests", "request_id=leaves-mid-stream]")
    assert " CANCELLED " in served and tokens_logged(served) == (prompt_tokens, generated)
    access = log_line(fleet.log("edge"), "fleetlm.access", "request_id=leaves-mid-stream]")
    assert "error=CANCELLED" in access and tokens_logged(access) == (0, streamed)


def test_a_cancelled_request_has_code_cancelled_on_every_transport(fleet: Fleet) -> None:
    key = fleet.key("cancels")
    before_edge, before_node = fleet.edge(), fleet.node()
    # gRPC: the client cancels the call after 10 deltas.
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(fleet.grpc))
    request = inference_pb2.GenerateRequest(model=MODEL, prompt="Once upon a time")
    request.sampling.max_tokens = 400
    request.sampling.temperature = 0
    call = stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=120)
    deltas = 0
    for event in call:
        deltas += event.HasField("delta")
        if deltas == 10:
            call.cancel()
            break
    # HTTP: the client gives up before the (whole, not streamed) reply starts.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{fleet.http}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0},
                   timeout=httpx.Timeout(30, read=0.5))  # fmt: skip
    wait_for(lambda: value(fleet.edge(), "fleetlm_edge_requests_in_flight", model=MODEL) == 0, 30, "the edge")
    edge = fleet.edge()
    cut = {"model": MODEL, "code": "CANCELLED"}
    assert (
        changes(before_edge, edge, "fleetlm_edge_requests_total", route="grpc:Generate", status="CANCELLED", **cut) == 1
    )
    assert changes(before_edge, edge, "fleetlm_edge_requests_total", route="/v1/completions", status="499", **cut) == 1
    cancelled_requests = sum(
        v - value(before_edge, n, **dict(ls))
        for (n, ls), v in edge.items()
        if n == "fleetlm_edge_requests_total" and ("code", "CANCELLED") in ls
    )
    assert cancelled_requests == 2  # each counted once, under code CANCELLED
    # The gRPC client was streamed its deltas; the HTTP client, waiting for the whole reply, was sent nothing.
    streamed = changes(before_edge, edge, "fleetlm_edge_generation_tokens_total", model=MODEL)
    assert deltas <= streamed < 400
    cancelled = {"model": MODEL, "method": "Generate", "outcome": "cancelled"}
    wait_for(lambda: changes(before_node, fleet.node(), "fleetlm_node_requests_total", **cancelled) == 2, 60,
             "the node to count both cancelled requests")  # fmt: skip


def test_tokenize_and_detokenize_are_counted_at_the_edge_and_the_node(fleet: Fleet) -> None:
    headers = {"Authorization": f"Bearer {fleet.key('tokens')}"}
    before_edge, before_node = fleet.edge(), fleet.node()
    tokens = httpx.post(f"{fleet.http}/tokenize", json={"model": MODEL, "prompt": "Hello there"},
                        headers=headers, timeout=30)  # fmt: skip
    assert tokens.status_code == 200, tokens.text
    text = httpx.post(f"{fleet.http}/detokenize", json={"model": MODEL, "tokens": tokens.json()["tokens"]},
                      headers=headers, timeout=30)  # fmt: skip
    assert text.status_code == 200 and "Hello there" in text.json()["prompt"]
    unknown = httpx.post(f"{fleet.http}/tokenize", json={"model": "no-such-model", "prompt": "Hi"}, headers=headers,
                         timeout=30)  # fmt: skip
    assert unknown.status_code == 404
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(fleet.grpc))
    stub.Tokenize(inference_pb2.TokenizeRequest(model=MODEL, text="Hi"),
                  metadata=(("authorization", headers["Authorization"]),), timeout=30)  # fmt: skip
    wait_for(lambda: changes(before_node, fleet.node(), "fleetlm_node_requests_total", model=MODEL,
                             method="Tokenize", outcome="ok") == 2, 15, "the node's count")  # fmt: skip
    edge, node = fleet.edge(), fleet.node()
    ok = {"model": MODEL, "status": "200", "code": ""}
    assert changes(before_edge, edge, "fleetlm_edge_requests_total", route="/tokenize", **ok) == 1
    assert changes(before_edge, edge, "fleetlm_edge_requests_total", route="/detokenize", **ok) == 1
    assert changes(before_edge, edge, "fleetlm_edge_requests_total", route="grpc:Tokenize", status="OK", code="",
                   model=MODEL) == 1  # fmt: skip
    missing = {"model": "", "route": "/tokenize", "status": "404", "code": "MODEL_NOT_FOUND"}
    assert changes(before_edge, edge, "fleetlm_edge_requests_total", **missing) == 1
    assert changes(before_node, node, "fleetlm_node_requests_total", model=MODEL, method="Detokenize",
                   outcome="ok") == 1  # fmt: skip
    # They generate nothing and are no prompt: no tokens counted.
    assert changes(before_node, node, "fleetlm_node_prompt_tokens_total", model=MODEL) == 0
    assert changes(before_edge, edge, "fleetlm_edge_prompt_tokens_total", model=MODEL) == 0


def test_a_completion_of_several_prompts_is_one_request_end_to_end(fleet: Fleet) -> None:
    client = fleet.client(fleet.key("prompts"))
    before = fleet.edge()
    reply = client.completions.create(model=MODEL, prompt=["a b", "c d e"], max_tokens=5, temperature=0)
    assert len(reply.choices) == 2 and reply.usage is not None
    after = fleet.edge()
    for name in ("e2e_request_latency_seconds_count", "time_to_first_token_seconds_count"):
        assert changes(before, after, f"fleetlm_edge_{name}", model=MODEL) == 1, name
    ok = {"model": MODEL, "route": "/v1/completions", "status": "200", "code": ""}
    assert changes(before, after, "fleetlm_edge_requests_total", **ok) == 1
    assert changes(before, after, "fleetlm_edge_generation_tokens_total", model=MODEL) == reply.usage.completion_tokens


def test_metrics_pages_have_no_created_series_and_vllms_long_buckets(fleet: Fleet) -> None:
    for url in (f"{fleet.http}/metrics", fleet.cluster.metrics["node-a"], fleet.cluster.metrics["controlplane"]):
        page = httpx.get(url, timeout=10).text
        assert "fleetlm_" in page and "_created" not in page, url
    samples = fleet.edge()
    ttft = {le for (n, ls), _ in samples.items() if n == "fleetlm_edge_time_to_first_token_seconds_bucket"
            for k, le in ls if k == "le"}  # fmt: skip
    itl = {le for (n, ls), _ in samples.items() if n == "fleetlm_edge_inter_token_latency_seconds_bucket"
           for k, le in ls if k == "le"}  # fmt: skip
    assert {"160.0", "640.0", "2560.0"} <= ttft  # a scale from zero (up to 120 s), a request's 600 s timeout
    assert {"5.0", "10.0", "80.0"} <= itl


def test_the_metrics_page_carries_a_request_id(fleet: Fleet) -> None:
    given = httpx.get(f"{fleet.http}/metrics", headers={"X-Request-Id": "scrape-1"}, timeout=10)
    assert given.status_code == 200 and given.headers["x-request-id"] == "scrape-1"
    assert given.headers["content-type"].startswith("text/plain; version=0.0.4")
    made = httpx.get(f"{fleet.http}/metrics", timeout=10)
    assert re.fullmatch(r"req_[0-9a-f]{32}", made.headers["x-request-id"])
    assert httpx.get(f"{fleet.http}/metrics", headers={"X-Request-Id": "bad id"}, timeout=10).status_code == 400


def test_edge_counts_requests_in_flight(fleet: Fleet) -> None:
    client = fleet.client(fleet.key("long"))
    done = threading.Event()

    def long_request() -> None:
        try:
            client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=0)
        finally:
            done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    try:
        seen = wait_for(lambda: value(fleet.edge(), "fleetlm_edge_requests_in_flight", model=MODEL) == 1, 60,
                        "the request to be in flight")  # fmt: skip
        assert seen
    finally:
        thread.join(180)
    assert done.is_set()
    assert value(fleet.edge(), "fleetlm_edge_requests_in_flight", model=MODEL) == 0


def test_an_edge_without_metrics_serves_no_metrics_page_and_stillserves_to_key(fleet: Fleet) -> None:
    _, http, _ = fleet.cluster.start_edge("--no-metrics")
    key = fleet.key("unmetered")
    wait_for(lambda: serves_to_key(http, key), 60, f"{http} to serve {MODEL}")
    reply = httpx.get(f"{http}/metrics", timeout=10)
    assert reply.status_code == 404
    assert reply.json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape, as for any unknown path
    client = openai.OpenAI(base_url=f"{http}/v1", api_key=key, max_retries=0, timeout=120)
    assert client.completions.create(model=MODEL, prompt="One, two,", max_tokens=2, temperature=0).usage is not None


# --- the node -------------------------------------------------------------------------------------------------


def test_node_metrics_show_replicas_and_count_requests_and_tokens(fleet: Fleet) -> None:
    node = fleet.cluster.metrics["node-a"]
    client = fleet.client(fleet.key("node"))
    before = scrape(node)
    assert value(before, "fleetlm_node_replica_state", model=MODEL, state="ready") == 1
    assert value(before, "fleetlm_node_replica_state", model=MISSING, state="failed") == 1
    assert value(before, "fleetlm_node_slots", model=MODEL) == 4  # llama.cpp's default sequence slots
    assert value(before, "fleetlm_node_capacity", model=MODEL) == 4 + 16
    assert value(before, "fleetlm_node_load_seconds", model=MODEL) > 0
    assert 0 <= value(before, "fleetlm_node_kv_cache_usage_ratio", model=MODEL) <= 1
    assert not any(name.startswith("fleetlm_node_gpu_") for name, _ in before)  # no GPU here: no series
    prompt_tokens = completion_tokens = generation_prompt_tokens = 0
    for prompt in ("Blue, yellow,", "Monday, Tuesday,"):
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        assert completion.usage is not None
        prompt_tokens += completion.usage.prompt_tokens
        generation_prompt_tokens += completion.usage.prompt_tokens
        completion_tokens += completion.usage.completion_tokens
    for _ in range(2):  # the second is answered from the embedding cache
        prompt_tokens += client.embeddings.create(model=MODEL, input=["node metrics"]).usage.prompt_tokens
    after = scrape(node)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("fleetlm_node_requests_total", model=MODEL, method="Generate", outcome="ok") == 2
    assert delta("fleetlm_node_requests_total", model=MODEL, method="Embed", outcome="ok") == 2
    # The edge carried both Generate calls on its stream to the node (edge.node_multiplex), not a call each.
    assert delta("fleetlm_node_multiplexed_calls_total") == 2
    assert value(after, "fleetlm_node_multiplex_streams") >= 1
    assert delta("fleetlm_node_prompt_tokens_total", model=MODEL) == prompt_tokens
    assert delta("fleetlm_node_generation_tokens_total", model=MODEL) == completion_tokens
    assert delta("fleetlm_node_prefix_cache_queries_total", model=MODEL) == generation_prompt_tokens
    steps = delta("fleetlm_node_decode_steps_total", model=MODEL)
    assert steps >= completion_tokens  # one step per token at least (a prompt may take more)
    assert delta("fleetlm_node_decode_step_seconds_count", model=MODEL) == steps
    assert delta("fleetlm_node_decode_batch_sequences_count", model=MODEL) == steps
    assert delta("fleetlm_node_embedding_cache_hits_total", model=MODEL) == 1
    assert delta("fleetlm_node_embedding_cache_misses_total", model=MODEL) == 1
    assert value(after, "fleetlm_node_requests_running", model=MODEL) == 0
    assert value(after, "process_cpu_seconds_total") > 0  # the process metrics every Prometheus client exports
    empty = scrape(fleet.cluster.metrics["node-b"])  # serves nothing: no replica series
    assert not any(name == "fleetlm_node_replica_state" for name, _ in empty)


def test_node_counts_a_refused_request_with_its_code(fleet: Fleet) -> None:
    node = fleet.cluster.metrics["node-a"]
    before = scrape(node)
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(fleet.node_address))
    with pytest.raises(grpc.RpcError) as failed:
        list(stub.Generate(inference_pb2.GenerateRequest(model=MISSING, prompt="Hi"), timeout=30))
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    after = scrape(node)
    name, outcome = (
        "fleetlm_node_requests_total",
        {"model": MISSING, "method": "Generate", "outcome": "MODEL_UNAVAILABLE"},
    )
    assert value(after, name, **outcome) - value(before, name, **outcome) == 1


# --- the control plane ----------------------------------------------------------------------------------------


def test_controlplane_metrics_show_nodes_replicas_and_its_work(fleet: Fleet) -> None:
    url = fleet.cluster.metrics["controlplane"]
    samples = scrape(url)
    assert value(samples, "fleetlm_controlplane_nodes", state="active") == 2
    assert value(samples, "fleetlm_controlplane_nodes", state="missing") == 0
    assert value(samples, "fleetlm_controlplane_replicas", model=MODEL, state="ready") == 1
    assert value(samples, "fleetlm_controlplane_replicas", model=MISSING, state="failed") == 1
    assert value(samples, "fleetlm_controlplane_is_leader") == 1
    assert total(samples, "fleetlm_controlplane_etcd_request_seconds_count") > 0
    passes = value(samples, "fleetlm_controlplane_reconcile_passes_total")
    # The reconciler passes at least every 2 s (reconcile_interval_seconds): 30 s is a generous bound.
    wait_for(lambda: value(scrape(url), "fleetlm_controlplane_reconcile_passes_total") > passes, 30, "a pass")
    # A deployment whose weights no node has: its placement fails for capacity, and is timed.
    spec = node_pb2.ModelSpec(name="nowhere", path="/nonexistent/nowhere.gguf", format="gguf", engine="llamacpp")
    deployment = node_pb2.Deployment(spec=spec, min_replicas=1, max_replicas=1, replicas=1)
    stub = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(fleet.cluster.controlplane))
    with pytest.raises(grpc.RpcError) as refused:
        stub.DeployModel(admin_pb2.DeployModelRequest(deployment=deployment), metadata=fleet.metadata, timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = scrape(url)
    failures = "fleetlm_controlplane_placement_failures_total"
    assert value(after, failures, reason="capacity") - value(samples, failures, reason="capacity") == 1
    timed = "fleetlm_controlplane_placement_seconds_count"
    assert value(after, timed) - value(samples, timed) == 1


# --- the metrics ports' settings ------------------------------------------------------------------------------


def _refusal(*argv: str) -> str:
    """What a component that must not start says (it exits by itself: the check comes before serving)."""
    done = subprocess.run(fleetlm(*argv), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_a_bad_metrics_address_is_refused_naming_the_flag() -> None:
    said = _refusal("controlplane", "--etcd", "http://127.0.0.1:1", "--metrics-listen", "nonsense")
    assert "--metrics-listen 'nonsense' is not host:port" in said
    said = _refusal("node", "--controlplane", "127.0.0.1:1", "--metrics-listen", "127.0.0.1:http")
    assert "--metrics-listen '127.0.0.1:http' is not host:port" in said


def test_a_metrics_port_beyond_loopback_needs_tls_or_insecure_plaintext() -> None:
    said = _refusal("node", "--controlplane", "127.0.0.1:1", "--metrics-listen", f"0.0.0.0:{free_port()}")
    assert "beyond this machine, without TLS" in said and "--insecure-plaintext" in said


def test_a_busy_metrics_port_ends_the_node_with_what_to_do() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        said = _refusal("node", "--controlplane", "127.0.0.1:1", "--metrics-listen", f"127.0.0.1:{port}")
    assert f"cannot serve metrics on 127.0.0.1:{port}" in said and "--metrics-listen" in said


def test_the_controlplane_metrics_port_speaks_https_with_the_fleet_certificate(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, tls=True)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(3)
        url = cluster.metrics["controlplane"]
        assert url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cluster.ca_dir / "ca.crt"))
        reply = httpx.get(url, verify=trusted, timeout=10)
        assert reply.status_code == 200 and "fleetlm_controlplane_is_leader" in reply.text
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://"), timeout=10)  # no plaintext on it
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, timeout=10)  # a client that does not trust the fleet CA
        assert httpx.get(url, verify=trusted, timeout=10).status_code == 200  # and the port still serves
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
