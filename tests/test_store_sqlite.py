"""What only the SQLite backend does: its lock file, and SQLite's own write lock.
Everything of the store contract is in tests/test_store_contract.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relay.errors import StoreUnavailable
from relay.store import NewEvent
from relay.store.sqlite import SqliteStore


def event(i: int, sinks=("a", "b")) -> NewEvent:
    return NewEvent(f"evt_{i}", "qingstor", f'{{"id": "evt_{i}"}}', tuple(sinks))


async def open_store(path: Path, window: float = 100.0) -> SqliteStore:
    store = SqliteStore(path, dedupe_window=window)
    await store.open()
    return store


async def test_a_second_server_on_the_same_store_refuses_to_start(tmp_path):
    import pytest

    from relay.errors import StoreUnavailable

    first = SqliteStore(tmp_path / "r.db", dedupe_window=60)
    await first.open(exclusive=True)
    second = SqliteStore(tmp_path / "r.db", dedupe_window=60)
    with pytest.raises(StoreUnavailable, match="another relay process"):
        await second.open(exclusive=True)
    # The DLQ commands open beside a running server without the lock.
    reader = SqliteStore(tmp_path / "r.db", dedupe_window=60)
    await reader.open()
    await reader.close()
    await first.close()
    await second.open(exclusive=True)  # free again once the first has closed
    await second.close()


async def test_a_write_lock_held_elsewhere_costs_a_bounded_wait_then_store_unavailable(tmp_path):
    store = SqliteStore(tmp_path / "r.db", dedupe_window=100.0)
    store.busy_timeout = 0.2
    await store.open()
    other = sqlite3.connect(tmp_path / "r.db", isolation_level=None)  # another process's
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.accept([event(1)], now=1000.0)
        other.execute("ROLLBACK")
        result = await store.accept([event(1)], now=1000.0)
        assert result.accepted == ["evt_1"]
    finally:
        other.close()
        await store.close()
