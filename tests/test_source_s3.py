"""`kind: s3`: S3 event notifications (AWS's format, MinIO's webhook, Ceph's HTTP push).

The bodies are the stores' documented samples (tests/fixtures/README.md); keys are
encoded the way the senders encode them, by the standard library's quote_plus (Go's
url.QueryEscape, which MinIO uses, escapes the same set), never by relay's own code.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.app import STORE
from relay.errors import InvalidBody
from relay.sinks.chat.events import event_facts
from relay.sources.s3 import decode_key
from relay.vocabulary import s3_event_name, s3_type
from tests.conftest import eventually, read_lines, relay_config, sample

TOKEN = "minio-auth-token-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def s3_config(tmp_path: Path, **overrides: Any) -> Any:
    sections: dict[str, Any] = {
        "sources": {
            "minio": {"kind": "s3", "token": TOKEN},
            "ceph": {"kind": "s3"},
        },
        **overrides,
    }
    return relay_config(tmp_path, **sections)


def out(tmp_path: Path, name: str = "events") -> list[dict[str, Any]]:
    return read_lines(tmp_path / "out" / f"{name}.jsonl")


def minio_body(
    key: str,
    *,
    bucket: str = "images",
    name: str = "s3:ObjectCreated:Put",
    sequencer: str = "15C32494527B46C5",
) -> dict[str, Any]:
    """MinIO's documented body for another object: `Key` decoded, the record's key
    query-escaped as MinIO escapes it."""
    body = sample("minio-put.json")
    record = body["Records"][0]
    body["EventName"] = record["eventName"] = name
    body["Key"] = f"{bucket}/{key}"
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"]["key"] = quote_plus(key, safe="")
    record["s3"]["object"]["sequencer"] = sequencer
    if name.startswith("s3:ObjectRemoved:"):
        for field in ("size", "eTag", "contentType", "userMetadata"):  # as MinIO leaves out
            del record["s3"]["object"][field]
    return body


# --- pure: keys and names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "key"),
    [
        ("red+flower.jpg", "red flower.jpg"),  # AWS's own example
        ("a%2Bb.txt", "a+b.txt"),
        ("users%2FABC", "users/ABC"),  # MinIO escapes the slash
        ("photos/2024/a+b.png", "photos/2024/a b.png"),  # AWS leaves it
        ("%E4%B8%AD%E6%96%87/%E6%8A%A5%E5%91%8A.pdf", "中文/报告.pdf"),
        ("100%25+done", "100% done"),
        ("plain.txt", "plain.txt"),
    ],
)
def test_keys_are_decoded_as_the_senders_encode_them(encoded, key):
    assert decode_key(encoded) == key


@given(st.text(min_size=1, max_size=60).filter(lambda k: "\x00" not in k))
def test_any_key_minio_or_aws_encodes_comes_back_whole(key):
    assert decode_key(quote_plus(key, safe="")) == key  # MinIO (Go's QueryEscape)
    assert decode_key(quote_plus(key, safe="/")) == key  # AWS


def test_a_key_whose_escapes_are_not_utf8_is_refused():
    with pytest.raises(InvalidBody) as refused:
        decode_key("bad%C0%A0key")
    assert refused.value.code == "invalid_event"


@pytest.mark.parametrize(
    ("record_name", "name", "kind"),
    [
        ("ObjectCreated:Put", "s3:ObjectCreated:Put", "create_object"),  # AWS: no prefix
        ("s3:ObjectCreated:Post", "s3:ObjectCreated:Post", "create_object"),  # MinIO
        ("ObjectCreated:Copy", "s3:ObjectCreated:Copy", "create_object"),
        (
            "s3:ObjectCreated:CompleteMultipartUpload",
            "s3:ObjectCreated:CompleteMultipartUpload",
            "complete_multipart",
        ),
        ("ObjectRemoved:Delete", "s3:ObjectRemoved:Delete", "delete_object"),
        (
            "ObjectRemoved:DeleteMarkerCreated",
            "s3:ObjectRemoved:DeleteMarkerCreated",
            "delete_object",
        ),
        (
            "LifecycleExpiration:Delete",
            "s3:LifecycleExpiration:Delete",
            "s3:LifecycleExpiration:Delete",
        ),
        ("ObjectRestore:Completed", "s3:ObjectRestore:Completed", "s3:ObjectRestore:Completed"),
        ("s3:ObjectAccessed:Get", "s3:ObjectAccessed:Get", "s3:ObjectAccessed:Get"),
    ],
)
def test_s3_names_map_to_relays_words_where_they_mean_the_same(record_name, name, kind):
    assert s3_event_name(record_name) == name
    assert s3_type(name) == kind


# --- on a real socket ----------------------------------------------------------------------


async def test_the_aws_sample_becomes_one_envelope(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    body = sample("s3-aws-put.json")
    response = await client.post("/hooks/ceph", json=body)
    assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})
    [line] = await eventually(lambda: out(tmp_path))
    assert line["source"] == "ceph"
    assert line["type"] == "create_object"
    assert line["event_name"] == "s3:ObjectCreated:Put"
    assert line["time"] == "1970-01-01T00:00:00.000Z"
    assert (line["bucket"], line["key"], line["subject"]) == (
        "mybucket",
        "HappyFace.jpg",
        "mybucket/HappyFace.jpg",
    )
    assert line["data"] == body["Records"][0]  # the record untouched


async def test_minio_reposts_are_duplicates(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    body = sample("minio-put.json")
    answers = []
    # MinIO's queue re-posts an event every 3 s until it is answered: the same body.
    for _ in range(4):
        response = await client.post("/hooks/minio", json=body, headers=BEARER)
        answers.append(await response.json())
    assert answers == [{"accepted": 1, "duplicates": 0}] + [{"accepted": 0, "duplicates": 1}] * 3
    [line] = await eventually(lambda: out(tmp_path))
    assert (line["bucket"], line["key"], line["type"]) == ("images", "myphoto.jpg", "create_object")
    assert line["event_name"] == "s3:ObjectCreated:Put"
    assert (await client.app[STORE].counts())["events"] == 1


async def test_another_change_to_the_same_object_is_a_new_event(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    first = minio_body("a.jpg", sequencer="15C32494527B46C5")
    again = minio_body("a.jpg", sequencer="15C32494527B46C6")  # overwritten a moment later
    removed = minio_body("a.jpg", name="s3:ObjectRemoved:Delete", sequencer="15C32494527B46C7")
    for body in (first, again, removed):
        response = await client.post("/hooks/minio", json=body, headers=BEARER)
        assert await response.json() == {"accepted": 1, "duplicates": 0}
    lines = await eventually(lambda: len(out(tmp_path)) == 3 and out(tmp_path))
    assert [line["type"] for line in lines] == ["create_object", "create_object", "delete_object"]
    assert len({line["id"] for line in lines}) == 3


@pytest.mark.parametrize(
    "key",
    ["my photo.jpg", "a+b.jpg", "中文/报告 2024.pdf", "100%.txt", "dir/sub dir/x%2By+z"],
)
async def test_url_encoded_keys_arrive_decoded_and_the_record_untouched(tmp_path, start_relay, key):
    client = await start_relay(s3_config(tmp_path))
    body = minio_body(key)
    response = await client.post("/hooks/minio", json=body, headers=BEARER)
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert line["key"] == key
    assert line["subject"] == f"images/{key}"
    assert line["subject"] == body["Key"]  # MinIO's own decoded form agrees
    assert line["data"]["s3"]["object"]["key"] == quote_plus(key, safe="")


async def test_ceph_keys_are_taken_as_they_are(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    body = sample("ceph-put.json")
    body["Records"][0]["s3"]["object"]["key"] = "reports/a+b 100%.json"  # Ceph sends it raw
    response = await client.post("/hooks/ceph", json=body)
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert (line["bucket"], line["key"]) == ("jayanth", "reports/a+b 100%.json")
    assert (line["type"], line["event_name"]) == ("create_object", "s3:ObjectCreated:Put")
    assert line["time"] == "2024-04-21T10:03:18.419013Z"


async def test_key_encoding_can_be_set_for_a_store_relay_does_not_know(tmp_path, start_relay):
    config = s3_config(tmp_path, sources={"other": {"kind": "s3", "key_encoding": "raw"}})
    client = await start_relay(config)
    body = sample("s3-aws-put.json")
    body["Records"][0]["s3"]["object"]["key"] = "a+b.jpg"
    response = await client.post("/hooks/other", json=body)
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert line["key"] == "a+b.jpg"


async def test_one_message_with_several_records_is_several_events(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    body = sample("s3-aws-put.json")
    template = body["Records"][0]
    body["Records"] = []
    for n in range(3):
        record = copy.deepcopy(template)
        record["eventName"] = "ObjectRemoved:Delete"  # one DeleteObjects request, 3 keys
        record["s3"]["object"] = {"key": f"old/{n}.log", "sequencer": f"0055AED6DCD9028{n}"}
        body["Records"].append(record)
    response = await client.post("/hooks/ceph", json=body)
    assert await response.json() == {"accepted": 3, "duplicates": 0}
    lines = await eventually(lambda: len(out(tmp_path)) == 3 and out(tmp_path))
    assert sorted(line["key"] for line in lines) == ["old/0.log", "old/1.log", "old/2.log"]
    assert {line["type"] for line in lines} == {"delete_object"}


async def test_the_s3_test_event_is_answered_and_stores_nothing(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    response = await client.post("/hooks/ceph", json=sample("s3-test-event.json"))
    assert (response.status, await response.json()) == (200, {"accepted": 0, "duplicates": 0})
    assert await client.app[STORE].counts() == {"events": 0}


@pytest.mark.parametrize(
    ("headers", "url", "code"),
    [
        ({}, "/hooks/minio", "missing_token"),
        ({"Authorization": "Bearer not-the-token"}, "/hooks/minio", "invalid_token"),
        ({"Authorization": f"Basic {TOKEN}"}, "/hooks/minio", "missing_token"),
        ({}, "/hooks/minio?token=wrong", "invalid_token"),
    ],
)
async def test_a_wrong_or_missing_token_is_refused(tmp_path, start_relay, headers, url, code):
    client = await start_relay(s3_config(tmp_path))
    response = await client.post(url, json=sample("minio-put.json"), headers=headers)
    answer = await response.json()
    assert (response.status, answer["error"]) == (401, code)
    assert TOKEN not in answer["message"]
    assert "Authorization: Bearer" in answer["message"]
    assert await client.app[STORE].counts() == {"events": 0}


async def test_the_token_may_come_in_the_url_as_for_qingstor(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    response = await client.post(f"/hooks/minio?token={TOKEN}", json=sample("minio-put.json"))
    assert await response.json() == {"accepted": 1, "duplicates": 0}


async def test_head_answers_the_probe_of_older_minio(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    assert (await client.head("/hooks/minio", headers=BEARER)).status == 200
    assert (await client.head("/hooks/minio")).status == 401
    assert (await client.head("/hooks/nowhere")).status == 404
    assert await client.app[STORE].counts() == {"events": 0}


def _no_records(body: dict[str, Any]) -> None:
    del body["Records"]


def _no_name(body: dict[str, Any]) -> None:
    del body["Records"][0]["eventName"]


def _bad_time(body: dict[str, Any]) -> None:
    body["Records"][0]["eventTime"] = "yesterday"


def _bad_escape(body: dict[str, Any]) -> None:
    body["Records"][0]["s3"]["object"]["key"] = "x%FF.jpg"


@pytest.mark.parametrize(
    ("spoil", "code", "fragment"),
    [
        (_no_records, "not_an_event", "Records"),
        (_no_name, "invalid_event", "eventName"),
        (_bad_time, "invalid_event", "eventTime"),
        (_bad_escape, "invalid_event", "UTF-8"),
    ],
)
async def test_bad_bodies_get_a_clear_400_and_nothing_is_stored(
    tmp_path, start_relay, spoil, code, fragment
):
    client = await start_relay(s3_config(tmp_path))
    body = sample("minio-put.json")
    spoil(body)
    response = await client.post("/hooks/minio", json=body, headers=BEARER)
    answer = await response.json()
    assert (response.status, answer["error"]) == (400, code)
    assert fragment in answer["message"]
    assert await client.app[STORE].counts() == {"events": 0}


async def test_routes_match_relays_type_or_the_s3_name(tmp_path, start_relay):
    sinks = {
        name: {"kind": "file", "path": f"out/{name}.jsonl"}
        for name in ("created", "removed", "multipart", "big", "everything")
    }
    routes = [
        {"when": {"event_types": ["create_object"]}, "to": ["created"]},
        {"when": {"event_types": ["s3:ObjectRemoved:*"]}, "to": ["removed"]},
        {
            "when": {"event_types": ["s3:ObjectCreated:CompleteMultipartUpload"]},
            "to": ["multipart"],
        },
        {"when": {"min_size": 5000}, "to": ["big"]},
        {"to": ["everything"]},
    ]
    client = await start_relay(s3_config(tmp_path, sinks=sinks, routes=routes))
    bodies = [
        minio_body("put.jpg"),  # size 6474 in the sample
        minio_body("gone.jpg", name="s3:ObjectRemoved:Delete", sequencer="1"),
        minio_body("big.bin", name="s3:ObjectCreated:CompleteMultipartUpload", sequencer="2"),
    ]
    for body in bodies:
        response = await client.post("/hooks/minio", json=body, headers=BEARER)
        assert await response.json() == {"accepted": 1, "duplicates": 0}
    await eventually(lambda: len(out(tmp_path, "everything")) == 3)

    def keys(name: str) -> list[str]:
        return sorted(line["key"] for line in out(tmp_path, name))

    await eventually(lambda: len(keys("big")) == 2)
    assert keys("created") == ["put.jpg"]  # complete_multipart is not create_object
    assert keys("removed") == ["gone.jpg"]
    assert keys("multipart") == ["big.bin"]
    assert keys("big") == ["big.bin", "put.jpg"]


def test_chat_messages_tell_an_s3_objects_size():
    envelope = {
        "type": "create_object",
        "bucket": "images",
        "key": "myphoto.jpg",
        "data": sample("minio-put.json")["Records"][0],
    }
    facts = dict(event_facts(envelope).facts)
    assert facts["Size"] == "6.3 KiB (6,474 bytes)"
    # Ceph's older records write the size as a string.
    envelope["data"]["s3"]["object"]["size"] = "1024"
    assert dict(event_facts(envelope).facts)["Size"].startswith("1.0 KiB")


def _curl(url: str, body_file: Path, *headers: str) -> dict[str, Any]:
    args = ["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json"]
    for header in headers:
        args += ["-H", header]
    done = subprocess.run(
        [*args, "--data-binary", f"@{body_file}", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


async def test_curl_posting_as_minio_does(tmp_path, start_relay):
    if shutil.which("curl") is None:
        if os.environ.get("CI"):
            pytest.fail("curl is not installed; .ci/run installs it")
        pytest.skip("curl is not installed (.ci/run installs it)")
    client = await start_relay(s3_config(tmp_path))
    url = str(client.make_url("/hooks/minio"))
    body_file = tmp_path / "minio.json"
    body_file.write_bytes((Path(__file__).parent / "fixtures" / "minio-put.json").read_bytes())
    bearer = f"Authorization: Bearer {TOKEN}"
    first = await asyncio.to_thread(_curl, url, body_file, bearer)
    again = await asyncio.to_thread(_curl, url, body_file, bearer)
    wrong = await asyncio.to_thread(_curl, url, body_file, "Authorization: Bearer nope")
    assert (first, again) == ({"accepted": 1, "duplicates": 0}, {"accepted": 0, "duplicates": 1})
    assert wrong["error"] == "invalid_token"
    [line] = await eventually(lambda: out(tmp_path))
    assert line["subject"] == "images/myphoto.jpg"


async def test_fields_relay_does_not_need_are_not_judged(tmp_path, start_relay):
    # MinIO re-posts a refused event every 3 s for ever, its queue held behind it: a
    # field written oddly must not cost a 400.
    client = await start_relay(s3_config(tmp_path))
    body = minio_body("odd.bin")
    record = body["Records"][0]
    record["s3"]["object"].update(size="big", eTag=7, versionId=None, sequencer=12345)
    record["responseElements"] = "none"
    record["eventSource"] = ["minio"]
    response = await client.post("/hooks/minio", json=body, headers=BEARER)
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    again = await client.post("/hooks/minio", json=body, headers=BEARER)
    assert await again.json() == {"accepted": 0, "duplicates": 1}
    [line] = await eventually(lambda: out(tmp_path))
    assert line["key"] == "odd.bin" and line["data"] == record


async def test_a_bucket_event_without_an_object_key(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    body = minio_body("x", name="s3:BucketCreated:*")
    del body["Records"][0]["s3"]["object"]
    response = await client.post("/hooks/minio", json=body, headers=BEARER)
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: out(tmp_path))
    assert (line["bucket"], line["key"], line["subject"]) == ("images", None, "images")
    assert line["type"] == line["event_name"] == "s3:BucketCreated:*"


async def test_an_empty_records_list_is_answered_and_stores_nothing(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    response = await client.post("/hooks/ceph", json={"Records": []})
    assert (response.status, await response.json()) == (200, {"accepted": 0, "duplicates": 0})


async def test_too_many_records_are_refused_before_any_is_read(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    # Empty objects: validating each would be the expensive part, and is not done.
    body = '{"Records": [' + ",".join(["{}"] * 300_000) + "]}"
    response = await client.post("/hooks/ceph", data=body)
    answer = await response.json()
    assert (response.status, answer["error"]) == (413, "too_many_records")
    assert "300000" in answer["message"]


@pytest.mark.parametrize(
    ("body", "hint"),
    [
        ({"Type": "Notification", "TopicArn": "arn:aws:sns:x", "Message": "{}"}, "SNS"),
        (sample("cloudevents-oss.json"), "kind: cloudevents"),
        (sample("notifier-create_object.json"), "kind: qingstor"),
    ],
)
async def test_another_senders_body_is_named_in_the_refusal(tmp_path, start_relay, body, hint):
    client = await start_relay(s3_config(tmp_path))
    response = await client.post("/hooks/ceph", json=body)
    answer = await response.json()
    assert (response.status, answer["error"]) == (400, "not_an_event")
    assert hint in answer["message"]


async def test_a_two_word_auth_token_is_told_to_be_a_bearer_token(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    headers = {"Authorization": f"Token {TOKEN}"}  # MinIO sends two words as they are
    response = await client.post("/hooks/minio", json=sample("minio-put.json"), headers=headers)
    answer = await response.json()
    assert (response.status, answer["error"]) == (401, "missing_token")
    assert "Bearer <token>" in answer["message"] and TOKEN not in answer["message"]


async def test_a_path_naming_the_kind_instead_of_the_source_says_so(tmp_path, start_relay):
    client = await start_relay(s3_config(tmp_path))
    response = await client.post("/hooks/s3", json=sample("minio-put.json"))
    answer = await response.json()
    assert (response.status, answer["error"]) == (404, "unknown_source")
    assert "not its kind" in answer["message"]
