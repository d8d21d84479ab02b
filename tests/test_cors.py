"""CORS on the edge's HTTP API (`fleetlm edge --cors-origins`): a web page of an allowed origin calls the
OpenAI API from a browser, a page of any other origin gets no permission, and an edge without the flag sends
no CORS headers at all. Against a real edge in front of SmolLM2 (the session's mesh), with the preflight and
the headers a browser sends."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.cluster import fleetlm
from tests.conftest import Mesh

pytestmark = [pytest.mark.model, pytest.mark.cluster]

APP = "http://app.example:3000"
OTHER = "https://evil.example"


@pytest.fixture(scope="module")
def cors_edge(mesh: Mesh) -> Iterator[str]:
    """A second edge of the same fleet that lets pages of APP and of http://[::1]:5173 call it."""
    proc, http, _ = mesh.cluster.start_edge("--cors-origins", f"{APP}, http://[::1]:5173")
    try:
        mesh.cluster.wait_model_state(http, mesh.model)
        yield http
    finally:
        proc.stop()


def preflight(http: str, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.options(
        f"{http}{path}",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-os",
        },
        timeout=10,
    )


def chat(http: str, origin: str, model: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream}
    return httpx.post(f"{http}/v1/chat/completions", json=body, headers={"origin": origin}, timeout=60)


def test_a_page_of_an_allowed_origin_may_call_the_api(cors_edge: str, mesh: Mesh) -> None:
    for origin in (APP, "http://[::1]:5173"):
        allowed = preflight(cors_edge, origin)
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == origin
        assert "POST" in allowed.headers["access-control-allow-methods"]
        asked = {h.strip() for h in allowed.headers["access-control-allow-headers"].lower().split(",")}
        assert {"authorization", "content-type", "x-stainless-os"} <= asked
    for stream in (False, True):
        reply = chat(cors_edge, APP, mesh.model, stream)
        assert reply.status_code == 200, reply.text
        assert reply.headers["access-control-allow-origin"] == APP
        exposed = reply.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
    assert (chat(cors_edge, APP, mesh.model, True).text.rstrip()).endswith("data: [DONE]")
    # An error is readable by the page too: OpenAI's error body, with the permission.
    missing = chat(cors_edge, APP, "no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert missing.headers["access-control-allow-origin"] == APP
    models = httpx.get(f"{cors_edge}/v1/models", headers={"origin": APP}, timeout=10)
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == APP


def test_a_page_of_another_origin_gets_no_permission(cors_edge: str, mesh: Mesh) -> None:
    refused = preflight(cors_edge, OTHER)
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    reply = chat(cors_edge, OTHER, mesh.model)  # the server answers; the browser keeps it from the page
    assert "access-control-allow-origin" not in reply.headers


def test_an_edge_without_the_flag_sends_no_cors_headers(mesh: Mesh) -> None:
    reply = chat(mesh.http, APP, mesh.model)
    assert reply.status_code == 200
    assert not [h for h in reply.headers if h.startswith("access-control-")]
    assert "access-control-allow-origin" not in preflight(mesh.http, APP).headers


@pytest.mark.parametrize("origins", ["https://app.example/path", "app.example", "https://a.example,ftp//x"])
def test_a_value_that_is_not_an_origin_is_refused_naming_it(origins: str) -> None:
    import subprocess

    done = subprocess.run(fleetlm("edge", "--cors-origins", origins), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--cors-origins" in done.stderr and "is not an origin" in done.stderr
    assert "Traceback" not in done.stderr
