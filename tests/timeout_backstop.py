"""A backstop for pytest-timeout, for a hang that its SIGALRM cannot break.

pytest-timeout (configured in pyproject.toml: 300 s a test, method "signal") fails a hung test with its
name, runs its teardown (the cluster's processes are stopped) and goes on to the next test. The signal only
lands when the main thread runs Python code, though: a hang inside a native call that never returns would
eat the whole CI job. So a timer thread waits a little longer than the timeout; if the test is still
running then, it names the test, dumps every thread's stack and ends the run. The processes the test
started die with pytest (tests/cluster.py gives them a parent-death signal).

tests/conftest.py imports the two hooks; pytest-timeout calls them around every test it times.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from collections.abc import Generator
from typing import Any

import pytest

_TIMER = pytest.StashKey[threading.Timer]()


def grace_seconds(timeout: float) -> float:
    """How long after the timeout the backstop fires: the signal's own failure and teardown come first."""
    return max(10.0, timeout / 5)


def _give_up(item: pytest.Item, after: float) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # pytest holds fd 2 in a file that os._exit would never print
        capture.suspend_global_capture(in_=True)
    out = sys.__stderr__ or sys.stderr
    out.write(
        f"\n+++ TIMEOUT: {item.nodeid} still running after {after:g}s, past pytest-timeout's limit: it is"
        " stuck where SIGALRM cannot reach (native code). Stacks of every thread:\n"
    )
    out.flush()
    faulthandler.dump_traceback(file=out, all_threads=True)
    out.write(f"+++ TIMEOUT: {item.nodeid}; ending the test run\n")
    out.flush()
    os._exit(1)


@pytest.hookimpl(hookwrapper=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, None, None]:
    after = settings.timeout + grace_seconds(settings.timeout)
    timer = threading.Timer(after, _give_up, (item, after))
    timer.daemon = True
    timer.start()
    item.stash[_TIMER] = timer
    yield


@pytest.hookimpl(hookwrapper=True, optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> Generator[None, None, None]:
    timer = item.stash.get(_TIMER, None)
    if timer is not None:
        timer.cancel()
    yield
