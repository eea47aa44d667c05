"""Delivery: retries, dead letters, sink isolation and shutdown, against real local servers."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

from structlog.testing import capture_logs

from relay.app import DISPATCHER, HOUSEKEEPER, RUNTIME, STORE, create_app
from relay.config import RetryConfig
from relay.dispatch import backoff, judge
from relay.models import Delivery
from relay.sinks import Outcome
from relay.store import Selection
from relay.store.sqlite import SqliteStore
from tests.conftest import TOKEN, eventually, notifier_body, read_lines, relay_config, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"
FAST_RETRY = {"max_attempts": 5, "initial": "10ms", "max": "50ms"}


def http_sink(url: str, **extra):
    return {"kind": "http", "url": url, "retry": FAST_RETRY, **extra}


async def test_500_503_then_200_is_delivered_on_the_third_attempt_with_one_id(
    tmp_path: Path, start_relay, receiver
):
    receiver.statuses = [500, 503]
    client = await start_relay(relay_config(tmp_path, sinks={"app": http_sink(receiver.url)}))
    await client.post(HOOK, json=sample())
    await eventually(lambda: len(receiver.requests) == 3)
    await eventually(lambda: client.app[STORE].counts())
    counts = await eventually(
        lambda: _when(client.app[STORE].counts(), lambda c: c.get("done") == 1)
    )
    assert counts == {"events": 1, "done": 1}
    ids = {r["headers"]["webhook-id"] for r in receiver.requests}
    bodies = {r["body"] for r in receiver.requests}
    assert len(ids) == 1 and len(bodies) == 1
    await asyncio.sleep(0.2)
    assert len(receiver.requests) == 3  # nothing after the success


async def _when(awaitable, predicate):
    value = await awaitable
    return value if predicate(value) else None


async def test_attempts_run_out_into_a_dead_letter_with_the_last_error(
    tmp_path, start_relay, receiver
):
    receiver.statuses = [500] * 10
    client = await start_relay(relay_config(tmp_path, sinks={"app": http_sink(receiver.url)}))
    with capture_logs() as logs:
        await client.post(HOOK, json=sample())
        await eventually(lambda: _when(client.app[STORE].counts(), lambda c: c.get("dead") == 1))
        # The log line follows the commit: wait for it, not just for the row.
        await eventually(lambda: [e for e in logs if e["event"] == "delivery.dead"])
    assert len(receiver.requests) == 5
    [letter] = await client.app[STORE].dead_letters(Selection(everything=True))
    assert (letter.attempts, letter.last_status, letter.last_error) == (5, 500, "HTTP 500: nope")
    dead = [e for e in logs if e["event"] == "delivery.dead"]
    assert len(dead) == 1 and dead[0]["sink"] == "app" and dead[0]["attempt"] == 5
    retries = [e for e in logs if e["event"] == "delivery.retry"]
    assert [e["attempt"] for e in retries] == [1, 2, 3, 4]


async def test_a_hanging_sink_neither_slows_acks_nor_the_other_sinks(
    tmp_path, start_relay, receiver
):
    receiver.hang = True
    config = relay_config(
        tmp_path,
        sinks={
            "archive": {"kind": "file", "path": "out/events.jsonl"},
            "app": http_sink(receiver.url, timeout="60s", concurrency=2),
        },
    )
    client = await start_relay(config)
    latencies = []
    for i in range(40):
        started = time.perf_counter()
        response = await client.post(HOOK, json=notifier_body(f"k/{i}", request_id=f"r{i}"))
        latencies.append(time.perf_counter() - started)
        assert response.status == 200
    # The file sink got everything although the HTTP sink is stuck on its first two.
    await eventually(lambda: len(read_lines(tmp_path / "out" / "events.jsonl")) == 40)
    assert len(receiver.requests) == 2
    assert statistics.median(latencies) < 0.1, latencies
    assert sorted(latencies)[int(len(latencies) * 0.9)] < 0.1, latencies


async def test_connection_refused_is_retried_until_the_service_is_back(
    tmp_path, start_relay, aiohttp_server, receiver
):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}/events"
    client = await start_relay(relay_config(tmp_path, sinks={"app": http_sink(dead_url)}))
    with capture_logs() as logs:
        await client.post(HOOK, json=sample())
        await eventually(lambda: [e for e in logs if e["event"] == "delivery.retry"])
    retry = next(e for e in logs if e["event"] == "delivery.retry")
    assert "ClientConnectorError" in retry["error"]


async def test_routes_choose_sinks_and_unrouted_events_are_logged(tmp_path, start_relay):
    config = relay_config(
        tmp_path,
        sinks={
            "images": {"kind": "file", "path": "out/images.jsonl"},
            "deletes": {"kind": "file", "path": "out/deletes.jsonl"},
        },
        routes=[
            {
                "when": {
                    "event_types": ["create_object"],
                    "keys": ["*.jpg", "*.png"],
                    "buckets": ["max-test2"],
                },
                "to": ["images"],
            },
            {
                "when": {"event_types": ["delete_object"], "sources": ["qingstor"]},
                "to": ["deletes"],
            },
        ],
    )
    client = await start_relay(config)
    with capture_logs() as logs:
        await client.post(HOOK, json=notifier_body("a/cat.jpg", "b/dog.png", "c/notes.txt"))
        await client.post(HOOK, json=notifier_body("a/cat.jpg", kind="delete_object"))
    images = await eventually(lambda: read_lines(tmp_path / "out/images.jsonl"))
    deletes = await eventually(lambda: read_lines(tmp_path / "out/deletes.jsonl"))
    assert sorted(e["key"] for e in images) == ["a/cat.jpg", "b/dog.png"]
    assert [(e["key"], e["type"]) for e in deletes] == [("a/cat.jpg", "delete_object")]
    unrouted = [e for e in logs if e["event"] == "ingest.unrouted"]
    assert [e["count"] for e in unrouted] == [1]
    # The unrouted event is still claimed: its retry is a duplicate.
    again = await client.post(HOOK, json=notifier_body("c/notes.txt"))
    assert await again.json() == {"accepted": 0, "duplicates": 1}


async def test_file_sink_retries_while_its_path_is_unwritable(tmp_path, start_relay):
    target = tmp_path / "out" / "events.jsonl"
    target.mkdir(parents=True)  # a directory where the file should be
    config = relay_config(
        tmp_path, sinks={"archive": {"kind": "file", "path": str(target), "retry": FAST_RETRY}}
    )
    client = await start_relay(config)
    with capture_logs() as logs:
        await client.post(HOOK, json=sample())
        await eventually(lambda: [e for e in logs if e["event"] == "delivery.retry"])
    target.rmdir()
    [line] = await eventually(lambda: read_lines(target))
    assert line["key"] == "abc/5.mp4"


async def test_shutdown_closes_every_background_task_and_the_store(
    tmp_path, aiohttp_client, receiver
):
    config = relay_config(tmp_path, sinks={"app": http_sink(receiver.url)})
    app = create_app(config)
    client = await aiohttp_client(app)
    await client.post(HOOK, json=sample())
    await eventually(lambda: receiver.requests)
    tasks = [*app[DISPATCHER].tasks, app[HOUSEKEEPER]]
    http_sink_object = app[RUNTIME].sinks["app"]
    assert tasks and not any(t.done() for t in tasks)
    await client.close()
    assert all(t.done() for t in tasks)
    assert app[STORE]._db is None
    assert http_sink_object._session is None


async def test_shutdown_waits_for_an_in_flight_send_within_the_bound(
    tmp_path, aiohttp_client, aiohttp_server
):
    from aiohttp import web

    got: list[bytes] = []

    async def slow(request: web.Request) -> web.Response:
        got.append(await request.read())
        await asyncio.sleep(0.5)
        return web.Response(text="ok")

    downstream = web.Application()
    downstream.router.add_post("/events", slow)
    server = await aiohttp_server(downstream)
    config = relay_config(
        tmp_path,
        server={"drain_timeout": "5s"},
        sinks={"app": http_sink(str(server.make_url("/events")))},
    )
    app = create_app(config)
    client = await aiohttp_client(app)
    await client.post(HOOK, json=sample())
    await eventually(lambda: got)
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 5
    store = SqliteStore(config.store.path, dedupe_window=60)
    await store.open()
    try:
        assert await store.counts() == {"events": 1, "done": 1}
    finally:
        await store.close()


async def test_a_send_cut_off_by_the_drain_bound_stays_pending_for_the_next_start(
    tmp_path, aiohttp_client, receiver
):
    receiver.hang = True
    config = relay_config(
        tmp_path,
        server={"drain_timeout": "200ms"},
        sinks={"app": http_sink(receiver.url, timeout="60s")},
    )
    app = create_app(config)
    client = await aiohttp_client(app)
    await client.post(HOOK, json=sample())
    await eventually(lambda: receiver.requests)
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 3
    # Next start: the receiver is healthy again and gets the same event, same id.
    receiver.hang = False
    client = await aiohttp_client(create_app(config))
    await eventually(lambda: len(receiver.requests) == 2)
    first, second = receiver.requests
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
    assert first["body"] == second["body"]
    await client.close()


def test_backoff_is_exponential_capped_and_fully_jittered():
    retry = RetryConfig(max_attempts=10, initial=1.0, max=300.0)
    assert [backoff(n, retry, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff(20, retry, rand=lambda: 1.0) == 300
    assert backoff(1000, retry, rand=lambda: 1.0) == 300
    assert backoff(3, retry, rand=lambda: 0.0) == 0
    assert all(0 <= backoff(5, retry) <= 16 for _ in range(100))


def test_judge_turns_outcomes_into_states():
    retry = RetryConfig(max_attempts=3, initial=1.0, max=10.0)
    fresh = Delivery(1, "evt", "app", attempts=0, created_at=0.0, envelope="{}")
    last = Delivery(1, "evt", "app", attempts=2, created_at=0.0, envelope="{}")
    assert judge(fresh, Outcome("done", 200), retry, 100.0).state == "done"
    assert judge(fresh, Outcome("dead", 404, "gone"), retry, 100.0).state == "dead"
    later = judge(fresh, Outcome("retry", 503, "busy", retry_after=30), retry, 100.0)
    assert (later.state, later.next_at) == ("pending", 130.0)
    assert judge(last, Outcome("retry", 500, "x"), retry, 100.0).state == "dead"


async def test_a_send_that_outlasts_its_claims_lease_is_never_handed_out_twice(
    tmp_path, start_relay, aiohttp_server
):
    # A Retry-After can park a sink's sends for hours, far past any lease: while one
    # goes on, a free slot must not take the same delivery again (found in review).
    # SQLite's claims never run out; Redis's are renewed (tests/test_replicas.py).
    from aiohttp import web

    active: dict[str, int] = {}
    seen: list[str] = []
    overlaps: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        event_id = request.headers["webhook-id"]
        seen.append(event_id)
        if active.get(event_id):
            overlaps.append(event_id)
        active[event_id] = active.get(event_id, 0) + 1
        # The first answers at once; the others are held well past the lease.
        await asyncio.sleep(0.05 if len(seen) == 1 else 1.0)
        active[event_id] -= 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/events", handle)
    server = await aiohttp_server(app)
    client = await start_relay(
        relay_config(
            tmp_path, sinks={"app": http_sink(str(server.make_url("/events")), concurrency=2)}
        )
    )
    await client.post(HOOK, json=notifier_body("a", "b", "c"))
    await eventually(lambda: len(set(seen)) == 3, within=10)
    await asyncio.sleep(1.2)  # any second copy would have started by now
    assert overlaps == []
    assert sorted(seen) == sorted(set(seen))


@contextlib.asynccontextmanager
async def one_lane(
    tmp_path: Path, store_class: type[SqliteStore], url: str
) -> AsyncIterator[SqliteStore]:
    """A dispatcher with one http sink to `url` over a store of `store_class` (a
    faulty one) holding one event; the lane starts on entering, under the caller's
    capture_logs if the caller wants its lines."""
    from relay.dispatch import Dispatcher
    from relay.sinks import build_sink
    from relay.store import NewEvent

    config = relay_config(tmp_path, sinks={"app": http_sink(url)})
    store = store_class(tmp_path / "relay.db", dedupe_window=60)
    await store.open(exclusive=True)
    sink = build_sink("app", config.sinks["app"])
    await sink.start()
    dispatcher = Dispatcher(store, idle_poll=0.02)
    try:
        await store.accept([NewEvent("evt_1", "qingstor", '{"id": "evt_1"}', ("app",))])
        dispatcher.start({"app": sink}, config.sinks)
        yield store
    finally:
        await dispatcher.stop(1.0)
        await sink.close()
        await store.close()


async def test_a_store_away_for_a_while_is_one_error_line_then_one_recovery(tmp_path, receiver):
    from relay.errors import StoreUnavailable

    class Flaky(SqliteStore):
        """A store whose claims fail for a while (Redis restarting, say)."""

        failures = 8

        async def claim(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("redis at redis://db:6379/0: Connection refused")
            return await super().claim(*args, **kwargs)

    with capture_logs() as logs:
        async with one_lane(tmp_path, Flaky, receiver.url):
            await eventually(lambda: receiver.requests)
    events = [e["event"] for e in logs if e["event"].startswith("dispatch.store")]
    assert events == ["dispatch.store_error", "dispatch.store_recovered"]


async def test_an_outcome_the_store_cannot_write_is_kept_not_sent_again(tmp_path, receiver):
    from relay.errors import StoreUnavailable

    class Full(SqliteStore):
        """A store whose disk is full for the first few settlements."""

        failures = 3

        async def settle(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("database or disk is full")
            return await super().settle(*args, **kwargs)

    with capture_logs() as logs:
        async with one_lane(tmp_path, Full, receiver.url) as store:

            async def done() -> bool:
                return (await store.counts()).get("done") == 1

            await eventually(done, within=15)
    events = [e for e in logs if e["event"].startswith("dispatch.settle")]
    assert [e["event"] for e in events] == ["dispatch.settle_failed", "dispatch.settle_written"]
    assert events[0]["kept"] is True
    # The idle poll (20 ms) came round dozens of times meanwhile: the delivery was held,
    # not handed out again.
    assert len(receiver.requests) == 1


async def test_a_drain_longer_than_the_lease_keeps_its_sends_claimed(
    tmp_path, aiohttp_server, redis_url
):
    # Redis: a relay stopping with a send in flight renews its claim while it waits for
    # it, or another relay would take the delivery over and send it a second time.
    from aiohttp import web

    from relay.dispatch import Dispatcher
    from relay.sinks import build_sink
    from relay.store import NewEvent
    from relay.store.redis import RedisStore
    from tests.redis_server import fresh_prefix

    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(2.0)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/events", slow)
    server = await aiohttp_server(app)
    config = relay_config(tmp_path, sinks={"app": http_sink(str(server.make_url("/events")))})
    prefix = fresh_prefix()
    mine = RedisStore(redis_url, prefix=prefix, dedupe_window=60, lease=0.6)
    other = RedisStore(redis_url, prefix=prefix, dedupe_window=60, lease=0.6)
    await mine.open(exclusive=True)
    await other.open(exclusive=True)
    sink = build_sink("app", config.sinks["app"])
    await sink.start()
    dispatcher = Dispatcher(mine, idle_poll=0.05)
    try:
        await mine.accept([NewEvent("evt_1", "qingstor", '{"id": "evt_1"}', ("app",))])
        dispatcher.start({"app": sink}, config.sinks)
        await asyncio.wait_for(started.wait(), 5)
        stopping = asyncio.ensure_future(dispatcher.stop(3.0))
        taken = []
        while not stopping.done():
            taken += await other.claim("app", 10, lease=0.6)
            await asyncio.sleep(0.1)
        assert taken == []
        assert await mine.counts() == {"events": 1, "done": 1}
    finally:
        await dispatcher.stop(1.0)
        await sink.close()
        await mine.close()
        await other.close()


async def test_a_settled_send_gives_back_no_claim_so_its_retry_is_not_sent_twice(
    tmp_path, receiver
):
    """A retry can be due at once (backoff jitter) and claimed again before the failed
    send's task has finished: finishing must not release that new claim, or the next
    claim hands the same delivery out a second time while it is being sent."""
    from relay.dispatch import Dispatcher
    from relay.sinks import build_sink
    from relay.store import NewEvent

    released: list[int] = []

    class Recording(SqliteStore):
        """Records what the dispatcher gives back, not what settle() releases itself."""

        settling = 0  # settle() calls under way (a lane settles several sends at once)

        async def settle(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.settling += 1
            try:
                await super().settle(*args, **kwargs)
            finally:
                self.settling -= 1

        def release(self, ids):  # type: ignore[no-untyped-def]
            if not self.settling:
                released.extend(ids)
            super().release(ids)

    receiver.statuses = [503, 503, 503]
    retry = {"initial": "5ms", "max": "5ms", "max_attempts": 10}
    config = relay_config(tmp_path, sinks={"app": http_sink(receiver.url, retry=retry)})
    store = Recording(tmp_path / "relay.db", dedupe_window=60)
    await store.open(exclusive=True)
    sink = build_sink("app", config.sinks["app"])
    await sink.start()
    dispatcher = Dispatcher(store, idle_poll=0.02)
    try:
        events = [
            NewEvent(f"evt_{n}", "qingstor", f'{{"id": "evt_{n}"}}', ("app",)) for n in range(3)
        ]
        await store.accept(events)
        dispatcher.start({"app": sink}, config.sinks)
        await eventually(lambda: len(receiver.requests) == 6)
        await asyncio.sleep(0.2)
        # Every send was settled (the store released those claims itself): the lane
        # gave nothing back, and each event went once more after its 503, no more.
        assert released == []
        assert len(receiver.requests) == 6
    finally:
        await dispatcher.stop(1.0)
        await sink.close()
        await store.close()
