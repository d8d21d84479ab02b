"""Limits against abuse: request body size (Content-Length and chunked), body and header deadlines (a
client that trickles bytes), messages per chat, prompt characters before tokenization. Each is refused
with a clear 4xx in the API's own shape: OpenAI's error body over HTTP, INVALID_ARGUMENT over gRPC.

The body limit and the checks of the request are tested on the real edge (the mesh fixture); the
deadlines on the edge's HTTP app and uvicorn protocol served here with short deadlines, so that a test
waits seconds, not the defaults' tens of seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import openai
import pytest
import uvicorn

from edge.gateway import Gateway
from edge.http_app import create_app
from edge.http_limits import HttpLimits, uvicorn_options
from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
from mesh.errors import ErrorCode, FleetError
from mesh.inference_requests import (
    MAX_MESSAGES,
    MAX_PROMPT_CHARS,
    validate_embed,
    validate_generate,
    validate_tokenize,
)
from tests.conftest import Mesh

BODY_LIMIT = HttpLimits().max_body_bytes


def _refusal(call: Any) -> FleetError:
    with pytest.raises(FleetError) as caught:
        call()
    return caught.value


# --- the request checks, the same at the edge and on the node ------------------------------------------


def test_messages_and_prompt_characters_are_bounded_before_tokenizing() -> None:
    many = inference_pb2.ChatConversation(
        messages=[inference_pb2.ChatMessage(role="user", content="hi")] * (MAX_MESSAGES + 1)
    )
    error = _refusal(lambda: validate_generate(inference_pb2.GenerateRequest(model="m", chat=many)))
    assert (error.code, error.param) == (ErrorCode.INVALID_REQUEST, "messages")
    assert str(MAX_MESSAGES) in error.message

    big = "x" * (MAX_PROMPT_CHARS + 1)
    cases = [
        (lambda: validate_generate(inference_pb2.GenerateRequest(model="m", prompt=big)), "prompt"),
        (
            lambda: validate_generate(
                inference_pb2.GenerateRequest(
                    model="m",
                    chat=inference_pb2.ChatConversation(
                        messages=[
                            inference_pb2.ChatMessage(role="user", content=big[: MAX_PROMPT_CHARS // 2 + 1]),
                            inference_pb2.ChatMessage(role="user", content=big[: MAX_PROMPT_CHARS // 2 + 1]),
                        ]
                    ),
                )
            ),
            "messages",
        ),
        (lambda: validate_embed(inference_pb2.EmbedRequest(model="m", inputs=[big[:600_000], big[:600_000]])), "input"),
        (lambda: validate_tokenize(inference_pb2.TokenizeRequest(model="m", text=big)), "text"),
    ]
    for call, param in cases:
        error = _refusal(call)
        assert (error.code, error.param) == (ErrorCode.INVALID_REQUEST, param), error
    # At the limits, nothing is refused.
    validate_generate(inference_pb2.GenerateRequest(model="m", prompt=big[:MAX_PROMPT_CHARS]))
    validate_generate(
        inference_pb2.GenerateRequest(
            model="m",
            chat=inference_pb2.ChatConversation(
                messages=[inference_pb2.ChatMessage(role="user", content="hi")] * MAX_MESSAGES
            ),
        )
    )


@pytest.mark.cluster
@pytest.mark.model
def test_over_http_and_grpc_the_same_limits_get_a_400_naming_the_field(mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=60)
    messages: Any = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=mesh.model, messages=messages, max_tokens=1)
    assert caught.value.body["param"] == "messages" and caught.value.body["code"] == "INVALID_REQUEST"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=mesh.model, prompt="x" * (MAX_PROMPT_CHARS + 1), max_tokens=1)
    assert caught.value.body["param"] == "prompt"  # type: ignore[index]

    with grpc.insecure_channel(mesh.grpc) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(model=mesh.model, prompt="x" * (MAX_PROMPT_CHARS + 1))
        with pytest.raises(grpc.RpcError) as rpc:
            list(stub.Generate(request, timeout=60))
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(MAX_PROMPT_CHARS) in (rpc.value.details() or "")


# --- the body limit on the real edge -------------------------------------------------------------------


def _host_port(http: str) -> tuple[str, int]:
    host, port = http.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _read_response(sock: socket.socket, limit: float) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP response (Content-Length framed), within `limit` seconds."""
    sock.settimeout(limit)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.mark.cluster
@pytest.mark.model
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_a_declared_body_over_the_limit_is_refused_413_before_it_is_sent(mesh: Mesh, path: str) -> None:
    with socket.create_connection(_host_port(mesh.http), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            f"Content-Length: {BODY_LIMIT + 1}\r\n\r\n".encode()
        )
        # Not a byte of the body is sent: the answer must come anyway (30 s: a busy machine, not a wait for
        # the body, which never comes).
        status, headers, body = _read_response(sock, 30)
    assert status == 413
    assert headers.get("connection") == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "REQUEST_TOO_LARGE" and error["type"] == "invalid_request_error"
    assert str(BODY_LIMIT) in error["message"]


@pytest.mark.cluster
@pytest.mark.model
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
def test_a_chunked_body_over_the_limit_is_refused_413_once_the_limit_is_passed(mesh: Mesh, path: str) -> None:
    chunk = b"x" * (1024 * 1024)
    sent = 0
    with socket.create_connection(_host_port(mesh.http), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        # At most twice the limit: the edge must answer before the client stops by itself.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 2 * BODY_LIMIT:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        status, _, body = _read_response(sock, 30)
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "REQUEST_TOO_LARGE"
    print(f"chunked body refused after the client sent {sent} bytes (limit {BODY_LIMIT})")


@pytest.mark.cluster
@pytest.mark.model
def test_a_body_just_under_the_limit_is_read_and_answered(mesh: Mesh) -> None:
    """The limit refuses only what is over it: a valid request padded to near the limit is served."""
    padding = "x" * (BODY_LIMIT - 4096)
    body = {"model": mesh.model, "prompt": "Hello", "max_tokens": 1, "padding": padding}
    client = openai.OpenAI(base_url=f"{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.completions.create(model=mesh.model, prompt="Hello", max_tokens=1, extra_body=body)
    assert reply.choices[0].finish_reason == "length"


# --- deadlines: a client that trickles its headers or its body holds nothing for long -------------------


@contextlib.asynccontextmanager
async def serve_edge_app(limits: HttpLimits) -> AsyncIterator[int]:
    """The edge's HTTP app (create_app) under uvicorn with `uvicorn_options(limits)`, as edge/server.py
    runs it, on a free port. Its gateway has no control plane: these requests never get past reading."""
    gateway = Gateway(["127.0.0.1:9"], request_timeout_seconds=5, placement_timeout_seconds=1)
    config = uvicorn.Config(
        create_app(gateway, limits),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        access_log=False,
        lifespan="off",
        **uvicorn_options(limits),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(400):  # 20 s at most for a server on this loop to bind
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        await gateway.close()


async def _trickle(port: int, head: bytes, tail: bytes, every: float, give_up: float) -> tuple[float, bytes, int]:
    """Send `head`, then `tail` one byte every `every` s until the server answers or closes, or `give_up`
    seconds pass. Returns (seconds until the server answered or closed, what it sent, bytes trickled)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(head)
    await writer.drain()
    answer = b""
    trickled = 0
    try:
        for byte in tail:
            if time.monotonic() - started > give_up:
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            trickled += 1
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), every)
                break  # the server answered, or closed (b"")
        return time.monotonic() - started, answer, trickled
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_headers_sent_slowly_get_408_and_the_connection_is_closed() -> None:
    limits = HttpLimits(header_timeout_seconds=2, body_timeout_seconds=2)
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    async with serve_edge_app(limits) as port:
        # One byte every 0.5 s: 200 bytes would take 100 s; the deadline is 2 s. Given up at 30 s (the
        # failure: uvicorn alone would wait forever).
        took, answer, trickled = await _trickle(port, b"", request, 0.5, give_up=30)
        # The connection of a client that sends nothing at all is closed too.
        idle_took, idle_answer, _ = await _trickle(port, b"", b"G" + b"E" * 100, 5.0, give_up=30)
    print(f"trickled headers: {trickled} bytes, answered after {took:.1f} s; silent client: {idle_took:.1f} s")
    assert answer.startswith(b"HTTP/1.1 408"), answer
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "REQUEST_TIMEOUT"
    assert 1.5 < took < 20  # 2 s deadline; up to 20 s for a loaded 2-core machine
    assert idle_answer.startswith(b"HTTP/1.1 408") and idle_took < 20, idle_answer


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_a_body_sent_slowly_gets_408(path: str) -> None:
    limits = HttpLimits(header_timeout_seconds=2, body_timeout_seconds=2)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 200}]}).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with serve_edge_app(limits) as port:
        took, answer, trickled = await _trickle(port, head, body, 0.5, give_up=30)
    print(f"{path}: trickled {trickled} body bytes, answered after {took:.1f} s")
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"REQUEST_TIMEOUT"' in answer
    assert 1.5 < took < 20


async def test_a_prompt_client_is_not_cut_by_the_deadlines() -> None:
    """Requests that arrive at once, several on one kept-alive connection with pauses under the keep-alive
    time between them, are all answered (with the gateway's own 4xx/5xx: there is no control plane)."""
    limits = HttpLimits(header_timeout_seconds=1, body_timeout_seconds=1, keep_alive_seconds=5)
    body = json.dumps({"model": "", "prompt": "hi"}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    async with serve_edge_app(limits) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        statuses = []
        for _ in range(3):
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            await asyncio.wait_for(reader.readexactly(length), 20)
            statuses.append(int(head.split()[1]))
            await asyncio.sleep(1.5)  # longer than the header deadline, shorter than keep-alive
        writer.close()
    assert statuses == [400, 400, 400]  # MODEL_REQUIRED each time, on the same connection


async def test_headers_larger_than_the_limit_get_431_and_the_connection_is_closed() -> None:
    """httptools buffers a header of any length: without a bound a client (before any key is checked) made
    the edge parse and hold a 16 MB header, and five unfinished 60 MB ones grew it by 120 MB. Beyond the
    limit the answer is 431 as soon as that much has arrived; headers under it (and a large body after
    them) are read as before."""
    limits = HttpLimits(max_incomplete_event_bytes=16 * 1024)
    async with serve_edge_app(limits) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: edge\r\nX-Big: ")
        sent = 0
        answer = b""
        try:
            while sent < 4 * 1024 * 1024 and not answer:  # never finished: 4 MB at most, then the test fails
                writer.write(b"a" * 8192)
                await writer.drain()
                sent += 8192
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(65536), 0.01)
        except ConnectionError:
            pass
        if not answer:
            answer = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        status, headers, body = _read_response_bytes(answer)
        assert status == 431, answer[:200]
        assert headers.get("connection") == "close" and headers.get("x-request-id", "").startswith("req_")
        assert json.loads(body)["error"]["code"] == "REQUEST_HEADERS_TOO_LARGE"
        assert sent < 1024 * 1024, sent  # refused once the limit was passed, not at the end
        # Headers under the limit, with a body larger than it, are taken.
        payload = json.dumps({"model": "", "prompt": "x" * 100_000}).encode()
        request = (
            f"POST /v1/completions HTTP/1.1\r\nHost: edge\r\nX-Pad: {'b' * 8000}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode() + payload
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 20)
        writer.close()
    assert _read_response_bytes(reply)[0] == 400, reply[:200]  # MODEL_REQUIRED: it reached the route


def _read_response_bytes(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return int(lines[0].split()[1]), headers, body
