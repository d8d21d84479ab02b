"""How an OpenAI-compatible engine server's refusal becomes the engine's error (node_agent.engines.
openai_server.upstream_error): the client's fault (a 400 naming the field, not retried) or the server's (a
retryable 503, tried on another replica). The messages are the servers' own, as llama-server,
llama_cpp.server and vLLM word them; the same through a fleet: tests/test_openai_engines.py."""

from __future__ import annotations

import pytest

from node_agent.engines.base import ContextLengthExceeded, EngineUnavailable, InvalidInput
from node_agent.engines.openai_server import upstream_error


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (501, "This server does not support embeddings. Start it with --embeddings"),  # llama-server
        (500, "Llama model must be created with embedding=True to call this method"),  # llama_cpp.server
        (404, "File Not Found"),  # a route the server lacks
        (405, "Method Not Allowed"),
    ],
)
def test_an_operation_the_server_does_not_serve_is_the_clients_400(status: int, message: str) -> None:
    error = upstream_error(status, message, "input")
    assert isinstance(error, InvalidInput) and error.param == "input"
    assert "does not serve this request" in str(error) and message in str(error)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (500, "input (3001 tokens) is too large to process. increase the physical batch size"),  # llama-server
        (400, "request (3031 tokens) exceeds the available context size (2048 tokens), try increasing it"),
        (400, "This model's maximum context length is 2048 tokens. However, you requested 3000 tokens"),  # vLLM
    ],
)
def test_an_input_too_long_is_context_length_exceeded_in_openais_words(status: int, message: str) -> None:
    error = upstream_error(status, message, "messages")
    assert isinstance(error, ContextLengthExceeded) and error.param == "messages"
    assert "maximum context length" in str(error) and message in str(error)


@pytest.mark.parametrize(
    ("status", "message"), [(500, "CUDA error: out of memory"), (503, "Loading model"), (502, "Bad Gateway")]
)
def test_the_servers_own_failures_stay_retryable(status: int, message: str) -> None:
    assert isinstance(upstream_error(status, message, "prompt"), EngineUnavailable)
