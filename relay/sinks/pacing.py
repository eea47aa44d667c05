"""Spacing sends out in time, for every sink that needs it: one pacer.

Two ways of counting the gap, because receivers count differently:
- from the start of the previous send (`from_answer=False`): a rate limit such as the
  `http` sink's `rate_limit: 10/s`. Concurrent callers reserve their slots before they
  sleep, so they queue up in arrival order rather than all waking at once;
- from the previous answer (`from_answer=True`): chat webhooks, which count messages as
  they post them, so a slow answer must not let the next message follow it at once.
  Used by one sender at a time (a chat sink's concurrency is 1).

`hold()` keeps every send back for a while (a 429's Retry-After, a robot's "too fast"
code), and `left()` tells how long until the next send may go, for a sink that hands the
rest of a batch back to the store rather than sleep through a long hold.
"""

from __future__ import annotations

import asyncio
import time


class Pacer:
    def __init__(self, gap: float = 0.0, *, from_answer: bool = False) -> None:
        self.gap = gap
        self.from_answer = from_answer
        self._next = 0.0  # monotonic: the earliest start of the next send
        self._answered: float | None = None  # monotonic: the last answer, if counted
        self._held_until = 0.0

    @classmethod
    def per_second(cls, rate: float | None) -> Pacer:
        """At most `rate` sends a second, evenly spaced (None: no limit)."""
        return cls(0.0 if not rate else 1.0 / rate)

    def _ready(self, gap: float) -> float:
        if self.from_answer:
            start = 0.0 if self._answered is None else self._answered + gap
        else:
            start = self._next
        return max(start, self._held_until)

    def left(self, gap: float | None = None) -> float:
        """Seconds until a send may start (0: now)."""
        return max(self._ready(self.gap if gap is None else gap) - time.monotonic(), 0.0)

    async def wait(self, gap: float | None = None) -> None:
        """Wait for this send's turn; `gap` overrides the pacer's own for this send (a
        digest that stands for many messages waits their share). Waiting happens before
        a send, never after it: a shutdown that cancels the wait cancels nothing the
        receiver has already seen."""
        gap = self.gap if gap is None else gap
        now = time.monotonic()
        slot = max(now, self._ready(gap))
        if not self.from_answer:
            self._next = slot + gap  # reserved before sleeping
        if slot > now:
            await asyncio.sleep(slot - now)

    def answered(self) -> None:
        """The receiver answered (or the request failed): the next gap counts from now."""
        self._answered = time.monotonic()

    def hold(self, seconds: float) -> None:
        """No send starts for `seconds` from now."""
        self._held_until = max(self._held_until, time.monotonic() + seconds)
