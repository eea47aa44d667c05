"""`kind: cloudevents`: CloudEvents 1.0 over HTTP, produced by the `cloudevents` SDK (the
reference library) in structured, batched and binary mode, and the cloud event buses'
documented storage events (tests/fixtures/README.md). The SDK also reads back what
relay stored and what it sends on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.http import (
    HTTPMessage,
    from_http_event,
    to_binary_event,
    to_structured_event,
)
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from relay.app import RUNTIME, STORE
from relay.errors import InvalidBody
from relay.sources.cloudevents import header_attribute
from tests.conftest import eventually, read_lines, relay_config, sample

TOKEN = "bus-token-for-the-tests"
SECRET = "an-hmac-secret-for-tests"
BATCH = "application/cloudevents-batch+json"
WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def ce_config(tmp_path: Path, **overrides: Any) -> Any:
    sections: dict[str, Any] = {
        "sources": {
            "bus": {"kind": "cloudevents", "token": TOKEN},
            "open": {"kind": "cloudevents"},
            "eb": {
                "kind": "cloudevents",
                "token": TOKEN,
                "token_header": "x-eventbridge-signature-token",
            },
            "signed": {
                "kind": "cloudevents",
                "hmac": {"secrets": [SECRET], "header": "X-Signature", "prefix": "sha256="},
            },
        },
        **overrides,
    }
    return relay_config(tmp_path, **sections)


def out(tmp_path: Path, name: str = "events") -> list[dict[str, Any]]:
    return read_lines(tmp_path / "out" / f"{name}.jsonl")


def event(n: int = 1, data: Any = None, **attributes: Any) -> CloudEvent:
    base = {
        "type": "com.example.object.created",
        "source": "https://example.com/storage",
        "id": f"evt-{n}",
        "time": WHEN,
        "datacontenttype": "application/json",
        **attributes,
    }
    return CloudEvent(base, {"n": n} if data is None else data)


def as_json(ce: CloudEvent) -> dict[str, Any]:
    """The event in the CloudEvents JSON format, as the SDK writes it."""
    written: dict[str, Any] = json.loads(JSONFormat().write(ce))
    return written


async def post(client: Any, message: HTTPMessage, source: str = "open", **kw: Any) -> Any:
    headers = {**message.headers, **kw.pop("headers", {})}
    return await client.post(f"/hooks/{source}", data=message.body, headers=headers, **kw)


# --- pure: header values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("Euro%20%E2%82%AC%20%F0%9F%98%80", "Euro € 😀"),  # the binding's own example
        ("euro%e2%82%ac", "euro€"),  # lower-case hex is accepted
        ("%41BC", "ABC"),  # needless encoding is accepted
        ('"quoted \\"old\\" sender"', 'quoted "old" sender'),  # RFC 7230 quoted-string
        ("plain/value:1", "plain/value:1"),
    ],
)
def test_header_values_are_read_as_the_binding_says(value, text):
    assert header_attribute("ce-subject", value) == text


def test_a_header_value_that_is_not_utf8_is_refused():
    with pytest.raises(InvalidBody) as refused:
        header_attribute("ce-subject", "%C0%A0")  # the binding's invalid example
    assert "ce-subject" in refused.value.message


# --- the three modes, produced by the SDK -----------------------------------------------------


async def test_structured_mode(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    ce = event(subject="photos/a.jpg")
    response = await post(client, to_structured_event(ce))
    assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})
    [line] = await eventually(lambda: out(tmp_path))
    assert line["source"] == "open"
    assert line["type"] == line["event_name"] == "com.example.object.created"
    assert line["subject"] == "photos/a.jpg"
    assert line["time"] == "2024-05-06T07:08:09Z"
    assert (line["bucket"], line["key"]) == (None, None)
    assert line["data"] == as_json(ce)
    # What relay keeps is a CloudEvent the SDK reads back as the one sent.
    back = JSONFormat().read(None, json.dumps(line["data"]))
    assert (back.get_id(), back.get_data()) == ("evt-1", {"n": 1})


async def test_binary_mode_keeps_the_event_as_the_json_format_writes_it(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    ce = event(subject="Euro € 😀 / 中文.txt", tenant="acme")
    message = to_binary_event(ce)
    assert message.headers["ce-subject"].startswith("Euro%20")  # the SDK encoded it
    response = await post(client, message)
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert line["data"] == as_json(ce)
    assert line["subject"] == "Euro € 😀 / 中文.txt"


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        ("application/octet-stream", b"\xff\x00\x01binary"),
        ("text/plain", "hello, 世界"),
        ("application/xml", "<object key='a.jpg'/>"),
    ],
)
async def test_binary_mode_data_of_any_media_type(tmp_path, start_relay, content_type, data):
    client = await start_relay(ce_config(tmp_path))
    ce = event(data=data, datacontenttype=content_type)
    response = await post(client, to_binary_event(ce))
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert line["data"] == as_json(ce)  # text as `data`, bytes as `data_base64`
    assert JSONFormat().read(None, json.dumps(line["data"])).get_data() == data


async def test_binary_mode_without_data(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    ce = CloudEvent({"specversion": "1.0", "id": "1", "source": "/s", "type": "ping"})
    message = to_binary_event(ce)
    assert message.body == b"" and "content-type" not in message.headers
    response = await client.post(
        "/hooks/open", headers=message.headers, skip_auto_headers=["Content-Type"]
    )
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert line["data"] == as_json(ce)
    assert "data" not in line["data"]


async def test_batched_mode(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    events = [event(n) for n in range(3)]
    body = "[" + ",".join(JSONFormat().write(e).decode() for e in events) + "]"
    headers = {"Content-Type": BATCH}
    response = await client.post("/hooks/open", data=body, headers=headers)
    assert await response.json() == {"accepted": 3, "duplicates": 0}
    again = await client.post("/hooks/open", data=body, headers=headers)
    assert await again.json() == {"accepted": 0, "duplicates": 3}
    empty = await client.post("/hooks/open", data="[]", headers=headers)
    assert await empty.json() == {"accepted": 0, "duplicates": 0}
    lines = await eventually(lambda: len(out(tmp_path)) == 3 and out(tmp_path))
    assert sorted(line["data"]["id"] for line in lines) == ["evt-0", "evt-1", "evt-2"]


async def test_dedupe_is_on_source_and_id_whatever_the_mode(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    ce = event(7)
    first = await post(client, to_binary_event(ce))
    # The producer's retry, now in structured mode, and with a later time: the same event.
    retry = await post(client, to_structured_event(event(7, time=datetime.now(UTC))))
    other_source = await post(client, to_structured_event(event(7, source="/elsewhere")))
    answers = [await r.json() for r in (first, retry, other_source)]
    assert answers == [
        {"accepted": 1, "duplicates": 0},
        {"accepted": 0, "duplicates": 1},
        {"accepted": 1, "duplicates": 0},
    ]
    assert (await client.app[STORE].counts())["events"] == 2


# --- the cloud buses' storage events -----------------------------------------------------------


async def test_alibaba_oss_event_maps_to_bucket_key_and_type(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    body = sample("cloudevents-oss.json")
    # EventBridge's HTTP target posts the complete event as plain JSON, the token in a
    # fixed header of the operator's choosing.
    response = await client.post(
        "/hooks/eb", json=body, headers={"x-eventbridge-signature-token": TOKEN}
    )
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert (line["bucket"], line["key"]) == ("******", "input/***********.csv")
    assert line["subject"] == "******/input/***********.csv"
    assert (line["type"], line["event_name"]) == ("create_object", "oss:ObjectCreated:PostObject")
    assert line["time"] == "2026-03-11T05:40:45.000Z"
    assert line["data"] == body


async def test_huawei_obs_event_maps_to_bucket_key_and_type(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    body = sample("cloudevents-obs.json")
    headers = {"Content-Type": "application/cloudevents+json", "Authorization": f"Bearer {TOKEN}"}
    response = await client.post("/hooks/bus", data=json.dumps(body), headers=headers)
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert (line["bucket"], line["key"]) == ("developer-test-example", "test.tar")
    assert (line["type"], line["event_name"]) == ("create_object", "OBS:DWR:ObjectCreated:PUT")
    assert line["time"] == "2026-09-30T03:24:43.167931174Z"


async def test_a_time_that_is_not_rfc3339_falls_back_sensibly(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    oss = sample("cloudevents-oss.json")
    oss["id"] = "other"
    oss["time"] = "2020-08-17T16:04:46.149Asia/Shanghai"  # as EventBridge's docs show it
    # Tencent's EventBridge writes epoch milliseconds; its COS data is not mapped.
    cos = {"specversion": "1.0", "id": "13a3f42d", "type": "cos:created:object",
           "source": "cos.cloud.tencent", "time": "1615430559146", "data": {}}  # fmt: skip
    for body in (oss, cos):
        response = await client.post("/hooks/open", json=body)
        assert await response.json() == {"accepted": 1, "duplicates": 0}
    lines = await eventually(lambda: len(out(tmp_path)) == 2 and out(tmp_path))
    by_source = {line["data"]["source"]: line for line in lines}
    assert by_source["acs.oss"]["time"] == "2026-03-11T05:40:45.000Z"  # data.eventTime
    assert by_source["cos.cloud.tencent"]["time"] == "2021-03-11T02:42:39.146Z"
    assert by_source["cos.cloud.tencent"]["type"] == "cos:created:object"
    assert by_source["cos.cloud.tencent"]["bucket"] is None


async def test_routes_match_mapped_types_and_cloudevent_types(tmp_path, start_relay):
    sinks = {n: {"kind": "file", "path": f"out/{n}.jsonl"} for n in ("created", "app", "all")}
    routes = [
        {"when": {"event_types": ["create_object"]}, "to": ["created"]},
        {"when": {"event_types": ["com.example.*"]}, "to": ["app"]},
        {"to": ["all"]},
    ]
    client = await start_relay(ce_config(tmp_path, sinks=sinks, routes=routes))
    for body in (sample("cloudevents-oss.json"), sample("cloudevents-obs.json")):
        assert (await client.post("/hooks/open", json=body)).status == 200
    assert (await post(client, to_structured_event(event()))).status == 200
    await eventually(lambda: len(out(tmp_path, "all")) == 3)
    await eventually(lambda: len(out(tmp_path, "created")) == 2 and len(out(tmp_path, "app")) == 1)
    assert sorted(line["data"]["source"] for line in out(tmp_path, "created")) == [
        "HC.OBS.DWR",
        "acs.oss",
    ]
    assert out(tmp_path, "app")[0]["type"] == "com.example.object.created"


async def test_relay_sends_a_bus_event_on_as_a_cloudevent_the_sdk_reads(
    tmp_path, start_relay, receiver
):
    sinks = {"app": {"kind": "http", "url": receiver.url, "format": "cloudevents-binary"}}
    client = await start_relay(ce_config(tmp_path, sinks=sinks, routes=[{"to": ["app"]}]))
    assert (await client.post("/hooks/open", json=sample("cloudevents-oss.json"))).status == 200
    [request] = await eventually(lambda: receiver.requests)
    sent = from_http_event(HTTPMessage(headers=request["headers"], body=request["body"]))
    assert sent.get_type() == "create_object"
    assert sent.get_extension("bucket") == "******"
    assert sent.get_extension("key") == "input/***********.csv"
    assert sent.get_extension("eventname") == "oss:ObjectCreated:PostObject"
    assert sent.get_data()["source"] == "acs.oss"  # the bus's event, whole


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "url", "headers", "status"),
    [
        ("bus", "/hooks/bus", {"Authorization": f"Bearer {TOKEN}"}, 200),
        ("bus", f"/hooks/bus?token={TOKEN}", {}, 200),
        ("bus", "/hooks/bus", {"X-Relay-Token": TOKEN}, 200),
        ("bus", "/hooks/bus", {}, 401),
        ("bus", "/hooks/bus", {"Authorization": "Bearer wrong"}, 401),
        ("eb", "/hooks/eb", {"x-eventbridge-signature-token": TOKEN}, 200),
        ("eb", "/hooks/eb", {"x-eventbridge-signature-token": "wrong"}, 401),
    ],
)
async def test_tokens(tmp_path, start_relay, source, url, headers, status):
    client = await start_relay(ce_config(tmp_path))
    message = to_structured_event(event())
    response = await client.post(url, data=message.body, headers={**message.headers, **headers})
    answer = await response.json()
    assert response.status == status, answer
    if status == 401:
        assert answer["error"] in ("missing_token", "invalid_token")
        assert TOKEN not in answer["message"]
        assert await client.app[STORE].counts() == {"events": 0}


def signature(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def test_an_hmac_over_the_body_is_checked(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    message = to_binary_event(event())
    good = await post(client, message, "signed", headers={"X-Signature": signature(message.body)})
    assert await good.json() == {"accepted": 1, "duplicates": 0}
    wrong = await post(client, message, "signed", headers={"X-Signature": signature(b"x")})
    missing = await post(client, message, "signed")
    assert [(r.status, (await r.json())["error"]) for r in (wrong, missing)] == [
        (401, "invalid_signature"),
        (401, "missing_signature"),
    ]


# --- bad input ------------------------------------------------------------------------------------


def _structured(body: Any) -> dict[str, Any]:
    return {"data": json.dumps(body), "headers": {"Content-Type": "application/cloudevents+json"}}


GOOD = {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}


@pytest.mark.parametrize(
    ("request_", "status", "code", "fragment"),
    [
        (_structured({"hello": "world"}), 400, "not_an_event", "specversion"),
        (_structured({**GOOD, "specversion": "0.3"}), 400, "invalid_event", "1.0"),
        (_structured({**GOOD, "id": ""}), 400, "invalid_event", "id"),
        (_structured({k: v for k, v in GOOD.items() if k != "type"}), 400, "invalid_event", "type"),
        (_structured({**GOOD, "data": 1, "data_base64": "AQ=="}), 400, "invalid_event", "both"),
        (_structured({**GOOD, "Bad-Name": "x"}), 400, "invalid_event", "lower-case"),
        (_structured({**GOOD, "ext": {"nested": 1}}), 400, "invalid_event", "ext"),
        (_structured([GOOD]), 400, "not_an_event", "a JSON object"),
        (
            {"data": json.dumps(GOOD), "headers": {"Content-Type": BATCH}},
            400,
            "not_an_event",
            "array",
        ),
        (
            {
                "data": json.dumps([GOOD, {**GOOD, "id": "2", "source": ""}]),
                "headers": {"Content-Type": BATCH},
            },
            400,
            "invalid_event",
            "event 2 of the batch",
        ),
        (
            {"data": "<e/>", "headers": {"Content-Type": "application/cloudevents+xml"}},
            415,
            "unsupported_media_type",
            "JSON format",
        ),
        (
            {
                "data": "{}",
                "headers": {
                    "ce-specversion": "1.0",
                    "ce-id": "1",
                    "ce-source": "/s",
                    "ce-type": "t",
                    "ce-subject": "%C0%A0",
                    "Content-Type": "application/json",
                },
            },
            400,
            "invalid_event",
            "ce-subject",
        ),
        (
            {
                "data": "{not json",
                "headers": {
                    "ce-specversion": "1.0",
                    "ce-id": "1",
                    "ce-source": "/s",
                    "ce-type": "t",
                    "Content-Type": "application/json",
                },
            },
            400,
            "invalid_json",
            "JSON",
        ),
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_nothing_is_stored(
    tmp_path, start_relay, request_, status, code, fragment
):
    client = await start_relay(ce_config(tmp_path))
    response = await client.post("/hooks/open", **request_)
    answer = await response.json()
    assert (response.status, answer["error"]) == (status, code), answer
    assert fragment in answer["message"]
    assert await client.app[STORE].counts() == {"events": 0}


async def test_a_wrong_credential_in_one_place_does_not_hide_the_right_one(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    message = to_structured_event(event())
    headers = {**message.headers, "Authorization": "Bearer something-a-proxy-added"}
    response = await client.post(f"/hooks/bus?token={TOKEN}", data=message.body, headers=headers)
    assert await response.json() == {"accepted": 1, "duplicates": 0}


BINARY = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ([("ce-id", "a"), ("ce-id", "b")], "more than once"),
        ([("ce-data", "x")], "not data"),
    ],
)
async def test_binary_headers_that_make_the_event_ambiguous_are_refused(
    tmp_path, start_relay, headers, fragment
):
    from multidict import CIMultiDict

    client = await start_relay(ce_config(tmp_path))
    sent = CIMultiDict([(k, v) for k, v in BINARY.items() if k != "ce-id"] + headers)
    sent.setdefault("ce-id", "1")
    response = await client.post("/hooks/open", data=b"{}", headers=sent)
    answer = await response.json()
    assert (response.status, answer["error"]) == (400, "invalid_event")
    assert fragment in answer["message"]
    assert await client.app[STORE].counts() == {"events": 0}


@pytest.mark.parametrize("value", ["!!!not base64", {"a": 1}, 12])
async def test_data_base64_must_be_base64(tmp_path, start_relay, value):
    client = await start_relay(ce_config(tmp_path))
    response = await client.post("/hooks/open", **_structured({**GOOD, "data_base64": value}))
    answer = await response.json()
    assert (response.status, answer["error"]) == (400, "invalid_event")
    assert "data_base64" in answer["message"]


@pytest.mark.parametrize("time", ["2024-01-01", "2024-01-01 00:00", "20240101T000000"])
async def test_a_time_that_is_iso_but_not_rfc3339_is_not_the_events_time(
    tmp_path, start_relay, time
):
    client = await start_relay(ce_config(tmp_path))
    response = await client.post("/hooks/open", **_structured({**GOOD, "time": time}))
    assert response.status == 200
    [line] = await eventually(lambda: out(tmp_path))
    assert line["time"] == line["received_at"]
    assert line["data"]["time"] == time  # kept as sent


async def test_a_refused_binary_event_is_quarantined_in_the_json_format(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    headers = {**BINARY, "ce-specversion": "0.3", "ce-subject": "a%20b",
               "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}  # fmt: skip
    response = await client.post("/hooks/bus", data=b'{"payload": 1}', headers=headers)
    assert response.status == 400
    await client.app[RUNTIME].finish_quarantine()
    [kept] = list(await client.app[STORE].quarantined())
    assert kept.content_type == "application/cloudevents+json"
    assert json.loads(kept.body) == {
        "specversion": "0.3", "id": "1", "source": "/s", "type": "t", "subject": "a b",
        "datacontenttype": "application/json", "data": {"payload": 1},
    }  # fmt: skip
    assert TOKEN.encode() not in kept.body


def test_a_ce_header_cannot_carry_the_token_or_the_signature(tmp_path):
    from relay.errors import ConfigError

    for source in (
        {"kind": "cloudevents", "token": TOKEN, "token_header": "ce-token"},
        {"kind": "cloudevents", "hmac": {"secrets": [SECRET], "header": "Ce-Signature"}},
    ):
        with pytest.raises(ConfigError) as refused:
            ce_config(tmp_path, sources={"b": source})
        assert "CloudEvents attribute" in str(refused.value)


async def test_an_s3_body_posted_here_is_named_in_the_refusal(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    response = await client.post("/hooks/open", json=sample("minio-put.json"))
    answer = await response.json()
    assert (response.status, answer["error"]) == (400, "not_an_event")
    assert "kind: s3" in answer["message"]


async def test_binary_mode_names_the_missing_header(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    headers = {k: v for k, v in BINARY.items() if k != "ce-type"}
    response = await client.post("/hooks/open", data=b"{}", headers=headers)
    answer = await response.json()
    assert response.status == 400 and "missing ce-type" in answer["message"]


async def test_a_time_in_epoch_milliseconds_as_a_number(tmp_path, start_relay):
    client = await start_relay(ce_config(tmp_path))
    body = {**GOOD, "time": 1615430559146}
    assert (await client.post("/hooks/open", json=body)).status == 200
    [line] = await eventually(lambda: out(tmp_path))
    assert line["time"] == "2021-03-11T02:42:39.146Z"


def test_only_sources_without_a_token_or_signature_count_as_open(tmp_path):
    from relay.exposure import open_sources

    config = ce_config(
        tmp_path,
        sources={
            "open_bus": {"kind": "cloudevents"},
            "token_bus": {"kind": "cloudevents", "token": TOKEN},
            "signed_bus": {"kind": "cloudevents", "hmac": {"secrets": [SECRET]}},
            "open_minio": {"kind": "s3"},
            "minio": {"kind": "s3", "token": TOKEN},
        },
    )
    assert sorted(open_sources(config)) == ["open_bus", "open_minio"]


def test_token_header_without_a_token_is_a_config_error(tmp_path):
    from relay.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        ce_config(tmp_path, sources={"b": {"kind": "cloudevents", "token_header": "X-Api-Key"}})
    assert "sources.b" in str(refused.value) and "token" in str(refused.value)
