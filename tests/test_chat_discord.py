"""`kind: discord` against a local server playing a Discord channel webhook (Execute
Webhook): the body's shape and limits as Discord documents them (counted here on their
own, in UTF-16 units), its answers (429's `retry_after`, 5xx, the 4xx it refuses with
and the 401/404 after which a webhook must not be used again), its pace, its default
messages and roll-ups. Discord does not sign webhook requests: nothing to recompute."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.app import STORE
from relay.config import build_config
from relay.errors import ConfigError
from relay.sinks.discord import DEFAULT_RETRY_AFTER, DiscordSink, classify
from tests.chat_robot import (
    Robot,
    assert_paced,
    chat_config,
    deliveries,
    ids_of,
    robot_fixture,
    settled,
)
from tests.conftest import TOKEN, eventually, notifier_body, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"
WEBHOOK_ID = "1234567890123456789"
# The token in the webhook's path is its credential.
WEBHOOK_TOKEN = "tOkEn-s3cr3t_0123456789abcdefABCDEF-xyz"
FAST_RETRY = {"max_attempts": 3, "initial": "10ms", "max": "20ms"}
# What Discord answers with `?wait=true`: the message it saved (abridged).
SAVED = json.dumps(
    {"id": "1100000000000000001", "type": 0, "channel_id": "1", "webhook_id": WEBHOOK_ID}
)

robot = robot_fixture(f"/api/webhooks/{WEBHOOK_ID}/{WEBHOOK_TOKEN}", (200, SAVED, {}))


def config(tmp_path: Path, robot: Robot, query: str = "", **sink: Any):
    return chat_config(tmp_path, "chan", "discord", robot.url + query, **sink)


def units(text: str) -> int:
    """Characters as Discord's limits count them, at most: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def visible(text: Any) -> str:
    """A string Discord takes: leading and trailing whitespace is trimmed, and an
    empty value after that is refused."""
    assert isinstance(text, str), text
    return text.strip()


def assert_discord_message(message: dict[str, Any]) -> None:
    """The Execute Webhook JSON body, field by field, as Discord documents it."""
    assert set(message) <= {"content", "username", "avatar_url", "tts", "embeds"} | {
        "allowed_mentions"
    }
    assert message["allowed_mentions"] == {"parse": []}
    assert 1 <= units(visible(message["content"])) <= 2000
    embeds = message["embeds"]
    assert isinstance(embeds, list) and 1 <= len(embeds) <= 10
    total = 0
    for embed in embeds:
        assert set(embed) <= {"title", "description", "color", "fields", "footer", "timestamp"}
        title = visible(embed["title"])
        assert 1 <= units(title) <= 256
        total += units(title)
        if "description" in embed:
            description = visible(embed["description"])
            assert 1 <= units(description) <= 4096
            total += units(description)
        assert isinstance(embed["color"], int) and 0 <= embed["color"] <= 0xFFFFFF
        if "timestamp" in embed:
            assert datetime.fromisoformat(embed["timestamp"]).tzinfo is not None
        assert set(embed["footer"]) == {"text"}
        footer = visible(embed["footer"]["text"])
        assert 1 <= units(footer) <= 2048
        total += units(footer)
        fields = embed["fields"]
        assert isinstance(fields, list) and len(fields) <= 25
        for item in fields:
            assert set(item) == {"name", "value", "inline"}
            assert isinstance(item["inline"], bool)
            name, value = visible(item["name"]), visible(item["value"])
            assert 1 <= units(name) <= 256 and 1 <= units(value) <= 1024
            total += units(name) + units(value)
    assert total <= 6000


def fields_of(message: dict[str, Any]) -> dict[str, str]:
    return {f["name"]: f["value"] for f in message["embeds"][0]["fields"]}


def assert_marks_closed(text: str) -> None:
    for line in text.splitlines():
        assert line.count("**") % 2 == 0, line
        assert not (line.endswith("\\") and not line.endswith("\\\\")), line


# --- messages ---------------------------------------------------------------------------


async def test_an_event_is_one_embed_in_discords_documented_shape(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, query="?thread_id=42"))
    assert (await client.post(HOOK, json=sample())).status == 200
    await eventually(lambda: robot.requests)
    [request] = robot.requests
    # Discord answers only once the message is saved; the operator's thread stays.
    assert request["query"] == {"thread_id": "42", "wait": "true"}
    assert request["headers"]["Content-Type"].startswith("application/json")
    message = request["json"]
    assert_discord_message(message)
    assert "username" not in message and "avatar_url" not in message
    assert message["content"] == "New object: abc/5.mp4"
    [embed] = message["embeds"]
    assert embed["title"] == "New object"
    assert embed["description"] == "New object **max-test2/abc/5.mp4** (9.4 MiB)"
    assert embed["fields"] == [
        {"name": "Bucket", "value": "max-test2", "inline": True},
        {"name": "Key", "value": "abc/5.mp4", "inline": False},
        {"name": "Size", "value": "9.4 MiB (9,840,497 bytes)", "inline": True},
        {"name": "Type", "value": "create_object", "inline": True},
        {"name": "Time", "value": "2021-08-31T06:25:46.000Z", "inline": True},
    ]
    [event_id] = ids_of(sample())
    assert embed["footer"] == {"text": f"source qingstor · event {event_id}"}
    assert embed["timestamp"] == "2021-08-31T06:25:46.000Z"
    assert embed["color"] == 0x3498DB
    [(state, attempts, status, _)] = await settled(client, [event_id])
    assert (state, attempts, status) == ("done", 1, 200)


async def test_a_204_without_wait_is_delivered_and_username_avatar_are_sent(
    tmp_path, start_relay, robot
):
    robot.ok = (204, "", {})
    avatar = "https://example.com/relay.png"
    sink = {"username": "QingStor relay", "avatar_url": avatar}
    client = await start_relay(config(tmp_path, robot, query="?wait=false", **sink))
    await client.post(HOOK, json=sample())
    [(state, _, status, _)] = await settled(client, ids_of(sample()))
    assert (state, status) == ("done", 204)
    [request] = robot.requests
    assert request["query"] == {"wait": "false"}  # the operator's choice is kept
    assert request["json"]["username"] == "QingStor relay"
    assert request["json"]["avatar_url"] == avatar


async def test_each_event_kind_reads_well(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, rollup_threshold=50))
    kinds = ["delete_object", "complete_multipart", "abort_multipart"]
    for kind in kinds:
        await client.post(HOOK, json=notifier_body(f"{kind}.bin", kind=kind))
    await eventually(lambda: len(robot.requests) == 3)
    for message in robot.messages:
        assert_discord_message(message)
    deleted, completed, aborted = robot.messages
    assert deleted["content"] == "Object deleted: delete_object.bin"
    assert deleted["embeds"][0]["description"] == "Deleted **max-test2/delete_object.bin**"
    assert completed["embeds"][0]["title"] == "Multipart upload completed"
    assert "(9.4 MiB)" in completed["embeds"][0]["description"]
    assert aborted["embeds"][0]["color"] == 0x95A5A6
    for kind, message in zip(kinds, robot.messages, strict=True):
        fields = fields_of(message)
        assert fields["Type"] == kind and fields["Bucket"] == "max-test2"
        assert fields["Key"] == f"{kind}.bin"


async def test_a_tupu_porn_result_shows_label_and_rate(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=sample("tupu-porn-result.json"))
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert_discord_message(message)
    embed = message["embeds"][0]
    assert message["content"] == "Content review passed: porn.jpeg"
    assert embed["title"] == "Content review passed"
    assert "- porn.jpeg: normal (98.4%)" in embed["description"]
    fields = fields_of(message)
    assert fields["Review"] == "1 normal" and fields["Type"] == "tupu-porn"
    assert fields["Bucket"] == "fakebucket" and fields["Key"] == "porn.jpeg"
    assert embed["color"] == 0x2ECC71


async def test_a_flagged_tupu_porn_result_is_flagged_for_review(tmp_path, start_relay, robot):
    result = sample("tupu-porn-result.json")
    files = result["result"]["54bcfc6c329af61034f7c2fc"]["fileList"]
    files[0].update(label=0, rate=0.912, review=True)
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=result)
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert_discord_message(message)
    embed = message["embeds"][0]
    assert message["content"] == "⚠️ Content review flagged: porn.jpeg"
    assert embed["title"] == "Content review flagged"
    assert "- porn.jpeg: porn (91.2%), **needs human review**" in embed["description"]
    assert fields_of(message)["Review"] == "1 porn, needs human review"
    assert embed["color"] == 0xE74C3C


async def test_chinese_when_configured(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, language="zh-CN"))
    await client.post(HOOK, json=sample())
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert_discord_message(message)
    assert message["content"] == "新对象：abc/5.mp4"
    assert message["embeds"][0]["description"].startswith("新对象 **max-test2/abc/5.mp4**（")
    assert fields_of(message)["存储空间"] == "max-test2"
    assert fields_of(message)["事件"] == "create_object"
    assert message["embeds"][0]["footer"]["text"].startswith("来源 qingstor · 事件 ID evt_")


async def test_a_key_never_pings_nor_becomes_markup(tmp_path, start_relay, robot):
    key = "@everyone <@123> __init__.py **b** [x](https://evil) _i_ ||s|| `c` my_file.txt"
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=notifier_body(key))
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert_discord_message(message)
    assert message["allowed_mentions"] == {"parse": []}
    escaped = (
        "@everyone \\<\u200b@123\\> \\_\\_init\\_\\_.py \\*\\*b\\*\\* \\[x\\](https://evil)"
        " \\_i\\_ \\|\\|s\\|\\| \\`c\\` my_file.txt"
    )
    assert fields_of(message)["Key"] == escaped
    assert f"**max-test2/{escaped}**" in message["embeds"][0]["description"]
    assert message["content"] == f"New object: {escaped}"


async def test_a_template_renders_the_description_with_escaped_values(tmp_path, start_relay, robot):
    template = "{{ type }} of **{{ key }}** in {{ bucket }}"
    client = await start_relay(config(tmp_path, robot, template=template))
    await client.post(HOOK, json=notifier_body("__x__*y*.txt"))
    await eventually(lambda: robot.requests)
    description = robot.messages[0]["embeds"][0]["description"]
    assert description == "create_object of **\\_\\_x\\_\\_\\*y\\*.txt** in max-test2"


@pytest.mark.parametrize(
    "long_key",
    [
        "照片/" + "很长的中文对象名" * 2000,  # 16,003 characters, 48,007 bytes of UTF-8
        "emoji/" + "😀" * 3000,  # each two UTF-16 units: a cut must not split one
    ],
    ids=["chinese", "emoji"],
)
async def test_a_long_key_is_cut_within_discords_limits(tmp_path, start_relay, robot, long_key):
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=notifier_body(long_key))
    await eventually(lambda: robot.requests)
    raw = robot.requests[0]["raw"]
    message = json.loads(raw.decode("utf-8", "strict"))  # valid UTF-8 throughout
    assert_discord_message(message)  # every limit, counted in UTF-16 units
    embed = message["embeds"][0]
    head = long_key[:20]
    for text in (message["content"], fields_of(message)["Key"], embed["description"]):
        text.encode("utf-8", "strict")  # whole characters: no half surrogate pair
        assert head in text and "…" in text
        assert_marks_closed(text)
    assert message["content"].endswith("…") and fields_of(message)["Key"].endswith("…")
    # The rendered line keeps its bold around a key cut before it: the mark is whole.
    assert embed["description"].startswith(f"New object **max-test2/{head}")
    assert embed["description"].endswith("…** (9.4 MiB)")
    assert fields_of(message)["Size"] == "9.4 MiB (9,840,497 bytes)"


async def test_a_burst_is_rolled_up_into_one_digest(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, rollup_threshold=5, rollup_keys=3))
    keys = [f"uploads/{i:03}.jpg" for i in range(40)]
    body = notifier_body(*keys)
    await client.post(HOOK, json=body)
    rows = await settled(client, ids_of(body))
    assert {state for state, *_ in rows} == {"done"}
    assert len(robot.requests) == 1
    message = robot.messages[0]
    assert_discord_message(message)
    embed = message["embeds"][0]
    assert message["content"] == "40 events in max-test2"
    assert embed["title"] == "40 events in max-test2"
    assert embed["description"] == (
        "**First 3 of 40**\n"
        "- max-test2/uploads/000.jpg\n"
        "- max-test2/uploads/001.jpg\n"
        "- max-test2/uploads/002.jpg\n"
        "and 37 more"
    )
    assert embed["fields"] == [{"name": "create_object", "value": "40", "inline": True}]
    assert embed["footer"]["text"].startswith(
        "source qingstor · rolled up: 40 events were waiting (threshold 5)"
    )


def test_a_digest_of_many_types_and_huge_keys_stays_within_limits(tmp_path):
    sink = DiscordSink("chan", discord_config(tmp_path, language="zh-CN", rollup_keys=40))
    envelopes = [
        {
            "id": f"evt_{i}",
            "type": f"类型_{i % 30}_" + "长" * 300,
            "source": "qingstor",
            "bucket": f"b{i % 2}",
            "key": f"{i}/" + "很长的中文对象名**[x]**" * 400,
            "time": f"2024-01-01T00:00:{i % 60:02}Z",
        }
        for i in range(60)
    ]
    message = sink.digest_message(envelopes)
    assert_discord_message(message)
    embed = message["embeds"][0]
    assert len(embed["fields"]) == 25 and embed["fields"][-1]["name"] == "其他类型"
    assert sum(int(f["value"]) for f in embed["fields"]) == 60
    assert embed["description"].count("\n- ") == 40
    assert_marks_closed(embed["description"])
    assert message["content"] == "60 个事件"


# --- answers ----------------------------------------------------------------------------


async def test_429_waits_the_retry_after_of_its_body(tmp_path, start_relay, robot):
    limited = {"message": "You are being rate limited.", "retry_after": 0.6, "global": False}
    # The header is Discord's whole seconds; the body's float is the precise wait.
    robot.answers = [(429, json.dumps(limited), {"Retry-After": "3"})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, status, _)] = await settled(client, ids_of(body))
    assert (state, attempts, status) == ("done", 2, 200)
    assert 0.59 <= robot.gaps()[0] < 2.5
    assert robot.messages[0] == robot.messages[1]


async def test_429_without_a_body_waits_its_retry_after_header(tmp_path, start_relay, robot):
    robot.answers = [(429, "", {"Retry-After": "1"})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, _, _)] = await settled(client, ids_of(body))
    assert (state, attempts) == ("done", 2)
    assert robot.gaps()[0] >= 0.95


async def test_429_mid_batch_holds_back_the_rest(tmp_path, start_relay, robot):
    limited = {"message": "You are being rate limited.", "retry_after": 0.5, "global": False}
    robot.answers = [(429, json.dumps(limited), {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg", "b.jpg", "c.jpg")
    await client.post(HOOK, json=body)
    rows = await settled(client, ids_of(body))
    assert {state for state, *_ in rows} == {"done"}
    assert len(robot.requests) == 4  # the refused one, then each of the three once
    assert min(robot.gaps()) >= 0.04 and robot.gaps()[0] >= 0.49
    # Held back is not attempted: only the refused message spent a second attempt.
    assert sorted(attempts for _, attempts, *_ in rows) == [1, 1, 2]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_server_error_is_retried(tmp_path, start_relay, robot, status):
    robot.answers = [(status, '{"message": "Internal Server Error", "code": 0}', {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, last_status, _)] = await settled(client, ids_of(body))
    assert (state, attempts, last_status) == ("done", 2, 200)
    assert robot.messages[0] == robot.messages[1]


async def test_a_200_that_is_not_discords_answer_is_not_delivered(tmp_path, start_relay, robot):
    robot.answers = [(200, "<html>captive portal</html>", {})] * 3
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, _, error)] = await settled(client, ids_of(body))
    assert (state, attempts) == ("dead", 3)
    assert "not Discord's answer" in error


REFUSALS = [
    (400, 50035, "Invalid Form Body"),
    (400, 200000, "Message was blocked by automatic moderation"),
    (401, 50027, "Invalid Webhook Token"),
    (403, 50013, "Missing Permissions"),
    (404, 10015, "Unknown Webhook"),
    (413, 40005, "Request entity too large"),
]


@pytest.mark.parametrize(("status", "code", "text"), REFUSALS, ids=lambda v: str(v))
async def test_a_refusal_is_dead_lettered_after_one_request(
    tmp_path, start_relay, robot, status, code, text
):
    robot.answers = [(status, json.dumps({"message": text, "code": code}), {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, attempts, last_status, error)] = await settled(client, ids_of(body))
    assert (state, attempts, last_status) == ("dead", 1, status)
    assert error == f"HTTP {status}: {text} (code {code})"
    await asyncio.sleep(0.2)
    assert len(robot.requests) == 1


@pytest.mark.parametrize(("status", "code"), [(404, 10015), (401, 50027)])
async def test_after_a_401_or_404_the_webhook_is_not_used_again(
    tmp_path, start_relay, robot, status, code
):
    robot.answers = [(status, json.dumps({"message": "nope", "code": code}), {})]
    client = await start_relay(config(tmp_path, robot))
    first, second = notifier_body("a.jpg"), notifier_body("b.jpg", request_id="0000000000000002")
    with capture_logs() as logs:
        await client.post(HOOK, json=first)
        [(state, *_)] = await settled(client, ids_of(first))
        assert state == "dead"
        await client.post(HOOK, json=second)
        await asyncio.sleep(0.5)
    assert len(robot.requests) == 1  # paused: nothing more goes to a dead webhook
    [(state, attempts, *_)] = await deliveries(client, ids_of(second))
    assert (state, attempts) == ("pending", 0)
    assert [e["sink"] for e in logs if e["event"] == "sink.gone"] == ["chan"]
    assert (await client.app[STORE].sink_stats())["chan"].gone is True


async def test_a_403_does_not_pause_the_sink(tmp_path, start_relay, robot):
    robot.answers = [(403, '{"message": "Missing Permissions", "code": 50013}', {})]
    client = await start_relay(config(tmp_path, robot))
    first, second = notifier_body("a.jpg"), notifier_body("b.jpg", request_id="0000000000000002")
    await client.post(HOOK, json=first)
    await settled(client, ids_of(first))
    await client.post(HOOK, json=second)
    [(state, *_)] = await settled(client, ids_of(second))
    assert state == "done" and len(robot.requests) == 2


async def test_an_answer_quoting_the_webhook_token_never_keeps_it(tmp_path, start_relay, robot):
    quoted = {"message": f"Unknown Webhook {WEBHOOK_TOKEN}", "code": 10015}
    robot.answers = [(404, json.dumps(quoted), {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    with capture_logs() as logs:
        await client.post(HOOK, json=body)
        [(_, _, _, error)] = await settled(client, ids_of(body))
    assert WEBHOOK_TOKEN not in error and "[redacted]" in error
    assert WEBHOOK_TOKEN not in repr(logs)


def test_answers_are_judged_as_discord_means_them():
    now = time.time()
    assert classify(204, None, "", now).result == "done"
    assert classify(200, None, SAVED, now).result == "done"
    limited = '{"message": "You are being rate limited.", "retry_after": 64.57, "global": true}'
    assert classify(429, "65", limited, now).retry_after == 64.57
    assert classify(429, "7", "", now).retry_after == 7.0
    # No wait given at all: not Discord's API but Cloudflare's ban page.
    banned = classify(429, None, "error code: 1015", now)
    assert (banned.result, banned.retry_after) == ("retry", DEFAULT_RETRY_AFTER)
    # A zero wait is still a wait (a zero would read as none, and as the default).
    assert 0 < classify(429, None, '{"retry_after": 0}', now).retry_after < 1
    too_long = {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 4096 or fewer in length."}
    invalid = {
        "code": 50035,
        "errors": {"embeds": {"0": {"description": {"_errors": [too_long]}}}},
        "message": "Invalid Form Body",
    }
    refused = classify(400, None, json.dumps(invalid), now)
    assert refused.result == "dead" and not refused.gone
    assert refused.error == (
        "HTTP 400: Invalid Form Body (code 50035):"
        " embeds.0.description: Must be 4096 or fewer in length."
    )
    assert classify(404, None, '{"message": "Unknown Webhook", "code": 10015}', now).gone
    assert classify(410, None, "", now).gone
    assert classify(408, None, "", now).result == "retry"


# --- pacing -----------------------------------------------------------------------------


async def test_messages_keep_the_pace_at_the_webhook(tmp_path, start_relay, robot):
    await assert_paced(
        await start_relay(config(tmp_path, robot, pace="300ms", rollup_threshold=50)), robot
    )


# --- config -----------------------------------------------------------------------------


def discord_config(tmp_path: Path, **sink: Any):
    url = f"https://discord.com/api/webhooks/{WEBHOOK_ID}/{WEBHOOK_TOKEN}"
    built = build_config(
        {
            "sources": {"q": {"kind": "qingstor", "token": TOKEN}},
            "sinks": {"chan": {"kind": "discord", "url": url, **sink}},
        },
        base_dir=tmp_path,
        env={},
    )
    return built.sinks["chan"]


def test_the_defaults_are_discords(tmp_path):
    section = discord_config(tmp_path)
    assert (section.pace, section.language) == (2.0, "en")
    assert section.username is None and section.avatar_url is None
    sink = DiscordSink("chan", section)
    assert WEBHOOK_TOKEN in sink.secrets()


def test_a_discord_url_behind_kind_http_names_its_kind_and_never_the_token(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(
            {
                "sources": {"q": {"kind": "qingstor", "token": TOKEN}},
                "sinks": {
                    "d": {
                        "kind": "http",
                        "url": f"https://discord.com/api/webhooks/{WEBHOOK_ID}/{WEBHOOK_TOKEN}",
                    }
                },
            },
            base_dir=tmp_path,
            env={},
        )
    problems = repr(caught.value.problems)
    assert "kind: discord" in problems and WEBHOOK_TOKEN not in problems


async def test_a_digest_answered_404_pauses_the_sink_and_keeps_the_rest_waiting(
    tmp_path, start_relay, robot
):
    robot.answers = [(404, '{"message": "Unknown Webhook", "code": 10015}', {})]
    client = await start_relay(config(tmp_path, robot, rollup_threshold=5))
    body = notifier_body(*(f"k{i}.jpg" for i in range(8)))
    await client.post(HOOK, json=body)
    await eventually(lambda: robot.requests)
    store = client.app[STORE]

    async def paused() -> Any:
        stats = (await store.sink_stats())["chan"]
        return stats if stats.gone and stats.dead == 1 else None

    stats = await eventually(paused)
    assert stats.pending == 7  # unsent, no attempt spent: waiting for the sink's fix
    assert len(robot.requests) == 1
