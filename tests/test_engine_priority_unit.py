"""The llama.cpp engine's compute threads lower their own priority (llamacpp_batch.lower_thread_priority):
the SCHED_IDLE class where the system has it, else a nice value; the thread that asks, nobody else."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from node_agent.engines.llamacpp_batch import lower_thread_priority


def _lowered(nice: int, idle: bool) -> tuple[int, int]:
    """(policy, nice) of a new thread after it lowered itself."""
    seen: list[tuple[int, int]] = []

    def run() -> None:
        lower_thread_priority(nice, idle)
        seen.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


def test_idle_puts_the_calling_thread_alone_in_sched_idle() -> None:
    assert _lowered(10, idle=True)[0] == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_without_idle_the_thread_gets_the_nice_value() -> None:
    assert _lowered(10, idle=False) == (os.SCHED_OTHER, 10)


def test_a_system_without_sched_idle_falls_back_to_the_nice_value(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(os, "SCHED_IDLE")
    with caplog.at_level(logging.WARNING):
        assert _lowered(10, idle=True) == (os.SCHED_OTHER, 10)
    assert "no SCHED_IDLE class" in caplog.text and "nice 10 instead" in caplog.text
