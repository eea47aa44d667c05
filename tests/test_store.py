"""The SQLite store: one-commit accept, dedupe window, durability across reopen, pruning."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relay.errors import StoreUnavailable
from relay.store import NewEvent, Settlement
from relay.store.sqlite import SqliteStore


def event(i: int, sinks=("a", "b")) -> NewEvent:
    return NewEvent(f"evt_{i}", "qingstor", f'{{"id": "evt_{i}"}}', tuple(sinks))


async def open_store(path: Path, window: float = 100.0) -> SqliteStore:
    store = SqliteStore(path, dedupe_window=window)
    await store.open()
    return store


async def test_accept_claims_and_enqueues_in_one_commit_that_survives_reopen(tmp_path):
    store = await open_store(tmp_path / "r.db")
    result = await store.accept([event(1), event(2), event(1)], now=1000.0)
    assert (result.accepted, result.duplicates) == (["evt_1", "evt_2"], ["evt_1"])
    await store.close()

    store = await open_store(tmp_path / "r.db")
    try:
        assert await store.counts() == {"events": 2, "pending": 4}
        again = await store.accept([event(2)], now=1050.0)
        assert again.duplicates == ["evt_2"]
        due = await store.claim("a", limit=10, lease=60.0, now=1000.0)
        assert [d.event_id for d in due] == ["evt_1", "evt_2"]
        assert due[0].envelope == '{"id": "evt_1"}'
    finally:
        await store.close()


async def test_after_the_window_a_repeat_is_a_new_event(tmp_path):
    store = await open_store(tmp_path / "r.db", window=60.0)
    try:
        await store.accept([event(1, sinks=())], now=1000.0)
        assert (await store.accept([event(1, sinks=())], now=1059.0)).duplicates == ["evt_1"]
        assert (await store.accept([event(1, sinks=())], now=1061.0)).accepted == ["evt_1"]
    finally:
        await store.close()


async def test_claims_hold_deliveries_until_settled_released_or_their_lease_ends(tmp_path):
    store = await open_store(tmp_path / "r.db")
    try:
        await store.accept([event(1, ("a",)), event(2, ("a",))], now=1000.0)
        [first] = await store.claim("a", limit=1, lease=60.0, now=1000.0)
        # Claimed: nobody else gets it, while the rest is still there to claim.
        [second] = await store.claim("a", limit=10, lease=60.0, now=1000.0)
        assert (first.event_id, second.event_id) == ("evt_1", "evt_2")
        assert await store.claim("a", limit=10, lease=60.0, now=1001.0) == []
        # Given back (a send cancelled by a drain): due again at once.
        store.release([second.id])
        assert [d.id for d in await store.claim("a", 10, lease=60.0, now=1002.0)] == [second.id]
        # A holder that died never gives back: the lease running out does.
        [again] = await store.claim("a", limit=10, lease=60.0, now=1060.5)
        assert again.id == first.id
    finally:
        await store.close()


async def test_claims_of_one_sink_leave_anothers_alone(tmp_path):
    store = await open_store(tmp_path / "r.db")
    try:
        await store.accept([event(1)], now=1000.0)
        [a] = await store.claim("a", limit=10, lease=60.0, now=1000.0)
        [b] = await store.claim("b", limit=10, lease=60.0, now=1000.0)
        assert a.id != b.id and a.event_id == b.event_id == "evt_1"
    finally:
        await store.close()


async def test_due_respects_time_claims_and_settlement(tmp_path):
    store = await open_store(tmp_path / "r.db")
    try:
        await store.accept([event(1, ("a",)), event(2, ("a",))], now=1000.0)
        first, second = await store.claim("a", limit=10, lease=60.0, now=1000.0)
        await store.settle(
            [
                Settlement(first.id, "pending", 1100.0, 503, "busy"),
                Settlement(second.id, "done", 1000.0, 200, None),
            ],
            now=1000.0,
        )
        # Settled: the claims are over, the retry is the schedule's.
        assert await store.claim("a", limit=10, lease=60.0, now=1050.0) == []
        assert await store.next_due_at("a") == 1100.0
        [again] = await store.claim("a", limit=10, lease=60.0, now=1100.0)
        assert (again.id, again.attempts) == (first.id, 1)
    finally:
        await store.close()


async def test_prune_drops_old_done_deliveries_then_expired_unreferenced_events(tmp_path):
    store = await open_store(tmp_path / "r.db", window=100.0)
    try:
        await store.accept([event(1, ("a",)), event(2, ("a",)), event(3, ())], now=1000.0)
        one, two = await store.claim("a", limit=10, lease=60.0, now=1000.0)
        await store.settle([Settlement(one.id, "done", 1000.0, 200, None)], now=1000.0)
        await store.settle([Settlement(two.id, "dead", 1000.0, 400, "bad")], now=1000.0)
        # Inside the window nothing goes, whatever its state: dedupe must hold.
        assert await store.prune(keep_done=10.0, now=1050.0) == (1, 0)
        assert (await store.accept([event(3, ())], now=1050.0)).duplicates == ["evt_3"]
        # Past the window: events 1 and 3 go; event 2 stays, its dead letter needs it.
        assert await store.prune(keep_done=10.0, now=1200.0) == (0, 2)
        assert await store.counts() == {"events": 1, "dead": 1}
    finally:
        await store.close()


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


async def test_a_reclaimed_event_does_not_queue_a_second_pending_delivery(tmp_path):
    store = await open_store(tmp_path / "r.db", window=10.0)
    try:
        await store.accept([event(1, ("a",))], now=1000.0)
        assert (await store.accept([event(1, ("a",))], now=1100.0)).accepted == ["evt_1"]
        assert await store.counts() == {"events": 1, "pending": 1}
    finally:
        await store.close()


async def test_a_big_group_is_stored_whole_across_several_multi_row_inserts(tmp_path):
    # 700 events with two sinks each: 700 event rows and 1,400 delivery rows, more
    # than one INSERT statement holds; all of them land, in order, in one commit.
    store = await open_store(tmp_path / "r.db")
    try:
        batch = [event(i) for i in range(700)]
        result = await store.accept([*batch, event(3)], now=1000.0)
        assert result.accepted == [e.id for e in batch]
        assert result.duplicates == ["evt_3"]
        assert await store.counts() == {"events": 700, "pending": 1400}
        due = await store.claim("b", limit=1000, lease=60.0, now=1000.0)
        assert [d.event_id for d in due] == [e.id for e in batch]
        assert [d.envelope for d in due[:2]] == ['{"id": "evt_0"}', '{"id": "evt_1"}']
    finally:
        await store.close()


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
