"""Several `relay serve` processes ("replicas") sharing one real redis-server.

Dedupe across replicas, kill -9 of a replica and the lease takeover of its claims, a
Redis restart under running relays, a rolling config change, a paced sink's rate across
replicas, and `server.workers` on Redis. Real processes, a real Redis, and a real HTTP
receiver in the test process that counts deliveries by their `webhook-id`; no mocks.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from tests.conftest import SAMPLE_ID, TOKEN, eventually, notifier_body, sample
from tests.processes import RelayProcess, free_port, post, run_cli
from tests.redis_server import RestartableRedis, fresh_prefix

HOOK = f"/hooks/qingstor?token={TOKEN}"
# Retries soon and often, and a circuit that never opens: what these tests look at is
# where events go, not how relay paces a failing sink.
FAST = {"max_attempts": 1000, "initial": "50ms", "max": "200ms"}
NEVER_OPEN = {"enabled": False}
LEASE = "2s"  # short, so that a replica takes over a dead one's claims quickly


# --- the downstream app -------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    path: str
    webhook_id: str
    key: str
    at: float  # time.monotonic()


class Downstream:
    """The downstream app, on a real socket: every POST to /<anything> is a delivery,
    recorded with its path, `webhook-id`, object key and arrival time. A path in
    `failing` answers 503 (recorded in `refused`, not as a delivery); `delay` slows
    every answer down."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.refused: list[Arrival] = []
        self.failing: set[str] = set()
        self.delay = 0.0
        self.base = ""

    async def handle(self, request: web.Request) -> web.Response:
        envelope = await request.json()
        arrival = Arrival(
            request.path, request.headers["webhook-id"], envelope["key"], time.monotonic()
        )
        if request.path in self.failing:
            self.refused.append(arrival)
            return web.Response(status=503, text="not now")
        self.arrivals.append(arrival)
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(text="ok")

    def url(self, path: str) -> str:
        return self.base + path

    def at(self, path: str) -> list[Arrival]:
        return [a for a in self.arrivals if a.path == path]

    def ids(self, path: str) -> Counter[str]:
        """Deliveries per webhook-id."""
        return Counter(a.webhook_id for a in self.at(path))

    def keys(self, path: str) -> set[str]:
        return {a.key for a in self.at(path)}

    def ids_by_key(self, path: str) -> dict[str, set[str]]:
        found: dict[str, set[str]] = defaultdict(set)
        for a in self.at(path):
            found[a.key].add(a.webhook_id)
        return found


@pytest.fixture
async def downstream(aiohttp_server) -> Downstream:
    down = Downstream()
    app = web.Application()
    app.router.add_post("/{sink}", down.handle)
    server = await aiohttp_server(app)
    down.base = str(server.make_url("")).rstrip("/")
    return down


# --- relays ---------------------------------------------------------------------------


def http_sink(url: str, **extra: Any) -> dict[str, Any]:
    base = {"kind": "http", "url": url, "timeout": "5s", "retry": FAST, "circuit": NEVER_OPEN}
    return base | extra


def replica_config(
    redis_url: str,
    prefix: str,
    sinks: dict[str, Any],
    *,
    routes: list[dict[str, Any]] | None = None,
    server: dict[str, Any] | None = None,
    store: dict[str, Any] | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"drain_timeout": "5s", **(server or {})},
        "log": {"level": "info"},
        "store": {
            "backend": "redis",
            "url": redis_url,
            "prefix": prefix,
            "lease": LEASE,
            **(store or {}),
        },
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": sinks,
    }
    if routes is not None:
        config["routes"] = routes
    return config


async def replica(processes, tmp_path: Path, name: str, config: dict[str, Any]) -> RelayProcess:
    """`relay serve` in tmp_path/<name> (its relay.yaml there), started and listening."""
    workdir = tmp_path / name
    workdir.mkdir(exist_ok=True)
    relay: RelayProcess = processes(workdir, config)
    return await relay.start()


async def replicas(processes, tmp_path: Path, **configs: dict[str, Any]) -> list[RelayProcess]:
    """Several replicas, started at once: name=config each."""
    started = [replica(processes, tmp_path, name, config) for name, config in configs.items()]
    return list(await asyncio.gather(*started))


def body_for(key: str) -> dict[str, Any]:
    """One QingStor notification of one object: its own event id per key."""
    body: dict[str, Any] = notifier_body(key, request_id=f"req-{key}")
    return body


Answer = tuple[int, Any, Mapping[str, str]]


async def send(session: ClientSession, relay: RelayProcess, body: Any) -> Answer | None:
    """One POST as QingStor makes it: (status, JSON body, headers), or None when no answer
    came back (refused, reset, timed out)."""
    try:
        async with session.post(relay.url(HOOK), json=body) as response:
            return response.status, await response.json(), response.headers
    except (ClientError, TimeoutError, OSError, json.JSONDecodeError):
        return None


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the downstream app runs on this test's event loop and must keep
    # answering while the command runs.
    return await asyncio.to_thread(run_cli, *args)


async def status(config_path: Path) -> dict[str, Any]:
    result = await cli("status", "--json", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def dead_letters(config_path: Path) -> list[dict[str, Any]]:
    result = await cli("dlq", "list", "--json", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def drained(config_path: Path, within: float = 60.0) -> dict[str, Any]:
    """Wait until the store holds no pending delivery for any sink; returns the status.
    From then on no further send can come: what the receiver has is final."""

    async def check() -> dict[str, Any] | None:
        report = await status(config_path)
        sinks = report["sinks"]
        return report if sinks and all(s["pending"] == 0 for s in sinks.values()) else None

    result: dict[str, Any] = await eventually(check, within=within)
    return result


def logged(relay: RelayProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in relay.logs() if e.get("event") == event]


def config_path(relay: RelayProcess) -> Path:
    return relay.workdir / "relay.yaml"


# --- 1. dedupe across replicas ------------------------------------------------------------


async def test_an_event_taken_by_one_replica_is_a_duplicate_at_the_other(
    tmp_path: Path, redis_url: str, downstream: Downstream, processes
):
    config = replica_config(redis_url, fresh_prefix(), {"app": http_sink(downstream.url("/app"))})
    a, b = await replicas(processes, tmp_path, a=config, b=config)

    assert await post(a.url(HOOK), sample()) == (200, {"accepted": 1, "duplicates": 0})
    # QingStor's retry, landing on the other replica.
    assert await post(b.url(HOOK), sample()) == (200, {"accepted": 0, "duplicates": 1})
    assert await post(a.url(HOOK), sample()) == (200, {"accepted": 0, "duplicates": 1})

    await eventually(lambda: downstream.ids("/app"))
    await drained(config_path(a))
    assert downstream.ids("/app") == Counter({SAMPLE_ID: 1})

    shown = await cli("event", SAMPLE_ID, "--json", "--config", str(config_path(b)))
    assert shown.returncode == 0, shown.stderr
    [delivery] = json.loads(shown.stdout)["deliveries"]
    assert (delivery["sink"], delivery["state"], delivery["attempts"]) == ("app", "done", 1)


# --- 2. kill -9 of a replica mid-stream -----------------------------------------------------


async def test_a_replica_killed_mid_stream_loses_nothing_and_redelivers_with_the_same_id(
    tmp_path: Path, redis_url: str, downstream: Downstream, processes
):
    concurrency = 8  # the http sink's default: what one replica may have in flight
    config = replica_config(
        redis_url,
        fresh_prefix(),
        {"app": http_sink(downstream.url("/app"), concurrency=concurrency)},
    )
    a, b = await replicas(processes, tmp_path, a=config, b=config)
    # Slow enough that A has sends in flight, and claims not yet sent, when it dies.
    downstream.delay = 0.05

    total, batch = 300, 10
    keys = [f"replicas/{n}.bin" for n in range(total)]
    acked: set[str] = set()
    answers: Counter[str] = Counter()
    a_dead = False

    async with ClientSession(timeout=ClientTimeout(total=10)) as session:

        async def deliver(n: int) -> None:
            # Alternately to A and B; once A is dead (or did not answer) to B, as
            # QingStor re-sends a post whose answer did not come back.
            target = a if n % 2 == 0 and not a_dead else b
            for _ in range(100):
                answer = await send(session, target, body_for(keys[n]))
                if answer is not None and answer[0] == 200:
                    acked.add(keys[n])
                    answers["accepted" if answer[1]["accepted"] else "duplicate"] += 1
                    return
                answers["unanswered" if answer is None else str(answer[0])] += 1
                target = b
                await asyncio.sleep(0.05)
            raise AssertionError(f"{keys[n]} was never acknowledged")

        for start in range(0, total, batch):
            sending = asyncio.gather(*(deliver(n) for n in range(start, start + batch)))
            if start == total // 2:
                # Killed a few milliseconds into a batch: posts in flight, and A's sends
                # and claims of the first half's deliveries.
                await asyncio.sleep(0.003)
                a.kill(signal.SIGKILL)
                a_dead = True
            await sending
    assert await asyncio.to_thread(a.wait) == -signal.SIGKILL
    print(f"answers: {dict(answers)}")
    assert acked == set(keys)

    def everything_arrived() -> bool:
        return downstream.keys("/app") >= acked

    await eventually(everything_arrived, within=60)
    await drained(config_path(b))

    ids = downstream.ids("/app")
    redeliveries = sum(ids.values()) - len(ids)
    print(f"deliveries: {sum(ids.values())}, redeliveries: {redeliveries}")
    # Each acknowledged event arrived, under its one id, however often it was sent.
    by_key = downstream.ids_by_key("/app")
    assert set(by_key) == acked
    assert all(len(found) == 1 for found in by_key.values()), by_key
    assert len(ids) == len(acked)
    # Only what A was sending when it died may arrive twice: B sends nothing twice.
    assert redeliveries <= concurrency, ids.most_common(concurrency + 1)
    assert not await dead_letters(config_path(b))

    # A back: it joins the same store, and dedupe still holds across both.
    a = await replica(processes, tmp_path, "a", config)
    more = [f"replicas/after/{n}.bin" for n in range(10)]
    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        for n, key in enumerate(more):
            answer = await send(session, (a, b)[n % 2], body_for(key))
            assert answer is not None and answer[:2] == (200, {"accepted": 1, "duplicates": 0})
        again = await send(session, a, body_for(keys[1]))
        assert again is not None and again[:2] == (200, {"accepted": 0, "duplicates": 1})
    await eventually(lambda: downstream.keys("/app") >= set(more), within=30)
    await drained(config_path(a))
    later = Counter(x.webhook_id for x in downstream.at("/app") if x.key in more)
    assert len(later) == len(more) and set(later.values()) == {1}, later
    assert downstream.ids("/app") - later == ids  # nothing of the first 300 sent again


# --- 3. Redis restarted under running replicas --------------------------------------------


async def test_a_redis_restart_is_503_while_down_then_recovers_and_loses_nothing(
    tmp_path: Path, restartable_redis: RestartableRedis, downstream: Downstream, processes
):
    redis = restartable_redis
    config = replica_config(redis.url, fresh_prefix(), {"app": http_sink(downstream.url("/app"))})
    both = await replicas(processes, tmp_path, a=config, b=config)
    # The app refuses for now: what relay acknowledges before the restart is still in
    # Redis, pending, when Redis goes down.
    downstream.failing.add("/app")
    acked: set[str] = set()

    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        before = [f"before/{n}" for n in range(20)]
        for n, key in enumerate(before):
            answer = await send(session, both[n % 2], body_for(key))
            assert answer is not None and answer[:2] == (200, {"accepted": 1, "duplicates": 0})
            acked.add(key)
        await eventually(lambda: {a.key for a in downstream.refused} >= set(before[:4]))

        await asyncio.to_thread(redis.stop, kill=True)  # a crash: AOF, fsynced always
        down = [f"down/{n}" for n in range(6)]
        for n, key in enumerate(down):
            answer = await send(session, both[n % 2], body_for(key))
            assert answer is not None, f"{key}: no answer while Redis is down"
            status_, body, headers = answer
            assert status_ == 503, answer
            assert headers.get("Retry-After", "").isdigit(), dict(headers)
            assert set(body) == {"error", "message"} and body["error"] == "store_unavailable"
            async with session.get(both[n % 2].url("/readyz")) as response:
                assert response.status == 503
        await asyncio.sleep(float(LEASE[:-1]) + 0.5)  # down for longer than a lease

        await asyncio.to_thread(redis.start)  # same port, same folder, its AOF loaded

        # No restart of relay: QingStor's retries of what got a 503 are taken again by
        # both replicas once their connections to Redis are back.
        async def taken(relay: RelayProcess, key: str) -> bool:
            answer = await send(session, relay, body_for(key))
            return answer is not None and answer[0] == 200

        async def ready(relay: RelayProcess) -> bool:
            async with session.get(relay.url("/readyz")) as response:
                return response.status == 200

        for n, key in enumerate(down):
            await eventually(lambda relay=both[n % 2], key=key: taken(relay, key), within=30)
            await eventually(lambda relay=both[n % 2]: ready(relay), within=10)
            acked.add(key)
        after = [f"after/{n}" for n in range(20)]
        for n, key in enumerate(after):
            answer = await send(session, both[n % 2], body_for(key))
            assert answer is not None and answer[:2] == (200, {"accepted": 1, "duplicates": 0})
            acked.add(key)
        # What was acknowledged before the crash is still a duplicate: Redis kept it.
        for n, key in enumerate(before[:4]):
            answer = await send(session, both[n % 2], body_for(key))
            assert answer is not None and answer[:2] == (200, {"accepted": 0, "duplicates": 1})

    downstream.failing.clear()
    await eventually(lambda: downstream.keys("/app") >= acked, within=60)
    await drained(config_path(both[0]))
    assert downstream.keys("/app") == acked
    assert all(len(ids) == 1 for ids in downstream.ids_by_key("/app").values())
    assert not await dead_letters(config_path(both[0]))
    for relay in both:
        assert relay.proc is not None and relay.proc.poll() is None, "relay exited"
        assert len(logged(relay, "relay.listening")) == 1
        assert logged(relay, "ingest.store_unavailable")


# --- 4. a rolling config change ----------------------------------------------------------


async def test_a_rolling_config_change_across_replicas_loses_and_dead_letters_nothing(
    tmp_path: Path, redis_url: str, downstream: Downstream, processes
):
    prefix = fresh_prefix()
    # A short prune interval: a replica's housekeeping retires the sinks that no running
    # replica has every second, so A on v1 gets every chance to retire `audit`.
    store = {"prune_interval": "1s"}
    app = http_sink(downstream.url("/app"))
    v1 = replica_config(redis_url, prefix, {"app": app}, routes=[{"to": ["app"]}], store=store)
    v2 = replica_config(
        redis_url,
        prefix,
        {"app": app, "audit": http_sink(downstream.url("/audit"))},
        routes=[{"to": ["app", "audit"]}],
        store=store,
    )
    a, b = await replicas(processes, tmp_path, a=v1, b=v1)
    to_app: set[str] = set()  # acknowledged: routed to app
    to_audit: set[str] = set()  # acknowledged by a replica on v2: routed to audit too

    async with ClientSession(timeout=ClientTimeout(total=10)) as session:

        async def ingest(relay: RelayProcess, keys: list[str], v2: bool) -> None:
            for key in keys:
                answer = await send(session, relay, body_for(key))
                assert answer is not None and answer[:2] == (200, {"accepted": 1, "duplicates": 0})
                to_app.add(key)
                if v2:
                    to_audit.add(key)

        await ingest(a, [f"v1/a/{n}" for n in range(10)], v2=False)
        await ingest(b, [f"v1/b/{n}" for n in range(10)], v2=False)

        # B rolls to v2: stopped, and while it is down its traffic goes to A.
        b.kill(signal.SIGTERM)
        assert await asyncio.to_thread(b.wait, 20) == 0
        await ingest(a, [f"v1/a-alone/{n}" for n in range(10)], v2=False)
        # `audit` refuses for now, so that its work waits in the store while A (on v1,
        # without `audit`) runs its housekeeping.
        downstream.failing.add("/audit")
        b = await replica(processes, tmp_path, "b", v2)
        await ingest(b, [f"v2/b/{n}" for n in range(20)], v2=True)
        await ingest(a, [f"v1/a-mixed/{n}" for n in range(10)], v2=False)
        await eventually(lambda: {r.key for r in downstream.refused} >= {"v2/b/0", "v2/b/19"})
        await asyncio.sleep(3.0)  # several rounds of A's housekeeping

        assert not await dead_letters(config_path(a))
        report = await status(config_path(b))
        assert report["sinks"]["audit"]["dead"] == 0, report
        assert report["sinks"]["audit"]["pending"] > 0, report
        assert not logged(a, "sink.removed"), logged(a, "sink.removed")

        # A restarts, still on v1 (a crash, a node drained): its start retires the sinks
        # no running replica has, and B still runs `audit`.
        a.kill(signal.SIGTERM)
        assert await asyncio.to_thread(a.wait, 20) == 0
        a = await replica(processes, tmp_path, "a", v1)
        await ingest(a, [f"v1/a-restarted/{n}" for n in range(10)], v2=False)
        assert not await dead_letters(config_path(a))
        assert not logged(a, "sink.removed"), logged(a, "sink.removed")

        # A rolls to v2 too, by a reload.
        config_path(a).write_text(yaml.safe_dump(v2))
        a.kill(signal.SIGHUP)
        await eventually(lambda: logged(a, "config.reloaded"), within=20)
        await ingest(a, [f"v2/a/{n}" for n in range(10)], v2=True)
        await ingest(b, [f"v2/b-late/{n}" for n in range(10)], v2=True)

    downstream.failing.clear()
    await eventually(lambda: downstream.keys("/app") >= to_app, within=60)
    await eventually(lambda: downstream.keys("/audit") >= to_audit, within=60)
    report = await drained(config_path(b))
    assert downstream.keys("/app") == to_app
    assert downstream.keys("/audit") == to_audit
    for path in ("/app", "/audit"):
        assert all(len(ids) == 1 for ids in downstream.ids_by_key(path).values())
    assert {name: s["dead"] for name, s in report["sinks"].items()} == {"app": 0, "audit": 0}
    assert not await dead_letters(config_path(a))
    for relay in (a, b):
        assert not logged(relay, "sink.removed")
        assert not logged(relay, "delivery.dead")


# --- 5. a paced sink fed by two replicas --------------------------------------------------


def busiest_second(times: list[float]) -> int:
    """The most arrivals in any window [t, t + 1 s)."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


async def test_a_paced_sink_fed_by_two_replicas_keeps_its_rate_at_the_receiver(
    tmp_path: Path, redis_url: str, downstream: Downstream, processes
):
    rate = 5
    config = replica_config(
        redis_url,
        fresh_prefix(),
        {"app": http_sink(downstream.url("/app"), rate_limit=f"{rate}/s")},
    )
    # The control: two relays that share no prefix, each its own consumer pacing at 5/s.
    control = {"app": http_sink(downstream.url("/control"), rate_limit=f"{rate}/s")}
    a, b, c, d = await replicas(
        processes,
        tmp_path,
        a=config,
        b=config,
        c=replica_config(redis_url, fresh_prefix(), control),
        d=replica_config(redis_url, fresh_prefix(), control),
    )
    total = 30
    keys = [f"paced/{n}" for n in range(total)]

    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        answers = await asyncio.gather(
            *(send(session, (a, b)[n % 2], body_for(key)) for n, key in enumerate(keys))
        )
    assert [x[:2] if x else x for x in answers] == [(200, {"accepted": 1, "duplicates": 0})] * total

    await eventually(lambda: downstream.keys("/app") >= set(keys), within=60)
    await drained(config_path(a))
    times = [arrival.at for arrival in downstream.at("/app")]
    assert len(times) == total and downstream.keys("/app") == set(keys)
    # Each replica paces its own sends to 5/s; two of them sending at once would make
    # about 10/s. One consumer at a time keeps the sink at its rate: 5 in any second,
    # one more for a window that catches both ends of the spacing.
    busiest = busiest_second(times)
    print(f"busiest second: {busiest} arrivals; all within {max(times) - min(times):.2f}s")
    assert busiest <= rate + 1, sorted(round(t - min(times), 3) for t in times)

    # The control, at the same receiver: two consumers pacing at 5/s each, and this
    # measurement sees them, about 10 in a second.
    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        await asyncio.gather(
            *(send(session, (c, d)[n % 2], body_for(f"control/{n}")) for n in range(total))
        )
    await eventually(lambda: len(downstream.at("/control")) >= total, within=60)
    unshared = busiest_second([arrival.at for arrival in downstream.at("/control")])
    print(f"busiest second of two unshared consumers: {unshared} arrivals")
    assert unshared > rate + 1


# --- 6. server.workers on the Redis store -------------------------------------------------


async def test_workers_on_redis_deliver_each_event_once(
    tmp_path: Path, redis_url: str, downstream: Downstream, processes
):
    config = replica_config(
        redis_url,
        fresh_prefix(),
        {"app": http_sink(downstream.url("/app"))},
        server={"workers": 2},
    )
    relay = await replica(processes, tmp_path, "leader", config)

    def listening() -> set[int]:
        return {e["worker"] for e in logged(relay, "worker.listening")}

    await eventually(lambda: listening() == {1, 2}, within=20)

    bodies = [body_for(f"workers/{n}") for n in range(60)]
    # One connection per post (post() opens a session each): the kernel spreads
    # connections over the workers, not requests.
    answers = await asyncio.gather(*(post(relay.url(HOOK), body) for body in bodies))
    assert answers == [(200, {"accepted": 1, "duplicates": 0})] * 60
    again = await asyncio.gather(*(post(relay.url(HOOK), body) for body in bodies[:20]))
    assert again == [(200, {"accepted": 0, "duplicates": 1})] * 20

    keys = {f"workers/{n}" for n in range(60)}
    await eventually(lambda: downstream.keys("/app") >= keys, within=30)
    await drained(config_path(relay))
    assert downstream.keys("/app") == keys
    assert set(downstream.ids("/app").values()) == {1}
    served = {e.get("worker") for e in logged(relay, "request")}
    assert served == {1, 2}


async def test_a_worker_on_redis_counts_its_queues_from_redis_not_from_what_it_took(
    tmp_path: Path, redis_url: str, downstream: Downstream, processes
):
    # max_queue 3, and far more than 3 events over the worker's life, each delivered
    # before the next: the queue never holds more than one, so none is refused.
    config = replica_config(
        redis_url,
        fresh_prefix(),
        {"app": http_sink(downstream.url("/app"), max_queue=3)},
        server={"workers": 1},
    )
    relay = await replica(processes, tmp_path, "leader", config)
    await eventually(lambda: logged(relay, "worker.listening"), within=20)
    for n in range(12):
        assert await post(relay.url(HOOK), body_for(f"counted/{n}")) == (
            200,
            {"accepted": 1, "duplicates": 0},
        )
        await eventually(lambda n=n: f"counted/{n}" in downstream.keys("/app"), within=10)
        await asyncio.sleep(1.1)  # the worker's next look at Redis's counts


async def test_a_reload_that_adds_a_sink_is_known_before_its_first_event(
    tmp_path: Path, redis_url: str, aiohttp_client
):
    # A's reload adds `audit`; B, still on the old config, retires sinks right after
    # A took an event for it: audit's work must stay pending, not become a dead letter.
    from relay.app import RUNTIME, create_app
    from relay.config import load_config

    prefix = fresh_prefix()
    nowhere = f"http://127.0.0.1:{free_port()}/x"  # nothing listens: work stays pending
    slow = {**http_sink(nowhere), "retry": {"initial": "1h", "max": "1h"}}
    v1 = replica_config(redis_url, prefix, {"app": slow})
    v2 = replica_config(redis_url, prefix, {"app": slow, "audit": slow})
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "relay.yaml").write_text(yaml.safe_dump(v1))
    apps = [
        create_app(load_config(tmp_path / n / "relay.yaml"), tmp_path / n / "relay.yaml")
        for n in ("a", "b")
    ]
    a, b = [await aiohttp_client(app) for app in apps]
    (tmp_path / "a" / "relay.yaml").write_text(yaml.safe_dump(v2))
    assert await apps[0][RUNTIME].reload("test")
    answer = await a.post(HOOK, json=body_for("audited.jpg"))
    assert (await answer.json())["accepted"] == 1
    assert await apps[1][RUNTIME].retire_removed_sinks() == 0
    stats = await apps[1][RUNTIME].store.sink_stats()
    assert (stats["audit"].pending, stats["audit"].dead) == (1, 0)
    await a.close()
    await b.close()
