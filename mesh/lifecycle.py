"""Process life cycle shared by the services: run until SIGINT/SIGTERM, then shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable


def run_until_signalled(body: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `body(stop)` on a fresh event loop; `stop` is set on SIGINT or SIGTERM."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runner())


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, for a child server the caller starts next."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def bound_address(address: str, port: int) -> str:
    """`host:0` with the port the OS actually gave."""
    return f"{address.rsplit(':', 1)[0]}:{port}"
