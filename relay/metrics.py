"""Prometheus metrics. Counters and histograms count what this process did; the gauges
are read from the store at scrape time, so they are right after a restart and whichever
process owns the work.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    exposition,
    generate_latest,
)

from relay.store import SinkStats

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST

# Ingest answers in milliseconds; sinks may take seconds.
_INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per app, so that several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._request_children: dict[tuple[str, int], Any] = {}
        self._source_children: dict[str, tuple[Any, Any]] = {}
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
        self.deliveries = Counter(
            "relay_deliveries",
            "Delivery attempts by outcome: done, retry or dead.",
            ["sink", "outcome"],
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
        self.queue_depth = Gauge(
            "relay_queue_depth", "Pending deliveries in the store.", ["sink"], registry=r
        )
        self.oldest_pending = Gauge(
            "relay_oldest_pending_seconds",
            "Age of the oldest pending delivery.",
            ["sink"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "relay_dead_letters", "Dead letters in the store.", ["sink"], registry=r
        )
        self.circuit_open = Gauge(
            "relay_circuit_open", "1 while the sink's circuit is open.", ["sink"], registry=r
        )
        self.sink_gone = Gauge(
            "relay_sink_gone",
            "1 after the sink's receiver answered 410 Gone (the sink is paused).",
            ["sink"],
            registry=r,
        )

    def request_counter(self, source: str, status: int) -> Any:
        """The requests counter's child for (source, status), looked up once: labels()
        takes a lock and builds a key on every call, on the hot path."""
        child = self._request_children.get((source, status))
        if child is None:
            child = self.requests.labels(source, str(status))
            self._request_children[(source, status)] = child
        return child

    def source_counters(self, source: str) -> tuple[Any, Any]:
        """The (received, duplicates) children for a configured source, looked up once."""
        children = self._source_children.get(source)
        if children is None:
            children = (self.received.labels(source), self.duplicates.labels(source))
            self._source_children[source] = children
        return children

    def render(self, stats: Mapping[str, SinkStats], sinks: Iterable[str], now: float) -> bytes:
        """The exposition, with the store's gauges for every configured sink and every
        sink the store still holds work for."""
        gauges = (
            self.queue_depth,
            self.oldest_pending,
            self.dead_letters,
            self.circuit_open,
            self.sink_gone,
        )
        for gauge in gauges:
            gauge.clear()  # a sink gone from both config and store drops out
        for sink in {*sinks, *stats}:
            current = stats.get(sink, SinkStats())
            self.queue_depth.labels(sink).set(current.pending)
            self.oldest_pending.labels(sink).set(round(current.oldest_pending_s, 3))
            self.dead_letters.labels(sink).set(current.dead)
            # Past its cool-down an open circuit lets the next send probe: not open.
            is_open = current.circuit == "open" and current.open_until > now
            self.circuit_open.labels(sink).set(1 if is_open else 0)
            self.sink_gone.labels(sink).set(1 if current.gone else 0)
        return generate_latest(self.registry)
