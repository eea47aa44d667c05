"""Property-based tests of POST /hooks/{source}: whatever a sender posts, relay answers 200
{"accepted": n, "duplicates": m} or a 4xx {"error", "message"}, never a 5xx, never logs an
unhandled error, and a refused POST stores nothing.

How Hypothesis meets asyncio here: pytest-asyncio (which pytest-aiohttp builds on, in
`asyncio_mode = auto`) recognises an `async def` test decorated with `@given` and runs each
example's coroutine on the test's own event loop. So relay's app and its aiohttp test server
are built once per test function, by an ordinary async fixture on that same loop, and every
example posts to that one server over a real socket: no nested loop, no thread, no mocked
client. Sharing the fixture across examples is deliberate (hence the suppressed
HealthCheck.function_scoped_fixture): the store accumulates events from example to example,
so each example checks the change in the store's counts, never absolute numbers.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from relay.app import STORE
from tests.conftest import TOKEN, notifier_body, relay_config, sample

# Every cloudfunc, so a document meets each branch of QingStorSource.parse.
SOURCES: dict[str, dict[str, Any]] = {
    "qingstor": {"kind": "qingstor", "token": TOKEN},
    "notifier": {"kind": "qingstor", "token": TOKEN, "cloudfunc": "notifier"},
    "tupu": {"kind": "qingstor", "token": TOKEN, "cloudfunc": "tupu-porn"},
    "thumbs": {"kind": "qingstor", "token": TOKEN, "cloudfunc": "image"},
    # Other stores' kinds (S3 records, CloudEvents) meet the same hostile input.
    "minio": {"kind": "s3", "token": TOKEN},
    "bus": {"kind": "cloudevents", "token": TOKEN},
}
# Raised so that 5,000-record bodies reach validation and the store rather than stopping
# at the size check (test_limits covers the defaults refusing them).
SERVER = {"max_body_bytes": 16 * 1024 * 1024, "max_records": 5000}
# Every routing condition, so each is judged on hostile envelopes; the catch-all after it
# keeps exactly one delivery per event, which post_checked counts on.
ROUTES = [
    {
        "when": {
            "event_types": ["create_object", "complete_upload"],
            "buckets": ["max-test2"],
            "keys": ["*.mp4", "a/*"],
            "sources": ["qingstor", "notifier"],
            "notification_ids": ["mp4-notify"],
            "prefixes": ["abc/", "a/"],
            "suffixes": [".mp4", ".jpg"],
            "min_size": 1,
            "max_size": 2**63,
            "not": {"keys": ["*secret*"], "min_size": 10**12},
        },
        "to": ["archive"],
    },
    {"to": ["archive"]},
]

# A longer hunt than CI affords: RELAY_FUZZ_SCALE=20 pytest tests/test_fuzz.py
SCALE = int(os.environ.get("RELAY_FUZZ_SCALE", "1"))
FUZZ = settings(
    max_examples=150 * SCALE,
    deadline=None,  # one example is a real HTTP round trip and, on a 200, an fsync
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture
async def relay(tmp_path: Path, start_relay: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await start_relay(
        relay_config(tmp_path, sources=SOURCES, server=SERVER, routes=ROUTES)
    )
    return client


# --- posting and the properties every answer must have ----------------------------------


def _deliveries(counts: dict[str, int]) -> int:
    # States move (pending -> done) in the background while examples run; totals do not,
    # since pruning runs once at start-up and keep_done is an hour.
    return sum(n for state, n in counts.items() if state != "events")


async def post_checked(
    client: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    *,
    source: str,
    body: bytes,
    content_type: str | None,
    token_in_header: bool = False,
    events_if_accepted: int | None = None,
    extra_headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST `body` and assert what holds for every answer; return status and JSON body.

    `events_if_accepted`: how many events the body holds if relay takes it, when the test
    knows; a 200 must then count each of them as accepted or duplicate."""
    path, headers = f"/hooks/{source}", dict(extra_headers or {})
    if token_in_header:
        headers["X-Relay-Token"] = TOKEN
    else:
        path += f"?token={TOKEN}"
    skip: list[str] = []
    if content_type is None:
        skip.append("Content-Type")  # else aiohttp labels bytes application/octet-stream
    else:
        headers["Content-Type"] = content_type
    store = client.app[STORE]
    before = await store.counts()
    caplog.clear()
    with capture_logs() as logs:
        async with client.post(
            path, data=body, headers=headers, skip_auto_headers=skip
        ) as response:
            status, raw = response.status, await response.read()
    after = await store.counts()

    events = [entry["event"] for entry in logs]
    assert "request.unhandled" not in events, logs
    assert not [e for e in logs if e.get("log_level") in ("error", "critical")], logs
    # aiohttp and asyncio log through the standard library, outside structlog.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

    assert status == 200 or 400 <= status < 500, (status, raw[:300])
    answer = json.loads(raw)
    # Shown by --hypothesis-show-statistics: how much of the input got past each check.
    if currently_in_test_context():
        event(f"{status} {answer.get('error', '')}")
    if status == 200:
        assert set(answer) == {"accepted", "duplicates"}, answer
        accepted, duplicates = answer["accepted"], answer["duplicates"]
        assert type(accepted) is int and type(duplicates) is int
        # Nothing at all only for a document that holds no event: an empty S3
        # `Records` or CloudEvents batch, S3's test event.
        assert accepted >= 0 and duplicates >= 0
        if events_if_accepted is not None:
            assert accepted + duplicates == events_if_accepted, answer
        # Stored whole: each new event with its one delivery (ROUTES end in a catch-all).
        assert after["events"] - before["events"] == accepted, (before, after)
        assert _deliveries(after) - _deliveries(before) == accepted, (before, after)
    else:
        assert set(answer) == {"error", "message"}, answer
        assert all(type(v) is str and v for v in answer.values()), answer
        assert after["events"] == before["events"], (status, answer, before, after)
        assert _deliveries(after) == _deliveries(before), (status, answer, before, after)
    return status, answer


def events_in(document: Any, source: str) -> int | None:
    """How many events a 200 for `document` must count; None when it cannot be a 200."""
    kind = SOURCES[source]["kind"]
    if kind == "cloudevents":
        return len(document) if isinstance(document, list) else 1
    if not isinstance(document, dict):
        return None
    if kind == "s3":
        records = document.get("Records")
        return len(records) if isinstance(records, list) else 0
    cloudfunc = SOURCES[source].get("cloudfunc")
    events = document.get("events")
    if cloudfunc in (None, "notifier") and "events" in document and isinstance(events, list):
        return len(events)
    return 1


# --- what senders might send ---------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text spliced into a document as is: what json.dumps cannot or will not write
    (NaN, 10,000 levels of nesting, numbers past the int conversion limit)."""

    text: str


_MARK = "\ue000raw{}\ue000"
# Replaced by `encode` with a value never used before; in an example, where an id goes.
FRESH = "fresh-id"
_fresh = itertools.count()


def encode(document: Any, *, ensure_ascii: bool = True, encoding: str = "utf-8") -> bytes:
    raws: list[str] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return _MARK.format(len(raws) - 1)
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(document), ensure_ascii=ensure_ascii)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_MARK.format(i), ensure_ascii=ensure_ascii), raw, 1)
    text = text.replace(FRESH, f"fresh-{next(_fresh)}")
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8, as a buggy sender's.
    return text.encode(encoding, "surrogatepass")


DEEP = 10_000
# Controls, line and paragraph separators, bidi overrides and isolates, BOMs and
# non-characters, lone surrogates, an astral character, JSON's own escapes.
NASTY_CHARS = (
    "\x00\x01\x08\t\n\x1b\x1f\x7f\x85\u2028\u2029\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    '\u2066\u2067\u2068\u2069\ufeff\ufffe\uffff\ud800\udbff\udc00\udfff\U0001f600"\\/'
)
nasty_text = st.text(st.sampled_from(NASTY_CHARS) | st.characters(), max_size=12)

NASTY_VALUES: list[Any] = [
    None,
    True,
    "",
    " ",
    "null",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-0",
    "0x1F",
    "2021-13-45T25:61:61Z",
    "\ufeff2021-08-31T06:25:46.000Z",
    "\u202eabc/5.mp4",
    "x" * 100_000,
    10**400,
    -(10**400),
    2**63,
    2**64,
    -(2**63) - 1,
    -1,
    -0.0,
    1e308,
    5e-324,
    [],
    {},
    [None],
    {"": None},
    Raw("NaN"),
    Raw("-Infinity"),
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1e-400"),
    Raw("1" + "0" * 5000),  # past Python's 4,300-digit int conversion limit
    Raw("1" + "0" * 5000 + ".5"),
    Raw("[" * DEEP + "]" * DEEP),
    Raw('{"a":' * DEEP + "null" + "}" * DEEP),
    Raw('"\\ud800"'),  # an escaped lone surrogate: valid JSON text, not valid Unicode
    Raw('"\\udc00\\ud800"'),
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    nasty_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(nasty_text, children, max_size=4)
    ),
    max_leaves=12,
)
nasty_values = st.sampled_from(NASTY_VALUES) | json_values

CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            None,
            "application/json",
            "application/json; charset=utf-8",
            "application/json; charset=utf-16",
            "APPLICATION/JSON",
            "application/cloudevents+json",
            "application/octet-stream",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain",
            'text/html; charset="',
            "",
            ";",
            "json",
            "*/*",
            "application/json;;;charset",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)
sources = st.sampled_from(list(SOURCES))
# Top-level keys that send a document down the notifier or tupu-porn branch of parsing.
QINGSTOR_KEYS = st.sampled_from(["events", "result", "bucket", "object"])
# How a sender might put its text on the wire: a BOM before the body, or another encoding
# (json.loads detects UTF-16 and UTF-32 on bytes; orjson does not). Half of the bodies are
# plain UTF-8, so that most still reach the schema and the store.
PREFIXES = st.just(b"") | st.sampled_from(
    [b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf", b" \r\n\t", b"\x00"]
)
ENCODINGS = st.just("utf-8") | st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-32"])

BASES: list[Callable[[], dict[str, Any]]] = [
    sample,
    lambda: sample("tupu-porn-result.json"),
    lambda: notifier_body("a/1.jpg", "a/2.jpg", kind="delete_object"),
    lambda: notifier_body("big.iso", kind="complete_upload"),
]
# The sources that take each kind of base unmutated; "thumbs" takes any object.
_TAKERS = {"notifier": ["qingstor", "notifier", "thumbs"], "tupu": ["qingstor", "tupu", "thumbs"]}


def _fresh_base(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid body whose identity `encode` makes new at each post, and a source that
    would take it: otherwise nearly every 200 would be a duplicate or a wrong source, the
    store path untried, and a replayed example (shrinking) a duplicate of itself."""
    document = copy.deepcopy(draw(st.sampled_from(BASES))())
    if "events" in document:
        kind = "notifier"
        for record in document["events"]:
            record["response_elements"]["request_id"] = FRESH
    else:
        kind = "tupu"
        document["result"]["nonce"] = FRESH
    # Now and then a source that must refuse it, whole.
    source = draw(st.sampled_from(_TAKERS[kind]) | sources)
    return source, document


def _draw_path(draw: st.DrawFn, document: Any) -> list[Any]:
    """A path from the root to some node, drawn one step at a time so that a list of
    5,000 records costs one integer, not 5,000 candidate paths."""
    path: list[Any] = []
    node = document
    while isinstance(node, dict | list) and node:
        step = (
            draw(st.sampled_from(list(node)))
            if isinstance(node, dict)
            else draw(st.integers(0, len(node) - 1))
        )
        path.append(step)
        node = node[step]
        if not draw(st.booleans()):
            break
    return path


def _decorate(draw: st.DrawFn, key: str) -> str:
    extra = draw(st.text(st.sampled_from(NASTY_CHARS), min_size=1, max_size=3))
    at = draw(st.integers(0, len(key)))
    return key[:at] + extra + key[at:]


def _nasty_value(draw: st.DrawFn) -> Any:
    # A copy: NASTY_VALUES' lists and dicts must not change when a later mutation edits
    # inside them, or the strategy would draw differently on replay.
    return copy.deepcopy(draw(nasty_values))


def mutate(draw: st.DrawFn, document: dict[str, Any]) -> None:
    path = _draw_path(draw, document)
    if not path:  # everything was deleted already
        document[draw(nasty_text)] = _nasty_value(draw)
        return
    parent: Any = document
    for step in path[:-1]:
        parent = parent[step]
    key = path[-1]
    op = draw(st.sampled_from(["set", "set", "delete", "rename", "add", "wrap"]))
    if op == "set":
        parent[key] = _nasty_value(draw)
    elif op == "delete":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        parent[_decorate(draw, key)] = parent.pop(key)
    elif op == "add" and isinstance(parent[key], dict):
        parent[key][draw(nasty_text)] = _nasty_value(draw)
    else:
        parent[key] = draw(st.sampled_from([[parent[key]], {"": parent[key]}]))


@st.composite
def mutated_payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    source, document = _fresh_base(draw)
    for _ in range(draw(st.integers(0, 3))):
        mutate(draw, document)
    return source, document


@st.composite
def mangled_bytes(draw: st.DrawFn) -> bytes:
    """A valid body with bytes flipped, inserted, cut or repeated."""
    body = bytearray(encode(copy.deepcopy(draw(st.sampled_from(BASES))())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body)))
        op = draw(st.sampled_from(["flip", "insert", "cut", "truncate", "repeat"]))
        if op == "flip" and at < len(body):
            body[at] = draw(st.integers(0, 255))
        elif op == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "cut":
            del body[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del body[at:]
        else:
            body[at:at] = body[at : at + draw(st.integers(1, 64))] * draw(st.integers(1, 50))
    return bytes(body)


# --- the properties -----------------------------------------------------------------------


@FUZZ
@given(
    body=st.binary(max_size=512) | mangled_bytes(),
    prefix=PREFIXES,
    source=sources,
    content_type=CONTENT_TYPES,
    token_in_header=st.booleans(),
)
async def test_arbitrary_bytes_are_answered_200_or_4xx_and_a_refusal_stores_nothing(
    relay: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    prefix: bytes,
    source: str,
    content_type: str | None,
    token_in_header: bool,
) -> None:
    await post_checked(
        relay,
        caplog,
        source=source,
        body=prefix + body,
        content_type=content_type,
        token_in_header=token_in_header,
    )


@FUZZ
@given(
    # Mostly objects: only an object can get past QingStorSource.parse's first check.
    document=st.dictionaries(QINGSTOR_KEYS | nasty_text, json_values, max_size=6) | json_values,
    ensure_ascii=st.booleans(),
    encoding=ENCODINGS,
    source=sources,
    content_type=CONTENT_TYPES,
)
async def test_arbitrary_json_documents_are_answered_200_or_4xx(
    relay: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    document: Any,
    ensure_ascii: bool,
    encoding: str,
    source: str,
    content_type: str | None,
) -> None:
    body = encode(document, ensure_ascii=ensure_ascii, encoding=encoding)
    status, answer = await post_checked(
        relay,
        caplog,
        source=source,
        body=body,
        content_type=content_type,
        events_if_accepted=events_in(document, source),
    )
    if not isinstance(document, dict) and not (source == "bus" and isinstance(document, list)):
        # 415 too: a body that is not UTF-8 (a lone surrogate) under a non-JSON label.
        # (A list is a CloudEvents batch: `[]` is an empty one.)
        assert status in (400, 415), answer


@FUZZ
@given(
    case=mutated_payloads(),
    ensure_ascii=st.booleans(),
    encoding=ENCODINGS,
    prefix=PREFIXES,
    content_type=CONTENT_TYPES,
    token_in_header=st.booleans(),
)
async def test_mutated_qingstor_payloads_are_answered_200_or_4xx(
    relay: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    case: tuple[str, dict[str, Any]],
    ensure_ascii: bool,
    encoding: str,
    prefix: bytes,
    content_type: str | None,
    token_in_header: bool,
) -> None:
    source, document = case
    await post_checked(
        relay,
        caplog,
        source=source,
        body=prefix + encode(document, ensure_ascii=ensure_ascii, encoding=encoding),
        content_type=content_type,
        token_in_header=token_in_header,
        events_if_accepted=events_in(document, source),
    )


# Other stores' documented bodies, as the s3 and cloudevents sources take them.
OTHER_BASES = {
    "minio": ["minio-put.json", "s3-aws-put.json", "ceph-put.json"],
    "bus": ["cloudevents-oss.json", "cloudevents-obs.json"],
}


@st.composite
def mutated_other_payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    source = draw(st.sampled_from(list(OTHER_BASES)))
    document = sample(draw(st.sampled_from(OTHER_BASES[source])))
    if source == "minio":
        for record in document["Records"]:
            record["s3"]["object"]["sequencer"] = FRESH
    else:
        document["id"] = FRESH
    for _ in range(draw(st.integers(0, 3))):
        mutate(draw, document)
    return source, document


@FUZZ
@given(
    case=mutated_other_payloads(),
    content_type=st.sampled_from(
        ["application/json", "application/cloudevents+json", "application/cloudevents-batch+json"]
    )
    | CONTENT_TYPES,
)
async def test_mutated_s3_and_cloudevents_payloads_are_answered_200_or_4xx(
    relay: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    case: tuple[str, dict[str, Any]],
    content_type: str | None,
) -> None:
    source, document = case
    await post_checked(
        relay, caplog, source=source, body=encode(document), content_type=content_type
    )


# 5,000 records at once, built once: each example copies the list, not the records.
_MANY = notifier_body(*(f"many/{i:04d}.jpg" for i in range(5000)))


@st.composite
def one_mutated_record_among_5000(draw: st.DrawFn) -> dict[str, Any]:
    records = list(_MANY["events"])
    at = draw(st.integers(0, len(records) - 1))
    record = copy.deepcopy(records[at])
    for _ in range(draw(st.integers(1, 3))):
        mutate(draw, record)
    records[at] = record
    return {"events": records}


@settings(FUZZ, max_examples=6 * SCALE)
@given(document=one_mutated_record_among_5000(), source=st.sampled_from(["qingstor", "notifier"]))
async def test_5000_records_with_one_mutated_are_taken_whole_or_refused_whole(
    relay: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    document: dict[str, Any],
    source: str,
) -> None:
    # post_checked asserts the whole point: a refusal leaves no event of the 4,999 others.
    await post_checked(
        relay,
        caplog,
        source=source,
        body=encode(document),
        content_type="application/json",
        events_if_accepted=events_in(document, source),
    )


# --- a valid token, an invalid schema ---------------------------------------------------


def _not_iso(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return True
    return False


not_a_string = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)
not_an_object = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.lists(st.none(), max_size=2)
)
_DELETE = object()
# Field paths within one record (notifier) or the body (tupu-porn), with values the schema
# refuses there; _DELETE removes a required field. Pydantic's lax mode takes "12" for a
# number, so no numeric strings appear.
NOTIFIER_BREAKS: list[tuple[tuple[str, ...], st.SearchStrategy[Any]]] = [
    (("event_type",), st.just(_DELETE) | st.just("") | not_a_string),
    (("event_time",), st.just(_DELETE) | not_a_string | st.text(max_size=30).filter(_not_iso)),
    (("response_elements",), st.just(_DELETE) | not_an_object | st.just({})),
    (("response_elements", "request_id"), st.just(_DELETE) | st.just("") | not_a_string),
    (("qingstor",), st.just(_DELETE) | not_an_object | st.just({})),
    (("qingstor", "notification_id"), st.just(_DELETE) | not_a_string),
    (("qingstor", "bucket"), st.just(_DELETE) | not_an_object),
    (("qingstor", "bucket", "name"), st.just(_DELETE) | st.just("") | not_a_string),
    (("qingstor", "object"), st.just(_DELETE) | not_an_object),
    (("qingstor", "object", "name"), st.just(_DELETE) | st.just("") | not_a_string),
    (("qingstor", "object", "size"), st.sampled_from([-1, -(10**400), 1.5, "big", [], {}])),
    (("qingstor", "object", "etag"), st.sampled_from([1, [], {}, True])),
    (("user_identify",), st.sampled_from(["usr", 1, []])),
]
TUPU_BREAKS: list[tuple[tuple[str, ...], st.SearchStrategy[Any]]] = [
    (("bucket",), st.just(_DELETE) | st.just("") | not_a_string),
    (("object",), st.just(_DELETE) | st.just("") | not_a_string),
    (("result",), not_an_object),
    (("result", "code"), st.sampled_from(["x", 1.5, [], {}])),
    (("result", "nonce"), st.sampled_from([1, [], {}, True])),
    (("result", "timestamp"), st.sampled_from(["x", [], {}, 10**400])),
]


def _break(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    parent = target
    for step in path[:-1]:
        parent = parent[step]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@st.composite
def schema_breaking_payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A source and a body that is the right shape for it but fails its schema."""
    if draw(st.booleans()):
        count = draw(st.integers(1, 4))
        document = notifier_body(*(f"k/{i}" for i in range(count)))
        path, values = draw(st.sampled_from(NOTIFIER_BREAKS))
        # One bad record rejects the whole POST, wherever it is.
        _break(document["events"][draw(st.integers(0, count - 1))], path, draw(values))
        return draw(st.sampled_from(["qingstor", "notifier"])), document
    document = sample("tupu-porn-result.json")
    path, values = draw(st.sampled_from(TUPU_BREAKS))
    _break(document, path, draw(values))
    return draw(st.sampled_from(["qingstor", "tupu"])), document


@settings(FUZZ, max_examples=100 * SCALE)
@given(case=schema_breaking_payloads(), token_in_header=st.booleans())
async def test_valid_token_but_invalid_schema_is_400_and_stores_nothing(
    relay: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    case: tuple[str, dict[str, Any]],
    token_in_header: bool,
) -> None:
    source, document = case
    status, answer = await post_checked(
        relay,
        caplog,
        source=source,
        body=encode(document),
        content_type="application/json",
        token_in_header=token_in_header,
    )
    assert status == 400 and answer["error"] == "invalid_event", answer
    assert (await relay.app[STORE].counts())["events"] == 0


# --- the hostile cases named outright, so every run meets them ---------------------------


def _record_with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    document = sample()
    _break(document["events"][0], path, value)
    return document


def _key_renamed(old: str, new: str) -> dict[str, Any]:
    document = sample()
    record = document["events"][0]
    record[new] = record.pop(old)
    return document


HOSTILE: list[tuple[str, str, bytes, str | None]] = [
    # (id, source, body, Content-Type)
    (
        "size 10**400",
        "qingstor",
        encode(_record_with(("qingstor", "object", "size"), 10**400)),
        "application/json",
    ),
    (
        "size 10**5000",
        "qingstor",
        encode(_record_with(("qingstor", "object", "size"), Raw("1" + "0" * 5000))),
        None,
    ),
    (
        "size NaN",
        "qingstor",
        encode(_record_with(("qingstor", "object", "size"), Raw("NaN"))),
        "application/json",
    ),
    (
        "size 'NaN'",
        "qingstor",
        encode(_record_with(("qingstor", "object", "size"), "NaN")),
        "application/json",
    ),
    (
        "tupu timestamp 1e308",
        "tupu",
        encode({**sample("tupu-porn-result.json"), "result": {"timestamp": 1e308}}),
        "application/json",
    ),
    (
        "tupu timestamp -1e308",
        "qingstor",
        encode({**sample("tupu-porn-result.json"), "result": {"timestamp": -1e308}}),
        None,
    ),
    (
        "10,000 levels in a record",
        "qingstor",
        encode(_record_with(("zone_id",), Raw("[" * DEEP + "]" * DEEP))),
        "application/json",
    ),
    ("10,000 levels as the body", "thumbs", ("[" * DEEP + "]" * DEEP).encode(), "application/json"),
    ("10,000 objects deep", "thumbs", encode(Raw('{"a":' * DEEP + "1" + "}" * DEEP)), "text/plain"),
    ("null events", "qingstor", b'{"events": null}', "application/json"),
    ("null record", "notifier", b'{"events": [null]}', "application/json"),
    ("null body", "thumbs", b"null", "application/json"),
    (
        "bidi key",
        "qingstor",
        encode(_key_renamed("event_type", "event\u202e_type")),
        "application/json",
    ),
    ("BOM key", "qingstor", encode(_key_renamed("qingstor", "\ufeffqingstor")), "application/json"),
    (
        "NUL in bucket",
        "qingstor",
        encode(_record_with(("qingstor", "bucket", "name"), "max\x00test2")),
        "application/json",
    ),
    (
        "bidi and BOM in key, raw UTF-8",
        "qingstor",
        encode(
            _record_with(("qingstor", "object", "name"), "\ufeff\u202egpj.exe"), ensure_ascii=False
        ),
        "application/json",
    ),
    (
        "bidi, BOM and NUL keys in an image result",
        "thumbs",
        encode({"\u202ebucket": "b", "\ufeffobject": "k", "\x00": "\u2066\x1b[2J"}),
        "application/json",
    ),
    ("lone surrogate key", "thumbs", b'{"\\ud800": 1}', "application/json"),
    (
        "lone surrogate value",
        "qingstor",
        encode(_record_with(("qingstor", "object", "name"), Raw('"\\udfff"'))),
        "application/json",
    ),
    (
        "UTF-8 BOM before the body",
        "qingstor",
        b"\xef\xbb\xbf" + encode(sample()),
        "application/json",
    ),
    ("UTF-16 body", "qingstor", encode(sample(), encoding="utf-16"), "application/json"),
    ("JSON labelled form data", "qingstor", encode(sample()), "application/x-www-form-urlencoded"),
    ("garbage labelled text/html", "qingstor", b"<html>\x00\xff</html>", "text/html"),
    ("garbage with no Content-Type", "qingstor", b"\xff\xfe\x00{", None),
    ("broken Content-Type parameter", "qingstor", encode(sample()), 'application/json; x="'),
]


@pytest.mark.parametrize(
    ("source", "body", "content_type"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
async def test_named_hostile_payloads_are_answered_200_or_4xx(
    relay: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    source: str,
    body: bytes,
    content_type: str | None,
) -> None:
    await post_checked(relay, caplog, source=source, body=body, content_type=content_type)


# --- bugs the fuzzing found, each pinned ---------------------------------------------------


async def test_body_not_in_its_declared_content_encoding_is_a_4xx(
    relay: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Was a 500: aiohttp's RequestPayloadError escaped relay.ingest.read_limited.
    status, answer = await post_checked(
        relay,
        caplog,
        source="qingstor",
        body=b"{}",
        content_type="application/json",
        extra_headers={"Content-Encoding": "gzip"},
    )
    assert (status, answer["error"]) == (400, "invalid_body")
