"""Noticing the wall clock step back (NTP after a bad start, a VM restored from a
snapshot, an operator): monotonic time never does, so the gap between the two moves.

Retries and open circuits are scheduled in wall time, since they must survive a
restart. A step back of an hour would hold each of them an hour longer; once the step
is seen, the dispatcher moves them back by as much (relay.dispatch). A step forward is
not undone: it makes them due early, and ages deliveries (retry.max_age) and event ids
(dedupe.window) by the step, as real time passing would. No I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class WallClock:
    def __init__(
        self,
        tolerance: float = 1.0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tolerance = tolerance
        self._wall, self._monotonic = wall, monotonic
        self._offset = wall() - monotonic()

    def stepped_back(self) -> float:
        """Seconds the wall clock stepped back since the last look, or 0.0. Steps
        within `tolerance` (NTP slewing, scheduling noise) are not steps."""
        offset = self._wall() - self._monotonic()
        moved, self._offset = self._offset - offset, offset
        return moved if moved > self.tolerance else 0.0
