"""Request ids end to end, on a real fleet: the client's X-Request-Id (or one the edge makes) comes back on
every response, success or error, streamed or not, before or after the route runs; it is in the edge's
access-log line, in the node's log and in the headers of the engine server's request; over gRPC it goes
in and out in metadata.

The fleet: etcd, a control plane with API keys, one node serving SmolLM2 on llama.cpp and, as `openai`
engines, two real llama_cpp.servers that print the headers of each request they get (a wrapper around its
own main): one as it ships, which answers 400 to an X-Request-Id that is not a UUID, and one with that
check off (as vLLM takes any id); an open edge (body limit 2,048 bytes, header deadline 2 s) and an edge
that requires API keys.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from fleetlm.controlplane.v1 import admin_pb2, admin_pb2_grpc
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from launcher.default_model import default_model_path
from mesh.auth import create_secret_file
from tests.cluster import MODEL, Cluster, Proc, free_port, smollm_entry, wait_for

pytestmark = [pytest.mark.model, pytest.mark.cluster]

ATTACHED = "smol-attached"  # takes any X-Request-Id
STRICT = "smol-strict"  # llama_cpp.server as it ships: 400 for an X-Request-Id that is not a UUID
MISSING = "missing-weights"
MADE = re.compile(r"req_[0-9a-f]{32}")
CHAT = [{"role": "user", "content": "Say hello."}]

# llama_cpp.server, unchanged, with each HTTP request's path and fleet headers printed to its log.
# With ACCEPT_ANY_ID set, its request-id plugin (starlette-context) takes any id instead of UUIDs only.
ENGINE_WRAPPER = """
import os, sys, uvicorn
if os.environ.get("ACCEPT_ANY_ID"):
    import starlette_context.plugins as plugins
    checked = plugins.RequestIdPlugin.__init__
    def accepting(self, *args, **kwargs):
        checked(self, *args, **{**kwargs, "validate": False})
    plugins.RequestIdPlugin.__init__ = accepting
serve = uvicorn.run
def run(app, **options):
    async def logged(scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            print("ENGINE", scope["path"], "x-request-id=" + headers.get(b"x-request-id", b"-").decode(),
                  "traceparent=" + headers.get(b"traceparent", b"-").decode(), flush=True)
        await app(scope, receive, send)
    serve(logged, **options)
uvicorn.run = run
sys.argv[0] = "llama_cpp.server"
from llama_cpp.server.__main__ import main
main()
"""


def engine_server(port: int, directory: Path, name: str = "engine-server", any_id: bool = True) -> Proc:
    argv = [sys.executable, "-c", ENGINE_WRAPPER, "--model", str(default_model_path()), "--port", str(port),
            "--n_threads", "1", "--n_ctx", "1024", "--model_alias", "smollm2"]  # fmt: skip
    proc = Proc(name, argv, directory, env={"ACCEPT_ANY_ID": "1"} if any_id else None)
    # 120 s: loading the model in a fresh process on a busy 2-core machine
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200, 120,
             "llama_cpp.server", proc)  # fmt: skip
    return proc


@dataclass
class Fleet:
    cluster: Cluster
    http: str  # the open edge
    grpc: str
    edge: Proc
    node: Proc
    keyed_http: str  # the edge that requires API keys
    engine: Proc
    strict_engine: Proc
    admin_token: str

    def client(self, key: str = "unused", http: str = "") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{http or self.http}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("request-ids")
    secret, token = workdir / "fleet.secret", workdir / "admin.token"
    create_secret_file(secret)
    create_secret_file(token)
    cluster = Cluster(workdir)
    engine = engine_server(port := free_port(), workdir)
    strict = engine_server(strict_port := free_port(), workdir, "strict-engine-server", any_id=False)
    try:
        cluster.start_etcd()
        cluster.start_controlplane(3, "--auth-secret-file", str(secret), "--admin-token-file", str(token))
        models = [
            smollm_entry(),
            smollm_entry(MISSING, path="/nonexistent/weights.gguf"),
            {"name": ATTACHED, "path": f"http://127.0.0.1:{port}/v1", "engine": "openai", "format": "gguf",
             "context_size": 1024},
            {"name": STRICT, "path": f"http://127.0.0.1:{strict_port}/v1", "engine": "openai", "format": "gguf",
             "context_size": 1024},
        ]  # fmt: skip
        # Health checks every 0.3 s: llama_cpp.server as it ships cuts a running stream when any other request
        # (a health check too) comes in; the node must not check a server that is answering a request.
        node, _ = cluster.start_node("node-a", models, extra=("--engine-health-seconds", "0.3"))
        edge, http, grpc_address = cluster.start_edge("--max-body-bytes", "2048", "--header-timeout", "2")
        _, keyed, _ = cluster.start_edge("--require-api-key", "--auth-secret-file", str(secret))
        cluster.wait_model_state(http, MODEL, timeout=120)
        cluster.wait_model_state(http, ATTACHED, timeout=120)
        cluster.wait_model_state(http, STRICT, timeout=120)
        cluster.wait_model_state(http, MISSING, "failed")
        yield Fleet(cluster, http, grpc_address, edge, node, keyed, engine, strict, token.read_text().strip())
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
        engine.stop()
        strict.stop()


def lines_with(proc: Proc, *texts: str, timeout: float = 15) -> list[str]:
    """The lines of `proc`'s log that contain every one of `texts`, once there is one (a line is written when
    the request has ended, which may be just after the client has its answer). 15 s: a busy machine."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: [
            line
            for line in proc.log_path.read_text(errors="replace").splitlines()
            if all(text in line for text in texts)
        ],
        timeout,
        f"{' and '.join(texts)} in {proc.name}'s log",
    )


def access_lines(proc: Proc, request_id: str) -> list[str]:
    """The edge's access-log lines of one request. Waited for as such, not as any line naming the request:
    the access line is written as the request ends, after any other line about it (the gateway's warning
    about a failure comes first)."""
    return lines_with(proc, "fleetlm.access", f"request_id={request_id}]")


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=([^\s\]]+)", line))


# --- HTTP: the id comes back ------------------------------------------------------------------------------


def test_the_given_id_comes_back_on_chat_streamed_chat_embeddings_and_an_error(fleet: Fleet) -> None:
    client = fleet.client()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=4, temperature=0, extra_headers={"X-Request-Id": "chat-1"}
    )
    assert raw.headers["x-request-id"] == "chat-1"
    assert raw.parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=CHAT, max_tokens=4, stream=True, extra_headers={"X-Request-Id": "stream-1"}
    ) as streamed:
        assert streamed.headers["x-request-id"] == "stream-1"
        assert [chunk for chunk in streamed.parse()]
    embedded = client.embeddings.with_raw_response.create(
        model=MODEL, input=["hello"], extra_headers={"X-Request-Id": "embed-1"}
    )
    assert embedded.headers["x-request-id"] == "embed-1"
    assert len(embedded.parse().data[0].embedding) > 10
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=CHAT, extra_headers={"X-Request-Id": "err-1"})
    assert error.value.request_id == "err-1"  # the openai client reads it from the header


def test_an_id_is_made_when_none_is_given(fleet: Fleet) -> None:
    ids = []
    for _ in range(2):
        reply = httpx.post(f"{fleet.http}/v1/completions", json={"model": MODEL, "prompt": "One", "max_tokens": 2},
                           timeout=60)  # fmt: skip
        assert reply.status_code == 200
        ids.append(reply.headers["x-request-id"])
    assert all(MADE.fullmatch(i) for i in ids), ids
    assert ids[0] != ids[1]


@pytest.mark.parametrize("bad", ["has space", "x" * 129, 'quote"d', "é"])
def test_an_invalid_id_is_a_400_naming_the_header(fleet: Fleet, bad: str) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    reply = httpx.post(f"{fleet.http}/v1/chat/completions", json=body, headers={"X-Request-Id": bad.encode()},
                       timeout=60)  # fmt: skip
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "X-Request-Id" and error["type"] == "invalid_request_error"
    assert "X-Request-Id" in error["message"]
    # Not silently replaced: the request was refused; the answer carries an id of the edge's own (its
    # access-log line has it), never the invalid one.
    assert MADE.fullmatch(reply.headers["x-request-id"])


def test_every_error_carries_the_id_before_and_after_the_route(fleet: Fleet) -> None:
    sent = iter(range(1000))

    def post(path: str, body: Any, http: str = "") -> httpx.Response:
        return httpx.post(f"{http or fleet.http}{path}", content=json.dumps(body).encode(),
                          headers={"X-Request-Id": f"e-{next(sent)}"}, timeout=60)  # fmt: skip

    cases = {
        # the route's own errors
        404: post("/v1/chat/completions", {"model": "nope", "messages": CHAT}),
        503: post("/v1/chat/completions", {"model": MISSING, "messages": CHAT}),
        400: post("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": 9}),
        # before the route: the body limit (2,048 bytes), the API-key check, an unknown route, a wrong method
        413: post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 4000}]}),
        401: post("/v1/chat/completions", {"model": MODEL, "messages": CHAT}, http=fleet.keyed_http),
    }
    for status, reply in cases.items():
        assert reply.status_code == status, (status, reply.text)
        assert reply.headers["x-request-id"] == reply.request.headers["x-request-id"], status
        assert "error" in reply.json()
    unknown = httpx.get(f"{fleet.http}/v1/nothing-here", headers={"X-Request-Id": "e-404-route"}, timeout=10)
    wrong_method = httpx.get(f"{fleet.http}/v1/chat/completions", headers={"X-Request-Id": "e-405"}, timeout=10)
    assert (unknown.status_code, unknown.headers["x-request-id"]) == (404, "e-404-route")
    assert (wrong_method.status_code, wrong_method.headers["x-request-id"]) == (405, "e-405")
    health = httpx.get(f"{fleet.http}/health", headers={"X-Request-Id": "probe-1"}, timeout=10)
    assert health.headers["x-request-id"] == "probe-1"


def test_a_429_carries_the_id(fleet: Fleet) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(grpc.insecure_channel(fleet.cluster.controlplane))
    request = admin_pb2.CreateApiKeyRequest(name="one-a-minute")
    request.limits.requests_per_minute = 1
    reply = admin.CreateApiKey(request, metadata=(("authorization", f"Bearer {fleet.admin_token}"),), timeout=30)
    client = fleet.client(reply.secret, fleet.keyed_http)

    def first() -> bool:  # the key reaches the edge in its key table stream: a 401 until it has
        try:
            client.models.list()
        except openai.AuthenticationError:
            return False
        return True

    wait_for(first, 30, "the key at the edge")
    statuses = []
    for i in range(2):
        try:
            raw = client.completions.with_raw_response.create(
                model=MODEL, prompt="One", max_tokens=1, extra_headers={"X-Request-Id": f"limited-{i}"}
            )
            statuses.append((raw.http_response.status_code, raw.headers["x-request-id"]))
        except openai.RateLimitError as exc:
            statuses.append((429, exc.response.headers["x-request-id"]))
    assert statuses == [(200, "limited-0"), (429, "limited-1")]


def test_a_request_whose_headers_never_finish_gets_a_408_with_an_id(fleet: Fleet) -> None:
    host, port = fleet.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 408")
    made = re.search(r"x-request-id: (\S+)", head)
    assert made and MADE.fullmatch(made.group(1)), head
    assert lines_with(fleet.edge, made.group(1))  # and the access log has the line for it


# --- the same id in the logs and at the engine ------------------------------------------------------------


def test_one_id_in_the_access_log_the_node_log_and_the_header(fleet: Fleet) -> None:
    request_id = f"trace-me-{time.time_ns()}"
    raw = fleet.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, extra_headers={"X-Request-Id": request_id}
    )
    assert raw.headers["x-request-id"] == request_id
    usage = raw.parse().usage
    assert usage is not None
    access = access_lines(fleet.edge, request_id)
    assert len(access) == 1, access  # one line per request
    seen = fields(access[0])
    assert seen["model"] == MODEL and seen["node"] == "node-a" and " 200 " in access[0]
    assert int(seen["prompt_tokens"]) == usage.prompt_tokens
    assert int(seen["completion_tokens"]) == usage.completion_tokens
    assert 0 < float(seen["ttft_ms"]) <= float(seen["duration_ms"])
    assert seen["request_id"] == request_id  # the text format's [request_id=...]
    node_lines = lines_with(fleet.node, request_id)
    served = [line for line in node_lines if "fleetlm.node.requests" in line]
    assert len(served) == 1, node_lines
    assert f"Generate {MODEL} on node-a/{MODEL}" in served[0] and ": ok " in served[0]
    assert f"completion_tokens={usage.completion_tokens}" in served[0]


def test_a_failed_request_has_its_id_in_both_logs(fleet: Fleet) -> None:
    with pytest.raises(openai.APIStatusError) as error:
        fleet.client().chat.completions.create(model=MISSING, messages=CHAT, extra_headers={"X-Request-Id": "lost-1"})
    assert error.value.status_code == 503 and error.value.request_id == "lost-1"
    access = access_lines(fleet.edge, "lost-1")
    assert len(access) == 1 and " 503 " in access[0] and "error=MODEL_UNAVAILABLE" in access[0], access


def test_the_engine_server_gets_the_id_as_a_header(fleet: Fleet) -> None:
    client = fleet.client()
    with client.chat.completions.with_streaming_response.create(
        model=ATTACHED, messages=CHAT, max_tokens=4, stream=True, extra_headers={"X-Request-Id": "to-engine-1"}
    ) as streamed:
        assert streamed.headers["x-request-id"] == "to-engine-1"
        assert [chunk for chunk in streamed.parse()]
    engine_lines = lines_with(fleet.engine, "x-request-id=to-engine-1")
    assert len(engine_lines) == 1 and "/v1/chat/completions" in engine_lines[0]
    assert "traceparent=-" in engine_lines[0]  # tracing is off in this fleet: no trace context is sent
    node_lines = [line for line in lines_with(fleet.node, "to-engine-1") if "fleetlm.node.requests" in line]
    assert len(node_lines) == 1 and "(openai " in node_lines[0]


def test_health_checks_do_not_cut_a_stream_on_an_engine_server_that_interrupts(fleet: Fleet) -> None:
    # llama_cpp.server ends a stream with [DONE] and no finish reason when another request arrives
    # (interrupt_requests, on by default), /v1/models included. Before, the node's health check did that to
    # any request longer than one check interval: a fresh-clone CI run saw this test's neighbour fail when
    # its request was cut before the first token and retried (the engine got it twice).
    client = fleet.client()
    for i in range(3):
        request_id = f"long-{i}-{time.time_ns()}"
        stream = client.completions.create(
            model=ATTACHED,
            prompt="Once upon a time",
            max_tokens=48,
            stream=True,
            extra_headers={"X-Request-Id": request_id},
        )
        finish = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"], finish
        assert len(lines_with(fleet.engine, f"x-request-id={request_id}")) == 1  # served once, not retried


# --- gRPC ---------------------------------------------------------------------------------------------------


def _generate(address: str, metadata: tuple[tuple[str, str], ...], model: str = MODEL) -> tuple[str, Any, list[Any]]:
    request = inference_pb2.GenerateRequest(model=model, prompt="One, two,")
    request.sampling.max_tokens = 3
    with grpc.insecure_channel(address) as channel:
        call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, metadata=metadata, timeout=60)
        initial = dict(call.initial_metadata())
        try:
            events = list(call)
        except grpc.RpcError as exc:
            return initial.get("x-request-id", ""), exc, []
    return initial.get("x-request-id", ""), None, events


def test_grpc_metadata_in_and_out(fleet: Fleet) -> None:
    given, error, events = _generate(fleet.grpc, (("x-request-id", "grpc-given-1"),))
    assert given == "grpc-given-1" and error is None and events[-1].HasField("result")
    made, error, _ = _generate(fleet.grpc, ())
    assert MADE.fullmatch(made) and error is None
    refused, error, _ = _generate(fleet.grpc, (("x-request-id", "not valid"),))
    assert MADE.fullmatch(refused)  # the edge's own id comes back with the refusal
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-id" in error.details()
    access = access_lines(fleet.edge, "grpc-given-1")
    assert len(access) == 1 and "grpc Generate 200" in access[0] and "node=node-a" in access[0]
    assert [line for line in lines_with(fleet.node, "grpc-given-1") if "fleetlm.node.requests" in line]


def test_an_invalid_request_id_field_beside_the_metadatas_id_is_refused_and_list_models_carries_the_id(
    fleet: Fleet,
) -> None:
    """The metadata's id wins over the field's, but a field that is no valid id is not passed over (the call
    succeeded under the metadata's id); ListModels sends the id back and has its access line (it had neither)."""
    request = inference_pb2.GenerateRequest(model=MODEL, prompt="One, two,", request_id="bad id")
    request.sampling.max_tokens = 3
    with grpc.insecure_channel(fleet.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, metadata=(("x-request-id", "grpc-field-1"),), timeout=60))
        reply, call = stub.ListModels.with_call(
            inference_pb2.ListModelsRequest(), metadata=(("x-request-id", "grpc-list-1"),), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in refused.value.details()
    assert MODEL in [m.name for m in reply.models]
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-list-1"
    access = wait_for(lambda: access_lines(fleet.edge, "grpc-list-1"), 10, "ListModels' access line")
    assert len(access) == 1 and "grpc ListModels 200" in access[0], access


def test_grpc_failures_and_unary_calls_carry_the_id(fleet: Fleet) -> None:
    """The id is sent while the edge routes the request (not before): it still comes back first, also when
    the call fails before any token, and on the unary calls."""
    given, error, events = _generate(fleet.grpc, (("x-request-id", "grpc-unknown-1"),), model="no-such-model")
    assert given == "grpc-unknown-1" and not events
    assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND, error
    access = access_lines(fleet.edge, "grpc-unknown-1")
    assert len(access) == 1 and "grpc Generate 404" in access[0], access
    with grpc.insecure_channel(fleet.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        reply, call = stub.Tokenize.with_call(
            inference_pb2.TokenizeRequest(model=MODEL, text="One, two"), metadata=(("x-request-id", "grpc-tok-1"),)
        )
        assert reply.token_ids and dict(call.initial_metadata())["x-request-id"] == "grpc-tok-1"
        future = stub.Tokenize.future(
            inference_pb2.TokenizeRequest(model="no-such-model", text="x"), metadata=(("x-request-id", "bad id"),)
        )
        with pytest.raises(grpc.RpcError) as refused:
            future.result(timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-request-id" in refused.value.details()
    assert MADE.fullmatch(dict(future.initial_metadata())["x-request-id"])


def test_a_server_that_refuses_such_ids_gets_none_and_still_serves(fleet: Fleet) -> None:
    """llama_cpp.server as it ships answers 400 to every request whose X-Request-Id is not a UUID: the node
    found that at start and sends it none (before, every request to it failed with that 400)."""
    reply = fleet.client().chat.completions.with_raw_response.create(
        model=STRICT, messages=CHAT, max_tokens=3, extra_headers={"X-Request-Id": "to-strict-1"}
    )
    assert reply.headers["x-request-id"] == "to-strict-1" and reply.parse().choices[0].message.content
    assert any("/v1/chat/completions x-request-id=-" in line for line in lines_with(fleet.strict_engine, "ENGINE"))
    warned = lines_with(fleet.node, "refuses X-Request-Id")
    assert len(warned) == 1 and "WARNING" in warned[0]
    served = [line for line in lines_with(fleet.node, "to-strict-1") if "fleetlm.node.requests" in line]
    assert len(served) == 1 and ": ok " in served[0]  # the node's own log still has the id
