"""Child processes that never outlive their parent: the plumbing `fleetlm up` and the node agent share.

A child runs in its own process group (so a stop reaches whatever it forked, and a terminal's Ctrl-C
reaches only the parent) with a parent-death signal (so even a parent killed with SIGKILL takes it down).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

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


def orphan_proof(argv: list[str]) -> list[str]:
    """`argv` run through this module, which sets the parent-death signal in the child and then execs it.

    For parents with threads (gRPC's): Python code in a forked child (`preexec_fn`) can deadlock or crash
    on a lock another thread held at the fork; an exec'd interpreter starts clean.
    """
    return [sys.executable, "-m", "mesh.child_process", str(os.getpid()), *argv]


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
