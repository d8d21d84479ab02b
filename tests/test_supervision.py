"""Supervision of engines that run as child processes, with real processes: a real llama_cpp.server
serving the real model where an engine is needed, plain processes where only the process matters."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psutil
import pytest

from fleetlm.inference.v1 import inference_pb2, inference_pb2_grpc
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


async def test_a_process_that_exits_while_starting_fails_with_its_last_output(caplog: pytest.LogCaptureFixture) -> None:
    script = "print('loading weights', flush=True); raise SystemExit('CUDA error: no CUDA-capable device')"
    process = EngineProcess("engine", [sys.executable, "-c", script])
    with pytest.raises(EngineError) as caught:
        await process.start(lambda: asyncio.sleep(0, result=False), timeout=30)
    # The reason (a replica's error: shown to clients and in `fleetlm status`'s table) is one line, with the
    # process's last line; its last lines are in the node's log, once.
    message = str(caught.value)
    assert "\n" not in message and "exited with code 1 while starting" in message
    assert "last output: CUDA error: no CUDA-capable device" in message and "loading weights" not in message
    [logged] = [r.getMessage() for r in caplog.records if "its last output" in r.getMessage()]
    assert "loading weights\nCUDA error: no CUDA-capable device" in logged


async def test_a_line_longer_than_the_readers_buffer_does_not_stop_the_reading() -> None:
    # Found by review: a line over 64 KiB (a server logging a long prompt) ended the reading of the process's
    # output; the pipe then filled and the process blocked on its next write, its health checks failing.
    script = (
        "import sys\n"
        "print('x' * 200_000, flush=True)\n"
        "for i in range(2000): print(f'line {i} ' + 'y' * 100)\n"  # 200 KB more than a pipe holds
        "print('served', flush=True)\n"
        "import time; time.sleep(300)\n"
    )
    process = EngineProcess("chatty", [sys.executable, "-c", script])

    async def ready() -> bool:
        return "served" in process.tail()

    await process.start(ready, timeout=30)  # never ready if the writes had blocked
    try:
        assert "line 1999" in process.tail()  # read to the end, past the long line
    finally:
        await process.stop()


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
    assert (
        str(caught.value)
        == "hung was not ready within 0.5s; last output: loading shard 1 of 4 (more in the node's log)"
    )
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


def test_children_started_on_uvloop_while_grpc_is_busy_run_their_command() -> None:
    """The node's loop is uvloop and its gRPC threads are busy while it starts engines. uvloop's own subprocess
    support forks and runs Python's after-fork code before the exec; here that killed about a third of the
    children (SIGSEGV, or SIGABRT from a gRPC check) before they printed anything. Each child must run."""
    import uvloop

    async def main() -> collections.Counter[str]:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(_Chatty(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        busy = True

        async def client() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                while busy:
                    async for _ in stub.Generate(inference_pb2.GenerateRequest(model="m", prompt="p")):
                        pass

        clients = [asyncio.ensure_future(client()) for _ in range(4)]
        outcomes: collections.Counter[str] = collections.Counter()
        try:
            await asyncio.sleep(0.2)
            for _ in range(60):
                process = EngineProcess("engine", ["sh", "-c", "echo loading; exit 3"])
                try:
                    await process.start(lambda: asyncio.sleep(0, result=False), timeout=30)
                    outcomes["ready?"] += 1
                except EngineError as exc:
                    outcomes[str(exc)] += 1
        finally:
            busy = False
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            await server.stop(0)
        return outcomes

    outcomes = uvloop.run(main())
    assert outcomes == {
        "engine exited with code 3 while starting; last output: loading (more in the node's log)": 60
    }, outcomes


class _Chatty(inference_pb2_grpc.InferenceServiceServicer):
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        for _ in range(20):
            yield inference_pb2.GenerateResponse(delta=inference_pb2.TextDelta(text="x"))
