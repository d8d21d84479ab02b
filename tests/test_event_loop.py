"""The services' event loop (mesh.lifecycle): uvloop by default where it is installed, the standard library's
with FLEETLM_EVENT_LOOP=asyncio, and a clear refusal of anything else; a real edge process runs on the loop
it is told to (uvloop's extension is loaded in it, or not)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
import uvloop

from mesh.lifecycle import EVENT_LOOP_ENV, free_port, loop_factory
from tests.cluster import wait_for


@pytest.mark.parametrize(
    ("value", "kind"), [("", uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)]
)
def test_the_loop_is_the_one_asked_for(monkeypatch: pytest.MonkeyPatch, value: str, kind: type) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, value)
    loop = loop_factory()()
    try:
        assert isinstance(loop, kind)
        assert value == "asyncio" or not isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()


def test_an_unknown_loop_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    with pytest.raises(SystemExit) as refused:
        loop_factory()
    assert EVENT_LOOP_ENV in str(refused.value) and "uvloop or asyncio" in str(refused.value)


def test_a_service_refuses_an_unknown_loop_in_one_line() -> None:
    """What an operator who mistypes the variable sees: one line naming it, exit status 1, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "edge", "--controlplane", "127.0.0.1:1"],
        env={**os.environ, EVENT_LOOP_ENV: "uvlop"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert EVENT_LOOP_ENV in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("value", ["", "asyncio"])
def test_an_edge_process_runs_on_the_loop_it_is_told_to(value: str) -> None:
    http = free_port()
    argv = [sys.executable, "-m", "launcher", "edge", "--controlplane", f"127.0.0.1:{free_port()}",
            "--http-listen", f"127.0.0.1:{http}", "--grpc-listen", f"127.0.0.1:{free_port()}"]  # fmt: skip
    edge = subprocess.Popen(argv, env={**os.environ, EVENT_LOOP_ENV: value}, stderr=subprocess.DEVNULL)
    try:

        def answers() -> bool:
            httpx.get(f"http://127.0.0.1:{http}/v1/models", timeout=1)  # any reply: the loop runs
            return True

        wait_for(answers, 60, "the edge to answer", None)
        with open(f"/proc/{edge.pid}/maps") as maps:
            loaded = "uvloop" in maps.read()
        assert loaded == (value != "asyncio")
    finally:
        edge.terminate()
        edge.wait(30)


async def test_a_stream_read_through_until_set_leaves_no_unretrieved_error_when_its_handler_ends() -> None:
    """A long-lived stream's handler reads its requests through until_set; when its call ends (cancelled)
    while a read is pending, and the stream then ends, nothing is logged as "Task exception was never
    retrieved" (a control plane logged that at ERROR on every node that rejoined after a partition)."""
    import gc

    from mesh.lifecycle import until_set

    ended = asyncio.Event()

    async def requests() -> Any:
        await ended.wait()
        return
        yield  # an async generator that ends (StopAsyncIteration) once `ended` is set

    async def handler() -> None:
        async for _ in until_set(asyncio.Event(), requests()):
            pass

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        # Cancelled while the read is pending and the stream ends later; and the stream's end and the
        # cancellation together, as when a client goes away (the read is done when the handler is cancelled).
        for together in (False, True):
            call = asyncio.ensure_future(handler())
            await asyncio.sleep(0.05)  # the read is pending
            if together:
                ended.set()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            ended.set()
            await asyncio.sleep(0.05)
            del call
            gc.collect()
            await asyncio.sleep(0)
            ended.clear()
    finally:
        loop.set_exception_handler(previous)
    assert [c.get("message") for c in reported] == []
