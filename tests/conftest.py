"""Shared fixtures: relay on a real socket, and local servers playing the downstream app."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from relay.app import create_app
from relay.config import RelayConfig, build_config

# The `processes` fixture: relay as a real subprocess.
pytest_plugins = ("tests.processes", "tests.redis_server")

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "s3cr3t-token-for-tests"
# The event id of the documented notifier sample (fixtures/notifier-create_object.json).
SAMPLE_ID = "evt_97a2d896bb44dbb1b9d5d028077a5ceb"


def sample(name: str = "notifier-create_object.json") -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def notifier_body(*keys: str, request_id: str = "45b47b6a30678cb2", kind: str = "create_object"):
    """A notifier batch with one record per key, built from the documented sample."""
    template = sample()["events"][0]
    records = []
    for key in keys:
        record = copy.deepcopy(template)
        record["event_type"] = kind
        record["response_elements"]["request_id"] = request_id
        record["qingstor"]["object"]["name"] = key
        records.append(record)
    return {"events": records}


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]], within: float = 10.0
) -> Any:
    """Poll until `check` returns something truthy; fail with its last value."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s (last: {value!r})")
        await asyncio.sleep(0.02)


@pytest.fixture(params=["sqlite", "redis"])
def store_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `store:` of a relay under test, on each backend: what an operator sees must
    not depend on which one it runs (the Redis run needs the session's redis-server)."""
    if request.param == "sqlite":
        return {"path": "data/relay.db"}
    from tests.redis_server import fresh_prefix  # a plugin (below): imported by pytest first

    url = request.getfixturevalue("redis_url")
    return {"backend": "redis", "url": url, "prefix": fresh_prefix()}


def relay_config(tmp_path: Path, **sections: Any) -> RelayConfig:
    """A config rooted in tmp_path: token-protected qingstor source and a file sink."""
    data: dict[str, Any] = {
        "store": {"path": "relay.db", "prune_interval": "1h"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": "out/events.jsonl"}},
    }
    data.update(sections)
    return build_config(data, base_dir=tmp_path, env={})


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class Receiver:
    """A downstream HTTP service: records each request, answers from a script."""

    # Answered in order, then 200: a status, or (status, headers) for e.g. Retry-After.
    statuses: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    hang: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            {"headers": dict(request.headers), "body": body, "at": time.monotonic()}
        )
        if self.hang:
            await self.release.wait()
        answer = self.statuses.pop(0) if self.statuses else 200
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return web.Response(status=status, text="ok" if status < 300 else "nope", headers=headers)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests]


@pytest.fixture
async def receiver(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/events", recv.handle)
    server = await aiohttp_server(app)
    recv.url = str(server.make_url("/events"))
    yield recv
    recv.release.set()  # let hanging handlers end so the server closes promptly


@pytest.fixture
def start_relay(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
) -> Callable[[RelayConfig], Awaitable[TestClient[Any, Any]]]:
    """relay's app on a real socket, started and (at teardown) shut down by pytest-aiohttp."""

    async def start(config: RelayConfig) -> TestClient[Any, Any]:
        return await aiohttp_client(create_app(config))

    return start
