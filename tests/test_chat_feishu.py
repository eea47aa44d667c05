"""`kind: feishu` against a local server playing a Feishu custom bot: signed bodies (the
signature recomputed here, independently), its answer codes, its pace, its 20 KB body,
its card, text and post messages, and roll-ups."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay.config import build_config
from relay.errors import ConfigError
from relay.sinks.feishu import FeishuSink, sign
from relay.templates import SAMPLE_ENVELOPES
from tests.chat_robot import (
    Robot,
    after_first_try,
    assert_a_foreign_200_is_not_delivered,
    chat_config,
    ids_of,
    robot_fixture,
    settled,
)
from tests.conftest import TOKEN, eventually, notifier_body, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"
BOT_TOKEN = "0d6f5a2e-3b1c-4e8f-9a7d-2c4b6e8f0a1b"
SECRET = "qJ3kL9mN2pR5sT8vW1xY4zA7bC0dE6fG"
FAST_RETRY = {"max_attempts": 3, "initial": "10ms", "max": "20ms"}
OK = '{"code":0,"msg":"success","data":{}}'

robot = robot_fixture(f"/open-apis/bot/v2/hook/{BOT_TOKEN}", (200, OK, {}))


def config(tmp_path: Path, robot: Robot, **sink: Any):
    return chat_config(tmp_path, "lark", "feishu", robot.url, **sink)


def expected_sign(secret: str, timestamp: str) -> str:
    """Feishu's recipe, as its guide gives it: HmacSHA256 keyed by timestamp + "\\n" +
    secret, over nothing, then Base64."""
    key = (timestamp + "\n" + secret).encode("utf-8")
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode("utf-8")


def markdown_of(card: dict[str, Any]) -> list[str]:
    """Every lark_md text of a card: the text block and the fields."""
    texts = []
    for element in card["elements"]:
        if element["tag"] == "div":
            if "text" in element:
                texts.append(element["text"]["content"])
            texts += [field["text"]["content"] for field in element.get("fields", [])]
    return texts


def unescaped(text: str) -> str:
    return re.sub(r"&#(\d+);", lambda m: chr(int(m[1])), text)


def assert_markup_whole(markdown: str) -> None:
    """No bold mark left open on a line, no entity cut in half, no tag from user data."""
    for line in markdown.splitlines():
        assert line.count("**") % 2 == 0, line
    assert all(entity.endswith(";") for entity in re.findall(r"&#?\d*;?", markdown))
    assert "<" not in markdown


def test_the_signature_matches_feishus_known_vector():
    assert sign("SECtest", 1700000000) == "G7XpBpG8NgG02fJOAhX6FRAObIljmFoxVReo8I62pEk="
    assert expected_sign("SECtest", "1700000000") == sign("SECtest", 1700000000)


async def test_a_signed_card_names_the_object(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, secret=SECRET))
    assert (await client.post(HOOK, json=sample())).status == 200
    await eventually(lambda: robot.requests)
    [request] = robot.requests
    message = request["json"]
    # Signed in the body, as strings, and recomputed here from Feishu's recipe.
    timestamp = message["timestamp"]
    assert isinstance(timestamp, str) and abs(int(timestamp) - time.time()) < 60
    assert message["sign"] == expected_sign(SECRET, timestamp)
    assert SECRET.encode() not in request["raw"]
    assert request["query"] == {}
    assert request["headers"]["Content-Type"].startswith("application/json")
    # The card, field by field: msg_type, config, header, elements.
    assert set(message) == {"timestamp", "sign", "msg_type", "card"}
    assert message["msg_type"] == "interactive"
    card = message["card"]
    assert set(card) == {"config", "header", "elements"}
    assert card["config"] == {"wide_screen_mode": True}
    header = card["header"]
    assert header["title"]["tag"] == "plain_text"
    assert header["title"]["content"].startswith("新对象")  # Chinese by default
    assert "abc/5.mp4" in header["title"]["content"]
    assert header["template"] == "blue"
    text, facts, rule, note = card["elements"]
    assert text["tag"] == "div" and text["text"]["tag"] == "lark_md"
    assert "新对象 **max-test2/abc/5.mp4**" in text["text"]["content"]
    assert facts["tag"] == "div"
    fields = {
        unescaped(f["text"]["content"]).split("\n")[0]: (
            unescaped(f["text"]["content"]).split("\n")[1],
            f["is_short"],
        )
        for f in facts["fields"]
    }
    assert all(f["text"]["tag"] == "lark_md" for f in facts["fields"])
    assert fields["**存储空间**"] == ("max-test2", True)
    assert fields["**对象**"] == ("abc/5.mp4", False)
    assert fields["**事件**"] == ("create_object", True)
    assert fields["**大小**"] == ("9.4 MiB (9,840,497 bytes)", True)
    assert fields["**时间**"] == ("2021-08-31T06:25:46.000Z", True)
    assert rule == {"tag": "hr"}
    assert note["tag"] == "note"
    [shown] = note["elements"]
    assert shown["tag"] == "plain_text"
    assert "qingstor" in shown["content"] and "evt_" in shown["content"]


async def test_an_unsigned_bot_gets_no_signature_fields(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=sample())
    await eventually(lambda: robot.requests)
    assert set(robot.messages[0]) == {"msg_type", "card"}


async def test_english_text_of_a_review_shows_label_and_rate(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, language="en", msgtype="text"))
    await client.post(HOOK, json=sample("tupu-porn-result.json"))
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert set(message) == {"msg_type", "content"}
    assert message["msg_type"] == "text"
    assert set(message["content"]) == {"text"}
    text = message["content"]["text"]
    assert text.startswith("Content review passed: porn.jpeg")
    assert "porn.jpeg: normal (98.4%)" in text
    assert "Bucket: fakebucket" in text and "Type: tupu-porn" in text
    assert "**" not in text and "&#" not in text


async def test_a_flagged_review_is_red_and_asks_for_a_look(tmp_path, start_relay, robot):
    body = sample("tupu-porn-result.json")
    [task] = [v for v in body["result"].values() if isinstance(v, dict) and "fileList" in v]
    task["fileList"][0].update(label=0, rate=0.9712, review=True)
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=body)
    await eventually(lambda: robot.requests)
    card = robot.messages[0]["card"]
    assert card["header"]["template"] == "red"
    assert card["header"]["title"]["content"] == "内容审核发现违规：porn.jpeg"
    text = card["elements"][0]["text"]["content"]
    assert "内容审核发现违规 **fakebucket/porn.jpeg**" in text
    assert "porn.jpeg: 色情 (97.1%), **需要人工复审**" in text
    assert any("1 色情, 需要人工复审" in md for md in markdown_of(card))


@pytest.mark.parametrize(("language", "locale"), [("zh-CN", "zh_cn"), ("en", "en_us")])
async def test_a_post_message_is_rich_text_by_line(tmp_path, start_relay, robot, language, locale):
    client = await start_relay(config(tmp_path, robot, msgtype="post", language=language))
    await client.post(HOOK, json=sample())
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert set(message) == {"msg_type", "content"}
    assert message["msg_type"] == "post"
    assert list(message["content"]) == ["post"]
    assert list(message["content"]["post"]) == [locale]
    post = message["content"]["post"][locale]
    assert set(post) == {"title", "content"}
    assert "abc/5.mp4" in post["title"]
    assert all(
        isinstance(paragraph, list)
        and all(set(e) == {"tag", "text"} and e["tag"] == "text" for e in paragraph)
        for paragraph in post["content"]
    )
    lines = [e["text"] for paragraph in post["content"] for e in paragraph]
    assert any("max-test2/abc/5.mp4" in line for line in lines)
    assert any("create_object" in line for line in lines)
    assert not any("**" in line or "&#" in line for line in lines)


@pytest.mark.parametrize("code", [9499, 19001, 19021, 19022, 19024])
async def test_a_permanent_code_is_dead_lettered_after_one_request(
    tmp_path, start_relay, robot, code
):
    robot.answers = [(200, json.dumps({"code": code, "msg": "refused", "data": {}}), {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, error)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("dead", 1, 200)
    assert f"code {code}" in error
    assert len(robot.requests) == 1


async def test_an_answer_quoting_the_secret_never_shows_it(tmp_path, start_relay, robot):
    answer = {"code": 19021, "msg": f"sign match fail, secret {SECRET}", "data": {}}
    robot.answers = [(200, json.dumps(answer), {})]
    client = await start_relay(config(tmp_path, robot, secret=SECRET))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, _, _, error)] = await settled(client, ids_of(body))
    assert state == "dead" and "19021" in error
    assert SECRET not in error and BOT_TOKEN not in error


async def test_too_frequent_is_retried_after_a_minute(tmp_path, start_relay, robot):
    robot.answers = [(200, '{"code":11232,"msg":"frequency limited psm","data":{}}', {})]
    client = await start_relay(config(tmp_path, robot))
    # Pending, due after the bot's minute, not at the backoff's 10 ms.
    delivery = await after_first_try(client, robot)
    assert delivery.state == "pending" and "code 11232" in delivery.last_error
    assert 55 < delivery.next_at - time.time() <= 60


async def test_too_frequent_then_ok_is_delivered_signed_afresh(
    tmp_path, start_relay, robot, monkeypatch
):
    import relay.sinks.feishu as feishu

    # The bot's minute, shortened for the test.
    monkeypatch.setattr(feishu, "ANSWERS", replace(feishu.ANSWERS, transient_wait=1.1))
    robot.answers = [(200, '{"code":11232,"msg":"frequency limited psm","data":{}}', {})]
    client = await start_relay(config(tmp_path, robot, secret=SECRET))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, _)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("done", 2, 200)
    assert robot.gaps()[0] >= 1.09
    first, second = robot.messages
    for message in (first, second):
        assert message["sign"] == expected_sign(SECRET, message["timestamp"])
    # Signed at each send: a second later, a new timestamp.
    assert int(second["timestamp"]) > int(first["timestamp"])


async def test_the_legacy_status_code_answer_is_delivered(tmp_path, start_relay, robot):
    robot.answers = [(200, '{"Extra":null,"StatusCode":0,"StatusMessage":"success"}', {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, _)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("done", 1, 200)


async def test_a_200_that_is_not_the_bot_s_answer_is_not_delivered(tmp_path, start_relay, robot):
    await assert_a_foreign_200_is_not_delivered(await start_relay(config(tmp_path, robot)), robot)


async def test_messages_keep_the_default_pace_at_the_bot(tmp_path, start_relay, robot):
    # The default pace (0.6 s): within 5 a second and 100 a minute.
    client = await start_relay(config(tmp_path, robot, pace=None, rollup_threshold=50))
    for key in ("a", "b", "c", "d"):
        await client.post(HOOK, json=notifier_body(f"{key}.jpg"))
    await eventually(lambda: len(robot.requests) == 4)
    assert min(robot.gaps()) >= 0.59
    assert 60 / min(robot.gaps()) <= 100 + 1


@pytest.mark.parametrize("msgtype", ["interactive", "text", "post"])
async def test_a_long_chinese_key_is_cut_within_the_body_limit(
    tmp_path, start_relay, robot, msgtype
):
    client = await start_relay(config(tmp_path, robot, msgtype=msgtype, secret=SECRET))
    # 48,000 bytes of UTF-8, with markup a key must never become.
    long_key = "照片/**要**<at id=all></at>" + "很长的中文对象名" * 2000
    await client.post(HOOK, json=notifier_body(long_key))
    await eventually(lambda: robot.requests)
    raw = robot.requests[0]["raw"]
    assert len(raw) <= 20_000  # the whole body, in bytes, signature included
    message = json.loads(raw.decode("utf-8"))  # whole characters only: strict UTF-8
    if msgtype == "interactive":
        texts = markdown_of(message["card"])
        for markdown in texts:
            assert_markup_whole(markdown)
        assert any("很长的中文对象名" in t and t.endswith("…") for t in texts)
        # The key, cut, stays inside its bold mark: the mark is closed after the "…".
        assert "…**" in texts[0]
        assert "&#42;&#42;要&#42;&#42;&#60;at id=all&#62;" in texts[0]
        title = message["card"]["header"]["title"]["content"]
        assert len(title.encode()) <= 150 and title.endswith("…")
    else:
        if msgtype == "text":
            lines = message["content"]["text"].splitlines()
        else:
            post = message["content"]["post"]["zh_cn"]
            lines = [post["title"], *(e["text"] for p in post["content"] for e in p)]
        assert any("很长的中文对象名" in line and line.endswith("…") for line in lines)
        assert any("**要**<\u200bat id=all>" in line for line in lines)
        assert not any(re.search(r"<at\b", line) for line in lines)


async def test_a_template_text_has_its_values_escaped(tmp_path, start_relay, robot):
    template = "**{{ type }}** in {{ bucket }}: {{ key }}"
    client = await start_relay(config(tmp_path, robot, template=template))
    await client.post(HOOK, json=notifier_body("a*b*_[x](y)_:DONE:.jpg"))
    await eventually(lambda: robot.requests)
    text = robot.messages[0]["card"]["elements"][0]["text"]["content"]
    assert text == (
        "**create_object** in max-test2: a&#42;b&#42;_&#91;x&#93;(y)_&#58;DONE&#58;.jpg"
    )


async def test_a_burst_is_rolled_up_into_one_digest(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, rollup_threshold=5, rollup_keys=3))
    keys = [f"uploads/{i:03}.jpg" for i in range(40)]
    body = notifier_body(*keys)
    await client.post(HOOK, json=body)
    rows = await settled(client, ids_of(body))
    assert {state for state, *_ in rows} == {"done"}
    assert len(robot.requests) == 1
    message = robot.messages[0]
    assert message["msg_type"] == "interactive"
    card = message["card"]
    assert card["header"]["title"] == {"tag": "plain_text", "content": "max-test2：40 个事件"}
    assert card["header"]["template"] == "wathet"
    text, rule, note = card["elements"]
    content = text["text"]["content"]
    assert "**事件**：40 create_object" in content
    assert "**前 3 个，共 40 个**" in content
    assert "- max-test2/uploads/000.jpg" in content and "另有 37 个" in content
    assert "uploads/003.jpg" not in content
    assert rule == {"tag": "hr"}
    assert "已合并：40 个事件在排队（阈值 5）" in note["elements"][0]["content"]


async def test_a_digest_as_text_in_english(tmp_path, start_relay, robot):
    sink = {"rollup_threshold": 5, "rollup_keys": 2, "msgtype": "text", "language": "en"}
    client = await start_relay(config(tmp_path, robot, **sink))
    body = notifier_body(*(f"k{i}.jpg" for i in range(6)))
    await client.post(HOOK, json=body)
    await settled(client, ids_of(body))
    text = robot.messages[0]["content"]["text"]
    assert text.startswith("6 events in max-test2\n")
    assert "First 2 of 6" in text and "- max-test2/k0.jpg" in text and "and 4 more" in text


def test_a_digest_with_a_flagged_review_is_red(tmp_path, robot):
    flagged = copy.deepcopy(SAMPLE_ENVELOPES[-1])
    assert flagged["type"] == "tupu-porn"
    [task] = [
        v for v in flagged["data"]["result"].values() if isinstance(v, dict) and "fileList" in v
    ]
    task["fileList"][0].update(label=1, review=True)
    sink = FeishuSink("lark", config(tmp_path, robot).sinks["lark"])
    message = sink.digest_message([*SAMPLE_ENVELOPES[:-1], flagged, *SAMPLE_ENVELOPES[:-1]])
    card = message["card"]
    assert card["header"]["template"] == "red"
    assert "**需要人工复审**：1" in card["elements"][0]["text"]["content"]


def test_config_problems_never_show_the_secret(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(
            {
                "sources": {"q": {"kind": "qingstor", "token": TOKEN}},
                "sinks": {
                    "f": {"kind": "feishu", "url": f"ftp://x/hook/{SECRET}", "msgtype": "card"}
                },
            },
            base_dir=tmp_path,
            env={},
        )
    assert SECRET not in repr(caught.value.problems)


@pytest.mark.parametrize("msgtype", ["interactive", "post", "text"])
async def test_a_keyword_bot_gets_its_word_in_every_message_type(
    tmp_path, start_relay, robot, msgtype
):
    client = await start_relay(config(tmp_path, robot, keyword="告警", msgtype=msgtype))
    await client.post(HOOK, json=notifier_body("a.jpg"))
    await eventually(lambda: robot.requests)
    assert "【告警】" in robot.requests[0]["raw"].decode()
