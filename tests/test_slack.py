"""The Slack sink, against a real local server playing an incoming webhook."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from relay.app import STORE
from relay.config import build_config
from relay.errors import ConfigError
from relay.models import NotifierBatch, notifier_envelopes
from relay.sinks.slack import (
    PERMANENT_ERRORS,
    classify,
    clip,
    digest_message,
    escape,
    slack_length,
)
from relay.templates import DEFAULT_SLACK_TEMPLATE, SAMPLE_ENVELOPES, check_template
from tests.chat_robot import deliveries
from tests.conftest import SAMPLE_ID, TOKEN, eventually, notifier_body, relay_config, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"
FAST_RETRY = {"max_attempts": 5, "initial": "10ms", "max": "50ms"}
# The path of an incoming-webhook URL is its credential.
SECRET = "XXXXs3cr3tXXXX"
DIGEST = re.compile(r"^(\d+) events: ")


@dataclass
class Slack:
    """An incoming webhook: records each message, answers from a script, then `ok`."""

    answers: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append(
            {"at": time.monotonic(), "headers": dict(request.headers), "json": json.loads(raw)}
        )
        status, text, headers = self.answers.pop(0) if self.answers else (200, "ok", {})
        return web.Response(status=status, text=text, headers=headers)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [r["json"] for r in self.requests]

    def gaps(self) -> list[float]:
        times = [r["at"] for r in self.requests]
        return [b - a for a, b in itertools.pairwise(times)]


@pytest.fixture
async def slack(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[Slack]:
    webhook = Slack()
    app = web.Application()
    path = f"/services/T0000/B0000/{SECRET}"
    app.router.add_post(path, webhook.handle)
    server = await aiohttp_server(app)
    webhook.url = str(server.make_url(path))
    yield webhook


def slack_sink(url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "slack", "url": url, "pace": "200ms", "retry": FAST_RETRY, **extra}


async def counts_when(
    client: Any, predicate: Callable[[dict[str, int]], bool], within: float = 10.0
) -> dict[str, int]:
    async def check() -> dict[str, int] | None:
        counts = await client.app[STORE].counts()
        return counts if predicate(counts) else None

    result: dict[str, int] = await eventually(check, within=within)
    return result


def ids_of(body: dict[str, Any]) -> list[str]:
    """The ids relay gives a notifier batch's events (its ack body does not list them)."""
    batch = NotifierBatch.model_validate(body)
    return [e.id for e in notifier_envelopes(body, batch, "qingstor", datetime.now(UTC))]


async def last_errors(client: Any, ids: Sequence[str]) -> list[tuple[Any, ...]]:
    """(state, attempts, last_status, last_error) of every delivery in the store, whose
    events are `ids`."""
    assert (await client.app[STORE].counts())["events"] == len(ids)
    return await deliveries(client, list(ids))


def assert_within_limits(message: dict[str, Any]) -> None:
    """Slack's documented limits, counted in UTF-16 units (never fewer than characters)."""
    assert isinstance(message["text"], str) and message["text"].strip()
    assert slack_length(message["text"]) <= 40000
    blocks = message["blocks"]
    assert 1 <= len(blocks) <= 50
    for block in blocks:
        if block["type"] == "header":
            assert block["text"]["type"] == "plain_text"
            assert 1 <= slack_length(block["text"]["text"]) <= 150
        elif block["type"] == "section":
            assert "text" in block or "fields" in block
            if "text" in block:
                assert 1 <= slack_length(block["text"]["text"]) <= 3000
            fields = block.get("fields", [])
            assert len(fields) <= 10
            for item in fields:
                assert 1 <= slack_length(item["text"]) <= 2000
        elif block["type"] == "context":
            assert 1 <= len(block["elements"]) <= 10
            for element in block["elements"]:
                assert 1 <= slack_length(element["text"]) <= 3000
        else:
            raise AssertionError(f"unexpected block {block['type']}")


def fields_of(message: dict[str, Any]) -> dict[str, str]:
    """Section fields as {label: value}."""
    result = {}
    for block in message["blocks"]:
        for item in block.get("fields", []):
            label, _, value = item["text"].partition("\n")
            result[label.strip("*")] = value
    return result


def mrkdwn_texts(message: dict[str, Any]) -> list[str]:
    texts = [message["text"]]
    for item in message["blocks"]:
        if item["type"] == "section":
            texts += [item["text"]["text"]] if "text" in item else []
            texts += [f["text"] for f in item.get("fields", [])]
        elif item["type"] == "context":
            texts += [e["text"] for e in item["elements"]]
    return texts


def block(message: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(b for b in message["blocks"] if b["type"] == kind)


# --- messages ---------------------------------------------------------------------------


async def test_a_single_event_becomes_one_block_kit_message(tmp_path: Path, start_relay, slack):
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    await client.post(HOOK, json=sample())
    assert await counts_when(client, lambda c: c.get("done") == 1) == {"events": 1, "done": 1}
    [message] = slack.messages
    assert_within_limits(message)
    assert slack.requests[0]["headers"]["Content-Type"].startswith("application/json")
    assert [b["type"] for b in message["blocks"]] == ["header", "section", "section", "context"]
    assert block(message, "header")["text"]["text"] == "New object: abc/5.mp4"
    assert message["text"] == ":inbox_tray: New object *max-test2/abc/5.mp4* (9.4 MiB)"
    assert fields_of(message) == {
        "Bucket": "max-test2",
        "Key": "abc/5.mp4",
        "Size": "9.4 MiB (9,840,497 bytes)",
        "Type": "create_object",
        "Time": "2021-08-31T06:25:46.000Z",
    }
    context = block(message, "context")["elements"][0]["text"]
    assert "qingstor" in context
    assert re.search(r"`evt_[0-9a-f]{32}`", context)


async def test_a_huge_key_with_markup_characters_stays_within_limits(
    tmp_path: Path, start_relay, slack
):
    key = "dir/<b>&" + "k" * 5000 + "<!channel>" + "😀" * 100
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    await client.post(HOOK, json=notifier_body(key))
    await counts_when(client, lambda c: c.get("done") == 1)
    [message] = slack.messages
    assert_within_limits(message)
    header = block(message, "header")["text"]["text"]
    assert header.startswith("New object: dir/<b>&kkk") and header.endswith("…")
    shown_key = fields_of(message)["Key"]
    assert shown_key.startswith("dir/&lt;b&gt;&amp;kkk") and shown_key.endswith("…")
    # User data never becomes markup: no mention, no raw angle bracket in mrkdwn.
    for text in mrkdwn_texts(message):
        assert "<!channel>" not in text and "<" not in text


async def test_a_tupu_porn_result_reads_as_a_content_review(tmp_path: Path, start_relay, slack):
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    await client.post(HOOK, json=sample("tupu-porn-result.json"))
    await counts_when(client, lambda c: c.get("done") == 1)
    [message] = slack.messages
    assert_within_limits(message)
    assert block(message, "header")["text"]["text"] == "Content review passed: porn.jpeg"
    assert "porn.jpeg: normal (98.4%)" in message["text"]
    assert fields_of(message)["Review"] == "1 normal"
    assert fields_of(message)["Type"] == "tupu-porn"


# --- answers ----------------------------------------------------------------------------


async def test_429_retry_after_is_honoured_before_the_next_send(tmp_path: Path, start_relay, slack):
    slack.answers = [(429, "rate_limited", {"Retry-After": "1"})]
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    await client.post(HOOK, json=sample())
    await counts_when(client, lambda c: c.get("done") == 1)
    assert len(slack.requests) == 2
    assert slack.gaps()[0] >= 0.95, slack.gaps()
    assert slack.messages[0] == slack.messages[1]


async def test_429_mid_batch_holds_back_the_rest_of_the_batch(tmp_path: Path, start_relay, slack):
    # Three events in one POST: below the roll-up threshold, so three messages.
    slack.answers = [(429, "rate_limited", {"Retry-After": "1"})]
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    body = notifier_body("a.jpg", "b.jpg", "c.jpg")
    await client.post(HOOK, json=body)
    await counts_when(client, lambda c: c.get("done") == 3)
    assert len(slack.requests) == 4  # the refused one, then each of the three once
    assert slack.gaps()[0] >= 0.95, slack.gaps()
    keys = [fields_of(m)["Key"] for m in slack.messages[1:]]
    assert sorted(keys) == ["a.jpg", "b.jpg", "c.jpg"]
    # Held back is not attempted: the refused message spent two attempts, the two that
    # waited behind it one each (their one send), not one more for the wait.
    attempts = sorted(row[1] for row in await last_errors(client, ids_of(body)))
    assert attempts == [1, 1, 2]


SLACK_STATUS = {
    "invalid_payload": 400,
    "no_text": 400,
    "user_not_found": 400,
    "too_many_attachments": 400,
    "action_prohibited": 403,
    "invalid_token": 403,
    "team_disabled": 403,
    "posting_to_general_channel_denied": 403,
    "channel_not_found": 404,
    "no_service": 404,
    "channel_is_archived": 410,
    "no_active_hooks": 410,
}


def test_the_permanent_errors_are_the_documented_twelve():
    assert set(SLACK_STATUS) == PERMANENT_ERRORS


@pytest.mark.parametrize("code", sorted(SLACK_STATUS))
async def test_a_permanent_error_is_dead_lettered_after_one_request(
    tmp_path: Path, start_relay, slack, code: str
):
    slack.answers = [(SLACK_STATUS[code], code, {})]
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    await client.post(HOOK, json=sample())
    assert await counts_when(client, lambda c: c.get("dead") == 1) == {"events": 1, "dead": 1}
    await asyncio.sleep(0.3)
    assert len(slack.requests) == 1
    [(state, attempts, status, error)] = await last_errors(client, [SAMPLE_ID])
    assert (state, attempts, status) == ("dead", 1, SLACK_STATUS[code])
    assert code in error and SECRET not in error


async def test_500_then_rollup_error_then_ok_is_delivered_on_the_third_attempt(
    tmp_path: Path, start_relay, slack
):
    slack.answers = [(500, "", {}), (500, "rollup_error", {})]
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    await client.post(HOOK, json=sample())
    assert await counts_when(client, lambda c: c.get("done") == 1) == {"events": 1, "done": 1}
    assert len(slack.requests) == 3
    assert slack.messages[0] == slack.messages[2]
    [(_, attempts, status, _)] = await last_errors(client, [SAMPLE_ID])
    assert (attempts, status) == (3, 200)


async def test_errors_never_carry_the_webhook_url(tmp_path: Path, start_relay):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/services/T0/B0/{SECRET}"
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(url)}))
    with capture_logs() as logs:
        await client.post(HOOK, json=sample())
        await eventually(lambda: [e for e in logs if e["event"] == "delivery.retry"])
    assert SECRET not in repr(logs)
    assert all(SECRET not in str(row) for row in await last_errors(client, [SAMPLE_ID]))


async def test_an_error_page_quoting_the_webhook_path_is_scrubbed(
    tmp_path: Path, start_relay, slack
):
    path = slack.url.split("/", 3)[3]
    slack.answers = [(404, f"<html>The requested URL /{path} was not found</html>", {})]
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    with capture_logs() as logs:
        await client.post(HOOK, json=sample())
        await counts_when(client, lambda c: c.get("dead") == 1)
    [(_, _, status, error)] = await last_errors(client, [SAMPLE_ID])
    assert status == 404 and "<url>" in error and SECRET not in error
    assert SECRET not in repr(logs)


def test_answers_are_judged_by_body_then_status():
    assert classify(200, "ok").result == "done"
    assert classify(200, "ok\n").result == "done"
    # Permanent codes win whatever the status; rollup_error is transient whatever it.
    assert classify(200, "channel_not_found").result == "dead"
    assert classify(500, "invalid_token").result == "dead"
    assert classify(200, "rollup_error").result == "retry"
    limited = classify(429, "rate_limited", "7")
    assert (limited.result, limited.status, limited.retry_after) == ("retry", 429, 7.0)
    assert classify(429, "").retry_after == 1.0  # no header: Slack's documented rate
    assert classify(503, "", "3").retry_after == 3.0
    assert classify(502, "").result == "retry"
    # An unknown 4xx will answer the same again; these three are about the moment.
    assert classify(400, "invalid_blocks").result == "dead"
    assert classify(401, "").result == "dead"
    assert classify(302, "").result == "dead"
    assert all(classify(s, "").result == "retry" for s in (408, 409, 425))
    # 2xx without `ok` does not confirm the post.
    assert classify(204, "").result == "retry"
    assert classify(200, "<html>proxy</html>").result == "retry"
    assert "\n" not in (classify(400, "bad\nthing").error or "")


def test_a_429_waits_its_retry_after_or_one_second_without_one():
    assert classify(429, "", "2").retry_after == 2.0
    assert classify(429, "", "1.5").retry_after == 1.5
    assert classify(429, "", None).retry_after == 1.0
    assert classify(429, "", "soon").retry_after == 1.0
    assert classify(503, "", None).retry_after is None  # plain backoff


# --- pacing and roll-up -----------------------------------------------------------------


async def test_single_events_are_paced(tmp_path: Path, start_relay, slack):
    client = await start_relay(
        relay_config(tmp_path, sinks={"team": slack_sink(slack.url, pace="300ms")})
    )
    for i in range(3):
        response = await client.post(HOOK, json=notifier_body(f"k/{i}.jpg", request_id=f"r{i}"))
        assert response.status == 200
    await counts_when(client, lambda c: c.get("done") == 3)
    assert len(slack.requests) == 3
    assert all(gap >= 0.28 for gap in slack.gaps()), slack.gaps()
    assert not any(DIGEST.match(m["text"]) for m in slack.messages)


async def test_a_burst_becomes_a_handful_of_digests_each_event_accounted_once(
    tmp_path: Path, start_relay, slack
):
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    for post in range(4):
        keys = [f"burst/{post}/{i}.jpg" for i in range(50)]
        response = await client.post(HOOK, json=notifier_body(*keys, request_id=f"r{post}"))
        assert await response.json() == {"accepted": 50, "duplicates": 0}
    assert await counts_when(client, lambda c: c.get("done") == 200) == {
        "events": 200,
        "done": 200,
    }
    await asyncio.sleep(0.3)
    messages = slack.messages
    assert 1 <= len(messages) <= 10, len(messages)
    counts = [int(m.group(1)) for m in (DIGEST.match(msg["text"]) for msg in messages) if m]
    assert counts, [m["text"][:80] for m in messages]
    assert sum(counts) == 200 and len(counts) == len(messages)
    for message in messages:
        assert_within_limits(message)
    first = messages[0]
    assert block(first, "header")["text"]["text"] == f"{counts[0]} events in max-test2"
    assert fields_of(first) == {"create_object": str(counts[0])}
    listing = next(b for b in first["blocks"] if b["type"] == "section" and "text" in b)
    lines = listing["text"]["text"].splitlines()
    assert lines[0] == f"*First 10 of {counts[0]}:*"
    assert lines[1] == "• max-test2/burst/0/0.jpg"
    assert lines[-1] == f"_and {counts[0] - 10} more_"


async def test_uploads_posted_one_by_one_in_a_burst_become_spaced_digests(
    tmp_path: Path, start_relay, slack
):
    # QingStor sends one POST per upload: a burst arrives as a stream, not in one batch.
    # Scaled down from "500 uploads in a minute" at a 1s pace: 200 in ~3s at 200ms.
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    for i in range(200):
        await client.post(HOOK, json=notifier_body(f"s/{i}.jpg", request_id=f"r{i}"))
        await asyncio.sleep(0.01)
    await counts_when(client, lambda c: c.get("done") == 200, within=20)
    await asyncio.sleep(0.3)
    messages = slack.messages
    assert len(messages) <= 15, [m["text"][:12] for m in messages]
    digests = [int(m.group(1)) for m in (DIGEST.match(msg["text"]) for msg in messages) if m]
    assert sum(digests) + (len(messages) - len(digests)) == 200
    assert all(gap >= 0.19 for gap in slack.gaps()), slack.gaps()


async def test_a_failed_digest_retries_every_event_in_it_together(
    tmp_path: Path, start_relay, slack
):
    slack.answers = [(503, "", {})]
    client = await start_relay(relay_config(tmp_path, sinks={"team": slack_sink(slack.url)}))
    body = notifier_body(*(f"k/{i}" for i in range(8)))
    await client.post(HOOK, json=body)
    await counts_when(client, lambda c: c.get("done") == 8)
    # Retried together (one floor for all), so they come due together: one digest again.
    assert [m["text"][:11] for m in slack.messages] == ["8 events: 8", "8 events: 8"]
    assert {row[1] for row in await last_errors(client, ids_of(body))} == {2}


def test_a_digest_of_odd_keys_stays_within_limits():
    envelopes = [
        dict(SAMPLE_ENVELOPES[0], key=f"{i}<&>" + "é" * 5000, type=f"type-{i % 14}")
        for i in range(500)
    ]
    message = digest_message(envelopes, keys=40, threshold=5)
    assert_within_limits(message)
    assert message["text"].startswith("500 events: ")
    fields = fields_of(message)
    # Types 0-9 have 36 events, 10-13 have 35: nine fields, then the rest together.
    assert len(fields) == 10 and fields["other types"] == str(36 + 4 * 35)
    assert "and 460 more" in message["text"]


# --- templates --------------------------------------------------------------------------


async def test_a_custom_template_renders_the_text_with_escaped_values(
    tmp_path: Path, start_relay, slack
):
    template = "<https://console.example/{{ bucket }}|{{ type }}> {{ subject }} ({{ source }})"
    config = relay_config(tmp_path, sinks={"team": slack_sink(slack.url, template=template)})
    client = await start_relay(config)
    await client.post(HOOK, json=notifier_body("a<b>.jpg"))
    await counts_when(client, lambda c: c.get("done") == 1)
    [message] = slack.messages
    expected = (
        "<https://console.example/max-test2|create_object> max-test2/a&lt;b&gt;.jpg (qingstor)"
    )
    assert message["text"] == expected
    assert block(message, "section")["text"]["text"] == expected


def test_a_template_naming_an_undefined_variable_is_a_config_error(tmp_path: Path):
    data = {"sinks": {"team": slack_sink("https://hooks.slack.invalid/x", template="{{ nope }}")}}
    with pytest.raises(ConfigError) as caught:
        build_config(data, base_dir=tmp_path, env={})
    [problem] = caught.value.problems
    assert problem.startswith("sinks.team.template: ") and "nope" in problem


def test_a_template_failing_on_a_sample_in_any_way_is_a_config_error(tmp_path: Path):
    data = {"sinks": {"team": slack_sink("https://hooks.slack.invalid/x", template="{{ 1/0 }}")}}
    with pytest.raises(ConfigError) as caught:
        build_config(data, base_dir=tmp_path, env={})
    assert caught.value.problems[0].startswith("sinks.team.template: ")


async def test_a_template_failing_at_send_time_falls_back_to_the_default(
    tmp_path: Path, start_relay, slack
):
    # Fine for the sample shapes (create_object, tupu-porn), undefined for a delete.
    template = '{{ {"create_object": "new", "tupu-porn": "reviewed"}[type] }} {{ key }}'
    config = relay_config(tmp_path, sinks={"team": slack_sink(slack.url, template=template)})
    client = await start_relay(config)
    with capture_logs() as logs:
        await client.post(HOOK, json=notifier_body("gone.txt", kind="delete_object"))
        await counts_when(client, lambda c: c.get("done") == 1)
    [message] = slack.messages
    assert message["text"] == ":wastebasket: Deleted *max-test2/gone.txt*"
    [failed] = [e for e in logs if e["event"] == "slack.template_failed"]
    assert failed["sink"] == "team" and failed["type"] == "delete_object"


def test_the_default_template_passes_its_own_check_and_reads_well():
    assert check_template(DEFAULT_SLACK_TEMPLATE) == DEFAULT_SLACK_TEMPLATE


def test_clipping_never_splits_an_entity_or_a_surrogate_pair():
    text = escape("a" * 10 + "&" * 10)
    for limit in range(5, 40):
        clipped = clip(text, limit)
        assert slack_length(clipped) <= limit
        assert re.fullmatch(r"a*(&amp;)*…?", clipped), clipped
    emoji = clip("😀" * 10, 6, escaped=False)
    assert emoji == "😀😀…" and slack_length(emoji) == 5
    assert escape("\ud800x\x00") == "\ufffdx\ufffd"


async def test_every_message_is_block_kit_as_slack_sdk_models_it(
    tmp_path: Path, start_relay, slack
):
    # Slack's own SDK as the judge of what relay sends: each block parsed by its models
    # and validated against their limits (header 150, section text 3000, 10 fields...).
    from slack_sdk.models.blocks import Block

    client = await start_relay(
        relay_config(tmp_path, sinks={"team": slack_sink(slack.url, rollup_threshold=3)})
    )
    hostile = ["x" * 5000, "<!channel> & <@U1|a>", "😀" * 400, "photos/ünïcode é.jpg", " "]
    # One at a time (single messages), then a burst that rolls up into a digest.
    for i, key in enumerate(hostile):
        body = notifier_body(key, request_id=f"single-{i}")
        assert (await client.post(HOOK, json=body)).status == 200
        await eventually(lambda n=i: len(slack.messages) > n)
    burst = [f"burst/{i}/" + "k" * 300 for i in range(12)]
    assert (await client.post(HOOK, json=notifier_body(*burst, request_id="burst"))).status == 200
    await eventually(lambda: sum("rolled up" in json.dumps(m) for m in slack.messages) >= 1)
    for message in slack.messages:
        assert isinstance(message["text"], str) and message["text"]
        assert len(message["blocks"]) <= 50
        for raw in message["blocks"]:
            block = Block.parse(raw)
            assert block is not None, raw
            block.validate_json()  # raises SlackObjectFormationError past a limit
