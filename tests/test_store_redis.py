"""What only the Redis backend does: keep working at maxmemory for everything that frees
or moves, and never show a password. Against the session's real redis-server."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from relay.errors import StoreUnavailable
from relay.store import NewEvent, Settlement
from relay.store.redis import RedisStore
from tests.processes import free_port
from tests.redis_server import fresh_prefix


def event(i: int) -> NewEvent:
    return NewEvent(
        f"evt_{i}", "qingstor", json.dumps({"id": f"evt_{i}", "pad": "x" * 2000}), ("a",)
    )


async def test_at_maxmemory_new_events_are_refused_but_work_still_drains(redis_url: str):
    store = RedisStore(redis_url, prefix=fresh_prefix(), dedupe_window=10.0)
    await store.open(exclusive=True)
    admin = Redis.from_url(redis_url)
    used = int((await admin.info("memory"))["used_memory"])
    try:
        await admin.config_set("maxmemory", str(used + 2_000_000))
        accepted = 0
        with pytest.raises(StoreUnavailable):
            for i in range(10_000):
                await store.accept([event(i)], now=1000.0)
                accepted += 1
        assert accepted > 0
        # Full: nothing new comes in, but what is queued still goes out and is settled,
        # and pruning frees room, so relay recovers without an operator.
        claimed = await store.claim("a", limit=accepted, lease=60.0, now=1000.0)
        assert len(claimed) == accepted
        await store.settle(
            [Settlement(d.id, "done", 1000.0, 200, None) for d in claimed], now=1000.0
        )
        assert await store.prune(keep_done=0.0, now=5000.0) == (accepted, accepted)
        await store.accept([event(10_001)], now=5000.0)
    finally:
        await admin.config_set("maxmemory", "1gb")
        await admin.aclose()
        await store.close()


async def test_a_password_in_the_url_never_reaches_a_message():
    port = free_port()  # nothing listens there
    for url in (
        f"redis://user:pa55word-secret@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password=pa55word-secret",
    ):
        store = RedisStore(url, prefix=fresh_prefix(), dedupe_window=10.0, connect_timeout=0.5)
        with pytest.raises(StoreUnavailable) as failed:
            await store.open(exclusive=True)
        await store.close()
        assert "pa55word-secret" not in str(failed.value)
        assert f"127.0.0.1:{port}" in str(failed.value)


async def test_prune_deletes_a_large_backlog_in_bounded_rounds(redis_url: str, monkeypatch):
    import relay.store.redis

    monkeypatch.setattr(relay.store.redis, "PRUNE_ROUND", 2)
    store = RedisStore(redis_url, prefix=fresh_prefix(), dedupe_window=10.0)
    await store.open(exclusive=True)
    try:
        await store.accept([event(i) for i in range(5)], now=1000.0)
        claimed = await store.claim("a", limit=10, lease=60.0, now=1000.0)
        await store.settle([Settlement(d.id, "done", 1000.0, 200, None) for d in claimed], 1000.0)
        # Three rounds of at most two deliveries each; then the events, unreferenced.
        assert await store.prune(keep_done=0.0, now=2000.0) == (5, 5)
        assert await store.counts() == {"events": 0}
    finally:
        await store.close()


async def test_durability_warnings_name_what_redis_would_lose(redis_url: str):
    store = RedisStore(
        redis_url.replace("redis://", "redis://:hunter2-secret@"),
        prefix=fresh_prefix(),
        dedupe_window=10.0,
    )
    admin = Redis.from_url(redis_url)
    try:
        # The session's server persists nothing (tests need no durability).
        await admin.config_set("requirepass", "hunter2-secret")
        await admin.execute_command("AUTH", "hunter2-secret")
        await store.open(exclusive=True)
        [nothing] = await store.warnings()
        assert "persists nothing" in nothing and "appendonly yes" in nothing
        await admin.config_set("save", "3600 1")
        [snapshots] = await store.warnings()
        assert "only RDB snapshots" in snapshots
        await admin.config_set("appendonly", "yes")
        await admin.config_set("appendfsync", "no")
        [fsync] = await store.warnings()
        assert "appendfsync no" in fsync
        await admin.config_set("appendfsync", "everysec")
        assert await store.warnings() == []
        for warning in (nothing, snapshots, fsync):
            assert "hunter2-secret" not in warning
    finally:
        await admin.config_set("appendonly", "no")
        await admin.config_set("save", "")
        await admin.config_set("requirepass", "")
        await admin.aclose()
        await store.close()


async def test_a_missing_or_wrong_password_says_where_the_password_goes(redis_url: str):
    admin = Redis.from_url(redis_url)
    try:
        await admin.config_set("requirepass", "right-pass-7c1")
        await admin.execute_command("AUTH", "right-pass-7c1")
        for url, fix in (
            (redis_url, "put it in the url, redis://:PASSWORD@host"),
            (redis_url.replace("redis://", "redis://:wrong-pass-7c1@"), "check the url's user"),
        ):
            store = RedisStore(url, prefix=fresh_prefix(), dedupe_window=10.0)
            with pytest.raises(StoreUnavailable) as caught:
                await store.open()
            assert fix in str(caught.value)
            assert "wrong-pass-7c1" not in str(caught.value)
            await store.close()
    finally:
        await admin.config_set("requirepass", "")
        await admin.aclose()


async def test_prune_goes_past_events_kept_for_their_dead_letters(redis_url: str, monkeypatch):
    import relay.store.redis

    monkeypatch.setattr(relay.store.redis, "PRUNE_ROUND", 3)
    store = RedisStore(redis_url, prefix=fresh_prefix(), dedupe_window=10.0)
    await store.open(exclusive=True)
    try:
        # Six dead letters expire first; four delivered events after them.
        await store.accept([event(i) for i in range(6)], now=1000.0)
        dead = await store.claim("a", limit=10, lease=60.0, now=1000.0)
        await store.settle([Settlement(d.id, "dead", 1000.0, 400, "no") for d in dead], 1000.0)
        await store.accept([event(i) for i in range(6, 10)], now=1001.0)
        done = await store.claim("a", limit=10, lease=60.0, now=1001.0)
        await store.settle([Settlement(d.id, "done", 1001.0, 200, None) for d in done], 1001.0)
        pruned = 0
        for _ in range(4):  # each prune reads at most 3 expired events, then goes on
            pruned += (await store.prune(keep_done=0.0, now=2000.0))[1]
        assert pruned == 4
        assert await store.counts() == {"events": 6, "dead": 6}
    finally:
        await store.close()


async def test_a_delivery_whose_record_was_deleted_by_hand_is_dropped_not_fatal(redis_url: str):
    prefix = fresh_prefix()
    store = RedisStore(redis_url, prefix=prefix, dedupe_window=10.0)
    await store.open(exclusive=True)
    admin = Redis.from_url(redis_url)
    try:
        await store.accept([event(1), event(2)], now=1000.0)
        await admin.delete(f"{{{prefix}}}:delivery:{1:016d}")
        [left] = await store.claim("a", limit=10, lease=60.0, now=1000.0)
        assert left.event_id == "evt_2"
        assert (await store.sink_stats(now=1000.0))["a"].pending == 1
    finally:
        await admin.aclose()
        await store.close()


async def test_a_relay_restarting_at_maxmemory_opens_its_store_and_starts_its_lanes(
    redis_url: str,
):
    prefix = fresh_prefix()
    first = RedisStore(redis_url, prefix=prefix, dedupe_window=10.0)
    await first.open(exclusive=True)
    await first.accept([event(1)], now=1000.0)
    await first.close()
    admin = Redis.from_url(redis_url)
    used = int((await admin.info("memory"))["used_memory"])
    again = RedisStore(redis_url, prefix=prefix, dedupe_window=10.0)
    try:
        await admin.config_set("maxmemory", str(used))  # full: writes that grow refused
        await again.open(exclusive=True)
        await again.save_sink_state("a", "closed", 0.0, False, now=1000.0)
        await again.heartbeat(["a"], now=1000.0)
        assert len(await again.claim("a", limit=10, lease=60.0, now=1000.0)) == 1
    finally:
        await admin.config_set("maxmemory", "1gb")
        await admin.aclose()
        await again.close()
