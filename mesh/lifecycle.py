"""Process life cycle shared by the services: run until SIGINT/SIGTERM, then shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Time from the stop signal to a forced exit, on top of the service's own grace for in-flight work: the
# orderly shutdown awaits libraries (an etcd client whose server went away at the same moment was seen to
# wait forever) and must not leave a process behind that holds its ports with no parent to stop it.
SHUTDOWN_MARGIN_SECONDS = 30.0

# Before the end of a service's shutdown grace: the time it leaves itself to end each request still running
# with its own clear error ("shutting down"), before the gRPC server cuts the calls with none.
SHUTDOWN_CUT_MARGIN_SECONDS = 1.0


async def until_set(event: asyncio.Event, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """`items` until `event` is set, then no more, as if they had run out: a long-lived stream's handler that
    reads its requests through this returns at its server's stop, so that the server stops at once (the
    caller opens it again elsewhere) instead of waiting out its grace for a stream that never ends."""
    stop = asyncio.ensure_future(event.wait())
    reading: asyncio.Future[T] | None = None
    try:
        while not event.is_set():
            reading = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({reading, stop}, return_when=asyncio.FIRST_COMPLETED)
            if reading not in done:
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading
                return
            try:
                item = reading.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()
        if reading is not None:
            # Closed or cancelled while a read was pending, or as it ended (the stream's end and the call's
            # cancellation come together when a client goes away): that read is not wanted, and whatever it
            # ended with is not an error to log.
            reading.cancel()
            reading.add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: asyncio does not log it as "never retrieved"


def cancelled_by_caller() -> bool:
    """Whether the running task is being cancelled: its stop. grpc.aio also raises CancelledError from a call
    that the close of its channel cancelled (a channel replaced after a certificate rotation closes the old
    one, and the calls still on it, after mesh.tls.REPLACED_CHANNEL_GRACE_SECONDS): that one is a stream
    lost, to be followed again, not a stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def cut_after(grace: float) -> float:
    """Seconds from the start of a shutdown with `grace` seconds for in-flight work to the moment the work
    still running is ended with an error of the service's own: SHUTDOWN_CUT_MARGIN_SECONDS before the grace
    is spent, or half-way through a shorter grace."""
    return max(0.0, grace - min(SHUTDOWN_CUT_MARGIN_SECONDS, grace / 2))


# The services' event loop: uvloop where it is installed (a dependency on Linux and macOS), as uvicorn's
# `--loop auto` chooses; FLEETLM_EVENT_LOOP=asyncio runs the standard library's loop instead. Every call and
# every token crosses the loop in the edge and the node; on uvloop the first token through the edge came
# 1.2 ms (HTTP) and 1.6 ms (gRPC) sooner (bench.inference_bench --ttft-only --asyncio-edge, README).
EVENT_LOOP_ENV = "FLEETLM_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the event loop the services run on (EVENT_LOOP_ENV: "uvloop", the default where it is
    installed, or "asyncio"). Anything else is refused, naming the variable."""
    wanted = os.environ.get(EVENT_LOOP_ENV, "").strip().lower() or "auto"
    if wanted not in ("auto", "uvloop", "asyncio"):
        raise SystemExit(f"{EVENT_LOOP_ENV} is {wanted!r}: it takes uvloop or asyncio")
    if wanted != "asyncio":
        try:
            import uvloop
        except ImportError:
            if wanted == "uvloop":
                raise SystemExit(f"{EVENT_LOOP_ENV}=uvloop, but uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run_until_signalled(body: Callable[[asyncio.Event], Awaitable[None]], grace: float = 0.0) -> None:
    """Run `body(stop)` on a fresh event loop (`loop_factory`); `stop` is set on SIGINT or SIGTERM. The
    shutdown that follows gets `grace` + SHUTDOWN_MARGIN_SECONDS; past that, or at a second signal, the
    process logs what happened and exits with status 1 without finishing it."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def signalled(sig: signal.Signals) -> None:
            if stop.is_set():
                _exit_unfinished(f"a second {sig.name} during the shutdown")
            stop.set()
            deadline = grace + SHUTDOWN_MARGIN_SECONDS
            reason = f"the shutdown did not finish within {deadline:g} s of {sig.name}"
            watchdog = threading.Timer(deadline, _exit_unfinished, (reason,))
            watchdog.daemon = True  # a shutdown that finishes in time is not held up by it
            watchdog.start()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled, sig)
        await body(stop)

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as running:
        running.run(runner())


def _exit_unfinished(reason: str) -> None:
    """Leave now (from the event loop or the watchdog's thread): one log line, the logs flushed, status 1."""
    log.error("%s: exiting without finishing it", reason)
    logging.shutdown()
    os._exit(1)


# Ports free_port hands out lie below the kernel's ephemeral range (ip_local_port_range), which the OS gives
# to outgoing connections: a port picked by binding to 0 is one of those, and any connect() made before the
# child server binds it may take it as its local port. The fresh-clone suite was seen failing that way (an
# edge's "address already in use" on a port a moment earlier free). This many ports below the range's start.
FREE_PORT_SPAN = 10_000
_handed_out: set[tuple[str, int]] = set()
_ports = random.Random()


def _ephemeral_start() -> int | None:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, for a child server the caller starts next: outside the range the OS takes
    outgoing connections' ports from, and never the same one twice in this process."""
    start = _ephemeral_start()
    if start is not None and start - FREE_PORT_SPAN >= 1024:
        for _ in range(200):
            port = _ports.randrange(start - FREE_PORT_SPAN, start)
            if (host, port) in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _handed_out.add((host, port))
            return port
    with socket.socket() as sock:  # no such range here (or all of it busy): any port the OS gives
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
    _handed_out.add((host, port))
    return port


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port that is free with the one above it (etcd's client and peer ports, as `fleetlm up` lays them
    out), both handed out here, so that no later free_port gives the upper one to another server."""
    for _ in range(200):
        port = free_port(host)
        upper = (host, port + 1)
        if upper in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(upper)
            except OSError:
                continue
        _handed_out.add(upper)
        return port
    raise OSError(f"no two free ports in a row on {host}")


def bound_address(address: str, port: int) -> str:
    """`host:0` with the port the OS actually gave."""
    return f"{address.rsplit(':', 1)[0]}:{port}"
