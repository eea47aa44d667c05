"""The store contract, one suite every backend must pass: through `open_store` and the
store's own API only, never a backend's insides. The `stores` fixture runs each test on
every backend in relay.store.BACKENDS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from relay.config import SqliteStoreConfig, StoreConfig
from relay.errors import StoreUnavailable
from relay.models import Delivery
from relay.store import (
    BACKENDS,
    MovedDelivery,
    NewEvent,
    Ordering,
    Quarantined,
    Selection,
    Settlement,
    Store,
    open_store,
)
from tests.redis_server import fresh_prefix

OpenStore = Callable[..., Awaitable[Store]]


def event(i: int, sinks: tuple[str, ...] = ("a", "b"), key: str | None = None) -> NewEvent:
    envelope = {"id": f"evt_{i}", "key": key or f"k{i}"}
    return NewEvent(f"evt_{i}", "qingstor", json.dumps(envelope), sinks)


@pytest.fixture(params=[*sorted(BACKENDS), "redis-cluster"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens stores of one backend on one location: again after close, to see what a
    restart sees; `elsewhere`, on a second location of the same backend."""
    sections: list[dict[str, object]] = [
        {"backend": request.param, "path": name} for name in ("r.db", "elsewhere.db")
    ]
    if request.param.startswith("redis"):
        # Requested only here, so that the SQLite runs need no redis-server.
        cluster = request.param == "redis-cluster"
        url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
        sections = [
            {"backend": "redis", "url": url, "prefix": fresh_prefix(), "cluster": cluster}
            for _ in "ab"
        ]
    configs = [
        TypeAdapter(StoreConfig).validate_python(section, context={"base_dir": tmp_path})
        for section in sections
    ]
    opened: list[Store] = []

    async def make(
        window: float = 100.0, *, exclusive: bool = True, elsewhere: bool = False
    ) -> Store:
        store = open_store(configs[elsewhere], dedupe_window=window)
        await store.open(exclusive=exclusive)
        opened.append(store)
        return store

    # Whether claims are shared between processes and so run out with their lease.
    make.shared_claims = request.param != "sqlite"  # type: ignore[attr-defined]
    make.backend = request.param  # type: ignore[attr-defined]
    yield make
    for store in opened:
        await store.close()


async def test_accept_claims_and_enqueues_in_one_step_that_survives_reopen(stores: OpenStore):
    store = await stores()
    result = await store.accept([event(1), event(2), event(1)], now=1000.0)
    assert (result.accepted, result.duplicates) == (["evt_1", "evt_2"], ["evt_1"])
    await store.close()

    store = await stores()
    assert await store.counts() == {"events": 2, "pending": 4}
    assert (await store.accept([event(2)], now=1050.0)).duplicates == ["evt_2"]
    assert await store.seen(["evt_1", "evt_2", "evt_3"], now=1050.0) == {"evt_1", "evt_2"}
    due = await store.claim("a", limit=10, lease=60.0, now=1000.0)
    assert [d.event_id for d in due] == ["evt_1", "evt_2"]
    assert json.loads(due[0].envelope) == {"id": "evt_1", "key": "k1"}
    assert await store.queued(["a", "b", "c"]) == {"a": 2, "b": 2, "c": 0}


async def test_after_the_window_a_repeat_is_a_new_event(stores: OpenStore):
    store = await stores(window=60.0)
    await store.accept([event(1, sinks=())], now=1000.0)
    assert (await store.accept([event(1, sinks=())], now=1059.0)).duplicates == ["evt_1"]
    assert (await store.accept([event(1, sinks=())], now=1061.0)).accepted == ["evt_1"]


async def test_a_reclaimed_event_does_not_queue_a_second_pending_delivery(stores: OpenStore):
    store = await stores(window=10.0)
    await store.accept([event(1, ("a",))], now=1000.0)
    assert (await store.accept([event(1, ("a",))], now=1100.0)).accepted == ["evt_1"]
    assert await store.counts() == {"events": 1, "pending": 1}


async def test_claims_hold_deliveries_until_settled_released_or_their_lease_ends(
    stores: OpenStore,
):
    store = await stores()
    await store.accept([event(1, ("a",)), event(2, ("a",))], now=1000.0)
    [first] = await store.claim("a", limit=1, lease=60.0, now=1000.0)
    [second] = await store.claim("a", limit=10, lease=60.0, now=1000.0)
    assert (first.event_id, second.event_id) == ("evt_1", "evt_2")
    assert await store.claim("a", limit=10, lease=60.0, now=1001.0) == []
    store.release([second.id])  # a send cancelled by a drain: due again at once
    assert [d.id for d in await store.claim("a", 10, lease=60.0, now=1002.0)] == [second.id]
    if stores.shared_claims:  # type: ignore[attr-defined]
        # A holder that died never gives back: the lease running out does.
        [again] = await store.claim("a", limit=10, lease=60.0, now=1060.5)
        assert again.id == first.id
    else:
        # The only holder is this process: a send that outlasts the lease (parked by a
        # Retry-After) must not be handed out a second time while it goes on.
        assert await store.claim("a", limit=10, lease=60.0, now=100_000.0) == []
        store.release([first.id])
        assert [d.id for d in await store.claim("a", 10, lease=60.0, now=100_000.0)] == [first.id]


async def test_claims_of_one_sink_leave_anothers_alone(stores: OpenStore):
    store = await stores()
    await store.accept([event(1)], now=1000.0)
    [a] = await store.claim("a", limit=10, lease=60.0, now=1000.0)
    [b] = await store.claim("b", limit=10, lease=60.0, now=1000.0)
    assert a.id != b.id and a.event_id == b.event_id == "evt_1"


async def test_settlements_schedule_count_attempts_and_end_claims(stores: OpenStore):
    store = await stores()
    await store.accept([event(1, ("a",)), event(2, ("a",))], now=1000.0)
    first, second = await store.claim("a", limit=10, lease=60.0, now=1000.0)
    await store.settle(
        [
            Settlement(first.id, "pending", 1100.0, 503, "busy"),
            Settlement(second.id, "done", 1000.0, 200, None),
        ],
        now=1000.0,
    )
    assert await store.claim("a", limit=10, lease=60.0, now=1050.0) == []
    assert await store.next_due_at("a") == 1100.0
    [again] = await store.claim("a", limit=10, lease=60.0, now=1100.0)
    assert (again.id, again.attempts) == (first.id, 1)
    # Held back by the sink (a 429 to an earlier message): not an attempt.
    await store.settle([Settlement(again.id, "pending", 1200.0, None, None, attempted=False)])
    [later] = await store.claim("a", limit=10, lease=60.0, now=1200.0)
    assert later.attempts == 1
    record = await store.event("evt_1")
    assert record is not None
    [delivery] = record.deliveries
    assert (delivery.sink, delivery.state, delivery.last_status) == ("a", "pending", 503)
    assert await store.event("evt_404") is None


async def test_dead_letters_list_replay_and_purge_by_selection(stores: OpenStore):
    store = await stores()
    await store.accept([event(1), event(2)], now=1000.0)
    for sink in ("a", "b"):
        claimed = await store.claim(sink, limit=10, lease=60.0, now=1000.0)
        await store.settle([Settlement(d.id, "dead", 1000.0, 400, "bad") for d in claimed])
    everything = Selection(everything=True)
    assert len(await store.dead_letters(everything)) == 4
    letters = await store.dead_letters(Selection(sink="a", event_ids=("evt_2",)))
    assert [(x.sink, x.event_id, x.last_error) for x in letters] == [("a", "evt_2", "bad")]
    assert await store.replay(Selection(sink="a"), now=2000.0) == 2
    replayed = await store.claim("a", limit=10, lease=60.0, now=2000.0)
    assert [(d.event_id, d.attempts) for d in replayed] == [("evt_1", 0), ("evt_2", 0)]
    assert await store.purge(Selection(event_ids=("evt_1",))) == 1  # b's; a's is pending
    assert [x.event_id for x in await store.dead_letters(everything)] == ["evt_2"]
    stats = await store.sink_stats(now=2000.0)
    assert (stats["a"].pending, stats["a"].dead, stats["b"].dead) == (2, 0, 1)
    with pytest.raises(ValueError, match="select"):
        Selection()


async def test_quarantine_keeps_a_body_once_and_within_its_bounds(stores: OpenStore):
    store = await stores()

    def body(i: int, size: int = 10) -> Quarantined:
        return Quarantined(
            "qingstor", 1000.0 + i, "invalid_event", "why", "text/plain", b"x" * size + bytes([i])
        )

    await store.quarantine(body(1), max_entries=3, max_bytes=1000)
    await store.quarantine(body(1), max_entries=3, max_bytes=1000)  # the sender's retry
    [kept] = await store.quarantined()
    assert (kept.repeats, kept.size, kept.body) == (2, 11, b"x" * 10 + b"\x01")
    for i in range(2, 6):
        await store.quarantine(body(i), max_entries=3, max_bytes=1000)
    assert [e.body[-1] for e in await store.quarantined()] == [3, 4, 5]  # newest 3
    # 991 bytes alone: with any older body the total would pass max_bytes.
    await store.quarantine(body(6, size=990), max_entries=3, max_bytes=1000)
    assert [e.size for e in await store.quarantined(with_bodies=False)] == [991]
    assert await store.purge_quarantine(None) == 1
    assert await store.quarantined() == []


async def test_sink_state_receipts_and_retirement(stores: OpenStore):
    store = await stores()
    await store.accept([event(1), event(2)], now=1000.0)
    await store.save_sink_state("a", "open", 1030.0, gone=True, now=1000.0)
    stats = await store.sink_stats(now=1000.0)
    assert (stats["a"].circuit, stats["a"].open_until, stats["a"].gone) == ("open", 1030.0, True)
    assert stats["b"].pending == 2 and stats["b"].oldest_pending_s == 0.0
    assert (await store.receipts_since(940.0))["qingstor"] == (2, 0)
    await store.accept([event(1), event(3)], now=1060.0)  # a minute later: 1 is a retry
    assert (await store.receipts_by_minute(900.0))["qingstor"] == {16: (2, 0), 17: (2, 1)}
    # A sink gone from the config: its queue is dead-lettered, never dropped.
    assert await store.retire_sinks(["b"], now=1010.0) == 3
    letters = await store.dead_letters(Selection(sink="a"))
    assert {x.last_error for x in letters} == {"sink removed"}
    assert "a" not in {s for s, st in (await store.sink_stats()).items() if st.circuit == "open"}


async def test_pruning_keeps_what_dedupe_and_dead_letters_need(stores: OpenStore):
    store = await stores(window=100.0)
    await store.accept([event(1, ("a",)), event(2, ("a",)), event(3, ())], now=1000.0)
    one, two = await store.claim("a", limit=10, lease=60.0, now=1000.0)
    await store.settle([Settlement(one.id, "done", 1000.0, 200, None)], now=1000.0)
    await store.settle([Settlement(two.id, "dead", 1000.0, 400, "bad")], now=1000.0)
    assert await store.prune(keep_done=10.0, now=1050.0) == (1, 0)
    assert (await store.accept([event(3, ())], now=1050.0)).duplicates == ["evt_3"]
    assert await store.prune(keep_done=10.0, now=1200.0) == (0, 2)
    assert await store.counts() == {"events": 1, "dead": 1}


async def test_a_clock_step_back_moves_later_work_no_earlier_than_now(stores: OpenStore):
    store = await stores()
    await store.accept([event(1, ("a",)), event(2, ("a",))], now=1000.0)
    first, second = await store.claim("a", limit=10, lease=60.0, now=1000.0)
    await store.settle(
        [
            Settlement(first.id, "pending", 1000.0 + 3610, 503, "busy"),
            Settlement(second.id, "pending", 1000.0 + 30, 503, "busy"),
        ],
        now=1000.0,
    )
    assert await store.move_schedule_back(3600, now=1000.0) == 2
    assert await store.next_due_at("a") == 1000.0
    assert [d.id for d in await store.claim("a", 10, lease=60.0, now=1000.0)] == [second.id]


async def test_a_big_group_is_stored_whole_and_in_order(stores: OpenStore):
    store = await stores()
    batch = [event(i) for i in range(700)]
    result = await store.accept([*batch, event(3)], now=1000.0)
    assert result.accepted == [e.id for e in batch] and result.duplicates == ["evt_3"]
    assert await store.counts() == {"events": 700, "pending": 1400}
    due = await store.claim("b", limit=1000, lease=60.0, now=1000.0)
    assert [d.event_id for d in due] == [e.id for e in batch]


async def test_operators_open_without_creating_and_health_is_reported(
    stores: OpenStore, tmp_path: Path
):
    store = await stores()
    await store.ping()
    assert await store.health(min_free_bytes=0) is None
    assert "nearly full" in (await store.health(min_free_bytes=2**62) or "")
    # An operator's command beside the server, on the same store.
    beside = await stores(exclusive=False)
    assert await beside.counts() == {"events": 0}
    elsewhere = open_store(
        SqliteStoreConfig.model_validate({"path": "nowhere/r.db"}, context={"base_dir": tmp_path}),
        dedupe_window=60.0,
    )
    with pytest.raises(StoreUnavailable, match="no store at"):
        await elsewhere.open(create=False)
    await elsewhere.close()


# --- several relays on one store (shared backends) ----------------------------------------


def shared_only(stores: OpenStore) -> None:
    if not stores.shared_claims:  # type: ignore[attr-defined]
        pytest.skip("one process per store: its claims, sinks and circuits are its own")


async def test_a_late_settle_from_a_holder_whose_lease_ran_out_changes_nothing(
    stores: OpenStore,
):
    shared_only(stores)
    one, two = await stores(), await stores()
    await one.accept([event(1, ("a",))], now=1000.0)
    [stalled] = await one.claim("a", limit=1, lease=10.0, now=1000.0)
    # `one` stalls past its lease; `two` takes the delivery over and delivers it.
    [taken] = await two.claim("a", limit=1, lease=10.0, now=1011.0)
    assert taken.id == stalled.id
    # `one` wakes up: its renewal says the claim is lost, its settlement is ignored.
    assert await one.renew("a", [stalled.id], lease=10.0, now=1012.0) == [stalled.id]
    await one.settle([Settlement(stalled.id, "pending", 1100.0, 503, "busy")], now=1012.0)
    assert (await one.event("evt_1")).deliveries[0].attempts == 0  # type: ignore[union-attr]
    await two.settle([Settlement(taken.id, "done", 1012.0, 200, None)], now=1012.0)
    # A settlement of what is already done changes nothing either.
    await one.settle([Settlement(stalled.id, "dead", 1013.0, 500, "x")], now=1013.0)
    record = await two.event("evt_1")
    assert record is not None
    assert [(d.state, d.attempts) for d in record.deliveries] == [("done", 1)]


async def test_renewed_claims_outlast_their_lease(stores: OpenStore):
    shared_only(stores)
    one, two = await stores(), await stores()
    await one.accept([event(1, ("a",))], now=1000.0)
    [held] = await one.claim("a", limit=1, lease=10.0, now=1000.0)
    for at in (1008.0, 1016.0, 1024.0):
        assert await one.renew("a", [held.id], lease=10.0, now=at) == []
    assert await two.claim("a", limit=1, lease=10.0, now=1030.0) == []
    assert [d.id for d in await two.claim("a", 1, lease=10.0, now=1034.5)] == [held.id]


async def test_a_paced_sink_has_one_consumer_at_a_time(stores: OpenStore):
    shared_only(stores)
    one, two = await stores(), await stores()
    await one.accept([event(i, ("slack",)) for i in range(4)], now=1000.0)
    first = await one.claim("slack", limit=1, lease=10.0, now=1000.0, exclusive=True)
    assert len(first) == 1
    await one.settle([Settlement(first[0].id, "done", 1000.0, 200, None)], now=1000.5)
    # Work is due, but `one` is the consumer: `two` gets none, even with nothing held.
    assert await two.claim("slack", limit=4, lease=10.0, now=1001.0, exclusive=True) == []
    # A sink that is not paced is anyone's.
    await one.accept([event(9, ("app",))], now=1001.0)
    assert len(await two.claim("app", limit=4, lease=10.0, now=1001.0)) == 1
    # The consumer's claims and renewals keep it the consumer...
    assert await one.renew("slack", [], lease=10.0, now=1009.0) == []
    assert await two.claim("slack", limit=4, lease=10.0, now=1015.0, exclusive=True) == []
    # ...and once it falls silent (died) for a lease, another relay takes over.
    taken = await two.claim("slack", limit=4, lease=10.0, now=1019.5, exclusive=True)
    assert len(taken) == 3
    assert await one.claim("slack", limit=4, lease=10.0, now=1020.0, exclusive=True) == []


async def test_a_sink_is_retired_only_when_no_running_relay_has_it(stores: OpenStore):
    shared_only(stores)
    old, new = await stores(), await stores()
    # A rolling deploy: `new` runs sink b, which `old`'s config does not have yet.
    await new.heartbeat(["a", "b"], now=1000.0)
    await new.accept([event(1, ("a", "b"))], now=1000.0)
    assert await old.retire_sinks(["a"], now=1001.0) == 0
    assert (await old.sink_stats(now=1001.0))["b"].pending == 1
    # `new` stops (killed: no goodbye); once its heartbeat is stale, b has no relay.
    assert await old.retire_sinks(["a"], now=1030.0) == 0
    assert await old.retire_sinks(["a"], now=1061.0) == 1
    [letter] = await old.dead_letters(Selection(sink="b"))
    assert letter.last_error == "sink removed"


async def test_each_relay_keeps_its_own_circuit_and_status_shows_the_worst(
    stores: OpenStore,
):
    shared_only(stores)
    one, two = await stores(), await stores()
    await one.save_sink_state("a", "open", 1030.0, gone=False, now=1000.0)
    await two.save_sink_state("a", "closed", 0.0, gone=False, now=1001.0)
    stats = await two.sink_stats(now=1002.0)
    assert (stats["a"].circuit, stats["a"].open_until) == ("open", 1030.0)
    await one.save_sink_state("a", "closed", 0.0, gone=False, now=1003.0)
    assert (await two.sink_stats(now=1004.0))["a"].circuit == "closed"
    await one.close()  # a relay that stops is forgotten at once
    await two.save_sink_state("a", "half_open", 0.0, gone=True, now=1005.0)
    stats = await two.sink_stats(now=1006.0)
    assert (stats["a"].circuit, stats["a"].gone) == ("half_open", True)


async def test_work_queued_by_one_relay_wakes_the_others(stores: OpenStore):
    shared_only(stores)
    one, two = await stores(), await stores()
    woken: asyncio.Queue[set[str]] = asyncio.Queue()

    async def watch() -> None:
        async for sinks in two.watch_work():
            await woken.put(sinks)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.sleep(0.3)  # subscribed
        await one.accept([event(1, ("a", "b"))])
        assert await asyncio.wait_for(woken.get(), timeout=5.0) == {"a", "b"}
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_work_moves_to_another_store_with_its_dedupe_claims(stores: OpenStore):
    source = await stores(window=100.0)
    await source.accept([event(4)], now=850.0)  # claimed until 950: expired at 1000
    await source.accept([event(1), event(2), event(3)], now=1000.0)
    due = {(d.event_id, d.sink): d for d in await source.claim("a", 10, lease=60.0, now=1000.0)}
    due |= {(d.event_id, d.sink): d for d in await source.claim("b", 10, lease=60.0, now=1000.0)}
    await source.settle(
        [
            Settlement(due["evt_1", "a"].id, "done", 1000.0, 200, None),
            Settlement(due["evt_1", "b"].id, "dead", 1000.0, 400, "bad request"),
            Settlement(due["evt_2", "a"].id, "pending", 1500.0, 503, "busy"),
            Settlement(due["evt_3", "a"].id, "done", 1000.0, 200, None),
            Settlement(due["evt_3", "b"].id, "done", 1000.0, 200, None),
            Settlement(due["evt_4", "a"].id, "done", 1000.0, 200, None),
            Settlement(due["evt_4", "b"].id, "done", 1000.0, 200, None),
        ],
        now=1000.0,
    )
    batches = [batch async for batch in source.export_work(now=1000.0, batch=2)]
    moved = {e.id: e for batch in batches for e in batch}
    # Done deliveries and the expired claim stay behind; evt_3's claim moves alone.
    assert sorted(moved) == ["evt_1", "evt_2", "evt_3"]
    assert moved["evt_1"].deliveries == (
        MovedDelivery("b", "dead", 1, 1000.0, 1000.0, 1000.0, 400, "bad request"),
    )
    assert sorted((d.sink, d.state, d.attempts, d.next_at) for d in moved["evt_2"].deliveries) == [
        ("a", "pending", 1, 1500.0),
        ("b", "pending", 0, 1000.0),
    ]
    assert moved["evt_3"].deliveries == ()

    target = await stores(window=100.0, elsewhere=True)
    everything = [e for batch in batches for e in batch]
    assert sorted(await target.import_work(everything)) == ["evt_1", "evt_2", "evt_3"]
    assert await target.import_work(everything) == []  # run twice: nothing doubles
    # The claims came along: a sender's retry is still a duplicate there.
    again = await target.accept([event(1), event(3), event(4)], now=1010.0)
    assert (again.accepted, again.duplicates) == (["evt_4"], ["evt_1", "evt_3"])
    [letter] = await target.dead_letters(Selection(everything=True))
    assert (letter.event_id, letter.sink, letter.last_error) == ("evt_1", "b", "bad request")
    ready = await target.claim("b", 10, lease=60.0, now=1010.0)
    assert sorted(d.event_id for d in ready) == ["evt_2", "evt_4"]
    claimed = await target.claim("a", 10, lease=60.0, now=1010.0)
    assert [d.event_id for d in claimed] == ["evt_4"]
    done = [Settlement(d.id, "done", 1010.0, 200, None) for d in [*ready, *claimed]]
    await target.settle(done, now=1010.0)
    [later] = await target.claim("a", 10, lease=60.0, now=1500.0)
    assert (later.event_id, later.attempts) == ("evt_2", 1)


async def test_a_settlement_applied_twice_counts_once(stores: OpenStore):
    # Its answer lost and the call run again (a retried connection): one attempt.
    store = await stores()
    await store.accept([event(1, ("a",))], now=1000.0)
    [held] = await store.claim("a", limit=1, lease=60.0, now=1000.0)
    retry = Settlement(held.id, "pending", 1100.0, 503, "busy", attempts_before=held.attempts)
    await store.settle([retry], now=1001.0)
    await store.settle([retry], now=1001.5)
    record = await store.event("evt_1")
    assert record is not None
    assert [(d.state, d.attempts) for d in record.deliveries] == [("pending", 1)]


async def test_moving_work_onto_an_expired_claim_of_the_same_id_keeps_the_work(
    stores: OpenStore,
):
    source = await stores(window=100.0)
    await source.accept([event(1, ("a",))], now=1000.0)
    moved = [e async for batch in source.export_work(now=1000.0) for e in batch]
    target = await stores(window=100.0, elsewhere=True)
    # The target saw this id long ago: its claim expired, its delivery done and pruned.
    await target.accept([event(1, ("a",))], now=100.0)
    [old] = await target.claim("a", 1, lease=60.0, now=100.0)
    await target.settle([Settlement(old.id, "done", 100.0, 200, None)], now=100.0)
    await target.prune(keep_done=0.0, now=900.0)
    assert await target.import_work(moved) == ["evt_1"]
    [pending] = await target.claim("a", 1, lease=60.0, now=1000.0)
    assert pending.event_id == "evt_1"
    assert await target.import_work(moved) == []


async def test_recent_events_page_newest_first_through_ties_with_their_states(
    stores: OpenStore,
):
    store = await stores()
    # Two requests of three events each share a claim time within each request.
    await store.accept([event(i, ("a", "b")) for i in (1, 2, 3)], now=1000.0)
    await store.accept([event(i, ("a",)) for i in (4, 5, 6)], now=1001.0)
    [held] = [
        d for d in await store.claim("a", 10, lease=60.0, now=1001.0) if d.event_id == "evt_5"
    ]
    await store.settle([Settlement(held.id, "dead", 1001.0, 400, "no")], now=1001.0)
    seen: list[str] = []
    cursor: str | None = None
    states: dict[str, dict[str, str]] = {}
    for _ in range(10):
        page = await store.recent_events(cursor, limit=2)
        seen += [e.id for e in page.events]
        states |= {e.id: dict(e.states) for e in page.events}
        cursor = page.cursor
        if cursor is None:
            break
    assert sorted(seen[:3]) == ["evt_4", "evt_5", "evt_6"]  # the newer request first
    assert sorted(seen[3:]) == ["evt_1", "evt_2", "evt_3"]
    assert len(seen) == 6
    assert states["evt_5"] == {"a": "dead"}
    assert states["evt_1"] == {"a": "pending", "b": "pending"}


# --- order: per_key -------------------------------------------------------------------

ORDER = Ordering(timeout=60.0)


def on_object(i: int, key: str, at: float, sinks: tuple[str, ...] = ("a",)) -> NewEvent:
    """An event about object `key`, sorting at `at`, to sinks that order by object."""
    envelope = json.dumps({"id": f"evt_{i}", "key": key})
    return NewEvent(f"evt_{i}", "qingstor", envelope, sinks, key, at, sinks)


def ids(deliveries: list[Delivery]) -> list[str]:
    return sorted(d.event_id for d in deliveries)


async def test_an_ordered_claim_takes_one_event_per_object_in_the_events_order(stores):
    store = await stores()
    # Accepted out of their own order: the delete's time comes after the create's.
    await store.accept([on_object(2, "A", 20.0), on_object(1, "A", 10.0)], now=1000.0)
    await store.accept([on_object(3, "B", 10.0)], now=1000.0)
    first = await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)
    assert ids(first) == ["evt_1", "evt_3"]
    assert await store.claim("a", 10, 30.0, now=1000.0, order=ORDER) == []  # A is out
    await store.settle([Settlement(d.id, "done", 1000.0, 200, None) for d in first])
    assert ids(await store.claim("a", 10, 30.0, now=1001.0, order=ORDER)) == ["evt_2"]


async def test_without_order_the_same_events_are_claimed_together(stores):
    store = await stores()
    await store.accept([on_object(1, "A", 10.0), on_object(2, "A", 20.0)], now=1000.0)
    assert ids(await store.claim("a", 10, 30.0, now=1000.0)) == ["evt_1", "evt_2"]


async def test_a_failed_event_holds_its_object_until_done_or_held_too_long(stores):
    store = await stores()
    await store.accept([on_object(1, "A", 10.0), on_object(2, "A", 20.0)], now=1000.0)
    [create] = await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)
    await store.settle([Settlement(create.id, "pending", 1010.0, 503, "busy")], now=1000.0)
    # Waiting for its retry, the create still holds the delete back.
    assert await store.claim("a", 10, 30.0, now=1005.0, order=ORDER) == []
    [again] = await store.claim("a", 10, 30.0, now=1010.0, order=ORDER)
    assert again.event_id == "evt_1" and again.attempts == 1
    await store.settle([Settlement(again.id, "pending", 1100.0, 503, "busy")], now=1010.0)
    # Held from its first failure (1000) for order.timeout (60 s): then the delete goes.
    assert await store.claim("a", 10, 30.0, now=1059.0, order=ORDER) == []
    [delete] = await store.claim("a", 10, 30.0, now=1061.0, order=ORDER)
    assert delete.event_id == "evt_2" and not delete.late
    await store.settle([Settlement(delete.id, "done", 1061.0, 200, None)], now=1061.0)
    # The create, when it goes at last, comes after its object's later event: late.
    [late] = await store.claim("a", 10, 30.0, now=1100.0, order=ORDER)
    assert late.event_id == "evt_1" and late.late


async def test_an_object_out_for_delivery_holds_even_an_earlier_event_that_comes_later(stores):
    store = await stores()
    await store.accept([on_object(2, "A", 20.0)], now=1000.0)
    [out] = await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)
    await store.accept([on_object(1, "A", 10.0)], now=1001.0)  # the sender's late retry
    assert await store.claim("a", 10, 30.0, now=1001.0, order=ORDER) == []
    await store.settle([Settlement(out.id, "done", 1002.0, 200, None)], now=1002.0)
    [late] = await store.claim("a", 10, 30.0, now=1002.0, order=ORDER)
    assert late.event_id == "evt_1" and late.late


async def test_a_dead_letter_releases_its_object(stores):
    store = await stores()
    await store.accept([on_object(1, "A", 10.0), on_object(2, "A", 20.0)], now=1000.0)
    [create] = await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)
    await store.settle([Settlement(create.id, "dead", 1000.0, 400, "refused")], now=1000.0)
    assert ids(await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)) == ["evt_2"]


async def test_an_event_about_no_object_and_an_unordered_sink_are_never_held(stores):
    store = await stores()
    plain = [event(1, sinks=("a",)), event(2, sinks=("a",))]  # no object key
    await store.accept(plain, now=1000.0)
    both = NewEvent("evt_3", "qingstor", "{}", ("a", "b"), "A", 10.0, ("a",))
    later = NewEvent("evt_4", "qingstor", "{}", ("a", "b"), "A", 20.0, ("a",))
    await store.accept([both, later], now=1000.0)
    assert ids(await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)) == [
        "evt_1",
        "evt_2",
        "evt_3",
    ]
    # Sink b does not order by object: it takes both events of A at once.
    assert ids(await store.claim("b", 10, 30.0, now=1000.0, order=ORDER)) == ["evt_3", "evt_4"]


async def test_order_holds_across_a_restart(stores):
    store = await stores()
    await store.accept([on_object(1, "A", 10.0), on_object(2, "A", 20.0)], now=1000.0)
    [create] = await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)
    await store.settle([Settlement(create.id, "pending", 1005.0, 503, "busy")], now=1000.0)
    await store.close()
    store = await stores()
    assert await store.claim("a", 10, 30.0, now=1001.0, order=ORDER) == []
    assert ids(await store.claim("a", 10, 30.0, now=1005.0, order=ORDER)) == ["evt_1"]


COALESCE = Ordering(timeout=60.0, coalesce=True)


async def states(store: Store, event_id: str, sink: str = "a") -> list[str]:
    record = await store.event(event_id)
    assert record is not None
    return [d.state for d in record.deliveries if d.sink == sink]


async def test_coalescing_takes_the_newest_of_an_object_and_settles_the_rest(stores):
    store = await stores()
    burst = [on_object(1, "A", 10.0), on_object(3, "A", 30.0), on_object(2, "A", 20.0)]
    await store.accept([*burst, on_object(4, "B", 10.0)], now=1000.0)
    taken = await store.claim("a", 10, 30.0, now=1000.0, order=COALESCE)
    assert ids(taken) == ["evt_3", "evt_4"]
    newest = next(d for d in taken if d.event_id == "evt_3")
    assert sorted(newest.supersedes) == ["evt_1", "evt_2"]
    assert await states(store, "evt_1") == await states(store, "evt_2") == ["coalesced"]
    assert (await store.sink_stats(now=1000.0))["a"].coalesced == 2
    # Nothing of A goes beside the newest, and coalesced ones never come back.
    await store.accept([on_object(5, "A", 50.0)], now=1001.0)
    assert await store.claim("a", 10, 30.0, now=1001.0, order=COALESCE) == []
    await store.settle([Settlement(d.id, "done", 1002.0, 200, None) for d in taken])
    [last] = await store.claim("a", 10, 30.0, now=1002.0, order=COALESCE)
    assert last.event_id == "evt_5" and last.supersedes == ()


async def test_coalescing_supersedes_an_event_waiting_for_its_retry(stores):
    store = await stores()
    await store.accept([on_object(1, "A", 10.0)], now=1000.0)
    [first] = await store.claim("a", 10, 30.0, now=1000.0, order=COALESCE)
    await store.settle([Settlement(first.id, "pending", 1050.0, 503, "busy")], now=1000.0)
    await store.accept([on_object(2, "A", 20.0), on_object(3, "A", 30.0)], now=1001.0)
    [newest] = await store.claim("a", 10, 100.0, now=1001.0, order=COALESCE)
    assert newest.event_id == "evt_3" and sorted(newest.supersedes) == ["evt_1", "evt_2"]
    assert await store.claim("a", 10, 30.0, now=1050.0, order=COALESCE) == []


async def test_an_object_held_too_long_is_reported_once_as_its_next_event_goes(stores):
    store = await stores()
    await store.accept([on_object(1, "A", 10.0), on_object(2, "A", 20.0)], now=1000.0)
    [stuck] = await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)
    await store.settle([Settlement(stuck.id, "pending", 1100.0, 503, "busy")], now=1000.0)
    [goes] = await store.claim("a", 10, 30.0, now=1061.0, order=ORDER)
    assert goes.event_id == "evt_2" and goes.overtakes == (("evt_1", 61.0),)
    await store.settle([Settlement(goes.id, "done", 1061.0, 200, None)], now=1061.0)
    await store.accept([on_object(3, "A", 30.0)], now=1062.0)
    [next_one] = await store.claim("a", 10, 30.0, now=1062.0, order=ORDER)
    assert next_one.event_id == "evt_3" and next_one.overtakes == ()


async def test_a_move_to_another_store_keeps_each_objects_order(stores):
    source = await stores()
    await source.accept([on_object(2, "A", 20.0), on_object(1, "A", 10.0)], now=1000.0)
    moved = [e async for batch in source.export_work(now=1000.0) for e in batch]
    target = await stores(elsewhere=True)
    assert sorted(await target.import_work(moved)) == ["evt_1", "evt_2"]
    assert ids(await target.claim("a", 10, 30.0, now=1000.0, order=ORDER)) == ["evt_1"]


async def test_a_long_run_of_events_that_held_their_object_too_long_is_walked_past(stores):
    """More of them in a row than one read takes: the object's next event still goes."""
    store = await stores()
    stuck = [on_object(i, "A", float(i)) for i in range(1, 71)]
    await store.accept([*stuck, on_object(71, "A", 71.0)], now=1000.0)
    # Each fails in turn, its retry a day away, and holds the object for the timeout
    # (60 s): then the next one goes, and fails too.
    for i in range(1, 71):
        at = 1000.0 + 61.0 * i
        [head] = await store.claim("a", 10, 30.0, now=at, order=ORDER)
        assert head.event_id == f"evt_{i}"
        await store.settle([Settlement(head.id, "pending", 90000.0, 503, "busy")], now=at)
    [last] = await store.claim("a", 10, 30.0, now=10000.0, order=ORDER)
    assert last.event_id == "evt_71"


async def test_a_replayed_dead_letter_holds_its_object_again(stores):
    store = await stores()
    await store.accept([on_object(1, "A", 10.0)], now=1000.0)
    [create] = await store.claim("a", 10, 30.0, now=1000.0, order=ORDER)
    await store.settle([Settlement(create.id, "pending", 1001.0, 503, "busy")], now=1000.0)
    [again] = await store.claim("a", 10, 30.0, now=1001.0, order=ORDER)
    await store.settle([Settlement(again.id, "dead", 1001.0, 503, "busy")], now=1001.0)
    await store.accept([on_object(2, "A", 20.0)], now=1002.0)
    [delete] = await store.claim("a", 10, 30.0, now=1002.0, order=ORDER)
    await store.settle([Settlement(delete.id, "done", 1002.0, 200, None)], now=1002.0)
    assert await store.replay(Selection(sink="a"), now=2000.0) == 1
    [replayed] = await store.claim("a", 10, 30.0, now=2000.0, order=ORDER)
    assert replayed.event_id == "evt_1" and replayed.keyed and replayed.late
    await store.settle([Settlement(replayed.id, "pending", 2100.0, 503, "busy")], now=2000.0)
    await store.accept([on_object(3, "A", 30.0)], now=2001.0)
    # Failed again just now: it holds its object for order_timeout from here.
    assert await store.claim("a", 10, 30.0, now=2030.0, order=ORDER) == []
    [later] = await store.claim("a", 10, 30.0, now=2061.0, order=ORDER)
    assert later.event_id == "evt_3"
