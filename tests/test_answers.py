"""One answer classifier for every sink: the status ladder, and a platform's reading of
the body first (robots answer HTTP 200 with their error inside)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from relay.app import RUNTIME
from relay.config import build_config
from relay.errors import ConfigError
from relay.sinks.answers import ErrorCodes, ExpectedField, judge, ladder
from tests.conftest import SAMPLE_ID, TOKEN, eventually, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"
DINGTALK = ErrorCodes("errcode", transient={130101}, permanent={310000, 300001}, transient_wait=60)


def test_the_ladder_reads_the_status_alone():
    assert ladder(204, None, "", 0.0).result == "done"
    gone = ladder(410, None, "bye", 0.0)
    assert (gone.result, gone.gone) == ("dead", True)
    assert ladder(302, None, "", 0.0).result == "dead"
    assert ladder(404, "5", "", 0.0).result == "dead"
    assert ladder(503, "7", "", 0.0).retry_after == 7.0
    assert ladder(500, "7", "", 0.0).retry_after is None
    assert ladder(429, None, "", 0.0).result == "retry"


def test_a_platforms_codes_speak_before_the_status():
    assert judge(200, None, '{"errcode":0,"errmsg":"ok"}', 0.0, DINGTALK).result == "done"
    refused = judge(200, None, '{"errcode":310000,"errmsg":"sign not match"}', 0.0, DINGTALK)
    assert (refused.result, refused.status) == ("dead", 200)
    assert refused.error == "HTTP 200: errcode 310000 sign not match"
    too_fast = judge(200, None, '{"errcode":130101,"errmsg":"send too fast"}', 0.0, DINGTALK)
    assert (too_fast.result, too_fast.retry_after) == ("retry", 60)
    # An unknown code is retried (bounded by max_attempts), never taken for delivered.
    assert judge(200, None, '{"errcode":777}', 0.0, DINGTALK).result == "retry"
    # A 200 that is not the robot's JSON (a proxy's page) confirms nothing.
    assert judge(200, None, "<html>ok</html>", 0.0, DINGTALK).result == "retry"
    assert judge(200, None, '{"ok": true}', 0.0, DINGTALK).result == "retry"
    # A plain HTTP error without the robot's body: the ladder decides.
    assert judge(502, "3", "Bad Gateway", 0.0, DINGTALK).retry_after == 3.0


def test_an_expected_field_is_what_makes_a_2xx_delivered():
    expect = ExpectedField("errcode", 0)
    assert expect(200, '{"errcode": 0}') is not None
    assert expect(200, '{"errcode": 0}').result == "done"  # type: ignore[union-attr]
    wrong = expect(200, '{"errcode": 310000, "errmsg": "keywords not in content"}')
    assert wrong is not None and wrong.result == "retry"
    assert "errcode 310000, expected 0" in (wrong.error or "")
    assert expect(200, '{"errcode": false}').result == "retry"  # type: ignore[union-attr]
    assert expect(200, "not json").result == "retry"  # type: ignore[union-attr]
    assert expect(500, '{"errcode": 0}') is None  # not a 2xx: the ladder's


def relay_with(tmp_path: Path, url: str, **sink: object):
    return build_config(
        {
            "store": {"path": "relay.db"},
            "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
            "sinks": {
                "robot": {
                    "kind": "http",
                    "url": url,
                    "retry": {"max_attempts": 3, "initial": "10ms", "max": "20ms"},
                    **sink,
                }
            },
        },
        base_dir=tmp_path,
        env={},
    )


async def test_an_http_sink_told_what_success_looks_like_never_loses_a_robots_refusal(
    tmp_path: Path, start_relay, aiohttp_server
):
    answers: list[int] = []

    async def robot(request: web.Request) -> web.Response:
        answers.append(1)
        return web.json_response({"errcode": 310000, "errmsg": "keywords not in content"})

    app = web.Application()
    app.router.add_post("/robot/send", robot)
    server = await aiohttp_server(app)
    config = relay_with(
        tmp_path, str(server.make_url("/robot/send")), success={"field": "errcode", "equals": 0}
    )
    client = await start_relay(config)
    assert (await client.post(HOOK, json=sample())).status == 200
    store = client.server.app[RUNTIME].store

    async def dead() -> bool:
        record = await store.event(SAMPLE_ID)
        return record is not None and record.deliveries[0].state == "dead"

    await eventually(dead)
    record = await store.event(SAMPLE_ID)
    assert record is not None
    [delivery] = record.deliveries
    assert (delivery.attempts, delivery.last_status) == (3, 200)
    assert "errcode 310000" in (delivery.last_error or "")
    assert len(answers) == 3


def test_a_robot_url_behind_kind_http_is_refused_even_with_success(tmp_path: Path):
    # kind: http would send relay's envelope, which no robot takes: its own kind or none.
    url = "https://oapi.dingtalk.com/robot/send?access_token=0123456789abcdef0123"
    for extra in ({}, {"success": {"field": "errcode", "equals": 0}}):
        with pytest.raises(ConfigError) as caught:
            relay_with(tmp_path, url, **extra)
        [problem] = caught.value.problems
        assert problem.startswith("sinks.robot: url is a dingtalk webhook: use kind: dingtalk")
        assert "0123456789abcdef0123" not in problem


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://hooks.slack.com/services/T0/B0/0123456789abcdefghij", "slack"),
        ("https://ptb.discord.com/api/webhooks/1/0123456789abcdefghij", "discord"),
        ("https://acme.webhook.office.com/webhookb2/0123456789abcdefghij", "teams"),
    ],
)
def test_other_chat_webhooks_behind_kind_http_are_refused_too(tmp_path: Path, url: str, kind: str):
    with pytest.raises(ConfigError) as caught:
        relay_with(tmp_path, url, success={"field": "ok", "equals": True})
    [problem] = caught.value.problems
    assert f"use kind: {kind}" in problem and "0123456789abcdefghij" not in problem
