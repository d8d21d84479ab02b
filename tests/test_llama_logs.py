"""llama.cpp's own log lines reach the node's logging at their own level: its warnings as warnings, its
chatter (the model loader's dump of the file's metadata) at DEBUG, with the real library and model."""

from __future__ import annotations

import logging

import pytest

from launcher.default_model import default_model_path
from node_agent import llama_logs

pytestmark = [pytest.mark.model]


def test_llama_cpp_lines_keep_their_level(caplog: pytest.LogCaptureFixture) -> None:
    import llama_cpp

    llama_logs.route()
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        # An embedding context with a pooling the model does not declare: llama.cpp warns (LLAMA_LOG_WARN)
        # "model default pooling_type is [-1], but [1] was specified", after its info lines about the file.
        llm = llama_cpp.Llama(
            str(default_model_path()),
            n_ctx=256,
            embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            verbose=False,
        )
        llm.close()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llama.cpp"]
    loader = [level for level, text in lines if text.startswith("llama_model_loader:")]
    assert loader and set(loader) == {logging.DEBUG}, lines[:5]
    pooling = [level for level, text in lines if "pooling_type" in text and "was specified" in text]
    assert pooling == [logging.WARNING], [line for line in lines if line[0] > logging.DEBUG]
    assert not [line for line in lines if line[0] >= logging.ERROR], lines
