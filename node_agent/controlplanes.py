"""The control planes a node was given, and the one it uses now for its lease and its assignments.

Given several addresses, the agent keeps a channel to each and uses one at a time. A control plane that
freezes (a long GC pause, a SIGSTOP, a host that hangs) keeps its TCP connection open and silent: a channel
stuck to it (gRPC's pick_first) would notice only when keepalive closes the connection, 10 s later, which
is the whole of a node's lease. So the agent moves on by itself: a call that gets no answer in time (its
deadline is a share of what is left of the lease, registration.py) moves the registration to the next
control plane at once, and the assignment stream follows it there. One address (a DNS name, whose records
one channel's pick_first tries in order) is one channel, and nothing to move to.

Moves only go forward, in the order given, and only from the control plane that failed: a heartbeat and
the assignment stream that find the same one gone move once, not twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from types import TracebackType

import grpc

from mesh.channels import CHANNEL_OPTIONS
from mesh.tls import TlsFiles, secure_channel

# Codes a control plane answers about the request itself (or the caller): another control plane would answer
# the same. Any other failure (no answer in time, a connection refused or broken, the control plane failing
# to serve the call) is worth trying on the next one.
ANSWERS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


def answered(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the control plane answered the call (a refusal of the request), rather than failed to."""
    return exc.code() in ANSWERS


class ControlPlanes:
    """One channel to each control plane (mutual TLS with `tls`, verifying `server_name`), the one in use,
    and a turn that counts the moves (a call remembers the turn it was made in, to report its failure)."""

    def __init__(self, addresses: Sequence[str], tls: TlsFiles | None = None, server_name: str | None = None) -> None:
        if not addresses:
            raise ValueError("no control-plane address given")
        self.addresses = list(addresses)
        self._channels = [secure_channel(a, tls, CHANNEL_OPTIONS, server_name) for a in self.addresses]
        self.turn = 0
        self._moved = asyncio.Event()  # set (and replaced) at every move

    @property
    def several(self) -> bool:
        return len(self._channels) > 1

    def current(self) -> tuple[int, grpc.aio.Channel]:
        """The turn and the channel of the control plane in use."""
        return self.turn, self._channels[self.turn % len(self._channels)]

    def address(self, turn: int) -> str:
        return self.addresses[turn % len(self.addresses)]

    def move_on(self, turn: int) -> bool:
        """The control plane of `turn` failed a call: use the next one, unless the agent has moved from it
        already. Returns whether it moves (the caller says why)."""
        if turn != self.turn or not self.several:
            return False
        self.turn += 1
        self._moved.set()
        self._moved = asyncio.Event()
        return True

    async def moved_from(self, turn: int) -> None:
        """Return once the agent no longer uses the control plane of `turn`."""
        while self.turn == turn:
            await self._moved.wait()

    async def until_moved(self, turn: int, work: Awaitable[None]) -> bool:
        """Run `work` until it ends (its error is raised) or the agent moves away from the control plane of
        `turn`, which cancels it; returns whether it moved."""
        working = asyncio.ensure_future(work)
        moved = asyncio.ensure_future(self.moved_from(turn))
        try:
            await asyncio.wait([working, moved], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (working, moved):
                task.cancel()
            await asyncio.gather(working, moved, return_exceptions=True)
        if not working.cancelled() and working.exception() is not None:
            raise working.exception()  # type: ignore[misc]
        return moved.done() and not moved.cancelled()

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels), return_exceptions=True)

    async def __aenter__(self) -> ControlPlanes:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
