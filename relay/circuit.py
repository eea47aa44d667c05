"""A per-sink circuit breaker: a pure state machine; the caller supplies the clock.

closed --(N consecutive failures)--> open --(cool-down passes)--> half-open
half-open --(the one probe succeeds)--> closed; --(it fails)--> open again.
"""

from __future__ import annotations

from typing import Literal

State = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    def __init__(self, failures: int, cooldown: float) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.state: State = "closed"
        self.failures = 0
        self.open_until = 0.0

    def allowance(self, now: float) -> int | None:
        """How many sends may start now: None (no limit), 1 (a probe), or 0 (wait)."""
        if self.state == "open":
            if now < self.open_until:
                return 0
            self.state = "half-open"
        return 1 if self.state == "half-open" else None

    def record(self, succeeded: bool, failed: bool, now: float) -> State | None:
        """Feed one send's result; returns the new state when it changed.

        A send that neither succeeded nor failed (the receiver refused one payload for
        good) says nothing about the sink's health and leaves the count as it was.
        """
        before = self.state
        if succeeded:
            self.failures = 0
            self.state = "closed"
        elif failed:
            self.failures += 1
            if self.state == "half-open" or self.failures >= self.threshold:
                self.state = "open"
                self.open_until = now + self.cooldown
        return self.state if self.state != before else None
