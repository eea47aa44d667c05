"""The store: where events are claimed, deliveries queued and dead letters kept.

Callers see the value types (`types`) and the protocols (`contract`), and get a store
from `open_store(config)`, which picks the backend the config names. No module outside
this package imports a backend.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from relay.config import StoreConfig
from relay.store.contract import (
    Accepting,
    DeadLetters,
    Deliveries,
    Housekeeping,
    Moving,
    Observations,
    QuarantineKeeper,
    Store,
)
from relay.store.types import (
    AcceptResult,
    DeadLetter,
    DeliveryRecord,
    EventRecord,
    EventSummary,
    MovedDelivery,
    MovedEvent,
    NewEvent,
    Ordering,
    Quarantined,
    RecentEvents,
    Selection,
    Settlement,
    SinkStats,
)

# `backend` in the config -> the class implementing it, imported only when chosen.
BACKENDS = {
    "sqlite": "relay.store.sqlite:SqliteStore",
    "redis": "relay.store.redis:RedisStore",
}


def open_store(config: StoreConfig, *, dedupe_window: float) -> Store:
    """The store the config names, built but not yet opened (`await store.open()`)."""
    module, _, name = BACKENDS[config.backend].partition(":")
    backend = getattr(importlib.import_module(module), name)
    store: Store = backend.from_config(config, dedupe_window=dedupe_window)
    return store


@asynccontextmanager
async def operator_store(config: StoreConfig, *, dedupe_window: float) -> AsyncIterator[Store]:
    """The store as an operator's command uses it, beside a running server or not:
    opened without making one where there was none (a mistyped path must not answer
    from a new, empty store), and closed afterwards."""
    store = open_store(config, dedupe_window=dedupe_window)
    try:
        await store.open(create=False)
        yield store
    finally:
        await store.close()


__all__ = [
    "AcceptResult",
    "Accepting",
    "DeadLetter",
    "DeadLetters",
    "Deliveries",
    "DeliveryRecord",
    "EventRecord",
    "EventSummary",
    "Housekeeping",
    "MovedDelivery",
    "MovedEvent",
    "Moving",
    "NewEvent",
    "Observations",
    "Ordering",
    "QuarantineKeeper",
    "Quarantined",
    "RecentEvents",
    "Selection",
    "Settlement",
    "SinkStats",
    "Store",
    "open_store",
    "operator_store",
]
