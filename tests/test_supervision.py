"""Supervision of engines that run as child processes, with real processes: a real llama_cpp.server
serving the real model where an engine is needed, plain processes where only the process matters."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import psutil
import pytest

from launcher.default_model import default_model_path
from mesh.catalog import ModelEntry
from mesh.lifecycle import free_port
from node_agent.engines.base import EngineError, SamplingOptions, TextChunk
from node_agent.engines.launched import LaunchedServerEngine, command_launch
from node_agent.engines.openai_server import OpenAIServerConfig
from node_agent.engines.supervisor import EngineProcess

LLAMA_CPP_SERVER = [sys.executable, "-m", "llama_cpp.server", "--model", "{path}", "--port", "{port}",
                    "--n_threads", "2", "--n_ctx", "2048", "--interrupt_requests", "False"]  # fmt: skip


def launched(startup_timeout: float = 60) -> LaunchedServerEngine:
    """llama_cpp.server with the real model, started the way the agent starts a deployment's command."""
    spec = ModelEntry.model_validate(
        {
            "name": "smol-server",
            "path": str(default_model_path()),
            "engine": "openai",
            "command": LLAMA_CPP_SERVER,
            "startup_timeout": startup_timeout,
        }
    ).spec()
    port = free_port()
    launch = command_launch(spec, port)
    return LaunchedServerEngine(
        launch, OpenAIServerConfig(f"http://127.0.0.1:{port}", "smol-server", 2048, health_interval=0.2)
    )


def group_alive(pgid: int) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return alive


async def test_a_process_that_exits_while_starting_fails_with_its_last_output() -> None:
    script = "print('loading weights', flush=True); raise SystemExit('CUDA error: no CUDA-capable device')"
    process = EngineProcess("engine", [sys.executable, "-c", script])
    with pytest.raises(EngineError) as caught:
        await process.start(lambda: asyncio.sleep(0, result=False), timeout=30)
    message = str(caught.value)
    assert "exited with code 1 while starting" in message
    assert "loading weights" in message and "no CUDA-capable device" in message


async def test_start_up_timeout_fails_with_the_reason_and_leaves_nothing() -> None:
    # A server that hangs while loading (as SGLang does when a GPU is wedged): never listening.
    port = free_port()
    process = EngineProcess("hung", ["sh", "-c", "echo 'loading shard 1 of 4'; sleep 300"])

    async def ready() -> bool:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        return True

    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        await process.start(ready, timeout=0.5)
    assert time.monotonic() - started < 5
    assert str(caught.value) == "hung was not ready within 0.5s; last output:\nloading shard 1 of 4"
    pid = process.pid
    assert pid is not None
    # SIGKILLed processes of the group may take a moment to be gone on a busy machine: 10 s is generous.
    deadline = time.monotonic() + 10
    while group_alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not group_alive(pid)


@pytest.mark.model
async def test_served_then_a_crash_is_reported_with_the_exit_and_output() -> None:
    engine = launched()
    await engine.start()
    try:
        text = ""
        async for event in engine.generate("The capital of France is", SamplingOptions(max_tokens=8, temperature=0)):
            text += event.text if isinstance(event, TextChunk) else ""
        assert text.strip()
        pid = engine.process.pid
        assert pid is not None
        watch = asyncio.ensure_future(engine.watch())
        await asyncio.sleep(0.2)
        assert not watch.done()
        os.kill(pid, signal.SIGKILL)
        reason = await asyncio.wait_for(watch, 10)
        assert "was killed by SIGKILL" in reason and "last output" in reason
    finally:
        await engine.close()
    assert not group_alive(pid)


async def test_stop_ends_the_whole_process_group_even_when_sigterm_is_ignored() -> None:
    # A leader that ignores SIGTERM and has children of its own, as engines with worker processes do.
    script = "trap '' TERM; sleep 300 & sleep 300 & echo ready; wait"
    process = EngineProcess("stubborn", ["sh", "-c", script])
    await process.start(lambda: asyncio.sleep(0, result=True), timeout=10)
    pid = process.pid
    assert pid is not None
    deadline = time.monotonic() + 5
    while len(group_alive(pid)) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(group_alive(pid)) == 3
    started = time.monotonic()
    await process.stop(grace=0.5)
    assert time.monotonic() - started < 5
    assert not group_alive(pid)
