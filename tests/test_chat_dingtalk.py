"""`kind: dingtalk` against a local server playing a DingTalk group robot: signed
requests (the signature recomputed here, independently), its error codes, its pace,
its byte limit, its default messages and roll-ups."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote

import pytest

from relay.app import STORE
from relay.config import build_config
from relay.errors import ConfigError
from relay.sinks.dingtalk import sign
from tests.chat_robot import (
    Robot,
    after_first_try,
    assert_a_foreign_200_is_not_delivered,
    assert_paced,
    chat_config,
    ids_of,
    robot_fixture,
    settled,
)
from tests.conftest import TOKEN, eventually, notifier_body, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"
ACCESS_TOKEN = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0"
SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
FAST_RETRY = {"max_attempts": 3, "initial": "10ms", "max": "20ms"}

robot = robot_fixture("/robot/send", (200, '{"errcode":0,"errmsg":"ok"}', {}))


def config(tmp_path: Path, robot: Robot, **sink: Any):
    return chat_config(
        tmp_path, "ding", "dingtalk", f"{robot.url}?access_token={ACCESS_TOKEN}", **sink
    )


def test_the_signature_matches_dingtalks_known_vector():
    assert sign("SECtest", 1700000000000) == "aZLLrriXgn05YbwaGR7knYsLeJADjr9NwLaNNKpxh4g%3D"


async def test_a_signed_markdown_message_names_the_object(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, secret=SECRET))
    assert (await client.post(HOOK, json=sample())).status == 200
    await eventually(lambda: robot.requests)
    [request] = robot.requests
    # The signature, recomputed here from DingTalk's documented recipe.
    timestamp = request["query"]["timestamp"]
    expected = base64.b64encode(
        hmac.new(SECRET.encode(), f"{timestamp}\n{SECRET}".encode(), hashlib.sha256).digest()
    ).decode()
    assert unquote(request["raw_query"].split("sign=")[1]) == expected
    assert f"sign={quote_plus(expected)}" in request["raw_query"]
    assert request["query"]["access_token"] == ACCESS_TOKEN
    message = request["json"]
    assert message["msgtype"] == "markdown"
    text = message["markdown"]["text"]
    assert "max-test2" in text and "abc/5.mp4" in text and "create_object" in text
    assert "新对象" in message["markdown"]["title"]  # Chinese by default
    assert message["at"] == {"atMobiles": [], "atUserIds": [], "isAtAll": False}


async def test_english_text_with_mentions(tmp_path, start_relay, robot):
    sink = {
        "language": "en",
        "msgtype": "text",
        "at": {"mobiles": ["13800000000"], "all": True},
    }
    client = await start_relay(config(tmp_path, robot, **sink))
    await client.post(HOOK, json=sample("tupu-porn-result.json"))
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    content = message["text"]["content"]
    assert "Content review passed" in content and "porn.jpeg" in content
    assert "normal (98.4%)" in content and "**" not in content
    assert content.endswith("@13800000000")
    assert message["at"] == {"atMobiles": ["13800000000"], "atUserIds": [], "isAtAll": True}


@pytest.mark.parametrize("code", [310000, 300001, 300005, 460101])
async def test_a_permanent_code_is_dead_lettered_after_one_request(
    tmp_path, start_relay, robot, code
):
    robot.answers = [(200, json.dumps({"errcode": code, "errmsg": "refused"}), {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, error)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("dead", 1, 200)
    assert f"errcode {code}" in error
    assert len(robot.requests) == 1


async def test_too_fast_is_retried_after_the_robot_s_block(tmp_path, start_relay, robot):
    robot.answers = [(200, '{"errcode":130101,"errmsg":"send too fast"}', {})]
    client = await start_relay(config(tmp_path, robot))
    # Pending, due after DingTalk's ten-minute block, not at the backoff's 10 ms.
    delivery = await after_first_try(client, robot)
    assert delivery.state == "pending" and "errcode 130101" in delivery.last_error
    assert 590 < delivery.next_at - time.time() <= 600


async def test_too_fast_then_ok_is_delivered_on_the_retry(
    tmp_path, start_relay, robot, monkeypatch
):
    import relay.sinks.dingtalk as dingtalk

    # The robot's minute, shortened for the test.
    monkeypatch.setattr(dingtalk, "ANSWERS", replace(dingtalk.ANSWERS, transient_wait=0.2))
    robot.answers = [(200, '{"errcode":130101,"errmsg":"send too fast"}', {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, _)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("done", 2, 200)
    assert robot.gaps()[0] >= 0.19


async def test_a_200_that_is_not_the_robot_s_answer_is_not_delivered(tmp_path, start_relay, robot):
    await assert_a_foreign_200_is_not_delivered(await start_relay(config(tmp_path, robot)), robot)


async def test_messages_keep_the_pace_at_the_robot(tmp_path, start_relay, robot):
    await assert_paced(
        await start_relay(config(tmp_path, robot, pace="300ms", rollup_threshold=50)), robot
    )


async def test_a_long_chinese_key_is_cut_within_the_byte_limit(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    long_key = "照片/" + "很长的中文对象名" * 2000  # 48,000 bytes of UTF-8
    await client.post(HOOK, json=notifier_body(long_key))
    await eventually(lambda: robot.requests)
    text = robot.messages[0]["markdown"]["text"]
    assert len(robot.requests[0]["raw"]) <= 20_000
    assert "很长的中文对象名" in text and "…" in text
    text.encode("utf-8")  # whole characters only
    for line in text.splitlines():
        assert line.count("**") % 2 == 0, line


async def test_a_burst_is_rolled_up_into_one_digest(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, rollup_threshold=5, rollup_keys=3))
    keys = [f"uploads/{i:03}.jpg" for i in range(40)]
    body = notifier_body(*keys)
    await client.post(HOOK, json=body)
    rows = await settled(client, ids_of(body))
    assert {state for state, *_ in rows} == {"done"}
    assert len(robot.requests) == 1
    text = robot.messages[0]["markdown"]["text"]
    assert "40 个事件" in text and "uploads/000.jpg" in text and "另有 37 个" in text


def test_config_problems_never_show_the_secret(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(
            {
                "sources": {"q": {"kind": "qingstor", "token": TOKEN}},
                "sinks": {"d": {"kind": "dingtalk", "url": f"ftp://x?access_token={SECRET}"}},
            },
            base_dir=tmp_path,
            env={},
        )
    assert SECRET not in repr(caught.value.problems)


async def test_a_bulk_upload_of_5000_objects_is_a_few_digests_not_hours_of_messages(
    tmp_path, start_relay, robot
):
    # 5,000 messages at DingTalk's 20 a minute would take over four hours. Rolled up, a
    # digest stands for up to 500 events, and digests go rollup_threshold paces apart.
    client = await start_relay(config(tmp_path, robot, pace="20ms"))
    ids: list[str] = []
    for start in range(0, 5000, 1000):  # server.max_records: 1000 events per POST
        body = notifier_body(*(f"bulk/{n:04}.jpg" for n in range(start, start + 1000)))
        assert (await client.post(HOOK, json=body)).status == 200
        ids += ids_of(body)
    rows = await settled(client, ids, within=60)
    assert {state for state, *_ in rows} == {"done"}
    messages = len(robot.requests)
    assert messages <= 15
    # At the default pace (3 s) and threshold (5), the same messages would take:
    assert (messages - 1) * 3.0 * 5 / 60 < 4  # minutes, not hours
    counted = sum(
        int(re.search(r"(\d+) 个事件", m["markdown"]["text"]).group(1))  # type: ignore[union-attr]
        for m in robot.messages
    )
    assert counted == 5000


async def test_the_access_token_never_reaches_an_error(tmp_path, start_relay, robot):
    # A gateway page quoting the configured URL, then DingTalk naming the token.
    quoted = f"bad gateway for {robot.url}?access_token={ACCESS_TOKEN}"
    robot.answers = [
        (502, quoted, {}),
        (200, json.dumps({"errcode": 300001, "errmsg": f"token {ACCESS_TOKEN} is not exist"}), {}),
    ]
    client = await start_relay(config(tmp_path, robot, secret=SECRET))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, _, error)] = await settled(client, ids_of(body))
    assert (state, attempts) == ("dead", 2)
    assert ACCESS_TOKEN not in error and SECRET not in error
    assert "errcode 300001" in error


async def test_an_object_size_no_one_means_does_not_cost_the_batch(tmp_path, start_relay, robot):
    body = notifier_body("a.jpg", "b.jpg", "c.jpg")
    body["events"][1]["qingstor"]["object"]["size"] = 10**400
    client = await start_relay(config(tmp_path, robot, rollup_threshold=50))
    await client.post(HOOK, json=body)
    rows = await settled(client, ids_of(body))
    assert [state for state, *_ in rows] == ["done"] * 3
    assert len(robot.requests) == 3  # each once: none sent again


async def test_a_failing_digest_counts_toward_the_circuit(tmp_path, start_relay, robot):
    from structlog.testing import capture_logs

    robot.answers = [(500, "down", {})] * 20
    sink = {"rollup_threshold": 5, "circuit": {"failures": 2, "cooldown": "1h"}}
    client = await start_relay(config(tmp_path, robot, **sink))
    with capture_logs() as logs:
        await client.post(HOOK, json=notifier_body(*(f"k{i}" for i in range(10))))
        await eventually(lambda: any(e["event"] == "circuit.open" for e in logs), within=15)


async def test_a_deleted_robot_pauses_the_sink(tmp_path, start_relay, robot):
    robot.answers = [(200, '{"errcode":300001,"errmsg":"token is not exist"}', {})]
    client = await start_relay(config(tmp_path, robot, rollup_threshold=50))
    first, second = notifier_body("a.jpg"), notifier_body("b.jpg")
    await client.post(HOOK, json=first)
    [(state, *_)] = await settled(client, ids_of(first))
    assert state == "dead"
    await client.post(HOOK, json=second)
    stats = await eventually(lambda: client.app[STORE].sink_stats(), within=5)
    assert stats["ding"].gone is True and stats["ding"].pending == 1
    assert len(robot.requests) == 1  # the second event waits for a new robot, unsent


async def test_a_short_token_quoted_back_is_scrubbed_too(tmp_path, start_relay, robot):
    short = "PLAINtok99"
    robot.answers = [(500, f"upstream failed for token={short} and {short}", {})] * 3
    client = await start_relay(
        chat_config(tmp_path, "ding", "dingtalk", f"{robot.url}?access_token={short}")
    )
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, _, _, error)] = await settled(client, ids_of(body))
    assert state == "dead" and short not in error


async def test_a_keyword_robot_gets_its_word_in_every_message_digests_included(
    tmp_path, start_relay, robot
):
    sink = {"keyword": "告警", "rollup_threshold": 5, "template": "{{ key }}"}
    client = await start_relay(config(tmp_path, robot, **sink))
    one = notifier_body("single.jpg")
    burst = notifier_body(*(f"b/{i}.jpg" for i in range(8)))
    await client.post(HOOK, json=one)
    await settled(client, ids_of(one))
    await client.post(HOOK, json=burst)
    await settled(client, ids_of(burst))
    assert len(robot.requests) == 2  # one message, one digest
    for message in robot.messages:
        assert message["markdown"]["text"].startswith("【告警】")
        assert message["markdown"]["title"].startswith("【告警】")
