"""`fleetlm up`'s restart budget (launcher.processes.RestartBudget): arithmetic on a clock it is given."""

from __future__ import annotations

from launcher.processes import RestartBudget
from tests.clock import Clock


def test_a_component_is_started_again_after_a_longer_wait_each_time_then_given_up() -> None:
    clock = Clock()
    budget = RestartBudget(limit=5, window_seconds=60, clock=clock)
    delays = []
    for _ in range(4):
        delays.append(budget.died())
        clock.now += 5
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert budget.died() is None and budget.deaths == 5  # the fifth death within 60 s: give up


def test_deaths_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    budget = RestartBudget(limit=3, window_seconds=60, clock=clock)
    assert budget.died() == 1.0
    clock.now += 30
    assert budget.died() == 2.0
    clock.now += 31  # the first death is now 61 s old
    assert budget.died() == 2.0 and budget.deaths == 2
    clock.now += 120  # one that then ran for two minutes is started again after 1 s, as the first time
    assert budget.died() == 1.0
