"""The HTTP sink against a real local receiver: signing, formats, answers, pacing."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import unquote

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary
from cloudevents.core.formats.json import JSONFormat
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from relay.app import STORE
from relay.sinks.base import parse_retry_after
from relay.sinks.http import encode, judge_response
from relay.store import Selection
from tests.conftest import SAMPLE_ID, TOKEN, eventually, notifier_body, relay_config, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"
SECRET_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_B = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24="
FAST = {"max_attempts": 5, "initial": "10ms", "max": "50ms"}


def parse_cloudevent(request):
    headers = {k.lower(): v for k, v in request["headers"].items()}
    return from_http_event(HTTPMessage(headers=headers, body=request["body"]))


def http(url: str, **extra):
    return {"kind": "http", "url": url, "retry": FAST, **extra}


async def counts_when(store, predicate):
    value = await store.counts()
    return value if predicate(value) else None


async def test_signatures_verify_with_the_reference_library_for_every_secret(
    tmp_path, start_relay, receiver
):
    config = relay_config(
        tmp_path, sinks={"app": http(receiver.url, signing_secret=[SECRET_A, SECRET_B])}
    )
    client = await start_relay(config)
    await client.post(HOOK, json=sample())
    [request] = await eventually(lambda: receiver.requests)
    headers = request["headers"]
    assert len(headers["webhook-signature"].split(" ")) == 2
    # A receiver holding either secret accepts it: rotation without downtime.
    for secret in (SECRET_A, SECRET_B):
        payload = Webhook(secret).verify(request["body"], headers)
        assert payload["id"] == headers["webhook-id"]
    with pytest.raises(Exception, match=r"(?i)signature"):
        Webhook("whsec_" + "d3Jvbmcgc2VjcmV0").verify(request["body"], headers)


async def test_a_retried_delivery_keeps_its_id_and_is_signed_afresh(
    tmp_path, start_relay, receiver
):
    receiver.statuses = [503, 200]
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, signing_secret=SECRET_A)})
    )
    await client.post(HOOK, json=sample())
    await eventually(lambda: len(receiver.requests) == 2)
    first, second = (r["headers"] for r in receiver.requests)
    assert first["webhook-id"] == second["webhook-id"]
    for request in receiver.requests:
        Webhook(SECRET_A).verify(request["body"], request["headers"])


async def test_cloudevents_structured_mode_parses_with_the_sdk(tmp_path, start_relay, receiver):
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, format="cloudevents")})
    )
    await client.post(HOOK, json=sample())
    [request] = await eventually(lambda: receiver.requests)
    assert request["headers"]["Content-Type"] == "application/cloudevents+json"
    event = parse_cloudevent(request)
    assert event.get_specversion() == "1.0"
    assert event.get_id() == request["headers"]["webhook-id"]
    assert (event.get_source(), event.get_type()) == ("qingstor", "create_object")
    assert event.get_time() == datetime(2021, 8, 31, 6, 25, 46, tzinfo=UTC)
    assert event.get_subject() == "max-test2/abc/5.mp4"
    assert event.get_data() == sample()["events"][0]


async def test_cloudevents_binary_mode_parses_with_the_sdk(tmp_path, start_relay, receiver):
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, format="cloudevents-binary")})
    )
    key = "图片/猫 100%.jpg"
    await client.post(HOOK, json=notifier_body(key))
    [request] = await eventually(lambda: receiver.requests)
    headers = request["headers"]
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-id"] == headers["webhook-id"]
    assert unquote(headers["ce-key"]) == key  # percent-encoded, per the HTTP binding
    event = parse_cloudevent(request)
    assert (event.get_type(), event.get_source()) == ("create_object", "qingstor")
    assert event.get_extension("key") == key
    assert event.get_data()["qingstor"]["object"]["name"] == key


# Keys that a header carries wrongly unless percent-encoded: HTTP strips spaces and tabs
# at either end of a value, `"` and `%` are the binding's own escapes, and the rest is
# not printable ASCII.
AWKWARD_KEYS = [
    "report.pdf ",
    " report.pdf",
    "  ",
    "\treport\t.pdf\t",
    'say "hi".txt',
    "100% done %41 %zz.txt",
    "a+b=c&d?e#f.txt",
    "图片/猫 1.jpg",
    "emoji 🎉👩‍👩‍👧.png",
    "line\nbreak\r.txt",
    "del\x7fnul\x01.txt",
]
BUCKET = "max-test2"
# CloudEvents HTTP binding 3.1.3.2, independently of either encoder: printable ASCII but
# space, `"` and `%`, or %XX.
HEADER_VALUE = re.compile(r"(?:[!#$&-~]|%[0-9A-F]{2})*")


@pytest.mark.parametrize("format_", ["cloudevents-binary", "cloudevents"])
async def test_object_keys_round_trip_exactly_through_the_sdk(
    tmp_path, start_relay, receiver, format_
):
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, format=format_)})
    )
    answer = await client.post(HOOK, json=notifier_body(*AWKWARD_KEYS))
    assert answer.status == 200
    await eventually(lambda: len(receiver.requests) == len(AWKWARD_KEYS))
    received = {}
    for request in receiver.requests:
        event = parse_cloudevent(request)
        received[event.get_extension("key")] = event
        if format_ == "cloudevents-binary":
            ce = {k.lower(): v for k, v in request["headers"].items() if k.lower()[:3] == "ce-"}
            assert all(HEADER_VALUE.fullmatch(value) for value in ce.values()), ce
            # The SDK's own sending side encodes every string attribute the same way.
            reference = to_binary(event, JSONFormat()).headers
            for name in ("ce-id", "ce-source", "ce-type", "ce-subject", "ce-bucket", "ce-key"):
                assert ce[name] == reference[name]
    assert sorted(received) == sorted(AWKWARD_KEYS)
    for key, event in received.items():
        assert event.get_subject() == f"{BUCKET}/{key}"
        assert event.get_extension("bucket") == BUCKET
        assert event.get_data()["qingstor"]["object"]["name"] == key


# Every spelling fromisoformat reads, as notifier validation lets through: the instant
# each means, a time without an offset read as UTC.
EVENT_TIMES = {
    "2021-08-31T06:25:46": datetime(2021, 8, 31, 6, 25, 46, tzinfo=UTC),
    "2021-08-31": datetime(2021, 8, 31, tzinfo=UTC),
    "20210831T062546Z": datetime(2021, 8, 31, 6, 25, 46, tzinfo=UTC),
    "2021-08-31 06:25:46Z": datetime(2021, 8, 31, 6, 25, 46, tzinfo=UTC),
    "2021-08-31T14:25:46+08:00": datetime(2021, 8, 31, 6, 25, 46, tzinfo=UTC),
    "2021-08-30T22:25:46.250-08:00": datetime(2021, 8, 31, 6, 25, 46, 250000, tzinfo=UTC),
    "2021-08-31T06:25:46.000Z": datetime(2021, 8, 31, 6, 25, 46, tzinfo=UTC),
}


@pytest.mark.parametrize("format_", ["cloudevents-binary", "cloudevents"])
async def test_cloudevents_time_is_rfc3339_utc_whatever_qingstor_spelled(
    tmp_path, start_relay, receiver, format_
):
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, format=format_)})
    )
    body = notifier_body(*EVENT_TIMES)  # each spelling's record keyed by the spelling
    for record in body["events"]:
        record["event_time"] = record["qingstor"]["object"]["name"]
    assert (await client.post(HOOK, json=body)).status == 200
    await eventually(lambda: len(receiver.requests) == len(EVENT_TIMES))
    for request in receiver.requests:
        event = parse_cloudevent(request)
        spelling = event.get_extension("key")
        assert event.get_time() == EVENT_TIMES[spelling]
        assert event.get_time().utcoffset() == timedelta(0)
        sent = (
            unquote(request["headers"]["ce-time"])
            if format_ == "cloudevents-binary"
            else json.loads(request["body"])["time"]
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", sent)
        # The record itself is QingStor's, as it sent it.
        assert event.get_data()["event_time"] == spelling


async def test_the_envelope_format_keeps_the_time_as_sent(tmp_path, start_relay, receiver):
    client = await start_relay(relay_config(tmp_path, sinks={"app": http(receiver.url)}))
    body = notifier_body("a.txt")
    body["events"][0]["event_time"] = "2021-08-31T14:25:46+08:00"
    await client.post(HOOK, json=body)
    [request] = await eventually(lambda: receiver.requests)
    envelope = json.loads(request["body"])
    assert envelope["time"] == envelope["data"]["event_time"] == "2021-08-31T14:25:46+08:00"


@pytest.mark.parametrize(
    "stored",
    [
        "yesterday",
        "",
        # Valid, but no UTC instant fits in a datetime: sent as it is, still RFC 3339.
        "0001-01-01T00:00:00+08:00",
        "9999-12-31T23:59:59-08:00",
    ],
)
@pytest.mark.parametrize("format_", ["cloudevents-binary", "cloudevents"])
def test_a_time_that_will_not_convert_is_sent_as_it_is(format_, stored):
    # No source stores such a time; the mapping is total anyway, so that an envelope
    # stored by some other version can never make every send of it fail.
    envelope = {"id": "evt_1", "source": "s", "type": "t", "time": stored, "data": {}}
    body, headers = encode(format_, json.dumps(envelope))
    sent = headers["ce-time"] if format_ == "cloudevents-binary" else json.loads(body)["time"]
    assert unquote(sent) == stored


async def test_410_dead_letters_at_once_and_reports_the_sink_gone(tmp_path, start_relay, receiver):
    receiver.statuses = [410]
    client = await start_relay(relay_config(tmp_path, sinks={"app": http(receiver.url)}))
    with capture_logs() as logs:
        await client.post(HOOK, json=sample())
        await eventually(lambda: counts_when(client.app[STORE], lambda c: c.get("dead") == 1))
        await eventually(lambda: [e for e in logs if e["event"] == "sink.gone"])
    assert len(receiver.requests) == 1
    assert [e["sink"] for e in logs if e["event"] == "sink.gone"] == ["app"]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 301, 302, 307])
async def test_other_4xx_are_permanent_after_one_request(tmp_path, start_relay, receiver, status):
    receiver.statuses = [status]
    client = await start_relay(relay_config(tmp_path, sinks={"app": http(receiver.url)}))
    await client.post(HOOK, json=sample())
    await eventually(lambda: counts_when(client.app[STORE], lambda c: c.get("dead") == 1))
    await asyncio.sleep(0.1)
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
async def test_transient_answers_are_retried(tmp_path, start_relay, receiver, status):
    receiver.statuses = [status]
    client = await start_relay(relay_config(tmp_path, sinks={"app": http(receiver.url)}))
    await client.post(HOOK, json=sample())
    await eventually(lambda: counts_when(client.app[STORE], lambda c: c.get("done") == 1))
    assert len(receiver.requests) == 2


async def test_retry_after_is_honoured_over_a_shorter_backoff(tmp_path, start_relay, receiver):
    receiver.statuses = [(429, {"Retry-After": "1"}), (503, {"Retry-After": "1"})]
    client = await start_relay(relay_config(tmp_path, sinks={"app": http(receiver.url)}))
    await client.post(HOOK, json=sample())
    await eventually(lambda: len(receiver.requests) == 3, within=10)
    times = [r["at"] for r in receiver.requests]
    assert times[1] - times[0] >= 0.95
    assert times[2] - times[1] >= 0.95


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120
    date = format_datetime(datetime.fromtimestamp(now, UTC) + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30)
    past = format_datetime(datetime.fromtimestamp(now - 60, UTC), usegmt=True)
    assert parse_retry_after(past, now) == 0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("99999999999", now) == 86400
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after("-3", now) == 0
    assert parse_retry_after("inf", now) is None


def test_judge_response_table():
    now = 0.0
    assert judge_response(204, None, "", now).result == "done"
    gone = judge_response(410, None, "bye", now)
    assert (gone.result, gone.gone) == ("dead", True)
    assert judge_response(404, "5", "", now).result == "dead"
    throttled = judge_response(503, "7", "", now)
    assert (throttled.result, throttled.retry_after) == ("retry", 7)
    # Retry-After only means something on the statuses that throttle.
    assert judge_response(500, "7", "", now).retry_after is None


async def test_concurrency_bounds_requests_in_flight(tmp_path, start_relay, receiver):
    receiver.hang = True
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, concurrency=3, timeout="30s")})
    )
    for i in range(6):
        await client.post(HOOK, json=notifier_body(f"k{i}", request_id=f"r{i}"))
    await eventually(lambda: len(receiver.requests) == 3)
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 3


async def test_rate_limit_spaces_requests(tmp_path, start_relay, receiver):
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, rate_limit="10/s")})
    )
    await client.post(HOOK, json=notifier_body(*[f"k{i}" for i in range(6)]))
    await eventually(lambda: len(receiver.requests) == 6)
    times = sorted(r["at"] for r in receiver.requests)
    # Six sends at 10/s take at least half a second from first to last.
    assert times[-1] - times[0] >= 0.45


async def test_headers_are_sent_and_cannot_override_the_event_id(tmp_path, start_relay, receiver):
    config = relay_config(
        tmp_path,
        sinks={"app": http(receiver.url, headers={"Authorization": "Bearer t", "webhook-id": "x"})},
    )
    client = await start_relay(config)
    await client.post(HOOK, json=sample())
    [request] = await eventually(lambda: receiver.requests)
    assert request["headers"]["Authorization"] == "Bearer t"
    assert request["headers"]["webhook-id"] == json.loads(request["body"])["id"]


async def test_max_age_dead_letters_an_old_delivery_at_its_next_failure(
    tmp_path, start_relay, receiver
):
    receiver.statuses = [500] * 100
    retry = {"max_attempts": 100, "initial": "50ms", "max": "50ms", "max_age": "300ms"}
    client = await start_relay(
        relay_config(
            tmp_path,
            sinks={
                "app": {
                    "kind": "http",
                    "url": receiver.url,
                    "retry": retry,
                    "circuit": {"enabled": False},  # keep sending: this test is about age
                }
            },
        )
    )
    started = time.monotonic()
    await client.post(HOOK, json=sample())
    await eventually(lambda: counts_when(client.app[STORE], lambda c: c.get("dead") == 1))
    assert time.monotonic() - started < 5
    [letter] = await client.app[STORE].dead_letters(Selection(everything=True))
    assert "max_age" in (letter.last_error or "")


async def test_retry_after_holds_the_whole_sink_not_just_one_delivery(
    tmp_path, start_relay, receiver
):
    receiver.statuses = [(429, {"Retry-After": "1"})]
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, concurrency=1)})
    )
    await client.post(HOOK, json=notifier_body("a", "b", "c"))
    await eventually(lambda: len(receiver.requests) == 4)
    first, *rest = [r["at"] for r in receiver.requests]
    # After the 429 nothing at all goes out for a second, then everything does.
    assert min(rest) - first >= 0.95


async def test_throttling_does_not_open_the_circuit(tmp_path, start_relay, receiver):
    receiver.statuses = [(429, {"Retry-After": "0"})] * 4
    sink = http(receiver.url, concurrency=1, circuit={"failures": 2, "cooldown": "1h"})
    client = await start_relay(relay_config(tmp_path, sinks={"app": sink}))
    with capture_logs() as logs:
        await client.post(HOOK, json=sample())
        await eventually(lambda: counts_when(client.app[STORE], lambda c: c.get("done") == 1))
    assert len(receiver.requests) == 5
    assert not [e for e in logs if e["event"].startswith("circuit.")]


async def test_a_gone_sink_pauses_and_keeps_the_rest_pending(tmp_path, start_relay, receiver):
    receiver.statuses = [410]
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": http(receiver.url, concurrency=1)})
    )
    await client.post(HOOK, json=notifier_body("a", "b", "c"))
    store = client.app[STORE]
    await eventually(lambda: counts_when(store, lambda c: c.get("dead") == 1))
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 1  # paused: no more sends after the 410
    assert await store.counts() == {"events": 3, "dead": 1, "pending": 2}
    stats = await store.sink_stats()
    assert stats["app"].gone is True
    metrics = await (await client.get("/metrics")).text()
    assert 'relay_sink_gone{sink="app"} 1.0' in metrics


async def test_a_malformed_answer_never_puts_the_url_in_the_stored_error(tmp_path, start_relay):
    secret = "PATHSECRET123"

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook/{secret}?token={secret}"
    try:
        client = await start_relay(relay_config(tmp_path, sinks={"app": http(url)}))
        await client.post(HOOK, json=sample())
        store = client.app[STORE]

        async def stored_error():
            record = await store.event(SAMPLE_ID)
            errors = [d.last_error for d in record.deliveries if d.last_error] if record else []
            return errors[0] if errors else None

        error = await eventually(stored_error)
        assert secret not in error
    finally:
        server.close()
        await server.wait_closed()


async def test_an_unpadded_signing_secret_signs_what_the_reference_verifies(
    tmp_path, start_relay, receiver
):
    unpadded = "whsec_" + "c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24"  # SECRET_B without its "="
    config = relay_config(tmp_path, sinks={"app": http(receiver.url, signing_secret=unpadded)})
    client = await start_relay(config)
    await client.post(HOOK, json=sample())
    [request] = await eventually(lambda: receiver.requests)
    # The same key as the padded spelling: either verifies it with the reference library.
    for secret in (unpadded, SECRET_B):
        assert Webhook(secret).verify(request["body"], request["headers"])["id"]
