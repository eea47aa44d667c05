"""`kind: wecom` against a local server playing a WeCom group robot: its body shapes as
WeCom documents them (markdown, text with mentions), its error codes, its pace, its byte
limits, its default messages and roll-ups. WeCom does not sign: the robot's key in the
URL is the only credential, and it never comes back in an error."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay.config import build_config
from relay.errors import ConfigError
from relay.sinks.chat.markdown import fit
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
KEY = "693a91f6-7a0c-4bc4-97a0-0ec2f1fa5aaa"
FAST_RETRY = {"max_attempts": 3, "initial": "10ms", "max": "20ms"}
# WeCom's documented limits on `content`, in bytes of UTF-8.
MARKDOWN_BYTES = 4096
TEXT_BYTES = 2048

robot = robot_fixture("/cgi-bin/webhook/send", (200, '{"errcode":0,"errmsg":"ok"}', {}))


def config(tmp_path: Path, robot: Robot, **sink: Any):
    return chat_config(tmp_path, "wx", "wecom", f"{robot.url}?key={KEY}", **sink)


def flagged_review() -> dict[str, Any]:
    """The documented tupu-porn result, with its one file found porn and sent to review."""
    body = sample("tupu-porn-result.json")
    [task] = [v for v in body["result"].values() if isinstance(v, dict)]
    task["fileList"][0].update(label=0, rate=0.9912, review=True)
    return body


async def test_a_markdown_message_as_wecom_documents_it(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    assert (await client.post(HOOK, json=sample())).status == 200
    await eventually(lambda: robot.requests)
    [request] = robot.requests
    # POST to the robot's URL with its key, JSON in UTF-8, nothing signed.
    assert request["query"] == {"key": KEY}
    assert request["headers"]["Content-Type"].startswith("application/json")
    request["raw"].decode("utf-8")
    # {"msgtype": "markdown", "markdown": {"content": ...}}: nothing else (no title, no
    # mentions: WeCom's markdown has neither).
    message = request["json"]
    assert list(message) == ["msgtype", "markdown"]
    assert message["msgtype"] == "markdown"
    assert list(message["markdown"]) == ["content"]
    content = message["markdown"]["content"]
    assert isinstance(content, str) and len(content.encode()) <= MARKDOWN_BYTES
    # Chinese by default: what happened, to which object, in which bucket.
    assert content.startswith("**新对象：abc/5.mp4**")
    assert "新对象 **max-test2/abc/5.mp4**（9.4 MiB）" in content
    assert "> **存储空间**：max-test2" in content
    assert "> **对象**：abc/5.mp4" in content
    assert "> **事件**：create_object" in content
    assert "来源 qingstor" in content


async def test_a_content_review_shows_label_and_rate(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=sample("tupu-porn-result.json"))
    await eventually(lambda: robot.requests)
    content = robot.messages[0]["markdown"]["content"]
    assert content.startswith("**内容审核通过：porn.jpeg**")
    assert "porn.jpeg: 正常 (98.4%)" in content
    assert "> **存储空间**：fakebucket" in content and "> **事件**：tupu-porn" in content
    assert "需要人工复审" not in content


async def test_a_flagged_review_is_flagged_for_a_human(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, language="en"))
    await client.post(HOOK, json=flagged_review())
    await eventually(lambda: robot.requests)
    content = robot.messages[0]["markdown"]["content"]
    assert content.startswith("**Content review flagged: porn.jpeg**")
    assert "porn.jpeg: porn (99.1%), **needs human review**" in content
    assert "> **Bucket**: fakebucket" in content and "> **Type**: tupu-porn" in content
    assert "> **Review**: 1 porn, needs human review" in content


async def test_english_text_with_mentions(tmp_path, start_relay, robot):
    sink = {
        "language": "en",
        "msgtype": "text",
        "at": {"mobiles": ["13800001111"], "user_ids": ["wangqing"], "all": True},
    }
    client = await start_relay(config(tmp_path, robot, **sink))
    await client.post(HOOK, json=sample())
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    # {"msgtype": "text", "text": {"content", "mentioned_list", "mentioned_mobile_list"}}
    assert list(message) == ["msgtype", "text"]
    assert message["msgtype"] == "text"
    text = message["text"]
    assert set(text) == {"content", "mentioned_list", "mentioned_mobile_list"}
    assert text["mentioned_list"] == ["wangqing", "@all"]
    assert text["mentioned_mobile_list"] == ["13800001111"]
    content = text["content"]
    assert len(content.encode()) <= TEXT_BYTES
    assert content.startswith("New object: abc/5.mp4\n")
    assert "Bucket: max-test2" in content and "Key: abc/5.mp4" in content
    assert "Type: create_object" in content
    assert "**" not in content and "\\" not in content


async def test_a_text_message_without_mentions_carries_none(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, msgtype="text"))
    await client.post(HOOK, json=sample())
    await eventually(lambda: robot.requests)
    assert list(robot.messages[0]["text"]) == ["content"]


def test_mentions_with_markdown_are_a_config_error(tmp_path):
    section = {
        "kind": "wecom",
        "url": f"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={KEY}",
        "at": {"all": True},
    }
    with pytest.raises(ConfigError) as caught:
        build_config(
            {"sources": {"q": {"kind": "qingstor", "token": TOKEN}}, "sinks": {"w": section}},
            base_dir=tmp_path,
            env={},
        )
    assert caught.value.problems == [
        "sinks.w: at needs msgtype: text (relay mentions through mentioned_list, which only"
        " WeCom's text messages take)"
    ]
    assert KEY not in repr(caught.value.problems)


async def test_a_key_that_looks_like_markup_shows_as_itself(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=notifier_body("**x** [a](b) <@all>.jpg"))
    await eventually(lambda: robot.requests)
    content = robot.messages[0]["markdown"]["content"]
    assert "\\*\\*x\\*\\* \\[a\\](b) \\<\u200b@all\\>.jpg" in content
    assert "<@all>" not in content


@pytest.mark.parametrize("code", [93000, 40058, 40008, 44004])
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


async def test_the_robot_s_key_never_comes_back_in_an_error(tmp_path, start_relay, robot):
    # An answer quoting the key alone, not the whole URL.
    errmsg = f"invalid webhook url, key {KEY}, more info at https://open.work.weixin.qq.com"
    robot.answers = [(200, json.dumps({"errcode": 93000, "errmsg": errmsg}), {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, _, _, error)] = await settled(client, ids_of(body))
    assert state == "dead" and "invalid webhook url" in error
    assert KEY not in error and "[redacted]" in error


async def test_too_fast_is_retried_after_the_robot_s_minute(tmp_path, start_relay, robot):
    robot.answers = [(200, '{"errcode":45009,"errmsg":"api freq out of limit"}', {})]
    client = await start_relay(config(tmp_path, robot))
    # Pending, due after WeCom's minute, not at the backoff's 10 ms.
    delivery = await after_first_try(client, robot)
    assert delivery.state == "pending" and "errcode 45009" in delivery.last_error
    assert 55 < delivery.next_at - time.time() <= 60
    assert len(robot.requests) == 1


async def test_too_fast_then_ok_is_delivered_after_the_wait(
    tmp_path, start_relay, robot, monkeypatch
):
    import relay.sinks.wecom as wecom

    # The robot's minute, shortened for the test.
    monkeypatch.setattr(wecom, "ANSWERS", replace(wecom.ANSWERS, transient_wait=0.3))
    robot.answers = [(200, '{"errcode":45009,"errmsg":"api freq out of limit"}', {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, _)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("done", 2, 200)
    assert robot.gaps()[0] >= 0.29


async def test_system_busy_is_retried_with_backoff(tmp_path, start_relay, robot):
    robot.answers = [(200, '{"errcode":-1,"errmsg":"system busy"}', {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, _)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("done", 2, 200)
    assert robot.gaps()[0] < 5  # the backoff's, not the rate limit's minute


async def test_a_gateway_error_is_retried(tmp_path, start_relay, robot):
    robot.answers = [(502, "<html>bad gateway</html>", {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, _)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("done", 2, 200)


async def test_a_200_that_is_not_the_robot_s_answer_is_not_delivered(tmp_path, start_relay, robot):
    await assert_a_foreign_200_is_not_delivered(await start_relay(config(tmp_path, robot)), robot)


async def test_messages_keep_the_pace_at_the_robot(tmp_path, start_relay, robot):
    await assert_paced(
        await start_relay(config(tmp_path, robot, pace="300ms", rollup_threshold=50)), robot
    )


async def test_by_default_the_robot_gets_at_most_twenty_a_minute(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, pace=None, rollup_threshold=50))
    for key in ("a", "b"):
        await client.post(HOOK, json=notifier_body(f"{key}.jpg"))
    await eventually(lambda: len(robot.requests) == 2, within=10)
    assert robot.gaps()[0] >= 2.95  # 60 s / 20


def test_the_defaults(tmp_path):
    section = {
        "kind": "wecom",
        "url": f"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={KEY}",
    }
    loaded = build_config(
        {"sources": {"q": {"kind": "qingstor", "token": TOKEN}}, "sinks": {"w": section}},
        base_dir=tmp_path,
        env={},
    )
    sink = loaded.sinks["w"]
    assert sink.pace == 3.0 and sink.msgtype == "markdown" and sink.language == "zh-CN"


def balanced(content: str) -> None:
    for line in content.splitlines():
        assert line.count("**") % 2 == 0, line


@pytest.mark.parametrize(("msgtype", "limit"), [("markdown", MARKDOWN_BYTES), ("text", TEXT_BYTES)])
async def test_a_long_chinese_key_is_cut_within_the_byte_limit(
    tmp_path, start_relay, robot, msgtype, limit
):
    client = await start_relay(config(tmp_path, robot, msgtype=msgtype))
    long_key = "照片/" + "很长的中文对象名" * 2000  # 48,000 bytes of UTF-8
    await client.post(HOOK, json=notifier_body(long_key))
    await eventually(lambda: robot.requests)
    raw = robot.requests[0]["raw"]
    raw.decode("utf-8")  # whole characters only: valid UTF-8 on the wire
    content = robot.messages[0][msgtype]["content"]
    assert len(content.encode("utf-8")) <= limit
    assert "很长的中文对象名" in content and "…" in content
    assert "\ufffd" not in content
    balanced(content)
    assert not content.endswith("\\…")
    # The object's name shows in the text, cut but still bold, and what happened still
    # shows after it, in the facts.
    if msgtype == "markdown":
        assert "新对象 **max-test2/照片/很长的中文对象名很长" in content
        assert "> **事件**：create_object" in content
    else:
        assert "新对象 max-test2/照片/很长的中文对象名很长" in content
        assert "> 事件：create_object" in content
    assert "来源 qingstor" in content


async def test_a_burst_is_rolled_up_into_one_digest(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, rollup_threshold=5, rollup_keys=3))
    keys = [f"uploads/{i:03}.jpg" for i in range(40)]
    body = notifier_body(*keys)
    await client.post(HOOK, json=body)
    rows = await settled(client, ids_of(body))
    assert {state for state, *_ in rows} == {"done"}
    assert len(robot.requests) == 1
    message = robot.messages[0]
    assert list(message) == ["msgtype", "markdown"] and list(message["markdown"]) == ["content"]
    content = message["markdown"]["content"]
    assert content.startswith("**max-test2：40 个事件**")
    assert "40 create_object" in content
    assert "- max-test2/uploads/000.jpg" in content and "uploads/003.jpg" not in content
    assert "另有 37 个" in content
    assert len(content.encode()) <= MARKDOWN_BYTES


async def test_a_burst_of_long_keys_rolls_up_within_the_text_limit(tmp_path, start_relay, robot):
    sink = {"msgtype": "text", "rollup_threshold": 5, "rollup_keys": 40}
    client = await start_relay(config(tmp_path, robot, **sink))
    keys = [f"目录/{i:02}/" + "中文" * 100 for i in range(40)]
    body = notifier_body(*keys)
    await client.post(HOOK, json=body)
    await settled(client, ids_of(body))
    assert len(robot.requests) == 1
    content = robot.messages[0]["text"]["content"]
    assert len(content.encode()) <= TEXT_BYTES and "40 个事件" in content and "**" not in content


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("短", 100, "短"),
        ("新对象 **桶/" + "很长" * 100 + "**", 30, "新对象 **桶/很长很…**"),
        ("plain " + "字" * 50, 16, "plain 字…"),
        ("ab\\*" + "b" * 50, 8, "ab…"),  # never half an escape
        ("ab\\\\" + "b" * 50, 9, "ab\\\\…"),  # an escaped backslash is whole
        ("**a**\n" + "b" * 50, 12, "**a**\nb…"),
    ],
)
def test_the_text_is_cut_without_breaking_a_character_or_a_mark(text, limit, expected):
    cut = fit(text, limit, "utf8")
    assert cut == expected
    assert len(cut.encode()) <= limit


def test_config_problems_never_show_the_key(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(
            {
                "sources": {"q": {"kind": "qingstor", "token": TOKEN}},
                "sinks": {"w": {"kind": "wecom", "url": f"ftp://x/send?key={KEY}"}},
            },
            base_dir=tmp_path,
            env={},
        )
    assert KEY not in repr(caught.value.problems)
