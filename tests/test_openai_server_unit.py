"""What an OpenAI-compatible server's /models entry says of its context, as each server writes it."""

from __future__ import annotations

from typing import Any

import pytest

from node_agent.engines.base import SamplingOptions
from node_agent.engines.openai_server import _reported_context, request_body


@pytest.mark.parametrize(
    ("entry", "context"),
    [
        ({"id": "m", "object": "model", "max_model_len": 32768}, 32768),  # vLLM, SGLang
        ({"id": "m", "meta": {"n_ctx": 3072, "n_ctx_train": 8192, "n_vocab": 49152}}, 3072),  # llama-server
        ({"id": "m", "object": "model", "owned_by": "me", "permissions": []}, 0),  # llama_cpp.server: none
        ({"id": "m", "max_model_len": None, "meta": "?"}, 0),
        ({"id": "m", "max_model_len": True}, 0),
        ({"id": "m", "max_model_len": -1}, 0),
    ],
)
def test_the_context_a_servers_models_entry_reports(entry: dict[str, Any], context: int) -> None:
    assert _reported_context(entry) == context


def test_a_seed_goes_to_an_openai_compatible_server_within_its_range_and_never_as_random() -> None:
    """SamplingParams' seed is unsigned 64-bit; vLLM refuses one beyond a signed 64-bit integer, llama.cpp's
    servers read -1 as "random": a server gets every seed as a fixed one it takes."""

    def sent(seed: int) -> Any:
        _, body = request_body("Hello", SamplingOptions(max_tokens=4, seed=seed), "m")
        return body["seed"]

    assert [sent(s) for s in (0, 5, 2**63 - 1, 2**63, 2**64 - 1)] == [0, 5, 2**63 - 1, 0, 2**63 - 1]
