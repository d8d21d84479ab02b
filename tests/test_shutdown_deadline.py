"""A service's shutdown always ends the process (mesh.lifecycle.run_until_signalled): an orderly one exits 0
at once; one that does not finish within the service's grace + the margin, or that gets a second signal,
exits 1 with one log line saying so. A control plane whose etcd died at the moment it was told to stop was
seen waiting forever in the etcd client's watch, holding its ports, with no parent left to stop it.

Real processes and real signals: a small program runs the services' own `run_until_signalled` with a
shutdown step that never returns and ignores cancellation, as the etcd client's did."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROGRAM = """
import asyncio, logging, sys
from mesh import lifecycle

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
lifecycle.SHUTDOWN_MARGIN_SECONDS = float(sys.argv[1])
hang = sys.argv[2] == "hang"

async def body(stop):
    print("serving", flush=True)
    await stop.wait()
    print("stopping", flush=True)
    while hang:  # a shutdown step that never returns and swallows its cancellation
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass

lifecycle.run_until_signalled(body, grace=0.5)
print("stopped", flush=True)
"""

ROOT = Path(__file__).resolve().parent.parent


def start(margin: float, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(margin), mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # bounded: the program prints it at once or dies (then "" here)
    assert first == "serving\n", (first, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running {timeout} s after the signal; stdout {out!r}, stderr {err[-2000:]!r}")
    return proc.returncode, out, err


def test_a_shutdown_that_hangs_ends_after_the_grace_and_the_margin() -> None:
    proc = start(1.0, "hang")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, 20)
    waited = time.monotonic() - signalled
    assert code == 1, (out, err)
    assert "stopping" in out and "stopped" not in out
    assert "the shutdown did not finish within 1.5 s of SIGTERM: exiting without finishing it" in err, err
    assert waited >= 1.5  # the grace and the margin were given


def test_a_second_signal_during_the_shutdown_ends_it_at_once() -> None:
    proc = start(120.0, "hang")
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "stopping\n"
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc, 20)
    assert code == 1, (out, err)
    assert "a second SIGINT during the shutdown: exiting without finishing it" in err, err
    assert time.monotonic() - signalled < 10  # not the 120 s margin


def test_an_orderly_shutdown_exits_0_without_waiting_for_the_deadline() -> None:
    proc = start(120.0, "finish")
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, 20)
    assert code == 0, (out, err)
    assert out.endswith("stopping\nstopped\n")
    assert "exiting without finishing" not in err
    assert time.monotonic() - signalled < 10
