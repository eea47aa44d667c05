"""The log stream itself: what reaches stdout, and in what pieces."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from relay.logs import configure


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
