"""Per-node circuit breakers at the edge: a node that cannot be reached is skipped for the next requests at
once, instead of being rediscovered by every request's connect timeout.

closed --(`failures` failures in a row)--> open --(cooldown over, or the node's channel connected
again)--> half-open: one request goes through as a probe; it succeeding closes the breaker, it failing
opens it again for twice as long (up to `max_cooldown`). Whoever owns the connection to the node may
also close it (`succeeded`) when the connection comes back: the edge watches each open node's channel.
Only failures that say the node is unreachable
count; a node that answers, even with an error, is reachable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0  # while open: when the next probe may go
    cooldown: float = 0.0
    probing: bool = False  # half-open: a probe is in flight


class Breakers:
    def __init__(
        self,
        failures: int = 1,
        cooldown: float = 1.0,
        max_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = max(1, failures)
        self._cooldown = cooldown
        self._max_cooldown = max_cooldown
        self._clock = clock
        self._states: dict[str, _State] = {}
        # Called with a node's address when its breaker opens (closed -> open), for whoever watches the node
        # come back (the edge watches its channel: edge.gateway).
        self.on_open: Callable[[str], None] | None = None

    def allow(self, node: str, connected: bool = False) -> bool:
        """Whether a request may go to `node` now. In half-open, the first caller gets the probe; and so does
        the first caller while the breaker is open but the node is `connected` again (its channel is READY:
        the node answered a connection just now), without waiting out the cool-down."""
        state = self._states.get(node)
        if state is None or state.failures < self._threshold:
            return True
        if state.probing or (self._clock() < state.open_until and not connected):
            return False
        state.probing = True
        return True

    def is_open(self, node: str) -> bool:
        """Whether `node` is being skipped (for status and metrics; does not take the probe)."""
        state = self._states.get(node)
        return state is not None and state.failures >= self._threshold

    def succeeded(self, node: str) -> None:
        self._states.pop(node, None)

    def failed(self, node: str) -> None:
        state = self._states.setdefault(node, _State())
        state.failures += 1
        state.probing = False
        if state.failures >= self._threshold:
            state.cooldown = min(self._max_cooldown, state.cooldown * 2) if state.cooldown else self._cooldown
            state.open_until = self._clock() + state.cooldown
            if state.failures == self._threshold and self.on_open is not None:
                self.on_open(node)

    def forget(self, node: str) -> None:
        """A node that is gone (no longer in the routing table): nothing to skip or to report."""
        self._states.pop(node, None)

    def released(self, node: str) -> None:
        """A probe that ended with neither verdict (the client went away): let another probe go."""
        state = self._states.get(node)
        if state is not None:
            state.probing = False

    def open_nodes(self) -> list[str]:
        return sorted(n for n in self._states if self.is_open(n))
