"""A clock a unit test moves by hand, for the classes that take one (`clock=`): breakers, quotas, restarts."""

from __future__ import annotations


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
