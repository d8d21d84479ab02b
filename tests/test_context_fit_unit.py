"""`may_exceed`: whether a prompt could fail the context check, told without tokenizing it (the node asks it
of a request refused for want of room, node_agent.inference_service). It may say yes for a prompt that fits
(then the prompt is counted); it must never say no for one that does not."""

from __future__ import annotations

import pytest

from node_agent.engines.base import (
    Chat,
    ContextLengthExceeded,
    Function,
    Message,
    TokenPrompt,
    check_context,
    may_exceed,
)


def test_text_fits_at_one_token_per_byte() -> None:
    assert not may_exceed("a" * 900, 1024, 100)
    assert may_exceed("a" * 1000, 1024, 100)
    assert may_exceed("é" * 500, 1024, 100)  # 1,000 bytes
    assert not may_exceed("a" * 1000, 1024, None)
    assert may_exceed("a" * 1023, 1024, None)


def test_token_ids_are_counted_as_they_are() -> None:
    assert not may_exceed(TokenPrompt(tuple(range(923))), 1024, 100)
    assert may_exceed(TokenPrompt(tuple(range(924))), 1024, 100)


def test_a_conversation_leaves_room_for_its_template_and_tools_always_count() -> None:
    short = Chat((Message("system", "Be brief."), Message("user", "Hi")))
    assert not may_exceed(short, 1024, 100)
    assert may_exceed(Chat((Message("user", "x" * 900),)), 1024, 100)
    assert may_exceed(Chat((Message("user", "Hi"),), tools=(Function("f"),)), 1024, 100)


def test_the_check_names_the_prompt_or_max_tokens() -> None:
    check_context(1000, 1024, 24)
    with pytest.raises(ContextLengthExceeded) as caught:
        check_context(1024, 1024, None)
    assert caught.value.param == "messages"
    with pytest.raises(ContextLengthExceeded) as caught:
        check_context(1000, 1024, 25)
    assert caught.value.param == "max_tokens" and "maximum context length of 1024" in str(caught.value)
