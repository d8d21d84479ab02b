"""API keys at the edge, against a real fleet: etcd, one control plane with a fleet secret and an admin token,
one node serving SmolLM2 with llama.cpp, two edges requiring keys; the official `openai` client and real
`grpcurl`. Auth is switched on through the environment the components inherit (FLEETLM_CP_AUTH_SECRET_FILE,
FLEETLM_CP_ADMIN_TOKEN_FILE, FLEETLM_EDGE_REQUIRE_API_KEY, FLEETLM_EDGE_AUTH_SECRET_FILE)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import schemathesis
from google.rpc import error_details_pb2, status_pb2
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth

from edge.auth import needs_key
from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.processes import etcd_argv  # noqa: F401 - etcd comes with the cluster
from mesh.auth import create_secret_file
from tests.cluster import MODEL, Cluster, fleetlm, serves_to_key, smollm_entry, wait_for
from tests.test_fuzz_http import CHECKS as FUZZ_CHECKS
from tests.test_fuzz_http import run_operation as fuzz_operation
from tests.test_grpcurl import grpcurl_binary


def error_info_reason(error: grpc.RpcError) -> str:
    """The reason of the ErrorInfo in a failed call's status, read as any gRPC client reads it."""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            info = error_details_pb2.ErrorInfo()
            if status_pb2.Status.FromString(value).details[0].Unpack(info):
                return info.reason
    return ""


pytestmark = [pytest.mark.model, pytest.mark.cluster]

REVOCATION_BOUND = 5.0  # the bound: a revoked key is refused by every edge within 5 s


@dataclass
class Fleet:
    cluster: Cluster
    edges: list[tuple[str, str]]  # (http base, grpc address)
    admin_token: str
    token_file: Path

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(self.cluster.controlplane))

    def create(self, name: str, **limits: int) -> tuple[str, str]:
        models = limits.pop("models", None)
        request = admin_pb2.CreateApiKeyRequest(name=name, models=models or [])
        for field, value in limits.items():
            setattr(request.limits, field, value)
        reply = self.admin().CreateApiKey(request, metadata=self.metadata, timeout=30)
        # The edges learn a new key from the table the control plane streams to them, a moment after it is
        # made: a test that used it at once was refused 401 now and then (CI: a gRPC Embed right after).
        for http, _ in self.edges:
            wait_for(lambda http=http: _knows_key(http, reply.secret), 30, f"{http} to know key {name}")
        return reply.key.id, reply.secret

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_token}"),)

    def client(self, key: str | None, edge: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.edges[edge][0]}/v1", api_key=key or "", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("keys")
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
        for name, value in env.items():
            patch.setenv(name, value)  # the components are started with this environment
        try:
            cluster.start_etcd()
            cluster.start_controlplane(3)
            cluster.start_node("node-a", [smollm_entry()])
            edges = [cluster.start_edge()[1:] for _ in range(2)]
            fleet = Fleet(cluster, edges, token_file.read_text().strip(), token_file)
            _, probe = fleet.create("probe")
            for http, _ in edges:
                wait_for(lambda http=http: serves_to_key(http, probe), 90, f"{http} to serve {MODEL} to a key")
            yield fleet
        except BaseException:
            print(cluster.logs())
            raise
        finally:
            cluster.close()


def _complete(client: openai.OpenAI) -> Any:
    return client.completions.with_raw_response.create(model=MODEL, prompt="One, two,", max_tokens=1, temperature=0)


def test_no_key_and_a_wrong_key_get_401_invalid_api_key(fleet: Fleet) -> None:
    http = fleet.edges[0][0]
    bare = httpx.post(f"{http}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=30)
    assert bare.status_code == 401
    assert bare.json()["error"]["code"] == "invalid_api_key"
    assert bare.headers["www-authenticate"] == "Bearer"
    for key in ("flk-not-a-key", "flk-" + "A" * 43, "sk-an-openai-key"):
        with pytest.raises(openai.AuthenticationError) as refused:
            fleet.client(key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_api_key"
    assert httpx.get(f"{http}/health", timeout=5).status_code == 200  # health stays open
    # The access log says why, as for every other refusal.
    logs = "".join(p.log_text() for p in fleet.cluster.procs if p.name.startswith("edge"))
    refusals = [line for line in logs.splitlines() if "http /v1/completions 401" in line]
    assert refusals and all("error=INVALID_API_KEY" in line for line in refusals), refusals


def test_an_edge_with_another_fleet_secret_is_told_so(fleet: Fleet, tmp_path: Path) -> None:
    """An edge given another fleet secret than the control plane's would refuse every key (its HMACs of the
    presented keys match none in the table) with nothing in any log to say why. The control plane refuses it
    the key table, naming the secret, and the edge logs that as an error."""
    other = tmp_path / "other.secret"
    create_secret_file(other)
    _, key = fleet.create("checked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLEETLM_EDGE_AUTH_SECRET_FILE", str(other))
        proc, http, _ = fleet.cluster.start_edge()
    said = "the control plane refuses this edge the API-key table: this edge's fleet secret (--auth-secret-file)"
    wait_for(lambda: said in proc.log_text(), 60, "the edge to log the refusal", proc)
    refused = httpx.post(f"{http}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                         headers={"authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    assert refused.status_code == 401
    for secret in (other.read_text().strip(), key):
        assert secret not in proc.log_text() and secret not in fleet.cluster.procs[1].log_text()
    proc.stop()


def test_a_key_for_another_model_gets_403_and_does_not_see_the_model(fleet: Fleet) -> None:
    _, secret = fleet.create("other", models=["some-other-model"])  # type: ignore[arg-type]
    client = fleet.client(secret)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert refused.value.status_code == 403
    assert refused.value.code == "model_not_allowed"
    assert MODEL not in [m.id for m in client.models.list().data]
    _, allowed = fleet.create("smol-only", models=[MODEL])  # type: ignore[arg-type]
    assert MODEL in [m.id for m in fleet.client(allowed).models.list().data]
    # over gRPC: PERMISSION_DENIED, and UNAUTHENTICATED without a key
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(fleet.edges[0][1]))
    request = inference_pb2.GenerateRequest(
        model=MODEL, prompt="hi", sampling=inference_pb2.SamplingParams(max_tokens=1)
    )
    for metadata, code, reason in (
        ((), grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY"),
        ((("authorization", f"Bearer {secret}"),), grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED"),
    ):
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.Generate(request, metadata=metadata, timeout=30))
        assert failed.value.code() == code
        assert error_info_reason(failed.value) == reason  # as ErrorInfo spells reasons (it was OpenAI's lowercase)
    replies = list(stub.Generate(request, metadata=(("authorization", f"Bearer {allowed}"),), timeout=60))
    assert replies[-1].HasField("result")


def test_a_revoked_key_is_refused_by_both_edges_within_5_s(fleet: Fleet) -> None:
    key_id, secret = fleet.create("to-revoke")
    for i in range(2):  # works on both edges first (the table reached them)
        wait_for(lambda i=i: fleet.client(secret, i).models.list().data, 10, f"edge {i} to know the key")
    revoked_at = time.monotonic()
    fleet.admin().RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id=key_id), metadata=fleet.metadata, timeout=30)
    refused_after = []
    for i in range(2):
        deadline = time.monotonic() + 2 * REVOCATION_BOUND  # bounded: the loop ends by itself
        while time.monotonic() < deadline:
            try:
                fleet.client(secret, i).models.list()
            except openai.AuthenticationError as exc:
                assert exc.code == "invalid_api_key"
                refused_after.append(time.monotonic() - revoked_at)
                break
            time.sleep(0.05)
    assert len(refused_after) == 2, f"refused by {len(refused_after)} of 2 edges"
    assert max(refused_after) < REVOCATION_BOUND, refused_after
    listed = fleet.admin().ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=fleet.metadata, timeout=30)
    assert next(k for k in listed.keys if k.id == key_id).revoked


def test_requests_per_minute_429_with_openai_headers(fleet: Fleet) -> None:
    _, secret = fleet.create("rpm", requests_per_minute=3)
    client = fleet.client(secret)
    outcomes = []
    for _ in range(5):
        try:
            raw = _complete(client)
            outcomes.append((200, raw.headers))
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limit_exceeded"
            outcomes.append((429, exc.response.headers))
    assert [status for status, _ in outcomes] == [200, 200, 200, 429, 429]
    for status, headers in outcomes:
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        if status == 429:
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert 1 <= int(headers["retry-after"]) <= 60
    assert [int(h["x-ratelimit-remaining-requests"]) for _, h in outcomes[:3]] == [2, 1, 0]


def test_two_edges_share_one_rpm_limit(fleet: Fleet) -> None:
    limit, slack = 6, 2  # slack: at most one chunk (1 request for limits under 64) per edge
    _, secret = fleet.create("shared", requests_per_minute=limit)
    admitted = refused = 0
    for i in range(4 * limit):  # alternating edges; bounded
        try:
            _complete(fleet.client(secret, i % 2))
            admitted += 1
        except openai.RateLimitError:
            refused += 1
    assert admitted + refused == 4 * limit
    assert limit <= admitted <= limit + slack, admitted  # per edge alone it would be 2 x limit


def test_tokens_per_minute_429(fleet: Fleet) -> None:
    _, secret = fleet.create("tpm", tokens_per_minute=5)
    client = fleet.client(secret)
    first = client.completions.with_raw_response.create(model=MODEL, prompt="One, two, three,", max_tokens=4)
    assert first.headers["x-ratelimit-limit-tokens"] == "5"
    assert first.parse().usage.total_tokens > 5  # the first one goes; its tokens use the window up
    outcome = None
    for _ in range(20):  # bounded: the charge is counted when the reply ends
        try:
            _complete(client)
        except openai.RateLimitError as exc:
            outcome = exc
            break
        time.sleep(0.1)
    assert outcome is not None and outcome.code == "rate_limit_exceeded"
    assert outcome.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "retry-after" in outcome.response.headers


def _knows_key(http: str, key: str) -> bool:
    """Whether the edge at `http` takes `key` (its model list is free of a key's limits: 200, not 401)."""
    return httpx.get(f"{http}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200


def test_concurrent_requests_429(fleet: Fleet) -> None:
    _, secret = fleet.create("one-at-a-time", max_concurrent_requests=1)
    client = fleet.client(secret)
    stream = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=200, stream=True)
    next(iter(stream))  # the first request is running
    with pytest.raises(openai.RateLimitError) as refused:
        _complete(client)
    assert refused.value.code == "rate_limit_exceeded"
    stream.close()
    wait_for(lambda: _complete(client), 30, "the slot to be free again")


def test_a_keys_limit_on_requests_at_once_bounds_its_prompts_at_once(fleet: Fleet) -> None:
    """Several prompts are one request to the limit, but run no more at once than the key's requests may:
    with a limit of 1 the node never holds two of them (its running gauge, sampled while they run)."""
    _, secret = fleet.create("one-prompt-at-a-time", max_concurrent_requests=1)
    metrics = fleet.cluster.metrics["node-a"]
    prompts = ["Count: 1, 2, 3,", "The alphabet: a, b, c,", "Colors: red, blue,"]
    peak = 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(
            fleet.client(secret).completions.create, model=MODEL, prompt=prompts, max_tokens=40, temperature=0
        )
        while not reply.done():
            text = httpx.get(metrics, timeout=5).text
            running = [line for line in text.splitlines() if line.startswith("fleetlm_node_requests_running{")]
            peak = max([peak, *(int(float(line.rsplit(" ", 1)[1])) for line in running)])
            time.sleep(0.02)
        choices = reply.result().choices
    assert [c.index for c in choices] == [0, 1, 2] and all(c.text for c in choices)
    assert peak == 1, peak


def _grpc(fleet: Fleet) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(fleet.edges[0][1]))


def _edge_idle(fleet: Fleet) -> bool:
    """No request in flight at the first edge (its gauge goes down after the key's admission has ended)."""
    text = httpx.get(f"{fleet.edges[0][0]}/metrics", timeout=5).text
    return all(
        float(line.rsplit(" ", 1)[1]) == 0
        for line in text.splitlines()
        if line.startswith("fleetlm_edge_requests_in_flight{")
    )


def test_a_failed_grpc_embed_gives_its_key_slot_back(fleet: Fleet) -> None:
    """A gRPC Embed that fails (an empty input) ends its request for the key's limit on requests at once,
    as every other call does (it held the key's only slot for good: every later request got 429)."""
    _, secret = fleet.create("one-embed-at-a-time", max_concurrent_requests=1)
    metadata = (("authorization", f"Bearer {secret}"),)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as refused:
            _grpc(fleet).Embed(inference_pb2.EmbedRequest(model=MODEL, inputs=[]), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = _grpc(fleet).Embed(inference_pb2.EmbedRequest(model=MODEL, inputs=["ok"]), metadata=metadata, timeout=30)
    assert reply.embeddings
    assert _complete(fleet.client(secret)).status_code == 200


def test_a_stream_its_client_leaves_is_charged_what_it_was_sent(fleet: Fleet) -> None:
    """A key's tokens per minute count a stream its client closes before the end: the tokens it was sent
    (they were charged only with a result, so a client that closed each stream just before its end had no
    limit)."""
    _, secret = fleet.create("tpm-cut", tokens_per_minute=20)
    client = fleet.client(secret)
    stream = client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=200, temperature=0, stream=True
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].text)
        if received == 30:
            break
    stream.close()
    assert received == 30
    wait_for(lambda: _edge_idle(fleet), 30, "the cut stream to end at the edge")
    with pytest.raises(openai.RateLimitError) as refused:
        _complete(client)
    assert "tokens per minute" in refused.value.message


def test_a_grpc_stream_cut_after_a_long_prompt_is_charged_its_prompt(fleet: Fleet) -> None:
    """The prompt of a stream cut before its result is counted too (the node read it whole before its first
    token): a 400-token prompt cut after 3 tokens uses a 250-token window up, where the short requests that
    follow would each use about 6."""
    _, secret = fleet.create("tpm-prompt", tokens_per_minute=250)
    metadata = (("authorization", f"Bearer {secret}"),)
    long_prompt = "one two three four " * 100
    request = inference_pb2.GenerateRequest(model=MODEL, prompt=long_prompt)
    request.sampling.max_tokens = 100
    request.sampling.temperature = 0
    call = _grpc(fleet).Generate(request, metadata=metadata, timeout=60)
    events = 0
    for response in call:
        events += response.HasField("delta")
        if events == 3:
            break
    call.cancel()
    assert events == 3
    short = inference_pb2.GenerateRequest(model=MODEL, prompt="One, two,")
    short.sampling.max_tokens = 1
    refused = None
    for _ in range(30):  # bounded: 30 short requests use about 180 tokens, less than the window
        try:
            list(_grpc(fleet).Generate(short, metadata=metadata, timeout=30))
        except grpc.RpcError as exc:
            refused = exc
            break
        time.sleep(0.2)
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "tokens per minute" in (refused.details() or "")


def test_the_secret_is_nowhere_but_in_the_create_reply(fleet: Fleet) -> None:
    key_id, secret = fleet.create("secret-check")
    _complete(fleet.client(secret))  # used once, so that edges and logs had every chance to see it
    etcdctl = Path(grpcurl_binary()).parent / "etcdctl"
    dump = subprocess.run(
        [str(etcdctl), "--endpoints", fleet.cluster.etcd_url, "get", "--prefix", "/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert key_id in dump  # the record is there ...
    assert secret not in dump and secret[4:] not in dump  # ... but not the secret
    listed = fleet.admin().ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=fleet.metadata, timeout=30)
    text = str(listed)
    assert key_id in text and secret not in text and secret[4:12] not in text
    assert "hash" not in json.dumps([str(k) for k in listed.keys])
    for log in fleet.cluster.dir.glob("*.log"):
        content = log.read_text(errors="replace")
        assert secret not in content, log.name
        assert fleet.admin_token not in content, log.name


def test_grpcurl_every_admin_rpc_needs_the_admin_token(fleet: Fleet) -> None:
    methods = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods
    assert len(methods) >= 18
    cp = fleet.cluster.controlplane

    def call(method: str, *headers: str) -> subprocess.CompletedProcess[str]:
        args = [grpcurl_binary(), "-plaintext", "-max-time", "5", *headers, "-d", "{}", cp]
        return subprocess.run(
            [*args, f"fleetlm.controlplane.v1.AdminService/{method}"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    for method in methods:
        without = call(method.name)
        assert "Unauthenticated" in without.stderr, (method.name, without.stderr)
        wrong = call(method.name, "-H", "authorization: Bearer not-the-token-but-long-enough-to-look-real")
        assert "Unauthenticated" in wrong.stderr, (method.name, wrong.stderr)
        with_token = call(method.name, "-H", f"authorization: Bearer {fleet.admin_token}")
        assert "Unauthenticated" not in with_token.stderr, (method.name, with_token.stderr)
    # reflection and health stay open
    listed = subprocess.run([grpcurl_binary(), "-plaintext", cp, "list"], capture_output=True, text=True, timeout=60)
    assert "fleetlm.controlplane.v1.AdminService" in listed.stdout
    health = subprocess.run(
        [grpcurl_binary(), "-plaintext", cp, "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "SERVING" in health.stdout


def test_fleetlm_keys_create_list_revoke(fleet: Fleet) -> None:
    base = [
        *fleetlm("keys"),
        "--controlplane",
        fleet.cluster.controlplane,
        "--admin-token-file",
        str(fleet.token_file),
    ]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([base[0], *base[1:4], *args, *base[4:]], capture_output=True, text=True, timeout=60)

    created = run("create", "cli-key", "--rpm", "10", "--model", MODEL)
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split("id: ")[1].split()[0]
    secret = created.stdout.split("keep it now): ")[1].split()[0]
    assert secret.startswith("flk-") and len(secret) == 4 + 43
    listed = run("list")
    assert key_id in listed.stdout and secret not in listed.stdout
    assert run("revoke", key_id).returncode == 0
    no_token = subprocess.run(
        [*fleetlm("keys", "list"), "--controlplane", fleet.cluster.controlplane],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_token.returncode != 0 and "admin token" in no_token.stderr


def test_schemathesis_finds_no_openai_route_that_ignores_the_key(fleet: Fleet) -> None:
    """schemathesis's ignored_auth against an edge that requires keys: its document declares a bearer key on
    every /v1 route, /tokenize and /detokenize (and 401/403 among the answers); each case is sent with a valid
    key, and for every operation that answers 2xx the same request is sent again without a key and with a wrong
    one, and must be refused (401/403). The usual checks (no 5xx, documented statuses and bodies) run on the
    same cases."""
    _, key = fleet.create("fuzz")
    http = fleet.edges[0][0]
    schema = schemathesis.openapi.from_url(f"{http}/openapi.json")
    document = httpx.get(f"{http}/openapi.json", timeout=10).json()
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["apiKey"]["description"],
    }

    @schema.auth()
    class FleetKey:
        def get(self, case: Any, context: Any) -> str:
            return key

        def set(self, case: Any, data: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    checked: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if not needs_key(operation.path):
            continue
        assert operation.definition.raw.get("security") == [{"apiKey": []}], operation.path
        sent = fuzz_operation(operation, GenerationMode.POSITIVE, http, MODEL, [ignored_auth, *FUZZ_CHECKS], 10)
        checked.append(f"{operation.method.upper()} {operation.path}: {sent}")
    print("ignored_auth:", "; ".join(checked))
    assert len(checked) >= 7, checked  # chat, completions, embeddings, models, a model, tokenize, detokenize
    assert httpx.get(f"{http}/openapi.json", timeout=10).status_code == 200  # the document stays open


def test_a_web_page_allowed_by_cors_is_asked_for_its_key_but_not_at_preflight(fleet: Fleet) -> None:
    page = "https://app.example"
    proc, http, _ = fleet.cluster.start_edge("--cors-origins", page)
    try:
        preflight = httpx.options(
            f"{http}/v1/chat/completions",
            headers={"origin": page, "access-control-request-method": "POST",
                     "access-control-request-headers": "authorization, content-type"},
            timeout=10,
        )  # fmt: skip
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == page
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        bare = httpx.post(f"{http}/v1/chat/completions", json=body, headers={"origin": page}, timeout=30)
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert bare.headers["access-control-allow-origin"] == page  # the page can read why
        _, secret = fleet.create("web-page")
        wait_for(lambda: serves_to_key(http, secret), 30, "the new edge to know the key")
        keyed = httpx.post(f"{http}/v1/chat/completions", json=body, timeout=60,
                           headers={"origin": page, "authorization": f"Bearer {secret}"})  # fmt: skip
        assert keyed.status_code == 200, keyed.text
        assert keyed.headers["access-control-allow-origin"] == page
        assert "x-ratelimit-remaining-requests" in keyed.headers["access-control-expose-headers"]
    finally:
        proc.stop()


def test_without_a_control_plane_each_edge_keeps_its_keys_and_admits_its_share(fleet: Fleet) -> None:
    """Last in this module: it stops the control plane. Each edge then checks keys on the table it has and
    limits a key on its own to limit / N, N being the edges that shared the key at the last lease."""
    limit = 8
    _, secret = fleet.create("fallback", requests_per_minute=limit)
    for i in range(4):  # both edges use the key, so that the leader tells each that two share it
        _complete(fleet.client(secret, i % 2))
    time.sleep(1)  # the background refills of the last two requests have come back
    controlplane = next(p for p in fleet.cluster.procs if p.name == "controlplane")
    controlplane.stop()
    admitted = [0, 0]
    for i in range(2):
        for _ in range(2 * limit):  # bounded
            try:
                _complete(fleet.client(secret, i))
                admitted[i] += 1
            except openai.RateLimitError as exc:
                assert exc.code == "rate_limit_exceeded"
    # limit / 2 each in a local window of its own (plus what the edge still held of its last grant: at most
    # one chunk, 1 request here)
    assert all(limit // 2 <= n <= limit // 2 + 1 for n in admitted), admitted
    with pytest.raises(openai.AuthenticationError):  # a wrong key is still refused without the control plane
        fleet.client("flk-" + "B" * 43).models.list()
