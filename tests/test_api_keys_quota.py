"""The leader's minute windows (controlplane.quota): arithmetic only, with a clock the test moves."""

from __future__ import annotations

from controlplane.quota import WINDOW_SECONDS, Quotas, chunk_size
from tests.clock import Clock


def test_grants_to_many_edges_never_pass_the_limit_in_a_window() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    limit = 100
    granted = 0
    for turn in range(200):  # five edges asking in turn, each for a chunk, far more than the limit
        grant = quotas.acquire("k", f"edge-{turn % 5}", chunk_size(limit), 0, 0, 0, limit, 0)
        granted += grant.requests_granted
        clock.now += 0.1
    assert granted == limit
    assert grant.edges == 5
    clock.now += WINDOW_SECONDS  # the window turns: a new minute's allowance
    assert quotas.acquire("k", "edge-0", 3, 0, 0, 0, limit, 0).requests_granted == 3


def test_tokens_used_up_stop_grants_until_the_window_turns() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    assert quotas.acquire("k", "e", 1, 0, 0, 0, 0, 50).tokens_remaining == 50
    spent = quotas.acquire("k", "e", 1, 60, 0, 0, 0, 50)
    assert spent.tokens_remaining == 0 and spent.requests_granted == 0
    clock.now += WINDOW_SECONDS
    assert quotas.acquire("k", "e", 1, 0, 0, 0, 0, 50).requests_granted == 1


def test_other_edges_in_flight_are_reported_and_forgotten_when_stale() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    quotas.acquire("k", "a", 0, 0, 3, 0, 0, 0)
    assert quotas.acquire("k", "b", 0, 0, 1, 0, 0, 0).others_in_flight == 3
    clock.now += 61  # a has not reported for a minute: it no longer counts
    assert quotas.acquire("k", "b", 0, 0, 1, 0, 0, 0).others_in_flight == 0


def test_chunks_are_small() -> None:
    assert chunk_size(1) == 1 and chunk_size(60) == 1 and chunk_size(640) == 16 and chunk_size(10**6) == 16
