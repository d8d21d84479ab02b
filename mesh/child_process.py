"""Child processes that never outlive their parent: the plumbing `fleetlm up` and the node agent share.

A child runs in its own process group (so a stop reaches whatever it forked, and a terminal's Ctrl-C
reaches only the parent) with a parent-death signal (so even a parent killed with SIGKILL takes it down).

From an event loop, children are started with `spawn`, never with the loop's own subprocess support: on
uvloop (the services' loop) that forks and runs Python's after-fork code in the child before the exec, and
in a process whose gRPC threads are busy the child then often dies at once (SIGSEGV, or SIGABRT from a
gRPC check) before it runs anything: 64 of 200 children in a stress run here, against 0 of 200 started
as `spawn` starts them (tests/test_supervision.py). `subprocess.Popen` forks and execs in C.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for Popen: the kernel sends SIGTERM to the child when its parent dies.

    Linux ties this to the thread that forked the child, so children must be started from a thread
    that lives as long as the process (the main thread or the event loop's), never from a worker pool.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid`; a group that is already gone is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, read from /proc (Linux)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after the last ")"
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


class Spawned:
    """A child started by `spawn`: its output (stdout and stderr together) as a StreamReader, its exit
    as an awaitable. `returncode` is None until the loop has seen it exit."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: asyncio.StreamReader,
                 transport: asyncio.BaseTransport, exited: asyncio.Future[int]) -> None:  # fmt: skip
        self._popen = popen
        self.stdout = stdout
        self._transport = transport
        self._exited = exited

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        """Its exit code (negative: the signal that killed it). Cancelling the wait leaves the child alone."""
        return await asyncio.shield(self._exited)

    def close(self) -> None:
        """Close the pipe of its output (after it has exited and its output was read)."""
        self._transport.close()


async def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Spawned:
    """Start `argv` from the running loop's thread (which must live as long as the process: the parent-death
    signal follows the forking thread), in a session of its own, stdin from /dev/null, stdout and stderr
    into one pipe. OSError when it cannot be started."""
    loop = asyncio.get_running_loop()
    # Blocking, deliberately (see the module's docstring): Popen returns once the child has exec'd, in about a
    # millisecond; the waiting for it to exit is the loop's.
    popen = subprocess.Popen(  # noqa: ASYNC220
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    assert popen.stdout is not None
    exited: asyncio.Future[int] = loop.create_future()

    def settle(code: int) -> None:
        if not exited.done():
            exited.set_result(code)

    try:
        pidfd = os.pidfd_open(popen.pid)  # Linux 5.3+: readable once the child has exited
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd >= 0:

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            settle(popen.wait())  # it has exited: at once

        loop.add_reader(pidfd, on_exit)
    else:

        def watch() -> None:
            code = popen.wait()
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, code)

        threading.Thread(target=watch, name=f"wait-{popen.pid}", daemon=True).start()
    reader = asyncio.StreamReader(loop=loop)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), popen.stdout)
    return Spawned(popen, reader, transport, exited)


def orphan_proof(argv: list[str]) -> list[str]:
    """`argv` run through this module, which sets the parent-death signal in the child and then execs it.

    For parents with threads (gRPC's): Python code in a forked child (`preexec_fn`) can deadlock or crash
    on a lock another thread held at the fork; an exec'd interpreter starts clean.
    """
    return [sys.executable, "-P", "-m", "mesh.child_process", str(os.getpid()), *argv]  # -P: as launcher.up


def _exec_orphan_proof(args: list[str]) -> None:
    parent, argv = int(args[0]), args[1:]
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(f"{argv[0]}: parent {parent} is gone")
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.exit(f"cannot run {argv[0]}: {exc}")


if __name__ == "__main__":
    _exec_orphan_proof(sys.argv[1:])
