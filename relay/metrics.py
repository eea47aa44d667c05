"""Prometheus metrics. Counters and histograms count what relay did (with
`server.workers`, summed over its processes through prometheus_client's multiprocess
files); the gauges are read from the store at scrape time, so they are right after a
restart and whichever process answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    exposition,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from relay.store import SinkStats

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST

# Ingest answers in milliseconds; sinks may take seconds.
_INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per app, so that several apps (tests) never share counters."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        # No `*_created` series, as one process or many: MultiProcessCollector keeps no
        # creation times, so one process alone would expose series that vanish with
        # `server.workers`. Nothing relies on them: Prometheus sees counter resets as
        # drops in `_total`, and every other series is untouched. The switch is
        # process-wide and read at each scrape, so it covers every registry, built
        # before or after; relay's processes keep no metrics but relay's.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "relay_requests", "HTTP requests answered.", ["source", "status"], registry=r
        )
        self.received = Counter(
            "relay_events_received",
            "Events in accepted POSTs, duplicates included.",
            ["source"],
            registry=r,
        )
        self.duplicates = Counter(
            "relay_events_duplicate",
            "Events answered as duplicates (already stored within the dedupe window).",
            ["source"],
            registry=r,
        )
        self.unrouted = Counter(
            "relay_events_unrouted", "New events that no route took.", ["source"], registry=r
        )
        self.quarantined = Counter(
            "relay_events_quarantined",
            "Unusable bodies from authenticated senders, answered 4xx and kept.",
            ["source"],
            registry=r,
        )
        self.deliveries = Counter(
            "relay_deliveries",
            "Delivery attempts by outcome: done, retry or dead; and deliveries coalesced"
            " (order: per_key with coalesce: a newer event of their object went instead).",
            ["sink", "outcome"],
            registry=r,
        )
        self.late = Counter(
            "relay_order_late",
            "Events sent to an order: per_key sink after a later event of their object.",
            ["sink"],
            registry=r,
        )
        self.released = Counter(
            "relay_order_released",
            "Objects let go by an event that held them: it held them longer than"
            " order_timeout (reason=timeout), or was dead-lettered (reason=dead).",
            ["sink", "reason"],
            registry=r,
        )
        self.ingest_seconds = Histogram(
            "relay_ingest_seconds",
            "Time from a hook request's arrival to its 200 answer.",
            buckets=_INGEST_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "relay_delivery_seconds",
            "Time one send to a sink took.",
            ["sink"],
            buckets=_DELIVERY_BUCKETS,
            registry=r,
        )

    def request_counter(self, source: str, status: int) -> Any:
        return self._child(self.requests, source, str(status))

    def source_counters(self, source: str) -> tuple[Any, Any]:
        """The (received, duplicates) children for a configured source."""
        return self._child(self.received, source), self._child(self.duplicates, source)

    def delivery_counter(self, sink: str, outcome: str) -> Any:
        return self._child(self.deliveries, sink, outcome)

    def order_late(self, sink: str) -> Any:
        return self._child(self.late, sink)

    def order_released(self, sink: str, reason: str) -> Any:
        return self._child(self.released, sink, reason)

    def delivery_timer(self, sink: str) -> Any:
        return self._child(self.delivery_seconds, sink)

    def _child(self, metric: Any, *labels: str) -> Any:
        """A metric's child for `labels`, looked up once: labels() takes a lock and
        builds a key on every call, and these are called per request and per send."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def render(self, stats: Mapping[str, SinkStats], sinks: Iterable[str], now: float) -> bytes:
        """The exposition: this process's counters (with `server.workers`, every
        process's, summed), and the store's gauges for every configured sink and every
        sink the store still holds work for."""
        if self.multiprocess_dir is None:
            counters = self.registry
        else:
            counters = CollectorRegistry()
            MultiProcessCollector(counters, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        gauges = CollectorRegistry(auto_describe=True)
        gauges.register(_StoreGauges(stats, sinks, now))
        return generate_latest(counters) + generate_latest(gauges)


def use_multiprocess(directory: Path) -> None:
    """Count in files under `directory` that every process of one relay shares, so any
    process answering /metrics reports them all. Call before any Metrics is built.

    prometheus_client picks its value class once, at import, from PROMETHEUS_MULTIPROC_DIR;
    relay only knows at run time (server.workers), so it sets both. Worker processes
    inherit the variable and pick the same class on import.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class _StoreGauges(Collector):
    """The gauges, read from the store at scrape time: right after a restart, and the
    same whichever process answers."""

    def __init__(self, stats: Mapping[str, SinkStats], sinks: Iterable[str], now: float) -> None:
        self.stats, self.sinks, self.now = stats, sinks, now

    def collect(self) -> Iterator[Metric]:
        families = [GaugeMetricFamily(name, text, labels=["sink"]) for name, text in _GAUGES]
        # A sink gone from both config and store drops out.
        for sink in sorted({*self.sinks, *self.stats}):
            current = self.stats.get(sink, SinkStats())
            # Past its cool-down an open circuit lets the next send probe: not open.
            is_open = current.circuit == "open" and current.open_until > self.now
            readings = (
                current.pending,
                round(current.oldest_pending_s, 3),
                current.dead,
                1 if is_open else 0,
                1 if current.gone else 0,
            )
            for family, value in zip(families, readings, strict=True):
                family.add_metric([sink], value)
        yield from families


# In the order _StoreGauges.collect reads them.
_GAUGES = (
    ("relay_queue_depth", "Pending deliveries in the store."),
    ("relay_oldest_pending_seconds", "Age of the oldest pending delivery."),
    ("relay_dead_letters", "Dead letters in the store."),
    ("relay_circuit_open", "1 while the sink's circuit is open."),
    ("relay_sink_gone", "1 after the sink's receiver answered 410 Gone (the sink is paused)."),
)
