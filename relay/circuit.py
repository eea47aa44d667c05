"""A per-sink circuit breaker: a pure state machine; the caller supplies the clock.

closed --(the failure rate over the window reaches `failure_rate`)--> open
open --(the cool-down passes)--> half-open: one send probes the sink
half-open --(the probe succeeds)--> closed, the cool-down back to its first length
half-open --(the probe fails)--> open again, for twice the last cool-down (capped)

The rate, not a run of failures, is what tells a dead sink from a flaky one: a sink
failing one send in five fails five in a row about once in 3,900 sends, while its
rate stays at 20%. Only sends made within
the last `window` count, and only once there were `min_sends` of them: a handful of
sends says too little. `failures` also opens it after that many consecutive failures: for a
sink too quiet to fill the window (10 in a row, by default, which a sink failing one
send in five does once in about 12 million sends).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from relay.config import CircuitConfig

State = Literal["closed", "open", "half-open"]
Reason = Literal["rate", "consecutive", "probe"]

# The window is counted in this many slices: memory and work stay flat however many
# sends a second a sink takes, at the cost of the oldest slice dropping out whole.
SLICES = 20


class SlidingCounts:
    """Successes and failures over the last `window` seconds, in slices of it."""

    def __init__(self, window: float, slices: int = SLICES) -> None:
        self.width = window / slices
        self.slices = slices
        # (slice number, successes, failures), oldest first.
        self._counts: deque[list[int]] = deque()

    def _prune(self, current: int) -> None:
        counts = self._counts
        while counts and counts[0][0] <= current - self.slices:
            counts.popleft()
        # The wall clock stepped back past them: what they counted is not "recent" in
        # any sense the window can use.
        while counts and counts[-1][0] > current:
            counts.pop()

    def add(self, now: float, failed: bool) -> None:
        current = math.floor(now / self.width)
        self._prune(current)
        counts = self._counts
        if not counts or counts[-1][0] != current:
            counts.append([current, 0, 0])
        counts[-1][2 if failed else 1] += 1

    def totals(self, now: float) -> tuple[int, int]:
        """(sends, failures) within the window."""
        self._prune(math.floor(now / self.width))
        sends = failures = 0
        for _, ok, failed in self._counts:
            sends += ok + failed
            failures += failed
        return sends, failures

    def clear(self) -> None:
        self._counts.clear()


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_rate: float = 0.5,
        window: float = 60.0,
        min_sends: int = 50,
        cooldown: float = 30.0,
        max_cooldown: float = 600.0,
        failures: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.failure_rate = failure_rate
        self.min_sends = min_sends
        self.first_cooldown = cooldown
        self.max_cooldown = max(max_cooldown, cooldown)
        self.threshold = failures
        self.enabled = enabled
        self.window = SlidingCounts(window)
        self.state: State = "closed"
        self.cooldown = cooldown  # the current one: grows while probes fail
        self.failures = 0  # consecutive failed sends
        self.open_until = 0.0
        # Counts the openings. A send is judged with the generation it started in:
        # one started before the circuit opened (several are in flight at once) says
        # nothing of the sink now, and must neither close the circuit nor fail a probe.
        self.generation = 0
        # Why it last opened, and the window's figures then: for the log line.
        self.reason: Reason | None = None
        self.seen: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, config: CircuitConfig) -> CircuitBreaker:
        return cls(
            failure_rate=config.failure_rate,
            window=config.window,
            min_sends=config.min_sends,
            cooldown=config.cooldown,
            max_cooldown=config.cooldown_cap,
            failures=config.failures,
            enabled=config.enabled,
        )

    def allowance(self, now: float) -> int | None:
        """How many sends may start now: None (no limit), 1 (a probe), or 0 (wait)."""
        if self.state == "open":
            if now < self.open_until:
                return 0
            self.state = "half-open"
        return 1 if self.state == "half-open" else None

    def record(
        self, succeeded: bool, failed: bool, now: float, generation: int | None = None
    ) -> State | None:
        """Feed one send's result; returns the new state when it changed. `generation`
        is the circuit's when the send started (None: now).

        A send that neither succeeded nor failed (the receiver refused one payload for
        good, or asked relay to slow down) says nothing about the sink's health and is
        not counted; nor is one that started before the circuit last opened.
        """
        if not self.enabled or not (succeeded or failed):
            return None
        if generation is not None and generation != self.generation:
            return None
        before = self.state
        if succeeded:
            self.failures = 0
            if self.state != "closed":
                self._close()
            else:
                self.window.add(now, failed=False)
        else:
            self.failures += 1
            if self.state == "half-open":
                # The probe failed: the sink is still down; wait longer before the next.
                self.cooldown = min(self.cooldown * 2, self.max_cooldown)
                self.seen = (1, 1)
                self._open(now, "probe")
            elif self.state == "closed":
                self.window.add(now, failed=True)
                self._judge(now)
        return self.state if self.state != before else None

    def _judge(self, now: float) -> None:
        sends, failures = self.window.totals(now)
        self.seen = (sends, failures)
        if sends >= self.min_sends and failures >= self.failure_rate * sends:
            self._open(now, "rate")
        elif self.threshold is not None and self.failures >= self.threshold:
            self._open(now, "consecutive")

    def _open(self, now: float, reason: Reason) -> None:
        self.generation += 1
        self.state = "open"
        self.reason = reason
        self.open_until = now + self.cooldown
        # A sink back from an outage starts with a clean slate, not with the failures
        # that opened the circuit.
        self.window.clear()

    def _close(self) -> None:
        self.state = "closed"
        self.reason = None
        self.cooldown = self.first_cooldown
        self.window.clear()
