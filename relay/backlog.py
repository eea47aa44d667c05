"""Each sink's queue on disk, against its `max_queue`: past it, ingest refuses new work
for that sink (503) rather than let a dead sink fill the disk. No I/O: the counts come
from the store, refreshed by the app's background task and bumped by every commit."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import structlog

from relay.errors import QueueFull
from relay.store import NewEvent

log = structlog.get_logger("relay.backlog")


class Backlog:
    def __init__(self, limits: Mapping[str, int]) -> None:
        self.limits = dict(limits)
        self.counts: Counter[str] = Counter()
        self.full: frozenset[str] = frozenset()

    def set_limits(self, limits: Mapping[str, int]) -> None:
        """Each sink's max_queue, after a reload."""
        self.limits = dict(limits)
        self._judge()

    def refresh(self, counts: Mapping[str, int]) -> None:
        """The store's count of pending deliveries per sink."""
        self.counts = Counter(counts)
        self._judge()

    def added(self, sinks: Iterable[str]) -> None:
        """Deliveries just committed: counted now, not only at the next refresh."""
        self.counts.update(sinks)
        # On the ingest path: judge again only when one of them reached its bound.
        if any(s in self.limits and self.counts[s] >= self.limits[s] for s in set(sinks)):
            self._judge()

    def blocked(self, events: Sequence[NewEvent]) -> list[NewEvent]:
        """Those of `events` bound for a sink whose queue is full."""
        if not self.full:
            return []
        return [event for event in events if self.full.intersection(event.sinks)]

    def refusal(self, events: Sequence[NewEvent]) -> QueueFull:
        sinks = sorted({sink for event in events for sink in event.sinks} & self.full)
        queued = ", ".join(f"{s} ({self.counts[s]} queued)" for s in sinks)
        return QueueFull(f"the queue of sink {queued} is full; retry later")

    def problems(self, counts: Mapping[str, int] | None = None) -> list[str]:
        """What is full, by these counts (a worker's, from the store) or by ours."""
        counts = self.counts if counts is None else counts
        return [
            f"sink {sink} has {counts[sink]} deliveries queued (max_queue {self.limits[sink]})"
            for sink in sorted(self._over(counts))
        ]

    def _over(self, counts: Mapping[str, int]) -> frozenset[str]:
        return frozenset(s for s, limit in self.limits.items() if counts.get(s, 0) >= limit)

    def _judge(self) -> None:
        full = self._over(self.counts)
        for sink in sorted(full - self.full):
            log.warning("sink.queue_full", sink=sink, queued=self.counts[sink])
        for sink in sorted(self.full - full):
            log.info("sink.queue_ok", sink=sink, queued=self.counts.get(sink, 0))
        self.full = full
