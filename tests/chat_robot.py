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
from tests.conftest import TOKEN, eventually, notifier_body

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


HOOK = f"/hooks/qingstor?token={TOKEN}"


async def assert_paced(client: Any, robot: Robot) -> None:
    """Four events posted one by one, to a sink paced 300 ms with roll-ups out of reach:
    they reach the robot at least that far apart."""
    for key in ("a", "b", "c", "d"):
        await client.post(HOOK, json=notifier_body(f"{key}.jpg"))
    await eventually(lambda: len(robot.requests) == 4)
    assert min(robot.gaps()) >= 0.29


async def assert_a_foreign_200_is_not_delivered(client: Any, robot: Robot) -> None:
    """The robot (three max_attempts) answers 200 with a page that is not its JSON: the
    event is dead-lettered, never counted as delivered."""
    robot.answers = [(200, "<html>gateway</html>", {})] * 3
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, _, error)] = await settled(client, ids_of(body))
    assert (state, attempts) == ("dead", 3)
    assert "not the robot's answer" in error


async def after_first_try(client: Any, robot: Robot) -> Any:
    """Post one event and return its delivery once the robot answered it the first time
    (its DeliveryRecord: state, attempts, last status and error, when it is due next)."""
    body = notifier_body("a.jpg")
    [event_id] = ids_of(body)
    await client.post(HOOK, json=body)
    await eventually(lambda: robot.requests)
    store = client.app[STORE]

    async def tried() -> Any:
        record = await store.event(event_id)
        delivery = record.deliveries[0] if record else None
        return delivery if delivery and delivery.attempts == 1 else None

    return await eventually(tried)
