"""`Expect: 100-continue`: a request whose head already settles the answer gets it at
once, without `100 Continue`, so the sender never uploads a body relay would refuse.

Spoken over raw sockets (the sender's side of the exchange byte for byte), and with
curl, a real sender that waits for the 100 before it uploads."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import FIXTURES, TOKEN, eventually, relay_config
from tests.processes import post

BODY = (FIXTURES / "notifier-create_object.json").read_bytes()


async def head_then_wait(port: int, target: str, length: int = len(BODY)) -> bytes:
    """Send only the request head with `Expect: 100-continue`; return what relay says
    before any body is sent (everything it writes until it closes or goes quiet)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {target} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    received = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 1.0)
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        pass
    writer.close()
    return received


def answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, json.loads(body)


@pytest.fixture
async def relay(tmp_path, start_relay):
    config = relay_config(
        tmp_path,
        sources={
            "qingstor": {"kind": "qingstor", "token": TOKEN},
            "office": {"kind": "qingstor", "token": TOKEN, "allow_ips": ["10.9.8.0/24"]},
        },
        server={"max_body_bytes": 4096},
    )
    return await start_relay(config)


@pytest.mark.parametrize(
    ("target", "length", "status", "code"),
    [
        ("/hooks/nosuch?token=x", len(BODY), 404, "unknown_source"),
        ("/hooks/qingstor", len(BODY), 401, "missing_token"),
        ("/hooks/qingstor?token=wrong", len(BODY), 401, "invalid_token"),
        (f"/hooks/office?token={TOKEN}", len(BODY), 403, "forbidden"),
        (f"/hooks/qingstor?token={TOKEN}", 10_000, 413, "body_too_large"),
    ],
)
async def test_a_refusal_the_head_settles_comes_without_100_continue(
    relay, target, length, status, code
):
    raw = await head_then_wait(relay.server.port, target, length)
    assert not raw.startswith(b"HTTP/1.1 100"), raw
    got, headers, body = answer(raw)
    assert (got, body["error"]) == (status, code)
    assert set(body) == {"error", "message"}
    assert headers["Content-Type"].startswith("application/json")
    assert "X-Request-Id" in headers
    # The body never came: the connection is closed rather than read on.
    assert headers.get("Connection") == "close"


async def test_a_request_that_may_proceed_is_invited_then_stored(relay):
    port = relay.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /hooks/qingstor?token={TOKEN} HTTP/1.1\r\nHost: relay\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(BODY)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    assert json.loads(await reader.readexactly(length)) == {"accepted": 1, "duplicates": 0}
    writer.close()


async def test_refusals_before_the_body_are_logged_and_counted_like_any_other(relay):
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    # The request id, source and error travel as context variables, as in production.
    with capture_logs(processors=[merge_contextvars]) as logs:
        await head_then_wait(relay.server.port, "/hooks/qingstor?token=wrong")
    [line] = [e for e in logs if e["event"] == "request"]
    assert (line["status"], line["error"], line["source"]) == (401, "invalid_token", "qingstor")
    assert line["request_id"]
    metrics = await (await relay.get("/metrics")).text()
    assert 'relay_requests_total{source="qingstor",status="401"} 1.0' in metrics


def curl(url: str, body_file: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "-v", "-H", "Expect: 100-continue", "-H", "Content-Type: application/json",
         "--expect100-timeout", "30", "--data-binary", f"@{body_file}", url],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


async def test_curl_never_uploads_a_body_relay_refuses(relay, tmp_path):
    if shutil.which("curl") is None:
        if os.environ.get("CI"):
            pytest.fail("curl is not installed; .ci/run installs it")
        pytest.skip("curl is not installed (.ci/run installs it)")
    body_file = tmp_path / "body.json"
    body_file.write_bytes(BODY)
    base = f"http://127.0.0.1:{relay.server.port}/hooks/qingstor"
    # curl waits up to 30 s for the 100: an answer within the second shows relay sent the
    # refusal at once, and its trace shows the body was never sent.
    refused = await asyncio.wait_for(
        asyncio.to_thread(curl, f"{base}?token=no", str(body_file)), 10
    )
    assert "< HTTP/1.1 401" in refused.stderr
    assert "100 Continue" not in refused.stderr
    assert "upload completely sent" not in refused.stderr
    assert json.loads(refused.stdout)["error"] == "invalid_token"

    taken = await asyncio.to_thread(curl, f"{base}?token={TOKEN}", str(body_file))
    assert "< HTTP/1.1 100 Continue" in taken.stderr
    assert json.loads(taken.stdout) == {"accepted": 1, "duplicates": 0}


async def test_a_sender_that_leaves_half_way_through_its_body_costs_no_5xx(tmp_path, processes):
    # As a process: aiohttp's test server cancels a handler whose client left, which
    # relay's own server (like aiohttp's default) does not.
    config = {
        "store": {"path": "relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": "events.jsonl"}},
    }
    relay = await processes(tmp_path, config).start()
    for expect in ("", "Expect: 100-continue\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(
            f"POST /hooks/qingstor?token={TOKEN} HTTP/1.1\r\nHost: relay\r\n"
            f"Content-Length: {len(BODY)}\r\n{expect}\r\n".encode()
        )
        await writer.drain()
        if expect:
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == (
                b"HTTP/1.1 100 Continue\r\n\r\n"
            )
        writer.write(BODY[:40])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()

    def requests():
        lines = [e for e in relay.logs() if e.get("event") == "request"]
        return lines if len(lines) == 2 else None

    lines = await eventually(requests)
    assert [(e["status"], e["error"], e["level"]) for e in lines] == [
        (400, "incomplete_body", "info")
    ] * 2
    assert not [e for e in relay.logs() if e.get("level") in ("error", "critical")]
    # The next sender is served as ever, and nothing of the broken ones was stored.
    status, answer = await post(relay.url(f"/hooks/qingstor?token={TOKEN}"), json.loads(BODY))
    assert (status, answer) == (200, {"accepted": 1, "duplicates": 0})


async def test_overload_is_answered_from_the_head_and_keep_alive_survives_a_100(
    tmp_path, start_relay
):
    client = await start_relay(relay_config(tmp_path, server={"max_concurrent": 1}))
    port = client.server.port
    # One hook in flight: its body trickles, so it holds the only place.
    _, slow = await asyncio.open_connection("127.0.0.1", port)
    slow.write(
        f"POST /hooks/qingstor?token={TOKEN} HTTP/1.1\r\nHost: relay\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY[:10]
    )
    await slow.drain()
    await asyncio.sleep(0.2)
    raw = await head_then_wait(port, f"/hooks/qingstor?token={TOKEN}")
    assert not raw.startswith(b"HTTP/1.1 100")
    status, headers, body = answer(raw)
    assert (status, body["error"], headers["Retry-After"]) == (503, "overloaded", "1")
    slow.write(BODY[10:])
    await slow.drain()
    await asyncio.sleep(0.2)

    # With the place free: 100, the body, 200, and the same connection serves again.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for key in ("one.jpg", "two.jpg"):
        body_bytes = BODY.replace(b"abc/5.mp4", key.encode())
        writer.write(
            f"POST /hooks/qingstor?token={TOKEN} HTTP/1.1\r\nHost: relay\r\n"
            f"Content-Length: {len(body_bytes)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        await writer.drain()
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(body_bytes)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert json.loads(await reader.readexactly(length)) == {"accepted": 1, "duplicates": 0}
    writer.close()
    slow.close()
