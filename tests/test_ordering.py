"""order: per_key end to end: relay on a real socket, a local HTTP server playing the
downstream app that keeps an index of the bucket, QingStor notifications posted to it."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from relay.config import RelayConfig
from tests.conftest import TOKEN, eventually, relay_config, sample
from tests.processes import post
from tests.redis_server import fresh_prefix

HOOK = f"/hooks/qingstor?token={TOKEN}"
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
# The circuit is not under test here: these sinks fail on purpose.
NEVER_OPEN = {"enabled": False}
StartRelay = Callable[[RelayConfig], Awaitable[TestClient[Any, Any]]]


def record(key: str, n: int, kind: str = "create_object") -> dict[str, Any]:
    """The n-th event of object `key` (its time n ms after EPOCH), from the sample."""
    event = sample()["events"][0]
    event["event_type"] = kind
    stamp = EPOCH + timedelta(milliseconds=n)
    event["event_time"] = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event["response_elements"]["request_id"] = f"req-{key}-{n}"
    event["qingstor"]["object"]["name"] = key
    return event


@dataclass
class App:
    """The downstream app: answers by a script (or a seeded fraction of failures, slowly)
    and records each request's object, event time, type and answer."""

    fail_first: dict[str, int] = field(default_factory=dict)  # type -> failures left
    fail_share: float = 0.0
    delay: tuple[float, float] = (0.0, 0.0)
    rng: random.Random = field(default_factory=lambda: random.Random(16))
    seen: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        envelope = json.loads(await request.read())
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.delay[1]:
                await asyncio.sleep(self.rng.uniform(*self.delay))
            kind = envelope["type"]
            if self.fail_first.get(kind, 0) > 0:
                self.fail_first[kind] -= 1
                status = 503
            else:
                status = 503 if self.rng.random() < self.fail_share else 200
            self.seen.append(
                {
                    "key": envelope["key"],
                    "time": envelope["time"],
                    "type": kind,
                    "status": status,
                    "late": envelope.get("late", False),
                }
            )
            return web.Response(status=status)
        finally:
            self.in_flight -= 1

    def delivered(self) -> list[dict[str, Any]]:
        return [s for s in self.seen if s["status"] == 200]


@pytest.fixture
async def app(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> App:
    downstream = App()
    server = web.Application()
    server.router.add_post("/objects", downstream.handle)
    running = await aiohttp_server(server)
    downstream.url = str(running.make_url("/objects"))
    return downstream


def process_config(url: str, store: dict[str, Any]) -> dict[str, Any]:
    """relay serve's config for the flaky-app runs: one ordered HTTP sink to `url`."""
    sink = {
        "kind": "http",
        "url": url,
        "order": "per_key",
        "concurrency": 16,
        "retry": {"initial": "50ms", "max": "200ms", "max_attempts": 50},
        "circuit": NEVER_OPEN,
    }
    return {
        "store": store,
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"index": sink},
    }


def ordered(tmp_path: Path, url: str, **sink: Any) -> RelayConfig:
    return relay_config(
        tmp_path,
        sinks={
            "index": {
                "kind": "http",
                "url": url,
                "order": "per_key",
                "retry": {"initial": "50ms", "max": "200ms", "max_attempts": 50},
                "circuit": NEVER_OPEN,
                **sink,
            }
        },
    )


async def test_a_delete_never_overtakes_the_create_it_follows(tmp_path, start_relay, app):
    app.fail_first = {"create_object": 2}
    client = await start_relay(ordered(tmp_path, app.url))
    answer = await client.post(
        HOOK, json={"events": [record("a.jpg", 1), record("a.jpg", 2, "delete_object")]}
    )
    assert answer.status == 200
    await eventually(lambda: len(app.delivered()) == 2)
    assert [(s["type"], s["status"]) for s in app.seen] == [
        ("create_object", 503),
        ("create_object", 503),
        ("create_object", 200),
        ("delete_object", 200),
    ]


async def test_without_order_the_delete_overtakes_the_failing_create(tmp_path, start_relay, app):
    """What order: per_key is for: the same two events to a sink without it."""
    app.fail_first = {"create_object": 2}
    config = ordered(tmp_path, app.url, order="none")
    client = await start_relay(config)
    await client.post(
        HOOK, json={"events": [record("a.jpg", 1), record("a.jpg", 2, "delete_object")]}
    )
    await eventually(lambda: len(app.delivered()) == 2)
    assert app.delivered()[0]["type"] == "delete_object"


async def test_order_holds_per_object_over_many_objects_a_flaky_slow_sink_and_retries(
    tmp_path, start_relay, app
):
    app.fail_share, app.delay = 0.2, (0.002, 0.01)
    client = await start_relay(ordered(tmp_path, app.url, concurrency=16))
    keys = [f"photos/{k:03d}.jpg" for k in range(100)]
    for n in range(20):  # 20 events per object, 100 objects: 2,000 events
        batch = [record(key, n, "create_object" if n % 2 == 0 else "delete_object") for key in keys]
        assert (await client.post(HOOK, json={"events": batch})).status == 200
    await eventually(lambda: len(app.delivered()) == 2000, within=120)
    for key in keys:
        times = [s["time"] for s in app.delivered() if s["key"] == key]
        assert times == sorted(times) and len(times) == 20, key
    assert not any(s["late"] for s in app.seen)
    # Ordering holds one object at a time, not the sink: sends to different objects ran
    # side by side.
    assert app.most_in_flight > 1


async def test_order_timeout_lets_an_object_go_on_without_the_event_that_holds_it(
    tmp_path, start_relay, app
):
    app.fail_first = {"create_object": 10_000}  # the create never goes through
    client = await start_relay(ordered(tmp_path, app.url, order_timeout="1s"))
    await client.post(
        HOOK, json={"events": [record("a.jpg", 1), record("a.jpg", 2, "delete_object")]}
    )
    await eventually(lambda: [s["type"] for s in app.delivered()] == ["delete_object"], within=10)
    started = [s for s in app.seen if s["type"] == "create_object"]
    assert started, "the create was tried first"


async def test_coalesce_delivers_only_the_newest_of_a_waiting_burst(tmp_path, start_relay, app):
    app.fail_first = {"create_object": 10_000}  # the create keeps failing: a burst waits
    client = await start_relay(ordered(tmp_path, app.url, coalesce=True))
    await client.post(HOOK, json={"events": [record("a.jpg", 1)]})
    await eventually(lambda: len(app.seen) >= 1)
    burst = [record("a.jpg", n, "delete_object") for n in (2, 3, 4)]
    await client.post(HOOK, json={"events": burst})
    await eventually(lambda: len(app.delivered()) >= 1, within=10)
    await asyncio.sleep(0.5)
    # Of the waiting events (the create between its retries, and the burst), only the
    # newest went; the others were settled as coalesced and counted.
    assert [s["time"][-7:] for s in app.delivered()] == ["00.004Z"]
    assert {s["time"][-7:] for s in app.seen} == {"00.001Z", "00.004Z"}
    metrics = await (await client.get("/metrics")).text()
    assert 'relay_deliveries_total{outcome="coalesced",sink="index"} 3.0' in metrics


async def test_a_late_event_is_delivered_marked_late_and_counted(tmp_path, start_relay, app):
    client = await start_relay(ordered(tmp_path, app.url))
    await client.post(HOOK, json={"events": [record("a.jpg", 2, "delete_object")]})
    await eventually(lambda: len(app.delivered()) == 1)
    # The sender's first try of the create failed on its side: it comes after the delete.
    await client.post(HOOK, json={"events": [record("a.jpg", 1)]})
    await eventually(lambda: len(app.delivered()) == 2)
    assert [(s["type"], s["late"]) for s in app.delivered()] == [
        ("delete_object", False),
        ("create_object", True),
    ]
    metrics = await (await client.get("/metrics")).text()
    assert 'relay_order_late_total{sink="index"} 1.0' in metrics


async def test_order_holds_and_nothing_is_lost_across_a_kill_9(tmp_path, processes, app):
    """The flaky-sink run, with relay killed (SIGKILL) half-way and started again."""
    app.fail_share, app.delay = 0.2, (0.002, 0.01)
    config = process_config(app.url, {"path": "relay.db"})
    relay = await processes(tmp_path, config).start()
    keys = [f"photos/{k:03d}.jpg" for k in range(50)]
    for n in range(20):  # 1,000 events over 50 objects
        batch = [record(key, n, "create_object" if n % 2 == 0 else "delete_object") for key in keys]
        status, _ = await post(relay.url(HOOK), {"events": batch})
        assert status == 200
    await eventually(lambda: len(app.delivered()) >= 200, within=60)
    relay.kill(signal.SIGKILL)
    relay.wait()
    relay = await processes(tmp_path, config).start()

    # Each event reaches the app at least once; a send in flight at the kill goes again.
    def done() -> bool:
        return {(s["key"], s["time"]) for s in app.delivered()} == {
            (key, record(key, n)["event_time"]) for key in keys for n in range(20)
        }

    await eventually(done, within=120)
    for key in keys:
        times = [s["time"] for s in app.delivered() if s["key"] == key]
        # In order; a repeat (the send the kill cut short, sent again) only in place.
        assert times == sorted(times), key


async def test_two_replicas_on_redis_keep_each_objects_order(tmp_path, processes, app, redis_url):
    """Two relays share one Redis: each takes events and sends, and neither sends an
    object's event while the other has one of that object out."""
    app.fail_share, app.delay = 0.2, (0.002, 0.01)
    store = {"backend": "redis", "url": redis_url, "prefix": fresh_prefix(), "lease": "5s"}
    config = process_config(app.url, store)
    relays = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        relays.append(await processes(tmp_path / name, config).start())
    keys = [f"photos/{k:03d}.jpg" for k in range(50)]
    for n in range(20):  # 1,000 events over 50 objects, half of them to each relay
        batch = [record(key, n, "create_object" if n % 2 == 0 else "delete_object") for key in keys]
        status, _ = await post(relays[n % 2].url(HOOK), {"events": batch})
        assert status == 200
    await eventually(lambda: len(app.delivered()) >= 1000, within=60)
    await asyncio.sleep(0.5)  # a second copy of anything would have come by now
    for key in keys:
        times = [s["time"] for s in app.delivered() if s["key"] == key]
        assert times == sorted(times) and len(times) == 20, key
    assert not any(s["late"] for s in app.seen)
    assert app.most_in_flight > 1


async def test_a_dead_letter_lets_its_object_go_on_and_says_so(tmp_path, start_relay, app):
    app.fail_first = {"create_object": 10_000}
    retry = {"initial": "50ms", "max": "50ms", "max_attempts": 2}
    client = await start_relay(ordered(tmp_path, app.url, retry=retry))
    with capture_logs() as logs:
        await client.post(
            HOOK, json={"events": [record("a.jpg", 1), record("a.jpg", 2, "delete_object")]}
        )
        await eventually(lambda: [s["type"] for s in app.delivered()] == ["delete_object"])
    assert [s["type"] for s in app.seen] == ["create_object", "create_object", "delete_object"]
    [released] = [e for e in logs if e["event"] == "order.released"]
    assert released["reason"] == "dead" and released["held_for_s"] >= 0.05
    metrics = await (await client.get("/metrics")).text()
    assert 'relay_order_released_total{reason="dead",sink="index"} 1.0' in metrics
