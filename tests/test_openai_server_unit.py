"""What an OpenAI-compatible server's /models entry says of its context, as each server writes it."""

from __future__ import annotations

from typing import Any

import pytest

from node_agent.engines.openai_server import _reported_context


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
