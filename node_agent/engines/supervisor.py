"""Supervision of an engine that runs as a child process (SGLang, or a server the agent launches).

`EngineProcess` starts the child in its own process group with a parent-death signal, keeps the last
lines it printed, waits for it to be ready (or fails with those lines as the reason when it exits or is
too slow), reports when it dies on its own, and stops it: SIGTERM to the group, SIGKILL after a grace.
Restarting after a crash, with backoff, is the host's job: it treats a crash like any failed load.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from mesh.child_process import Spawned, group_members, orphan_proof, signal_group, spawn
from mesh.redaction import REDACTED, redact_argv
from node_agent.engines.base import EngineError, PermanentEngineError

log = logging.getLogger(__name__)
# What a failure says of a process that printed nothing.
_SILENT = "(it printed nothing)"

ReadyCheck = Callable[[], Awaitable[bool]]


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class EngineProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        tail: int = 30,
        secrets: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        # Values never to show (an API key passed as a flag): hidden in the logged command line and in
        # whatever the process prints, which becomes a replica's error.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._lines: collections.deque[str] = collections.deque(maxlen=tail)
        self._proc: Spawned | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def tail(self) -> str:
        """The last lines the process printed."""
        return "\n".join(self._lines) or _SILENT

    def _failure(self, what: str) -> str:
        """A failure's reason, one line: what happened and the process's last line (a replica's error is shown
        to clients, in `fleetlm status`'s table and in every refusal's log line). Its last lines go to this
        node's log, once."""
        log.warning("%s %s; its last output:\n%s", self.name, what, self.tail())
        last = self._lines[-1] if self._lines else _SILENT
        return f"{self.name} {what}; last output: {last} (more in the node's log)"

    def _hide(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    async def _read(self, stream: asyncio.StreamReader) -> None:
        """Every line the process prints, to its end. A line longer than the reader's buffer (64 KiB: a
        server logging a long prompt) is said to be one and left out, and reading goes on: it ended the
        reading, the pipe then filled, and the process blocked on its next write."""
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # asyncio has dropped that line (or its first 64 KiB, the rest read as a line)
                raw = b"[a line of more than 64 KiB, left out]"
            if not raw:
                return
            line = self._hide(raw.decode(errors="replace").rstrip())
            if line:
                self._lines.append(line)
                log.debug("[%s] %s", self.name, line)

    async def start(self, ready: ReadyCheck, timeout: float, poll: float = 0.25) -> None:
        """Start the process and return once `ready` says so. Raises EngineError with the process's last
        line (its last lines logged) if it exits first or is not ready within `timeout` seconds,
        PermanentEngineError if it cannot be run at all; the process is stopped then, and when the start is
        cancelled."""
        log.info("starting %s: %s", self.name, " ".join(redact_argv(self.argv)))
        if shutil.which(self.argv[0]) is None:
            raise PermanentEngineError(f"could not start {self.name}: no program '{self.argv[0]}' on this node")
        try:
            # Started from the event loop's thread: the parent-death signal follows the forking thread.
            # Its own session: a stop reaches its whole process group, a terminal's Ctrl-C does not.
            # `spawn`, not the loop's subprocess support (see mesh.child_process: on uvloop a child forked
            # from this busy gRPC process could die before it ran).
            self._proc = await spawn(orphan_proof(self.argv), self.env)
        except OSError as exc:
            raise PermanentEngineError(f"could not start {self.name} ({self.argv[0]}): {exc}") from exc
        self._reader = asyncio.ensure_future(self._read(self._proc.stdout))
        try:
            await self._wait_ready(ready, timeout, poll)
        except BaseException:
            # Not ready, or the replica was unloaded meanwhile: nothing of it may stay behind. Shielded,
            # so that a second cancellation cannot stop the stop halfway.
            await asyncio.shield(self.stop())
            raise

    async def _wait_ready(self, ready: ReadyCheck, timeout: float, poll: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.returncode is not None:
                await self._drain()
                raise EngineError(self._failure(f"{_exit_text(self._proc.returncode)} while starting"))
            with contextlib.suppress(Exception):  # not listening yet, or answering "not ready"
                if await ready():
                    log.info("%s is ready (pid %d)", self.name, self._proc.pid)
                    return
            if time.monotonic() >= deadline:
                raise EngineError(self._failure(f"was not ready within {timeout:g}s"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):  # not wait_for, which can swallow a cancellation on 3.11
                    await self._proc.wait()

    async def _drain(self) -> None:
        if self._reader is not None:
            # asyncio.wait neither cancels the reader nor raises its end (a cancelled reader is fine here).
            await asyncio.wait({self._reader}, timeout=1.0)

    async def exited(self) -> str:
        """Wait until the process dies without being asked to; return why, with its last line."""
        assert self._proc is not None, "not started"
        code = await self._proc.wait()
        await self._drain()
        if self._stopping:
            await asyncio.Event().wait()  # a stop we asked for is not a failure: never report it
        return self._failure(_exit_text(code))

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; then nothing of it is left."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        if proc.returncode is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await proc.wait()
            except TimeoutError:
                log.warning("%s did not stop within %gs; killing it", self.name, grace)
        # Whatever the leader left behind in its group (an engine's worker processes) goes too.
        signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        # The leader is reaped, but SIGKILLed members (GPU workers holding memory, say) die when the kernel
        # next runs them: on a busy machine that is not at once. Wait for them (10 s at most), so that a
        # restart never meets the old engine's processes.
        deadline = time.monotonic() + 10
        while group_members(proc.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):  # the stop goes on whatever it ended with
                await self._reader
        proc.close()
