"""The suite's own guard against hangs: a hung test fails with its name instead of eating CI's time, and
a run that has to be ended leaves no process behind. Each case runs pytest on a small test file, with this
repository's configuration and a 2 s timeout in place of its 300 s."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.timeout_backstop import grace_seconds

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 2.0
# The run's own bound: pytest's start-up plus the timeout and the backstop's grace, with room for busy cores.
RUN_BOUND = 120


def run_pytest(tmp_path: Path, test_source: str) -> tuple[subprocess.CompletedProcess[str], float]:
    (tmp_path / "conftest.py").write_text(
        "from tests.timeout_backstop import pytest_timeout_cancel_timer, pytest_timeout_set_timer  # noqa: F401\n"
    )
    (tmp_path / "test_hang.py").write_text(test_source)
    argv = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
            "-p", "no:cacheprovider", "-q", f"--timeout={TIMEOUT}", str(tmp_path / "test_hang.py")]  # fmt: skip
    env = {**os.environ, "MARKER_DIR": str(tmp_path)}
    start = time.monotonic()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_BOUND)
    return result, time.monotonic() - start


def test_a_test_hung_in_python_fails_with_its_name_and_the_run_goes_on(tmp_path: Path) -> None:
    result, _ = run_pytest(
        tmp_path,
        "import os, time\nfrom pathlib import Path\nimport pytest\n\n"
        "@pytest.fixture\ndef resource():\n    yield\n"
        "    Path(os.environ['MARKER_DIR'], 'torn-down').touch()\n\n"
        "def test_hangs_in_python(resource):\n    time.sleep(3600)\n\n"
        "def test_after():\n    pass\n",
    )
    assert "FAILED" in result.stdout and "test_hangs_in_python" in result.stdout, result.stdout + result.stderr
    assert "Timeout" in result.stdout
    assert "1 failed, 1 passed" in result.stdout
    assert (tmp_path / "torn-down").exists()  # its teardown ran: a cluster fixture would have been stopped


def test_a_test_stuck_where_the_signal_cannot_land_ends_the_run_with_its_name_and_no_process_left(
    tmp_path: Path,
) -> None:
    result, took = run_pytest(
        tmp_path,
        "import os, signal, time\nfrom pathlib import Path\nfrom tests.cluster import Proc\n\n"
        "def test_stuck_in_native_code(tmp_path):\n"
        "    sleeper = Proc('sleeper', ['sleep', '3600'], tmp_path)\n"
        "    Path(os.environ['MARKER_DIR'], 'pid').write_text(str(sleeper.popen.pid))\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a native call that never returns\n"
        "    time.sleep(3600)\n",
    )
    assert result.returncode == 1
    assert "+++ TIMEOUT: test_hang.py::test_stuck_in_native_code" in result.stderr, result.stdout + result.stderr
    assert took >= TIMEOUT + grace_seconds(TIMEOUT)
    # The process the test started dies with pytest (the parent-death signal of tests/cluster.py).
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
