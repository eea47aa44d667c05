"""`kind: teams` against a local server playing a Teams Workflows webhook (and the
retiring Office 365 connector's answers): the Adaptive Card body field by field, its
answers, its pace, its size limit, its default messages and roll-ups."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.app import STORE
from relay.config import build_config
from tests.chat_robot import (
    Robot,
    after_first_try,
    assert_paced,
    chat_config,
    ids_of,
    robot_fixture,
    settled,
)
from tests.conftest import TOKEN, eventually, notifier_body, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"
PATH = "/workflows/0a1b2c3d4e5f/triggers/manual/paths/invoke"
SIG = "Zq3v9XyK_s3cr3t-SIG_0123456789abcdefABCDEF"
# As Power Automate shows it: `sp` percent-encoded, `sig` the credential.
QUERY = f"api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={SIG}"
# Teams takes 28,672 bytes of message after Power Automate wraps the body in a few KB
# of its own; relay's documented bound for the body, however it is re-encoded.
BODY_LIMIT = 20_000
FAST_RETRY = {"max_attempts": 3, "initial": "10ms", "max": "20ms"}
# What an Office 365 connector answers, with HTTP 200, when its own post failed.
CONNECTOR_FAILED = (
    "Webhook message delivery failed with error: Microsoft Teams endpoint returned HTTP error"
)
CONNECTOR_429 = f"{CONNECTOR_FAILED} 429 with ContextId tcid=0,server=msgapi-production,cv=x"
TOO_MANY = '{"error":{"code":"TooManyRequests","message":"Rate limit is exceeded."}}'

# A workflow answers 202 Accepted, with an empty body.
robot = robot_fixture(PATH, (202, "", {}))


def config(tmp_path: Path, robot: Robot, **sink: Any):
    return chat_config(tmp_path, "team", "teams", f"{robot.url}?{QUERY}", **sink)


def card(message: dict[str, Any]) -> dict[str, Any]:
    content: dict[str, Any] = message["attachments"][0]["content"]
    return content


def blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in card(message)["body"] if e["type"] == "TextBlock"]


def facts(message: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for element in card(message)["body"]:
        if element["type"] == "FactSet":
            found.update({f["title"]: f["value"] for f in element["facts"]})
    return found


def texts(message: dict[str, Any]) -> list[str]:
    """Every markdown string the card shows: text blocks, fact titles and values."""
    shown = [b["text"] for b in blocks(message)]
    for element in card(message)["body"]:
        if element["type"] == "FactSet":
            shown += [v for f in element["facts"] for v in (f["title"], f["value"])]
    return shown


def all_text(message: dict[str, Any]) -> str:
    return "\n".join(texts(message))


def assert_teams_shape(message: dict[str, Any]) -> None:
    """The documented Workflows body: a message with one Adaptive Card 1.2 attachment
    made of TextBlock and FactSet elements, and nothing else."""
    assert set(message) == {"type", "attachments"}
    assert message["type"] == "message"
    [attachment] = message["attachments"]
    assert set(attachment) == {"contentType", "content"}
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    content = attachment["content"]
    assert content["$schema"] == "http://adaptivecards.io/schemas/adaptive-card.json"
    assert content["type"] == "AdaptiveCard"
    assert content["version"] == "1.2"
    assert set(content) <= {"$schema", "type", "version", "body", "fallbackText", "msteams"}
    assert content["msteams"] == {"width": "Full"}
    assert isinstance(content["fallbackText"], str) and content["fallbackText"]
    assert content["body"], "a card with no body shows nothing"
    for element in content["body"]:
        assert element["type"] in {"TextBlock", "FactSet"}
        if element["type"] == "TextBlock":
            assert set(element) <= {"type", "text", "wrap", "weight", "size", "color", "isSubtle"}
            assert isinstance(element["text"], str) and element["text"].strip()
            assert element["wrap"] is True
            assert element.get("weight", "Bolder") == "Bolder"
            assert element.get("size", "Medium") in {"Medium", "Small"}
            assert element.get("color", "Attention") == "Attention"
        else:
            assert set(element) == {"type", "facts"} and element["facts"]
            for fact in element["facts"]:
                assert set(fact) == {"title", "value"}
                assert isinstance(fact["title"], str) and isinstance(fact["value"], str)


def assert_markup_whole(message: dict[str, Any]) -> None:
    for text in texts(message):
        for line in text.splitlines():
            assert line.count("**") % 2 == 0, line
        assert not (text.endswith("\\") and not text.endswith("\\\\")), text


# --- the body ---------------------------------------------------------------------------


async def test_the_default_card_names_the_object_bucket_and_event(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    assert (await client.post(HOOK, json=sample())).status == 200
    await eventually(lambda: robot.requests)
    [request] = robot.requests
    # The URL exactly as copied from Power Automate: its query is not re-quoted.
    assert request["raw_query"] == QUERY
    assert request["headers"]["Content-Type"] == "application/json; charset=utf-8"
    message = request["json"]
    assert_teams_shape(message)
    headline, text, context = blocks(message)
    assert headline == {
        "type": "TextBlock",
        "text": "New object: abc/5.mp4",
        "wrap": True,
        "weight": "Bolder",
        "size": "Medium",
    }
    assert text["text"] == "New object **max-test2/abc/5.mp4** (9.4 MiB)"
    assert facts(message) == {
        "Bucket": "max-test2",
        "Key": "abc/5.mp4",
        "Size": "9.4 MiB (9,840,497 bytes)",
        "Type": "create_object",
        "Time": "2021-08-31T06:25:46.000Z",
    }
    assert context["isSubtle"] is True and context["size"] == "Small"
    assert context["text"].startswith("source qingstor · event evt_")
    assert card(message)["fallbackText"] == "New object: abc/5.mp4"
    assert_markup_whole(message)


async def test_a_tupu_porn_result_shows_label_and_rate(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=sample("tupu-porn-result.json"))
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert_teams_shape(message)
    headline = blocks(message)[0]
    assert headline["text"].startswith("Content review passed")
    assert "color" not in headline  # nothing to look at
    shown = all_text(message)
    assert "porn.jpeg" in shown and "fakebucket" in shown
    assert "- porn.jpeg: normal (98.4%)" in shown
    assert facts(message)["Review"] == "1 normal"
    assert facts(message)["Type"] == "tupu-porn"


async def test_a_flagged_review_is_marked_for_attention(tmp_path, start_relay, robot):
    result = sample("tupu-porn-result.json")
    [task] = [v for v in result["result"].values() if isinstance(v, dict)]
    task["fileList"][0].update({"label": 0, "rate": 0.9712, "review": True})
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=result)
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert_teams_shape(message)
    headline = blocks(message)[0]
    assert headline["color"] == "Attention"
    assert headline["text"].startswith("Content review flagged")
    shown = all_text(message)
    assert "porn (97.1%)" in shown and "**needs human review**" in shown
    assert facts(message)["Review"] == "1 porn, needs human review"
    assert_markup_whole(message)


async def test_chinese_when_configured(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, language="zh-CN"))
    await client.post(HOOK, json=sample())
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert blocks(message)[0]["text"] == "新对象：abc/5.mp4"
    assert facts(message)["存储空间"] == "max-test2" and facts(message)["对象"] == "abc/5.mp4"
    assert "来源 qingstor" in blocks(message)[-1]["text"]


async def test_a_template_is_the_text_and_user_data_never_becomes_markup(
    tmp_path, start_relay, robot
):
    sink = {"template": "**{{ type }}** of [{{ key }}](https://example.com/{{ key }})"}
    client = await start_relay(config(tmp_path, robot, **sink))
    await client.post(HOOK, json=notifier_body("**x** [y](https://evil.example)"))
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert_teams_shape(message)
    text = blocks(message)[1]["text"]
    # The template's own markup stays; the key's is escaped.
    assert text.startswith("**create_object** of [\\*\\*x\\*\\* \\[y\\](https://evil.example)]")
    assert facts(message)["Key"] == "\\*\\*x\\*\\* \\[y\\](https://evil.example)"
    assert "[y](" not in all_text(message).replace("\\[y\\](", "")


# --- answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "wait"),
    [
        pytest.param(500, "", {}, 0.0, id="500"),
        pytest.param(502, "", {}, 0.0, id="502"),
        pytest.param(503, "", {"Retry-After": "1"}, 1.0, id="503-retry-after"),
        pytest.param(504, "", {}, 0.0, id="504"),
        pytest.param(408, "", {}, 0.0, id="408"),
        pytest.param(409, "", {}, 0.0, id="409"),
        pytest.param(429, TOO_MANY, {"Retry-After": "1"}, 1.0, id="429-retry-after"),
        # No Retry-After: THROTTLE_WAIT (shortened here to 0.3 s).
        pytest.param(429, TOO_MANY, {}, 0.3, id="429"),
        pytest.param(200, CONNECTOR_429, {}, 0.3, id="200-hidden-429"),
        pytest.param(200, f"{CONNECTOR_FAILED} 502", {}, 0.0, id="200-hidden-502"),
    ],
)
async def test_a_transient_answer_is_retried_after_the_right_wait(
    tmp_path, start_relay, robot, monkeypatch, status, body, headers, wait
):
    import relay.sinks.teams as teams

    monkeypatch.setattr(teams, "THROTTLE_WAIT", 0.3)
    robot.answers = [(status, body, headers)]
    client = await start_relay(config(tmp_path, robot))
    ids = ids_of(notifier_body("a.jpg"))
    await client.post(HOOK, json=notifier_body("a.jpg"))
    [(state, attempts, last_status, error)] = await settled(client, ids)
    assert (state, attempts, last_status, error) == ("done", 2, 202, None)
    assert len(robot.requests) == 2
    assert robot.gaps()[0] >= wait - 0.01


@pytest.mark.parametrize(
    ("status", "body"),
    [pytest.param(429, TOO_MANY, id="429"), pytest.param(200, CONNECTOR_429, id="hidden-429")],
)
async def test_throttling_without_retry_after_waits_a_minute(
    tmp_path, start_relay, robot, status, body
):
    robot.answers = [(status, body, {})]
    client = await start_relay(config(tmp_path, robot))
    # Pending and due after a minute, not at the backoff's 10 ms.
    delivery = await after_first_try(client, robot)
    assert delivery.state == "pending" and delivery.last_status == status
    assert 55 < delivery.next_at - time.time() <= 60
    if status == 200:
        assert "the connector's post failed: HTTP 429" in delivery.last_error


async def test_a_hidden_429_honours_retry_after(tmp_path, start_relay, robot):
    robot.answers = [(200, CONNECTOR_429, {"Retry-After": "7"})]
    client = await start_relay(config(tmp_path, robot))
    [event_id] = ids_of(notifier_body("a.jpg"))
    await client.post(HOOK, json=notifier_body("a.jpg"))
    store = client.app[STORE]

    async def scheduled() -> Any:
        record = await store.event(event_id)
        delivery = record.deliveries[0] if record else None
        return delivery if delivery and delivery.attempts == 1 else None

    delivery = await eventually(scheduled)
    assert 5 < delivery.next_at - time.time() <= 7


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(400, '{"error":{"code":"InvalidRequestContent"}}', id="400"),
        pytest.param(401, '{"error":{"code":"DirectApiAuthorizationRequired"}}', id="401"),
        pytest.param(403, '{"error":{"code":"AuthorizationFailed"}}', id="403"),
        pytest.param(404, '{"error":{"code":"WorkflowNotFound"}}', id="404"),
        pytest.param(413, "Request Entity Too Large", id="413"),
        pytest.param(200, f"{CONNECTOR_FAILED} 413 with ContextId tcid=0", id="200-hidden-413"),
        pytest.param(200, f"{CONNECTOR_FAILED} 403", id="200-hidden-403"),
    ],
)
async def test_a_permanent_answer_is_dead_lettered_after_one_request(
    tmp_path, start_relay, robot, status, body
):
    robot.answers = [(status, body, {})]
    client = await start_relay(config(tmp_path, robot))
    body_ = notifier_body("a.jpg")
    await client.post(HOOK, json=body_)
    [(state, attempts, last_status, error)] = await settled(client, ids_of(body_))
    assert (state, attempts, last_status) == ("dead", 1, status)
    assert error.startswith(f"HTTP {status}")
    assert len(robot.requests) == 1


async def test_410_is_dead_and_the_sink_reported_gone(tmp_path, start_relay, robot):
    robot.answers = [(410, "Gone", {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    with capture_logs() as logs:
        await client.post(HOOK, json=body)
        [(state, attempts, status, _)] = await settled(client, ids_of(body))
        await eventually(lambda: any(e["event"] == "sink.gone" for e in logs))
    assert (state, attempts, status) == ("dead", 1, 410)
    assert len(robot.requests) == 1


async def test_an_answer_never_carries_the_signature_back(tmp_path, start_relay, robot):
    robot.answers = [(401, f"sig {SIG} is not valid for ?{QUERY}", {})]
    client = await start_relay(config(tmp_path, robot))
    body = notifier_body("a.jpg")
    await client.post(HOOK, json=body)
    [(state, _, _, error)] = await settled(client, ids_of(body))
    assert state == "dead" and "not valid" in error
    assert SIG not in error


# --- pace, size, roll-up ----------------------------------------------------------------


def test_english_and_one_message_a_second_by_default(tmp_path):
    built = build_config(
        {
            "sources": {"q": {"kind": "qingstor", "token": TOKEN}},
            "sinks": {"t": {"kind": "teams", "url": f"https://example.com{PATH}?{QUERY}"}},
        },
        base_dir=tmp_path,
        env={},
    )
    sink = built.sinks["t"]
    assert (sink.language, sink.pace) == ("en", 1.0)


async def test_messages_keep_the_pace_at_the_webhook(tmp_path, start_relay, robot):
    await assert_paced(
        await start_relay(config(tmp_path, robot, pace="300ms", rollup_threshold=50)), robot
    )


@pytest.mark.parametrize("language", ["en", "zh-CN"])
async def test_a_long_chinese_key_is_cut_within_the_size_limit(
    tmp_path, start_relay, robot, language
):
    client = await start_relay(config(tmp_path, robot, language=language))
    long_key = "照片/" + "很长的中文对象名" * 2000  # 48,000 bytes of UTF-8
    await client.post(HOOK, json=notifier_body(long_key))
    await eventually(lambda: robot.requests)
    raw = robot.requests[0]["raw"]
    raw.decode("utf-8")  # whole characters only (strict)
    message = robot.messages[0]
    assert len(raw) <= BODY_LIMIT
    # Within the limit even as Power Automate may re-encode it: every non-ASCII escaped.
    assert len(json.dumps(message, ensure_ascii=True)) <= BODY_LIMIT
    assert_teams_shape(message)
    assert_markup_whole(message)
    key = facts(message)["Key" if language == "en" else "对象"]
    assert key.startswith("照片/很长的中文对象名") and key.endswith("…")
    # The text names the object too, cut inside its bold mark and the mark closed.
    headline, text = (b["text"] for b in blocks(message)[:2])
    assert headline.endswith("…") and "照片/很长的中文对象名" in headline
    new = "New object" if language == "en" else "新对象"
    assert text.startswith(f"{new} **max-test2/照片/很长的中文对象名") and "…**" in text
    assert "\ufffd" not in all_text(message)


async def test_a_long_key_of_markup_is_cut_without_breaking_it(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot))
    await client.post(HOOK, json=notifier_body("**[x]** " * 6000))
    await eventually(lambda: robot.requests)
    message = robot.messages[0]
    assert len(robot.requests[0]["raw"]) <= BODY_LIMIT
    assert_teams_shape(message)
    assert_markup_whole(message)


async def test_a_burst_is_rolled_up_into_one_digest(tmp_path, start_relay, robot):
    client = await start_relay(config(tmp_path, robot, rollup_threshold=5, rollup_keys=3))
    keys = [f"uploads/{i:03}.jpg" for i in range(40)]
    body = notifier_body(*keys)
    await client.post(HOOK, json=body)
    rows = await settled(client, ids_of(body))
    assert {state for state, *_ in rows} == {"done"}
    assert len(robot.requests) == 1
    message = robot.messages[0]
    assert_teams_shape(message)
    headline, first, listing, more, context = (b["text"] for b in blocks(message))
    assert headline == "40 events in max-test2"
    assert facts(message) == {"create_object": "40"}
    assert first == "**First 3 of 40**"
    assert listing.splitlines() == [f"- max-test2/uploads/{i:03}.jpg" for i in range(3)]
    assert more == "and 37 more"
    assert "rolled up: 40 events were waiting (threshold 5)" in context
    assert card(message)["fallbackText"] == "40 events in max-test2"


async def test_a_chinese_digest(tmp_path, start_relay, robot):
    sink = {"rollup_threshold": 5, "rollup_keys": 3, "language": "zh-CN"}
    client = await start_relay(config(tmp_path, robot, **sink))
    body = notifier_body(*(f"k{i}.jpg" for i in range(8)))
    await client.post(HOOK, json=body)
    await settled(client, ids_of(body))
    message = robot.messages[0]
    shown = all_text(message)
    assert "max-test2 于 8 个事件" in shown and "另有 5 个" in shown


def test_a_2xx_that_is_not_teams_answer_is_not_delivered():
    from relay.sinks.teams import classify

    assert classify(202, None, "", 0.0).result == "done"
    assert classify(200, None, "1", 0.0).result == "done"
    assert classify(200, None, '{"ok": true}', 0.0).result == "done"
    page = classify(200, None, "<html>Sign in to your account</html>", 0.0)
    assert page.result == "retry" and "not the webhook's answer" in (page.error or "")
