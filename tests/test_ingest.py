"""POST /hooks/{source} against relay on a real socket: answers, dedupe, bad input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import ClientSession
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from relay.app import STORE
from relay.config import RelayConfig
from tests.conftest import TOKEN, eventually, notifier_body, read_lines, relay_config, sample

HOOK = f"/hooks/qingstor?token={TOKEN}"


async def _if(awaitable, predicate):
    value = await awaitable
    return value if predicate(value) else None


async def test_documented_sample_posted_four_times_is_one_event_in_each_sink(
    tmp_path: Path, start_relay, receiver
):
    config = relay_config(
        tmp_path,
        sinks={
            "archive": {"kind": "file", "path": "out/events.jsonl"},
            "app": {"kind": "http", "url": receiver.url},
        },
    )
    client = await start_relay(config)
    answers = []
    for _ in range(4):  # the first POST and three of QingStor's retries
        response = await client.post(HOOK, json=sample())
        answers.append((response.status, await response.json()))
    assert answers == [
        (200, {"accepted": 1, "duplicates": 0}),
        (200, {"accepted": 0, "duplicates": 1}),
        (200, {"accepted": 0, "duplicates": 1}),
        (200, {"accepted": 0, "duplicates": 1}),
    ]
    out = tmp_path / "out" / "events.jsonl"
    await eventually(lambda: read_lines(out) and receiver.requests)
    store = client.app[STORE]
    counts = await eventually(lambda: _if(store.counts(), lambda c: c.get("done") == 2))
    assert counts == {"events": 1, "done": 2}

    [line] = read_lines(out)
    [posted] = receiver.bodies()
    assert line == posted
    record = sample()["events"][0]
    assert line["data"] == record  # the original record, untouched
    assert line["type"] == "create_object"
    assert line["source"] == "qingstor"
    assert line["bucket"] == "max-test2"
    assert line["key"] == "abc/5.mp4"
    assert line["subject"] == "max-test2/abc/5.mp4"
    assert line["time"] == "2021-08-31T06:25:46.000Z"
    assert line["id"].startswith("evt_")
    headers = receiver.requests[0]["headers"]
    assert headers["webhook-id"] == line["id"] == headers["Idempotency-Key"]


async def test_two_record_post_is_two_events_and_its_retry_adds_none(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    body = notifier_body("a/1.jpg", "a/2.jpg", kind="delete_object")
    first = await client.post(HOOK, json=body)
    assert (first.status, await first.json()) == (200, {"accepted": 2, "duplicates": 0})
    retry = await client.post(HOOK, json=body)
    assert (retry.status, await retry.json()) == (200, {"accepted": 0, "duplicates": 2})

    out = tmp_path / "out" / "events.jsonl"
    lines = await eventually(lambda: len(read_lines(out)) == 2 and read_lines(out))
    assert sorted(line["key"] for line in lines) == ["a/1.jpg", "a/2.jpg"]
    assert len({line["id"] for line in lines}) == 2
    assert (await client.app[STORE].counts())["events"] == 2


async def test_same_record_twice_in_one_body_counts_once(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    body = notifier_body("x.txt", "x.txt")
    response = await client.post(HOOK, json=body)
    assert await response.json() == {"accepted": 1, "duplicates": 1}


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("complete_upload", "complete_multipart"),
        ("complete_multipart", "complete_multipart"),
        ("abort_upload", "abort_multipart"),
        ("abort_multipart", "abort_multipart"),
    ],
)
async def test_both_multipart_spellings_are_accepted_and_normalized(
    tmp_path, start_relay, spelling, expected
):
    config = relay_config(
        tmp_path, routes=[{"when": {"event_types": [expected]}, "to": ["archive"]}]
    )
    client = await start_relay(config)
    response = await client.post(HOOK, json=notifier_body("big.iso", kind=spelling))
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: read_lines(tmp_path / "out" / "events.jsonl"))
    assert line["type"] == expected
    assert line["data"]["event_type"] == spelling


async def test_tupu_porn_result_is_one_event_deduped_on_its_nonce(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    body = sample("tupu-porn-result.json")
    for expected in ({"accepted": 1, "duplicates": 0}, {"accepted": 0, "duplicates": 1}):
        response = await client.post(HOOK, json=body)
        assert await response.json() == expected
    body["result"]["nonce"] = "another-review"
    response = await client.post(HOOK, json=body)
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    lines = await eventually(
        lambda: (
            len(read_lines(tmp_path / "out/events.jsonl")) == 2
            and read_lines(tmp_path / "out/events.jsonl")
        )
    )
    assert {line["type"] for line in lines} == {"tupu-porn"}
    assert lines[0]["subject"] == "fakebucket/porn.jpeg"
    assert lines[0]["time"] == "2017-06-28T11:03:17.834Z"


def _with_image_source(tmp_path: Path) -> RelayConfig:
    return relay_config(
        tmp_path,
        sources={
            "qingstor": {"kind": "qingstor", "token": TOKEN},
            "thumbs": {"kind": "qingstor", "token": TOKEN, "cloudfunc": "image"},
        },
    )


async def test_image_results_only_on_a_source_declared_cloudfunc_image(tmp_path, start_relay):
    config = _with_image_source(tmp_path)
    client = await start_relay(config)
    body = {"bucket": "media", "object": "a.png", "width": 120, "anything": [1, 2]}
    refused = await client.post(HOOK, json=body)
    assert refused.status == 400
    assert (await refused.json())["error"] == "not_an_event"
    taken = await client.post(f"/hooks/thumbs?token={TOKEN}", json=body)
    assert await taken.json() == {"accepted": 1, "duplicates": 0}
    [line] = await eventually(lambda: read_lines(tmp_path / "out/events.jsonl"))
    assert (line["type"], line["source"], line["data"]) == ("image", "thumbs", body)


@pytest.mark.parametrize("depth", [990, 1020, 400_000])
async def test_deeply_nested_bodies_are_a_400_never_a_5xx_or_a_crash(tmp_path, start_relay, depth):
    # Up to 1,024 levels orjson reads what the standard library then cannot write back
    # (the image source's id, any envelope); far deeper, old orjson crashed the process.
    config = _with_image_source(tmp_path)
    client = await start_relay(config)
    nested = "[" * depth + "]" * depth
    record = json.dumps(sample()["events"][0])[:-1] + f', "deep": {nested}}}'
    for path, body in (
        (HOOK, f'{{"events": [{record}]}}'),
        (f"/hooks/thumbs?token={TOKEN}", f'{{"bucket": "b", "object": "k", "x": {nested}}}'),
    ):
        response = await client.post(path, data=body, headers={"Content-Type": "application/json"})
        assert response.status == 400, (path, await response.text())
        assert (await response.json())["error"] == "invalid_json"
    assert await client.app[STORE].counts() == {"events": 0}
    assert (await client.post(HOOK, json=sample())).status == 200


async def test_token_in_header_works_like_the_query_parameter(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    response = await client.post("/hooks/qingstor", json=sample(), headers={"X-Relay-Token": TOKEN})
    assert response.status == 200


def _bad_requests(limit: int):
    record = sample()["events"][0]
    wrong_size = json.loads(json.dumps(record))
    wrong_size["qingstor"]["object"]["size"] = "big"
    wrong_name = json.loads(json.dumps(record))
    wrong_name["qingstor"]["object"]["name"] = 42
    no_request_id = json.loads(json.dumps(record))
    del no_request_id["response_elements"]
    ok = json.dumps(sample())
    json_header = {"Content-Type": "application/json"}
    return [
        # (id, method, path, body, headers, status, error)
        ("missing token", "POST", "/hooks/qingstor", ok, json_header, 401, "missing_token"),
        (
            "wrong token",
            "POST",
            "/hooks/qingstor?token=nope",
            ok,
            json_header,
            401,
            "invalid_token",
        ),
        ("malformed json", "POST", HOOK, '{"events": [', json_header, 400, "invalid_json"),
        ("empty body", "POST", HOOK, "", json_header, 400, "invalid_json"),
        (
            "not json at all",
            "POST",
            HOOK,
            "<html></html>",
            {"Content-Type": "text/html"},
            415,
            "unsupported_media_type",
        ),
        ("NaN is not json", "POST", HOOK, '{"events": [NaN]}', json_header, 400, "invalid_json"),
        (
            "wrong size type",
            "POST",
            HOOK,
            json.dumps({"events": [wrong_size]}),
            json_header,
            400,
            "invalid_event",
        ),
        (
            "wrong name type",
            "POST",
            HOOK,
            json.dumps({"events": [wrong_name]}),
            json_header,
            400,
            "invalid_event",
        ),
        (
            "missing request id",
            "POST",
            HOOK,
            json.dumps({"events": [no_request_id]}),
            json_header,
            400,
            "invalid_event",
        ),
        (
            "events not a list",
            "POST",
            HOOK,
            '{"events": {"a": 1}}',
            json_header,
            400,
            "invalid_event",
        ),
        ("empty events", "POST", HOOK, '{"events": []}', json_header, 400, "invalid_event"),
        ("json array", "POST", HOOK, "[1, 2, 3]", json_header, 400, "not_an_event"),
        (
            "json object, not an event",
            "POST",
            HOOK,
            '{"hello": "world"}',
            json_header,
            400,
            "not_an_event",
        ),
        (
            "body over the limit",
            "POST",
            HOOK,
            json.dumps({"pad": "x" * limit}),
            json_header,
            413,
            "body_too_large",
        ),
        (
            "unknown source",
            "POST",
            f"/hooks/nosuch?token={TOKEN}",
            ok,
            json_header,
            404,
            "unknown_source",
        ),
        ("unknown path", "POST", "/elsewhere", ok, json_header, 404, "not_found"),
        ("wrong method", "GET", HOOK, None, {}, 405, "method_not_allowed"),
        ("wrong method put", "PUT", HOOK, ok, json_header, 405, "method_not_allowed"),
    ]


LIMIT = 4096


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "error"),
    [case[1:] for case in _bad_requests(LIMIT)],
    ids=[case[0] for case in _bad_requests(LIMIT)],
)
async def test_bad_input_gets_its_status_and_error_body_and_stores_nothing(
    tmp_path, start_relay, method, path, body, headers, status, error
):
    client = await start_relay(relay_config(tmp_path, server={"max_body_bytes": LIMIT}))
    response = await client.request(method, path, data=body, headers=headers)
    assert response.status == status
    answer = await response.json()
    assert answer["error"] == error
    assert set(answer) == {"error", "message"} and answer["message"]
    assert "X-Request-Id" in response.headers
    assert TOKEN not in json.dumps(answer)

    assert await client.app[STORE].counts() == {"events": 0}
    assert not (tmp_path / "out" / "events.jsonl").exists()
    healthy = await client.get("/healthz")
    assert healthy.status == 200
    good = await client.post(HOOK, json=sample())
    assert await good.json() == {"accepted": 1, "duplicates": 0}


async def test_chunked_body_over_the_limit_is_cut_off_with_413(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path, server={"max_body_bytes": LIMIT}))

    async def trickle():
        yield b'{"events": ['
        for _ in range(100):
            yield b" " * 1024

    response = await client.post(HOOK, data=trickle())
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"
    assert await client.app[STORE].counts() == {"events": 0}


async def test_allow_ips_refuses_other_addresses_with_403(tmp_path, start_relay):
    config = relay_config(
        tmp_path,
        sources={"qingstor": {"kind": "qingstor", "token": TOKEN, "allow_ips": ["10.0.0.0/8"]}},
    )
    client = await start_relay(config)
    response = await client.post(HOOK, json=sample())
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"

    config = relay_config(
        tmp_path / "b",
        sources={"qingstor": {"kind": "qingstor", "token": TOKEN, "allow_ips": ["127.0.0.0/8"]}},
    )
    allowed = await start_relay(config)
    assert (await allowed.post(HOOK, json=sample())).status == 200


async def test_store_that_cannot_persist_answers_503_and_recovers(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    store = client.app[STORE]
    # A real SQLITE_FULL: cap the database at its current size, as a full disk would.
    pages = await store._run(lambda: store.db.execute("PRAGMA page_count").fetchone()[0])
    await store._run(lambda: store.db.execute(f"PRAGMA max_page_count={pages}"))
    big = notifier_body(*[f"k/{i}-{'x' * 200}" for i in range(200)])
    response = await client.post(HOOK, json=big)
    assert response.status == 503
    assert (await response.json())["error"] == "store_unavailable"
    assert response.headers["Retry-After"] == "1"
    assert await store.counts() == {"events": 0}

    await store._run(lambda: store.db.execute("PRAGMA max_page_count=1073741823"))
    response = await client.post(HOOK, json=big)
    assert await response.json() == {"accepted": 200, "duplicates": 0}


async def test_readyz_reports_the_store(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    assert (await client.get("/readyz")).status == 200
    await client.app[STORE]._run(client.app[STORE]._close)
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["error"] == "not_ready"
    await client.app[STORE]._run(lambda: client.app[STORE]._open(False))


async def test_request_id_is_echoed_or_made(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    given = await client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert given.headers["X-Request-Id"] == "abc-123"
    hostile = await client.get("/healthz", headers={"X-Request-Id": "a b\u00e9"})
    assert hostile.headers["X-Request-Id"] != "a b\u00e9"
    assert len(hostile.headers["X-Request-Id"]) == 32


async def test_raw_socket_garbage_never_costs_a_5xx(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    bodies = [
        b"\xff\xfe\x00",
        b"\xef\xbb\xbf{}",
        b'{"events": [null]}',
        b'"\\ud800"',
        b'{"events": [{"qingstor": null}]}',
        b"9" * 5000,
        b"[" * 100000,
        b'{"bucket": 1, "object": 2, "result": 3}',
    ]
    async with ClientSession() as session:
        for body in bodies:
            async with session.post(
                client.make_url(HOOK), data=body, headers={"Content-Type": "application/json"}
            ) as response:
                assert 400 <= response.status < 500, body[:20]
                assert set(await response.json()) == {"error", "message"}
    assert await client.app[STORE].counts() == {"events": 0}


async def test_undecodable_token_header_is_a_401_not_a_crash(tmp_path, start_relay):
    import socket

    client = await start_relay(relay_config(tmp_path))
    raw = (
        b"POST /hooks/qingstor HTTP/1.1\r\nHost: x\r\nX-Relay-Token: \xff\xfe\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", client.port), timeout=5) as sock:
            sock.sendall(raw)
            chunks = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
            return b"".join(chunks)

    answer = await asyncio.to_thread(exchange)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    assert b'"invalid_token"' in answer


async def test_one_log_line_per_request_with_its_request_id(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    with capture_logs(processors=[merge_contextvars]) as logs:
        await client.post(HOOK, json=sample(), headers={"X-Request-Id": "req-1"})
        await client.post("/hooks/qingstor?token=wrong", json=sample())
        await client.get("/healthz")
    lines = [e for e in logs if e["event"] == "request"]
    assert [(e["status"], e["log_level"]) for e in lines] == [
        (200, "info"),
        (401, "info"),
        (200, "debug"),  # probes are quiet unless they fail
    ]
    first, second, _ = lines
    assert first["request_id"] == "req-1"
    assert (first["source"], first["accepted"], first["duplicates"]) == ("qingstor", 1, 0)
    assert first["path"] == "/hooks/qingstor"  # the query string, with its token, stays out
    assert second["request_id"] != "req-1" and "accepted" not in second
    assert second["error"] == "invalid_token" and "error" not in first
    assert all("wrong" not in str(value) for e in logs for value in e.values())


@pytest.mark.parametrize(
    "escape",
    ["\\ud800", "\\udfff", "x\\udc00y", "\\ude00\\ud83d"],  # alone, or in wrong order
)
async def test_a_lone_surrogate_escape_in_an_object_name_is_invalid_json(
    tmp_path, start_relay, escape
):
    client = await start_relay(relay_config(tmp_path))
    record = json.dumps(sample()["events"][0]).replace("abc/5.mp4", f"abc/{escape}.mp4")
    body = '{"events": [' + record + "]}"
    response = await client.post(HOOK, data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    answer = await response.json()
    assert answer["error"] == "invalid_json"
    assert "surrogate" in answer["message"]
    assert await client.app[STORE].counts() == {"events": 0}
    # A proper pair is an ordinary character, kept exactly.
    paired = record.replace(f"abc/{escape}.mp4", "abc/\\ud83d\\ude00.mp4")
    ok = await client.post(HOOK, data='{"events": [' + paired + "]}")
    assert (await ok.json()) == {"accepted": 1, "duplicates": 0}


@pytest.mark.parametrize("declared", [";0*", "application/json; charset*", ";", "text/plain;a*"])
async def test_a_content_type_the_standard_library_cannot_parse_costs_no_500(
    tmp_path, start_relay, declared
):
    # aiohttp reads Content-Type with the email package, which raises on these (found
    # by hypothesis): the answer is as for any other label.
    client = await start_relay(relay_config(tmp_path))
    empty = await client.post(HOOK, data=b"", headers={"Content-Type": declared})
    assert (empty.status, (await empty.json())["error"]) == (400, "invalid_json")
    body = json.dumps(sample()).encode()
    taken = await client.post(HOOK, data=body, headers={"Content-Type": declared})
    assert (taken.status, await taken.json()) == (200, {"accepted": 1, "duplicates": 0})
