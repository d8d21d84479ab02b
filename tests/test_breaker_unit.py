"""Per-node circuit breakers at the edge: pure state, on a clock the test moves."""

from __future__ import annotations

from edge.breaker import Breakers
from tests.clock import Clock


def test_open_after_failures_then_one_probe_after_the_cooldown() -> None:
    clock = Clock(100.0)
    b = Breakers(failures=2, cooldown=1.0, clock=clock)
    assert b.allow("n")
    b.failed("n")
    assert b.allow("n") and not b.is_open("n")  # one failure is not enough at failures=2
    b.failed("n")
    assert b.is_open("n") and not b.allow("n")
    clock.now += 0.5
    assert not b.allow("n")
    clock.now += 0.6
    assert b.allow("n")  # the probe
    assert not b.allow("n")  # only one at a time
    b.succeeded("n")
    assert not b.is_open("n") and b.allow("n") and b.allow("n")


def test_a_failed_probe_doubles_the_cooldown_up_to_the_cap() -> None:
    clock = Clock(100.0)
    b = Breakers(failures=1, cooldown=1.0, max_cooldown=3.0, clock=clock)
    b.failed("n")
    waits = []
    for _ in range(4):
        start = clock.now
        while not b.allow("n"):
            clock.now += 0.25
        waits.append(clock.now - start)
        b.failed("n")
    assert waits == [1.0, 2.0, 3.0, 3.0]


def test_a_probe_that_ends_without_a_verdict_lets_another_go() -> None:
    clock = Clock(100.0)
    b = Breakers(failures=1, cooldown=1.0, clock=clock)
    b.failed("n")
    clock.now += 1.0
    assert b.allow("n") and not b.allow("n")
    b.released("n")
    assert b.allow("n")


def test_nodes_are_independent() -> None:
    b = Breakers(failures=1, clock=Clock(100.0))
    b.failed("a")
    assert not b.allow("a") and b.allow("b")
    assert b.open_nodes() == ["a"]


def test_a_node_connected_again_is_probed_before_the_cooldown_is_over() -> None:
    clock = Clock(100.0)
    b = Breakers(failures=1, cooldown=30.0, clock=clock)
    b.failed("n")
    assert not b.allow("n") and not b.allow("n", connected=False)
    assert b.allow("n", connected=True)  # its channel is READY again: one probe now
    assert not b.allow("n", connected=True)  # still one at a time
    b.failed("n")  # the probe failed all the same: open again, and no probe until it connects again
    assert not b.allow("n")
    b.released("n")
    assert b.allow("n", connected=True)
