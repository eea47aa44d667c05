"""Fault injection: a read-only store, sinks that reset or babble, and relay killed -9
again and again while it ingests and delivers."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from relay.app import STORE
from tests.conftest import TOKEN, eventually, notifier_body, relay_config
from tests.processes import RelayProcess

HOOK = f"/hooks/qingstor?token={TOKEN}"
FAST = {"max_attempts": 1000, "initial": "10ms", "max": "100ms"}


async def test_a_read_only_store_answers_503_stores_nothing_and_recovers(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    store = client.app[STORE]
    # A real "attempt to write a readonly database", as a remounted volume gives.
    await store._run(lambda: store.db.execute("PRAGMA query_only=ON"))
    refused = await client.post(HOOK, json=notifier_body("ro/1"))
    assert refused.status == 503 and (await refused.json())["error"] == "store_unavailable"
    await store._run(lambda: store.db.execute("PRAGMA query_only=OFF"))
    assert await store.counts() == {"events": 0}
    again = await client.post(HOOK, json=notifier_body("ro/1"))
    assert await again.json() == {"accepted": 1, "duplicates": 0}


async def _raw_sink(answers: list[bytes]) -> tuple[asyncio.Server, str, list[bytes]]:
    """A sink that reads each request and answers the next of `answers` as raw bytes
    (b"" resets the connection), then proper 200s. Returns the bodies it got."""
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        bodies.append(await reader.readexactly(length))
        answer = answers.pop(0) if answers else b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        if not answer:
            writer.transport.abort()  # an RST, mid-exchange
            return
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/events", bodies


async def test_resets_and_garbage_from_a_sink_are_retried_until_it_answers(tmp_path, start_relay):
    answers = [
        b"",  # reset
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello, not HTTP
        b"HTTP/1.1 2OO OK\r\n\r\n",  # a status that is no number
        # Then a 200 whose body is cut short: the sink said 200, so it is delivered.
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    ]
    server, url, bodies = await _raw_sink(list(answers))
    try:
        client = await start_relay(
            relay_config(tmp_path, sinks={"app": {"kind": "http", "url": url, "retry": FAST}})
        )
        assert (await client.post(HOOK, json=notifier_body("f/1"))).status == 200
        await eventually(lambda: len(bodies) >= len(answers))
        store = client.app[STORE]

        async def delivered() -> bool:
            counts = await store.counts()
            return counts.get("done") == 1

        await eventually(delivered)
        # Every attempt carried the same event: one id, however the sink failed.
        assert len({json.loads(body)["id"] for body in bodies}) == 1
    finally:
        server.close()


class FlakySink:
    """The downstream app: fails a third of requests (500 or a reset), records the rest."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.ids_by_key: dict[str, set[str]] = defaultdict(set)
        self.requests = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        envelope = await request.json()
        self.requests += 1
        roll = self.random.random()
        if roll < 0.2:
            return web.Response(status=500, text="flaky")
        if roll < 0.3:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        self.ids_by_key[envelope["key"]].add(envelope["id"])
        return web.Response(text="ok")


async def test_kill_9_at_random_points_never_loses_an_acknowledged_event(
    tmp_path: Path, processes, aiohttp_server
):
    seed = random.randrange(1 << 30)
    chance = random.Random(seed)
    print(f"seed {seed}")  # shown on failure: replay the same kill points
    sink = FlakySink(seed)
    app = web.Application()
    app.router.add_post("/events", sink.handle)
    server = await aiohttp_server(app)
    config = {
        "store": {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {
            "app": {
                "kind": "http",
                "url": str(server.make_url("/events")),
                "retry": FAST,
                "circuit": {"enabled": False},
            }
        },
    }
    relay: RelayProcess = processes(tmp_path, config)
    total, acked, kills, unanswered, cut = 5000, set[str](), 0, 0, 0
    keys = [f"chaos/{n}" for n in range(total)]

    async with ClientSession(timeout=ClientTimeout(total=5)) as session:

        async def send(key: str) -> None:
            # What got no 200 is sent again later, as QingStor retries it.
            nonlocal unanswered
            try:
                body = notifier_body(key, request_id=f"req-{key}")
                async with session.post(relay.url(HOOK), json=body) as response:
                    if response.status == 200:
                        acked.add(key)
            except (ClientError, TimeoutError, OSError):
                unanswered += 1

        for round in range(5):
            await relay.start()
            if round == 4:  # the last start: send what is left, then let it deliver
                while pending := [k for k in keys if k not in acked]:
                    await asyncio.gather(*(send(k) for k in pending[:32]))
                break
            # Killed mid-flight: requests being answered, groups being committed,
            # deliveries being sent and settled. Until the kill there is always load:
            # what is not acked yet, else retries of what is (QingStor's duplicates).
            kill_at = time.monotonic() + chance.uniform(0.3, 1.5)
            before = unanswered
            while True:
                batch = [k for k in keys if k not in acked][:32] or chance.sample(keys, 32)
                sending = asyncio.gather(*(send(k) for k in batch))
                if time.monotonic() >= kill_at:
                    # A few milliseconds into a batch of 32: requests are in flight.
                    await asyncio.sleep(chance.uniform(0.0, 0.005))
                    relay.kill(signal.SIGKILL)
                    await sending
                    break
                await sending
            relay.wait()
            kills += 1
            cut += unanswered > before

    def everything_delivered() -> bool:
        return all(sink.ids_by_key.get(key) for key in acked)

    await eventually(everything_delivered, within=90)
    assert kills == 4 and len(acked) == total
    assert cut == 4  # every kill cut requests off mid-flight
    # Redeliveries after a kill carry the event's one id, never a new one.
    assert all(len(ids) == 1 for ids in sink.ids_by_key.values())
    assert set(sink.ids_by_key) == acked
