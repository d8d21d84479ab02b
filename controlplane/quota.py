"""Fleet-wide limits of API keys: the leader's minute windows, from which edges lease allowance in chunks.

One window per key, in the leader's memory (a new leader starts with fresh windows: at worst one extra
minute's allowance after a failover, stated in the README). A window opens at a key's first request and
lasts 60 s. An edge asks for a chunk of requests ahead of need (`chunk_size`); a grant is counted against the
window when it is made, so the grants of one window never pass the limit. An edge may not use a grant after
the window it came from has turned; with clocks that differ by a moment, the edge can admit at most one chunk
of an old grant in the next window: that is the slack, at most one chunk per edge.

Tokens are charged after the reply (the edge reports what it served); once a window's tokens are used up,
every edge refuses the key until the window turns. Concurrency: each edge reports its in-flight requests of
the key with each lease, and hears the others' total as last reported, so the fleet admits at most the limit
plus what other edges started since their last report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

WINDOW_SECONDS = 60.0
EDGE_STALE_SECONDS = 60.0  # an edge that has not asked for a minute no longer counts as sharing a key


def chunk_size(limit: int) -> int:
    """Requests an edge leases at once: small against the limit (a thirty-second of it, at most 16)."""
    return max(1, min(16, limit // 32))


@dataclass
class _Window:
    started: float
    requests: int = 0
    tokens: int = 0
    in_flight: dict[str, tuple[int, float]] = field(default_factory=dict)  # edge -> (count, when reported)


@dataclass(frozen=True)
class Grant:
    requests_granted: int
    requests_remaining: int
    tokens_remaining: int
    reset_seconds: float
    others_in_flight: int
    edges: int


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def acquire(
        self,
        key_id: str,
        edge_id: str,
        want: int,
        tokens_used: int,
        in_flight: int,
        returned: int,
        rpm: int,
        tpm: int,
    ) -> Grant:
        now = self._clock()
        window = self._windows.get(key_id)
        if window is None or now - window.started >= WINDOW_SECONDS:
            old = window.in_flight if window else {}
            window = self._windows[key_id] = _Window(now, in_flight=old)
        elif returned:
            window.requests = max(0, window.requests - returned)
        window.tokens += tokens_used
        window.in_flight[edge_id] = (in_flight, now)
        for edge, (_, when) in list(window.in_flight.items()):
            if now - when > EDGE_STALE_SECONDS:
                del window.in_flight[edge]
        granted = want
        if rpm:
            granted = max(0, min(want, rpm - window.requests))
        if tpm and window.tokens >= tpm:
            granted = 0
        window.requests += granted
        others = sum(count for edge, (count, _) in window.in_flight.items() if edge != edge_id)
        return Grant(
            requests_granted=granted,
            requests_remaining=max(0, rpm - window.requests) if rpm else 0,
            tokens_remaining=max(0, tpm - window.tokens) if tpm else 0,
            reset_seconds=max(0.0, WINDOW_SECONDS - (now - window.started)),
            others_in_flight=others,
            edges=len(window.in_flight),
        )
