"""The log stream itself: what reaches stdout, and in what pieces."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient

from relay import logs
from relay.config import RelayConfig
from relay.logs import configure
from tests.conftest import TOKEN, notifier_body, relay_config, sample

StartRelay = Callable[[RelayConfig], Awaitable[TestClient[Any, Any]]]


@pytest.fixture(autouse=True)
def no_test_server_access_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test server logs each request through `aiohttp.access`, raw request line and
    all; relay's own runner has no access log. Only relay's lines are under test here."""
    monkeypatch.setattr(logging.getLogger("aiohttp.access"), "disabled", True)


class Writes(io.StringIO):
    """A text stream that keeps each write() apart, as a shared fd would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[Writes]:
    handlers = logging.getLogger().handlers[:]
    out = Writes()
    configure("info", "json", out)
    yield out
    structlog.reset_defaults()
    logging.getLogger().handlers = handlers


def test_each_log_line_is_one_write_so_processes_sharing_stdout_cannot_split_it(stream: Writes):
    structlog.get_logger().info("relay.listening", port=8080)
    logging.getLogger("aiohttp.server").warning("a library's record")
    writes = [call for call in stream.calls if call]
    assert len(writes) == 2
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in writes)
    events = [json.loads(call)["event"] for call in writes]
    assert events == ["relay.listening", "a library's record"]


def test_secrets_are_scrubbed_on_the_way_out(stream: Writes):
    structlog.get_logger().info(
        "sink.failed", url="https://oapi.dingtalk.com/robot/send?access_token=s3cr3t", token="t0k"
    )
    logging.getLogger("aiohttp.server").warning("Bad request: GET /hooks/q?token=s3cr3t HTTP/1.1")
    lines = [json.loads(call) for call in stream.calls if call]
    assert len(lines) == 2
    assert "s3cr3t" not in json.dumps(lines) and "t0k" not in json.dumps(lines)


# --- the request line, as it reaches stdout -----------------------------------------

HOOK = f"/hooks/qingstor?token={TOKEN}"


def lines_of(stream: Writes) -> list[dict[str, Any]]:
    return [json.loads(line) for call in stream.calls for line in call.splitlines()]


async def test_the_request_line_carries_what_an_operator_greps_for(
    stream: Writes, tmp_path: Path, start_relay: StartRelay
) -> None:
    client = await start_relay(relay_config(tmp_path))
    await client.post(HOOK, json=sample(), headers={"X-Request-Id": "req-1"})
    await client.post(HOOK, json=sample())  # the same event again: a duplicate
    await client.post("/hooks/qingstor?token=wrong", json=sample())
    await client.get("/healthz")  # a probe: debug, not shown at info
    await asyncio.sleep(0)  # the end of the loop's turn writes what it held
    requests = [line for line in lines_of(stream) if line["event"] == "request"]
    seen = [(r["status"], r.get("accepted"), r.get("duplicates"), r.get("error")) for r in requests]
    assert seen == [
        (200, 1, 0, None),
        (200, 0, 1, None),
        (401, None, None, "invalid_token"),
    ]
    first = requests[0]
    assert first["request_id"] == "req-1"
    assert first["method"] == "POST" and first["path"] == "/hooks/qingstor"  # no query
    assert first["source"] == "qingstor" and first["level"] == "info"
    assert isinstance(first["duration_ms"], float) and first["peer"] == "127.0.0.1"
    # The same timestamp format as every other line (structlog's ISO, UTC, "Z").
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["timestamp"])
    assert len({r["request_id"] for r in requests}) == 3


async def test_secrets_in_what_a_request_line_quotes_are_scrubbed(
    stream: Writes, tmp_path: Path, start_relay: StartRelay
) -> None:
    """A scanner's path can hold anything, a URL with a password or a query-like token
    written into the path: the line quotes the path, never those."""
    client = await start_relay(relay_config(tmp_path))
    await client.post("/hooks/https:%2F%2Fuser:hunter2@example.com%2Fx", json=sample())
    await client.post("/hooks/qingstor%3Ftoken=s3cr3t", json=sample())
    await client.get("/hooks/x&access_token=t0k3n")
    await asyncio.sleep(0)
    text = "".join(stream.calls)
    for secret in ("hunter2", "s3cr3t", "t0k3n", TOKEN):
        assert secret not in text
    statuses = [line["status"] for line in lines_of(stream) if line["event"] == "request"]
    assert statuses == [404, 404, 405]


async def test_request_lines_leave_in_whole_lines_a_few_per_write(
    stream: Writes, tmp_path: Path, start_relay: StartRelay
) -> None:
    """Under load the lines of one turn of the loop share a write; each write holds
    whole lines and stays within 4 KiB, which a pipe keeps whole between processes."""
    client = await start_relay(relay_config(tmp_path))
    bodies = [notifier_body(f"k{n}", request_id=f"r{n}") for n in range(200)]
    await asyncio.gather(*(client.post(HOOK, json=body) for body in bodies))
    structlog.get_logger().warning("after.the.burst")
    writes = [call for call in stream.calls if call]
    assert all(call.endswith("\n") for call in writes)
    assert all(len(call.encode()) <= 4096 for call in writes)
    lines = lines_of(stream)
    assert sum(1 for line in lines if line["event"] == "request") == 200
    assert lines[-1]["event"] == "after.the.burst"  # held lines went out first
    assert len(writes) < 200  # shared writes, not one per line


def test_a_request_line_off_the_loop_is_written_at_once(stream: Writes) -> None:
    structlog.contextvars.bind_contextvars(request_id="r-9")
    try:
        logs.request_line(logging.INFO, {"method": "GET", "path": "/x", "status": 404})
    finally:
        structlog.contextvars.clear_contextvars()
    [line] = lines_of(stream)
    assert line["request_id"] == "r-9" and line["status"] == 404


def test_a_line_logged_while_lines_are_being_written_does_not_hang_the_process() -> None:
    """A finalizer that logs (asyncio's "Task was destroyed", aiohttp's "Unclosed
    client session") can run in the middle of a write, on the same thread."""
    handlers = logging.getLogger().handlers[:]

    class Reentrant(Writes):
        def write(self, text: str) -> int:
            if '"request"' in text:  # as the request lines go out, a finalizer logs
                logging.getLogger("asyncio").error("Task was destroyed but it is pending!")
            return super().write(text)

    out = Reentrant()
    try:
        configure("info", "json", out)
        logs.request_line(logging.INFO, {"method": "GET", "path": "/x", "status": 404})
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers = handlers
    events = [json.loads(line)["event"] for line in "".join(out.calls).splitlines()]
    assert sorted(events) == ["Task was destroyed but it is pending!", "request"]


def test_capture_logs_sees_request_lines_after_configure(stream: Writes) -> None:
    with structlog.testing.capture_logs() as captured:
        logs.request_line(logging.INFO, {"method": "GET", "path": "/x", "status": 404})
    assert [e["event"] for e in captured] == ["request"]
    assert stream.calls == []


async def test_what_a_client_puts_in_a_path_cannot_break_a_line_or_drive_a_terminal(
    stream: Writes, tmp_path: Path, start_relay: StartRelay
) -> None:
    client = await start_relay(relay_config(tmp_path))
    # NEL (a line break to str.splitlines), RIGHT-TO-LEFT OVERRIDE, a C1 CSI.
    await client.get("/a%C2%85b%E2%80%AEc%C2%9B31m")
    await asyncio.sleep(0)
    text = "".join(stream.calls)
    assert text.isascii()
    [line] = [json.loads(line) for line in text.splitlines()]
    assert line["path"] == "/a\x85b\u202ec\x9b31m"
