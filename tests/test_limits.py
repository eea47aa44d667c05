"""server.max_*, read_timeout, keepalive_timeout: what one request may cost, enforced."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from relay.app import RUNTIME, STORE
from tests.conftest import TOKEN, eventually, notifier_body, relay_config
from tests.processes import RelayProcess

HOOK = f"/hooks/qingstor?token={TOKEN}"


async def _refused(response: Any, status: int, error: str) -> dict[str, Any]:
    assert response.status == status
    answer: dict[str, Any] = await response.json()
    assert set(answer) == {"error", "message"} and answer["error"] == error
    return answer


class RawConnection:
    """An HTTP/1.1 client slow on purpose: headers now, the body when the test says."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        return cls(*await asyncio.open_connection(host, port))

    async def start_post(self, path: str, body: bytes, sent: int) -> None:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body[:sent])
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, within: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """Status, headers, and body of one response."""
        async with asyncio.timeout(within):
            status = int((await self.reader.readline()).split()[1])
            headers: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def closed_by_peer(self, within: float = 10.0) -> bool:
        async with asyncio.timeout(within):
            try:
                return await self.reader.read(1) == b""
            except ConnectionError:  # a reset, or a write that met the closed socket
                return True

    def close(self) -> None:
        self.writer.close()


async def _connect(client: TestClient[Any, Any]) -> RawConnection:
    return await RawConnection.open(str(client.host), int(client.port or 0))


async def test_more_records_than_max_records_is_413_and_stores_nothing(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path, server={"max_records": 3}))
    too_many = await client.post(HOOK, json=notifier_body("a", "b", "c", "d"))
    answer = await _refused(too_many, 413, "too_many_records")
    assert "4 events" in answer["message"] and "3" in answer["message"]
    # Counted before a record is validated: validating is where a big batch costs.
    unchecked = await client.post(HOOK, json={"events": [{}] * 4})
    await _refused(unchecked, 413, "too_many_records")
    assert await client.app[STORE].counts() == {"events": 0}

    enough = await client.post(HOOK, json=notifier_body("a", "b", "c"))
    assert await enough.json() == {"accepted": 3, "duplicates": 0}


async def test_nesting_past_max_json_depth_is_400_however_deep(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path, server={"max_json_depth": 8}))
    body = notifier_body("a")
    # The record is at depth 3 ({events: [{...}]}), so its 6 levels of "extra" make 9.
    body["events"][0]["extra"] = json.loads("[" * 6 + "]" * 6)
    too_deep = await client.post(HOOK, json=body)
    answer = await _refused(too_deep, 400, "invalid_json")
    assert "deeper than 8" in answer["message"]
    # Far deeper than Python's recursion limit, raw: still a clear 400, never a 500.
    for depth in (2_000, 100_000):
        nested = "[" * depth + "]" * depth
        json_type = {"Content-Type": "application/json"}
        response = await client.post(HOOK, data=nested, headers=json_type)
        await _refused(response, 400, "invalid_json")
    # Brackets inside a string are text, not nesting: a fast 400 for the shape.
    text = '"' + "[" * 100_000 + '"'
    response = await client.post(HOOK, data=text, headers=json_type)
    await _refused(response, 400, "not_an_event")
    assert await client.app[STORE].counts() == {"events": 0}

    body["events"][0]["extra"] = json.loads("[" * 5 + "]" * 5)
    fits = await client.post(HOOK, json=body)
    assert await fits.json() == {"accepted": 1, "duplicates": 0}


async def test_a_body_trickling_past_read_timeout_is_cut_off_with_408(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path, server={"read_timeout": "300ms"}))
    body = json.dumps(notifier_body("slow")).encode()
    slow = await _connect(client)
    started = time.monotonic()
    await slow.start_post(HOOK, body, sent=10)
    for _ in range(3):  # still sending, never finishing
        await asyncio.sleep(0.1)
        await slow.send(b" ")
    status, headers, answer = await slow.answer()
    assert status == 408 and json.loads(answer)["error"] == "request_timeout"
    # aiohttp then lingers a bounded while (lingering_time) reading what still comes,
    # so the client can read this answer before the socket closes.
    assert headers.get("connection") == "close"
    assert time.monotonic() - started < 5
    slow.close()
    assert await client.app[STORE].counts() == {"events": 0}
    assert client.app[RUNTIME].ingest.in_flight == 0  # the refusal gave its place back


async def test_beyond_max_concurrent_a_fast_503_with_retry_after(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path, server={"max_concurrent": 2}))
    bodies = [json.dumps(notifier_body(f"held/{n}")).encode() for n in range(2)]
    held = [await _connect(client) for _ in bodies]
    for connection, body in zip(held, bodies, strict=True):
        await connection.start_post(HOOK, body, sent=len(body) // 2)
    await asyncio.sleep(0.2)  # both handlers are now waiting for the rest of their body

    refused = await client.post(HOOK, json=notifier_body("third"))
    answer = await _refused(refused, 503, "overloaded")
    assert refused.headers["Retry-After"] == "1" and "2 hooks" in answer["message"]
    assert (await client.get("/healthz")).status == 200  # probes are not hooks

    for connection, body in zip(held, bodies, strict=True):
        await connection.send(body[len(body) // 2 :])
        status, _, answer_body = await connection.answer()
        assert status == 200 and json.loads(answer_body)["accepted"] == 1
        connection.close()
    again = await client.post(HOOK, json=notifier_body("third"))
    assert await again.json() == {"accepted": 1, "duplicates": 0}
    assert (await client.app[STORE].counts())["events"] == 3
    # Every place is given back, however the request ended: refused, or cut off.
    assert (await client.post("/hooks/qingstor?token=wrong", json={})).status == 401
    dropped = await _connect(client)
    await dropped.start_post(HOOK, bodies[0], sent=5)
    await asyncio.sleep(0.1)
    dropped.writer.transport.abort()
    await eventually(lambda: client.app[RUNTIME].ingest.in_flight == 0)


async def test_header_size_and_keepalive_bound_a_real_server(tmp_path: Path, processes):
    # The HTTP parser's limits are set where relay serve builds its runner: a real process.
    config: dict[str, Any] = {
        "server": {"max_header_bytes": 2048, "keepalive_timeout": "500ms"},
        "store": {"path": "relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": "events.jsonl"}},
    }
    relay: RelayProcess = await processes(tmp_path, config).start()
    body = json.dumps(notifier_body("h")).encode()

    async def post_with(header: str) -> RawConnection:
        connection = await RawConnection.open("127.0.0.1", relay.port)
        head = (
            f"POST {HOOK} HTTP/1.1\r\nHost: relay\r\nX-Padding: {header}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        await connection.send(head.encode() + body)
        return connection

    big = await post_with("x" * 3000)
    status, _, _ = await big.answer()
    assert status == 400
    assert await big.closed_by_peer()
    big.close()

    fits = await post_with("x" * 1500)
    status, _, answer = await fits.answer()
    assert status == 200 and json.loads(answer)["accepted"] == 1
    # Idle past keepalive_timeout: relay closes its side.
    started = time.monotonic()
    assert await fits.closed_by_peer(within=5)
    assert 0.3 < time.monotonic() - started < 4
    fits.close()

    # A head trickled a line at a time (slowloris) is cut off by the same bound.
    slow = await RawConnection.open("127.0.0.1", relay.port)
    await slow.send(f"POST {HOOK} HTTP/1.1\r\nHost: relay\r\n".encode())
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        for _ in range(40):
            await asyncio.sleep(0.1)
            await slow.send(b"X-Slow: 1\r\n")
    assert await slow.closed_by_peer(within=5)
    assert time.monotonic() - started < 4
    slow.close()
