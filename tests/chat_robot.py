"""A local server playing a chat platform's webhook, for the chat sinks' tests: records
every request (query, headers, JSON body, arrival time) and answers from a script,
then with the platform's success answer. Real sockets, no mocks."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.app import STORE
from relay.config import RelayConfig, build_config
from relay.models import NotifierBatch, notifier_envelopes
from tests.conftest import TOKEN, eventually

# A scripted answer: (status, body, headers).
Answer = tuple[int, str, dict[str, str]]


@dataclass
class Robot:
    ok: Answer = (200, '{"errcode":0,"errmsg":"ok"}', {})
    answers: list[Answer] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    path: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append(
            {
                "at": time.monotonic(),
                "query": dict(request.query),
                "raw_query": request.rel_url.raw_query_string,
                "headers": dict(request.headers),
                "raw": raw,
                "json": json.loads(raw) if raw else None,
            }
        )
        status, text, headers = self.answers.pop(0) if self.answers else self.ok
        return web.Response(
            status=status, text=text, headers=headers, content_type="application/json"
        )

    @property
    def messages(self) -> list[Any]:
        return [r["json"] for r in self.requests]

    def gaps(self) -> list[float]:
        times = [r["at"] for r in self.requests]
        return [b - a for a, b in itertools.pairwise(times)]


def robot_fixture(path: str, ok: Answer) -> Callable[..., Any]:
    """A pytest fixture of a Robot listening at `path` (its URL in `robot.url`)."""

    @pytest.fixture
    async def robot(
        aiohttp_server: Callable[..., Awaitable[TestServer]],
    ) -> AsyncIterator[Robot]:
        played = Robot(ok=ok, path=path)
        app = web.Application()
        app.router.add_post(path, played.handle)
        server = await aiohttp_server(app)
        played.url = str(server.make_url(path))
        yield played

    return robot


def ids_of(body: dict[str, Any]) -> list[str]:
    """The ids relay gives a notifier batch's events (its ack body does not list them)."""
    batch = NotifierBatch.model_validate(body)
    return [e.id for e in notifier_envelopes(body, batch, "qingstor", datetime.now(UTC))]


async def deliveries(client: Any, ids: list[str]) -> list[tuple[Any, ...]]:
    """(state, attempts, last_status, last_error) of the one delivery of each event."""
    store = client.app[STORE]
    rows: list[tuple[Any, ...]] = []
    for event_id in ids:
        record = await store.event(event_id)
        assert record is not None, event_id
        rows += [(d.state, d.attempts, d.last_status, d.last_error) for d in record.deliveries]
    return rows


async def settled(client: Any, ids: list[str], within: float = 10.0) -> list[tuple[Any, ...]]:
    """The deliveries of `ids`, once none is pending."""

    async def check() -> list[tuple[Any, ...]] | None:
        rows = await deliveries(client, ids)
        return rows if rows and all(state != "pending" for state, *_ in rows) else None

    result: list[tuple[Any, ...]] = await eventually(check, within=within)
    return result


FAST_RETRY = {"max_attempts": 3, "initial": "10ms", "max": "20ms"}


def chat_config(tmp_path: Any, name: str, kind: str, url: str, **sink: Any) -> RelayConfig:
    """A relay with a token-protected qingstor source and one chat sink `name` of `kind`
    posting to `url`, paced 50 ms with fast retries; a key given as None takes its
    default."""
    section = {"kind": kind, "url": url, "pace": "50ms", "retry": FAST_RETRY, **sink}
    return build_config(
        {
            "store": {"path": "relay.db"},
            "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
            "sinks": {name: {k: v for k, v in section.items() if v is not None}},
        },
        base_dir=tmp_path,
        env={},
    )
