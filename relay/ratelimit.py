"""Spacing sends out in time: a rate limit or a pace, shared by the sinks that need one."""

from __future__ import annotations

import asyncio
import time


class Pacer:
    """Hands out send slots at most `rate` per second, evenly spaced, in arrival order.

    Slots are reserved before sleeping, so concurrent callers queue up rather than all
    waking at once. `hold_until` pushes the next slot out, e.g. for a 429's Retry-After.
    """

    def __init__(self, rate: float | None) -> None:
        self.interval = 0.0 if rate is None else 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def hold_until(self, seconds_from_now: float) -> None:
        self._next = max(self._next, time.monotonic() + seconds_from_now)
