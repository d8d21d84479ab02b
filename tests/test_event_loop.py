"""The services' event loop (mesh.lifecycle): uvloop by default where it is installed, the standard library's
with FLEETLM_EVENT_LOOP=asyncio, and a clear refusal of anything else; a real edge process runs on the loop
it is told to (uvloop's extension is loaded in it, or not)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

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
