"""Generic source kinds: standard-webhooks, hmac and generic.

Pure tests of the signature functions and the sources' checks (the clock passed in),
then relay on a real socket: signed requests accepted once, everything else refused
with 401 and nothing stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from standardwebhooks.webhooks import Webhook

from relay.app import STORE
from relay.config import GenericSourceConfig, HmacSourceConfig, StandardWebhooksSourceConfig
from relay.errors import ConfigError, Forbidden, InvalidBody, Unauthorized
from relay.models import Envelope, canonical_json
from relay.signatures import (
    standard_webhooks_header,
    standard_webhooks_signature,
    verify_hmac,
    verify_standard_webhooks,
    whsec_key,
)
from relay.sources import SOURCES, RequestMeta
from relay.sources.extract import Extractor, extract, generic_envelope
from relay.sources.generic import BasicAuthRequired, GenericSource
from relay.sources.hmac_header import HmacSource
from relay.sources.standard_webhooks import StandardWebhooksSource
from tests.conftest import eventually, read_lines, relay_config

# The Standard Webhooks test vector, from the specification.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

SECOND_SECRET = "whsec_" + base64.b64encode(b"the-secret-rotated-in-next-week").decode()
WRONG_SECRET = "whsec_" + base64.b64encode(b"a-secret-relay-has-never-seen!!").decode()
HMAC_SECRET = "It's a Secret to Everybody"  # GitHub's documentation example
RECEIVED = datetime(2021, 2, 26, 15, 2, 10, tzinfo=UTC)


def meta(headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> RequestMeta:
    # aiohttp hands sources a case-insensitive mapping; so do these tests.
    return RequestMeta(
        headers=CIMultiDictProxy(CIMultiDict(headers or {})),
        query=query or {},
        remote="127.0.0.1",
    )


def out_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return read_lines(tmp_path / "out" / "events.jsonl")


async def assert_nothing_stored(client: Any, tmp_path: Path) -> None:
    assert await client.app[STORE].counts() == {"events": 0}
    assert out_lines(tmp_path) == []


# --- relay/signatures.py: Standard Webhooks -----------------------------------------------


def test_standard_webhooks_vector_signs_as_documented():
    key = whsec_key(VECTOR_SECRET)
    signature = standard_webhooks_signature(key, VECTOR_ID, VECTOR_TS, VECTOR_BODY)
    assert signature == VECTOR_SIGNATURE
    reference = Webhook(VECTOR_SECRET).sign(
        VECTOR_ID, datetime.fromtimestamp(VECTOR_TS, tz=UTC), VECTOR_BODY.decode()
    )
    assert reference == VECTOR_SIGNATURE


def test_standard_webhooks_vector_verifies_at_its_own_time():
    outcome = verify_standard_webhooks(
        [whsec_key(VECTOR_SECRET)],
        VECTOR_ID,
        str(VECTOR_TS),
        VECTOR_SIGNATURE,
        VECTOR_BODY,
        now=VECTOR_TS,
        tolerance=300,
    )
    assert outcome == "ok"


@pytest.mark.parametrize(
    ("skew", "expected"),
    [
        (0, "ok"),
        (-300, "ok"),  # exactly at the bound, either way, is still inside
        (300, "ok"),
        (-299.5, "ok"),
        (300.5, "stale"),  # the receiver's clock is ahead: the message is too old
        (-300.5, "stale"),  # the receiver's clock is behind: the message is from the future
        (86400, "stale"),
        (-86400, "stale"),
    ],
)
def test_standard_webhooks_clock_skew_both_ways(skew: float, expected: str):
    outcome = verify_standard_webhooks(
        [whsec_key(VECTOR_SECRET)],
        VECTOR_ID,
        str(VECTOR_TS),
        VECTOR_SIGNATURE,
        VECTOR_BODY,
        now=VECTOR_TS + skew,
        tolerance=300,
    )
    assert outcome == expected


@pytest.mark.parametrize(
    ("msg_id", "timestamp", "signature", "body", "expected"),
    [
        (None, str(VECTOR_TS), VECTOR_SIGNATURE, VECTOR_BODY, "missing"),
        (VECTOR_ID, None, VECTOR_SIGNATURE, VECTOR_BODY, "missing"),
        (VECTOR_ID, str(VECTOR_TS), None, VECTOR_BODY, "missing"),
        (VECTOR_ID, str(VECTOR_TS), "", VECTOR_BODY, "missing"),
        (VECTOR_ID, "yesterday", VECTOR_SIGNATURE, VECTOR_BODY, "mismatch"),
        (VECTOR_ID, str(VECTOR_TS), VECTOR_SIGNATURE, b'{"test": 2432232315}', "mismatch"),
        ("msg_other", str(VECTOR_TS), VECTOR_SIGNATURE, VECTOR_BODY, "mismatch"),
        (VECTOR_ID, str(VECTOR_TS), "v1,", VECTOR_BODY, "mismatch"),
        (VECTOR_ID, str(VECTOR_TS), "garbage", VECTOR_BODY, "mismatch"),
        # Only v1 is defined; the same digest under another version label is not a match.
        (VECTOR_ID, str(VECTOR_TS), "v2," + VECTOR_SIGNATURE[3:], VECTOR_BODY, "mismatch"),
        (VECTOR_ID, str(VECTOR_TS), "v1,éé", VECTOR_BODY, "mismatch"),
        # Several signatures: one match is enough, in any position.
        (VECTOR_ID, str(VECTOR_TS), f"v1,bm9wZQ== {VECTOR_SIGNATURE}", VECTOR_BODY, "ok"),
        (VECTOR_ID, str(VECTOR_TS), f"{VECTOR_SIGNATURE} v1a,xyz", VECTOR_BODY, "ok"),
    ],
)
def test_standard_webhooks_fails_closed(msg_id, timestamp, signature, body, expected):
    outcome = verify_standard_webhooks(
        [whsec_key(VECTOR_SECRET)],
        msg_id,
        timestamp,
        signature,
        body,
        now=VECTOR_TS,
        tolerance=300,
    )
    assert outcome == expected


def test_standard_webhooks_without_any_key_fails_closed():
    outcome = verify_standard_webhooks(
        [], VECTOR_ID, str(VECTOR_TS), VECTOR_SIGNATURE, VECTOR_BODY, now=VECTOR_TS, tolerance=300
    )
    assert outcome == "missing"


def test_standard_webhooks_rotation_any_key_and_any_signature():
    keys = [whsec_key(WRONG_SECRET), whsec_key(VECTOR_SECRET)]
    assert (
        verify_standard_webhooks(
            keys,
            VECTOR_ID,
            str(VECTOR_TS),
            VECTOR_SIGNATURE,
            VECTOR_BODY,
            now=VECTOR_TS,
            tolerance=300,
        )
        == "ok"
    )
    # What relay's own http sink sends while rotating verifies with the reference library.
    header = standard_webhooks_header(
        [whsec_key(SECOND_SECRET), whsec_key(VECTOR_SECRET)], VECTOR_ID, VECTOR_TS, VECTOR_BODY
    )
    assert VECTOR_SIGNATURE in header.split()
    assert len(header.split()) == 2


# --- relay/signatures.py: header HMAC ----------------------------------------------------


def github_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_hmac_matches_githubs_documented_example():
    # docs.github.com "Validating webhook deliveries": payload "Hello, World!".
    body = b"Hello, World!"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert github_signature(HMAC_SECRET, body) == expected
    outcome = verify_hmac(
        [HMAC_SECRET.encode()], expected, body, algorithm="sha256", encoding="hex", prefix="sha256="
    )
    assert outcome == "ok"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "missing"),
        ("", "missing"),
        ("757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", "mismatch"),
        ("sha1=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", "mismatch"),
        ("sha256=not-hex", "mismatch"),
        ("sha256=757107ea", "mismatch"),  # a prefix of the digest is not the digest
        ("sha256=", "mismatch"),
    ],
)
def test_hmac_fails_closed(header, expected):
    outcome = verify_hmac(
        [HMAC_SECRET.encode()],
        header,
        b"Hello, World!",
        algorithm="sha256",
        encoding="hex",
        prefix="sha256=",
    )
    assert outcome == expected


def test_hmac_base64_sha512_and_rotation():
    body = b'{"a": 1}'
    presented = base64.b64encode(hmac.new(b"new", body, hashlib.sha512).digest()).decode()
    kwargs: dict[str, Any] = {"algorithm": "sha512", "encoding": "base64"}
    assert verify_hmac([b"old", b"new"], presented, body, **kwargs) == "ok"
    assert verify_hmac([b"old"], presented, body, **kwargs) == "mismatch"
    assert verify_hmac([], presented, body, **kwargs) == "missing"
    assert verify_hmac([b"new"], presented + "!", body, **kwargs) == "mismatch"


# --- the sources, pure: codes, messages, the clock passed in ----------------------------


def sw_source(**overrides: Any) -> StandardWebhooksSource:
    config = StandardWebhooksSourceConfig.model_validate(
        {"kind": "standard-webhooks", "secrets": [VECTOR_SECRET], **overrides}
    )
    return StandardWebhooksSource("vendor", config)


def vector_headers(**changes: str) -> dict[str, str]:
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    headers.update(changes)
    return {k: v for k, v in headers.items() if v}


def refusal(action: Any) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        action()
    return info.value


def test_standard_webhooks_source_codes_with_the_clock_passed_in():
    source = sw_source()
    ok = meta(vector_headers())
    source.authenticate(ok)
    source.verify(ok, VECTOR_BODY, VECTOR_TS + 299)

    old = refusal(lambda: source.verify(ok, VECTOR_BODY, VECTOR_TS + 301))
    assert (old.status, old.code) == (401, "stale_timestamp")
    assert "301s old" in old.message
    future = refusal(lambda: source.verify(ok, VECTOR_BODY, VECTOR_TS - 400))
    assert future.code == "stale_timestamp"
    assert "400s in the future" in future.message

    missing = refusal(lambda: source.authenticate(meta(vector_headers(**{"webhook-id": ""}))))
    assert (missing.code, "webhook-id" in missing.message) == ("missing_signature", True)
    for bad_timestamp in ("+1614265330", " 1614265330", "1614_265330", "1614265330.5"):
        bad = meta(vector_headers(**{"webhook-timestamp": bad_timestamp}))
        assert refusal(lambda m=bad: source.verify(m, VECTOR_BODY, VECTOR_TS)).code == (
            "invalid_signature"
        )


def test_tolerance_is_configurable():
    source = sw_source(tolerance="10m")
    source.verify(meta(vector_headers()), VECTOR_BODY, VECTOR_TS + 599)
    error = refusal(lambda: source.verify(meta(vector_headers()), VECTOR_BODY, VECTOR_TS + 601))
    assert error.code == "stale_timestamp"


def secret_spellings(secret: str, body: bytes, signed: bytes) -> list[str]:
    """Every form a leak could take: the secret, and the expected digest in each encoding."""
    digests = [hmac.new(whsec_key(secret), signed, hashlib.sha256).digest()]
    return [
        secret,
        secret.removeprefix("whsec_"),
        *(base64.b64encode(d).decode() for d in digests),
        *(d.hex() for d in digests),
    ]


def test_no_error_message_contains_the_expected_signature_or_a_secret():
    source = sw_source()
    forged = vector_headers(**{"webhook-signature": "v1,Zm9yZ2VkIHNpZ25hdHVyZQ=="})
    tampered = b'{"test": 1}'
    messages = [
        refusal(lambda: source.verify(meta(forged), VECTOR_BODY, VECTOR_TS)).message,
        refusal(lambda: source.verify(meta(vector_headers()), tampered, VECTOR_TS)).message,
        refusal(lambda: source.verify(meta(vector_headers()), VECTOR_BODY, 0)).message,
    ]
    leaks = secret_spellings(VECTOR_SECRET, VECTOR_BODY, f"{VECTOR_ID}.{VECTOR_TS}.".encode())
    leaks += secret_spellings(
        VECTOR_SECRET, tampered, f"{VECTOR_ID}.{VECTOR_TS}.".encode() + tampered
    )
    leaks.append(VECTOR_SIGNATURE.removeprefix("v1,"))
    for message in messages:
        for leak in leaks:
            assert leak not in message

    for encoding, algorithm in (("hex", "sha256"), ("base64", "sha512")):
        hsource = HmacSource(
            "gh",
            HmacSourceConfig.model_validate(
                {
                    "kind": "hmac",
                    "secrets": [HMAC_SECRET],
                    "algorithm": algorithm,
                    "encoding": encoding,
                }
            ),
        )
        digest = hmac.new(HMAC_SECRET.encode(), b"{}", getattr(hashlib, algorithm)).digest()
        wrong = meta({"X-Hub-Signature-256": "00" * len(digest)})
        message = refusal(lambda s=hsource, m=wrong: s.verify(m, b"{}", 0)).message
        for leak in (HMAC_SECRET, digest.hex(), base64.b64encode(digest).decode()):
            assert leak not in message
        assert "HMAC-" + algorithm.upper() in message  # names the expected format instead


def test_every_generic_kind_is_registered():
    assert {"standard-webhooks", "hmac", "generic"} <= set(SOURCES)


# --- extraction of ids and types ------------------------------------------------------


DOC = {"data": {"id": "ord_1", "n": 7, "flag": True, "items": [{"sku": "a"}, {"sku": "b"}]}}


@pytest.mark.parametrize(
    ("spec", "value"),
    [
        ("$.data.id", "ord_1"),
        ("data.id", "ord_1"),
        ("data.n", "7"),
        ("$.data.items.1.sku", "b"),
        ("header:X-Delivery", "d-42"),
        ("header:x-delivery", "d-42"),
    ],
)
def test_extract_finds_values(spec, value):
    headers = CIMultiDictProxy(CIMultiDict({"X-Delivery": "d-42"}))
    assert extract(Extractor.parse(spec), headers, DOC, what="id_from") == value


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("$.data.missing", "nothing at $.data.missing"),
        ("$.data.items.2.sku", "nothing at"),
        ("$.data.items.x", "nothing at"),
        ("$.data.id.deeper", "nothing at"),
        ("$.data", "is an object"),
        ("$.data.items", "is an array"),
        ("$.data.flag", "is a boolean"),
        ("header:X-Absent", "no X-Absent header"),
    ],
)
def test_extract_refuses_missing_or_unusable_values(spec, fragment):
    with pytest.raises(InvalidBody) as info:
        extract(Extractor.parse(spec), {}, DOC, what="id_from")
    assert (info.value.status, info.value.code) == (400, "invalid_event")
    assert fragment in info.value.message
    assert "id_from" in info.value.message


def test_envelope_for_a_non_object_body_and_default_type():
    envelope = generic_envelope(
        source="s",
        kind="generic",
        headers={},
        document=[1, 2, 3],
        received_at=RECEIVED,
        id_from=None,
        type_from=None,
    )
    assert (envelope.type, envelope.subject, envelope.data) == ("generic", "", [1, 2, 3])
    assert (envelope.bucket, envelope.key) == (None, None)
    assert envelope.time == envelope.received_at == "2021-02-26T15:02:10.000Z"


def test_same_identifier_from_two_sources_gives_two_ids():
    def make(name: str) -> Envelope:
        return generic_envelope(
            source=name,
            kind="generic",
            headers={},
            document={"id": "1"},
            received_at=RECEIVED,
            id_from=Extractor.parse("id"),
            type_from=None,
        )

    assert make("a").id != make("b").id
    assert make("a").id == make("a").id


# --- standard-webhooks on a real socket ---------------------------------------------------


def sw_config(tmp_path: Path, **source: Any) -> Any:
    return relay_config(
        tmp_path,
        sources={"vendor": {"kind": "standard-webhooks", "secrets": [VECTOR_SECRET], **source}},
    )


def sw_request(
    body: dict[str, Any] | str,
    *,
    secret: str = VECTOR_SECRET,
    msg_id: str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
    at: datetime | None = None,
    skew: timedelta = timedelta(0),
) -> dict[str, Any]:
    """Headers and body signed by the standardwebhooks reference library; `skew` moves
    the sender's clock away from relay's."""
    text = body if isinstance(body, str) else json.dumps(body)
    at = (at or datetime.now(UTC)) + skew
    return {
        "data": text.encode(),
        "headers": {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, at, text),
        },
    }


async def test_standard_webhooks_signed_request_is_accepted_and_its_retry_is_a_duplicate(
    tmp_path, start_relay
):
    client = await start_relay(sw_config(tmp_path))
    body = {"type": "invoice.paid", "data": {"invoice": "in_1", "amount": 4200}}
    sent_at = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    first = await client.post("/hooks/vendor", **sw_request(body, at=sent_at))
    assert (first.status, await first.json()) == (200, {"accepted": 1, "duplicates": 0})
    # The sender's retry: same webhook-id, a new timestamp, so a new signature.
    retry = await client.post("/hooks/vendor", **sw_request(body))
    assert (retry.status, await retry.json()) == (200, {"accepted": 0, "duplicates": 1})

    [line] = await eventually(lambda: out_lines(tmp_path))
    assert line["id"].startswith("evt_")
    assert line["source"] == "vendor"
    assert line["type"] == "invoice.paid"
    assert line["subject"] == "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
    assert line["time"] == sent_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert (line["bucket"], line["key"], line["data"]) == (None, None, body)
    assert (await client.app[STORE].counts())["events"] == 1


async def test_standard_webhooks_new_message_id_is_a_new_event(tmp_path, start_relay):
    client = await start_relay(sw_config(tmp_path))
    body = {"type": "ping"}
    for msg_id in ("msg_1", "msg_2"):
        response = await client.post("/hooks/vendor", **sw_request(body, msg_id=msg_id))
        assert await response.json() == {"accepted": 1, "duplicates": 0}


async def test_standard_webhooks_rotation_second_secret_signs(tmp_path, start_relay):
    client = await start_relay(sw_config(tmp_path, secrets=[VECTOR_SECRET, SECOND_SECRET]))
    response = await client.post("/hooks/vendor", **sw_request({"n": 1}, secret=SECOND_SECRET))
    assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})
    # A sender mid-rotation signs with both old and new secrets: one match is enough.
    request = sw_request({"n": 2}, secret=WRONG_SECRET, msg_id="msg_b")
    at = datetime.fromtimestamp(int(request["headers"]["webhook-timestamp"]), tz=UTC)
    good = Webhook(SECOND_SECRET).sign("msg_b", at, request["data"].decode())
    request["headers"]["webhook-signature"] += " " + good
    response = await client.post("/hooks/vendor", **request)
    assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})


def _tampered(request: dict[str, Any]) -> None:
    request["data"] = request["data"].replace(b"4200", b"9999")


def _missing(request: dict[str, Any]) -> None:
    del request["headers"]["webhook-signature"]


def _no_headers(request: dict[str, Any]) -> None:
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        del request["headers"][name]


def _other_id(request: dict[str, Any]) -> None:
    request["headers"]["webhook-id"] = "msg_replayed_under_another_id"


@pytest.mark.parametrize(
    ("case", "sign", "change", "code"),
    [
        ("tampered body", {}, _tampered, "invalid_signature"),
        ("id swapped", {}, _other_id, "invalid_signature"),
        ("wrong secret", {"secret": WRONG_SECRET}, None, "invalid_signature"),
        ("too old", {"skew": timedelta(minutes=-6)}, None, "stale_timestamp"),
        ("too new", {"skew": timedelta(minutes=6)}, None, "stale_timestamp"),
        ("no signature", {}, _missing, "missing_signature"),
        ("no headers", {}, _no_headers, "missing_signature"),
    ],
)
async def test_standard_webhooks_refusals_store_nothing(
    tmp_path, start_relay, case, sign, change, code
):
    client = await start_relay(sw_config(tmp_path))
    request = sw_request({"type": "invoice.paid", "amount": 4200}, **sign)
    if change is not None:
        change(request)
    response = await client.post("/hooks/vendor", **request)
    answer = await response.json()
    assert (response.status, answer["error"]) == (401, code), case
    assert VECTOR_SECRET.removeprefix("whsec_") not in answer["message"]
    await assert_nothing_stored(client, tmp_path)


async def test_standard_webhooks_id_from_overrides_webhook_id(tmp_path, start_relay):
    client = await start_relay(sw_config(tmp_path, id_from="$.data.id", type_from="$.kind"))
    for msg_id in ("msg_a", "msg_b"):  # two deliveries of one business event
        request = sw_request({"kind": "order", "data": {"id": 17}}, msg_id=msg_id)
        response = await client.post("/hooks/vendor", **request)
        assert response.status == 200
    assert (await client.app[STORE].counts())["events"] == 1
    [line] = await eventually(lambda: out_lines(tmp_path))
    assert (line["type"], line["subject"]) == ("order", "17")


# --- hmac on a real socket ------------------------------------------------------------


def hmac_config(tmp_path: Path, **source: Any) -> Any:
    return relay_config(
        tmp_path,
        sources={
            "github": {"kind": "hmac", "secrets": [HMAC_SECRET], "prefix": "sha256=", **source}
        },
    )


GITHUB_BODY = json.dumps({"action": "opened", "issue": {"number": 1347}}).encode()


async def test_hmac_github_style_is_accepted_and_its_retry_is_a_duplicate(tmp_path, start_relay):
    client = await start_relay(hmac_config(tmp_path))
    headers = {
        "X-Hub-Signature-256": github_signature(HMAC_SECRET, GITHUB_BODY),
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "Content-Type": "application/json",
    }
    answers = []
    for _ in range(2):
        response = await client.post("/hooks/github", data=GITHUB_BODY, headers=headers)
        answers.append((response.status, await response.json()))
    assert answers == [
        (200, {"accepted": 1, "duplicates": 0}),
        (200, {"accepted": 0, "duplicates": 1}),
    ]
    [line] = await eventually(lambda: out_lines(tmp_path))
    assert (line["type"], line["subject"]) == ("hmac", "")
    assert line["data"] == json.loads(GITHUB_BODY)
    assert line["time"] == line["received_at"]


async def test_hmac_base64_sha512_in_a_custom_header(tmp_path, start_relay):
    config = relay_config(
        tmp_path,
        sources={
            "shop": {
                "kind": "hmac",
                "secrets": ["old-secret", "new-secret"],
                "header": "X-Shop-Hmac-Sha512",
                "algorithm": "sha512",
                "encoding": "base64",
            }
        },
    )
    client = await start_relay(config)
    body = b'{"type": "orders/create", "id": 820982911946154508}'
    digest = hmac.new(b"new-secret", body, hashlib.sha512).digest()
    headers = {"X-Shop-Hmac-Sha512": base64.b64encode(digest).decode()}
    response = await client.post("/hooks/shop", data=body, headers=headers)
    assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})
    [line] = await eventually(lambda: out_lines(tmp_path))
    assert line["type"] == "orders/create"

    headers = {"X-Shop-Hmac-Sha512": base64.b64encode(digest).decode()}
    response = await client.post("/hooks/shop", data=body + b" ", headers=headers)
    assert (response.status, (await response.json())["error"]) == (401, "invalid_signature")


@pytest.mark.parametrize(
    ("case", "headers", "body", "code"),
    [
        (
            "tampered body",
            {"X-Hub-Signature-256": github_signature(HMAC_SECRET, GITHUB_BODY)},
            GITHUB_BODY.replace(b"1347", b"1348"),
            "invalid_signature",
        ),
        (
            "wrong secret",
            {"X-Hub-Signature-256": github_signature("guess", GITHUB_BODY)},
            GITHUB_BODY,
            "invalid_signature",
        ),
        (
            "no prefix",
            {"X-Hub-Signature-256": github_signature(HMAC_SECRET, GITHUB_BODY)[7:]},
            GITHUB_BODY,
            "invalid_signature",
        ),
        (
            "sha1 header",
            {
                "X-Hub-Signature": "sha1="
                + hmac.new(HMAC_SECRET.encode(), GITHUB_BODY, hashlib.sha1).hexdigest()
            },
            GITHUB_BODY,
            "missing_signature",
        ),
        ("no signature", {}, GITHUB_BODY, "missing_signature"),
        ("empty signature", {"X-Hub-Signature-256": ""}, GITHUB_BODY, "missing_signature"),
    ],
)
async def test_hmac_refusals_store_nothing(tmp_path, start_relay, case, headers, body, code):
    client = await start_relay(hmac_config(tmp_path))
    response = await client.post("/hooks/github", data=body, headers=headers)
    answer = await response.json()
    assert (response.status, answer["error"]) == (401, code), case
    expected = github_signature(HMAC_SECRET, body).removeprefix("sha256=")
    assert expected not in answer["message"]
    assert HMAC_SECRET not in answer["message"]
    await assert_nothing_stored(client, tmp_path)


async def test_hmac_id_from_delivery_header(tmp_path, start_relay):
    client = await start_relay(hmac_config(tmp_path, id_from="header:X-GitHub-Delivery"))
    signature = github_signature(HMAC_SECRET, GITHUB_BODY)
    for delivery, expected in (("d-1", 1), ("d-1", 0), ("d-2", 1)):
        headers = {"X-Hub-Signature-256": signature, "X-GitHub-Delivery": delivery}
        response = await client.post("/hooks/github", data=GITHUB_BODY, headers=headers)
        assert (await response.json())["accepted"] == expected
    response = await client.post(
        "/hooks/github", data=GITHUB_BODY, headers={"X-Hub-Signature-256": signature}
    )
    answer = await response.json()
    assert (response.status, answer["error"]) == (400, "invalid_event")
    assert "X-GitHub-Delivery" in answer["message"]


# --- generic on a real socket ---------------------------------------------------------


def generic_config(tmp_path: Path, **source: Any) -> Any:
    return relay_config(tmp_path, sources={"app": {"kind": "generic", **source}})


async def test_generic_token_in_query_or_header(tmp_path, start_relay):
    client = await start_relay(generic_config(tmp_path, token="t0ken"))
    response = await client.post("/hooks/app?token=t0ken", json={"n": 1})
    assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})
    response = await client.post("/hooks/app", json={"n": 2}, headers={"X-Relay-Token": "t0ken"})
    assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})


@pytest.mark.parametrize(
    ("url", "headers", "code"),
    [
        ("/hooks/app", {}, "missing_token"),
        ("/hooks/app?token=", {}, "missing_token"),
        ("/hooks/app?token=t0ke", {}, "invalid_token"),
        ("/hooks/app", {"X-Relay-Token": "T0KEN"}, "invalid_token"),
    ],
)
async def test_generic_token_refusals(tmp_path, start_relay, url, headers, code):
    client = await start_relay(generic_config(tmp_path, token="t0ken"))
    response = await client.post(url, json={"n": 1}, headers=headers)
    answer = await response.json()
    assert (response.status, answer["error"]) == (401, code)
    assert "t0ken" not in answer["message"]
    await assert_nothing_stored(client, tmp_path)


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


BASIC = {"basic_auth": {"username": "hooks", "password": "pa:ss wörd"}}


async def test_generic_basic_auth_accepted(tmp_path, start_relay):
    client = await start_relay(generic_config(tmp_path, **BASIC))
    auth = {"Authorization": basic_header("hooks", "pa:ss wörd")}
    response = await client.post("/hooks/app", json={"n": 1}, headers=auth)
    assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_credentials"),
        (basic_header("hooks", "wrong"), "invalid_credentials"),
        (basic_header("admin", "pa:ss wörd"), "invalid_credentials"),
        (basic_header("hooks", "pa:ss wörd") + "!", "invalid_credentials"),
        ("Basic " + base64.b64encode(b"no colon").decode(), "invalid_credentials"),
        ("Bearer pa:ss", "invalid_credentials"),
    ],
)
async def test_generic_basic_auth_refusals(tmp_path, start_relay, authorization, code):
    client = await start_relay(generic_config(tmp_path, **BASIC))
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.post("/hooks/app", json={"n": 1}, headers=headers)
    answer = await response.json()
    assert (response.status, answer["error"]) == (401, code)
    assert "wörd" not in answer["message"]
    await assert_nothing_stored(client, tmp_path)


def test_basic_auth_refusal_carries_www_authenticate():
    config = GenericSourceConfig.model_validate({"kind": "generic", **BASIC})
    error = refusal(lambda: GenericSource("app", config).authenticate(meta()))
    assert isinstance(error, BasicAuthRequired)
    assert error.headers["WWW-Authenticate"] == 'Basic realm="relay"'


async def test_basic_auth_refusal_answers_with_www_authenticate(tmp_path, start_relay):
    client = await start_relay(generic_config(tmp_path, **BASIC))
    response = await client.post("/hooks/app", json={"n": 1})
    assert response.status == 401
    assert response.headers.get("WWW-Authenticate") == 'Basic realm="relay"'


async def test_generic_token_and_basic_auth_both_required(tmp_path, start_relay):
    client = await start_relay(generic_config(tmp_path, token="t0ken", **BASIC))
    auth = {"Authorization": basic_header("hooks", "pa:ss wörd")}
    only_token = await client.post("/hooks/app?token=t0ken", json={})
    assert (only_token.status, (await only_token.json())["error"]) == (401, "missing_credentials")
    only_basic = await client.post("/hooks/app", json={}, headers=auth)
    assert (only_basic.status, (await only_basic.json())["error"]) == (401, "missing_token")
    both = await client.post("/hooks/app?token=t0ken", json={}, headers=auth)
    assert both.status == 200


async def test_generic_open_source_takes_any_json_value(tmp_path, start_relay):
    client = await start_relay(generic_config(tmp_path))
    for body in ([1, 2], "text", 42, None, {"type": "custom.kind"}):
        response = await client.post("/hooks/app", data=json.dumps(body))
        assert (response.status, await response.json()) == (200, {"accepted": 1, "duplicates": 0})
    lines = await eventually(lambda: len(out_lines(tmp_path)) == 5 and out_lines(tmp_path))
    assert [line["data"] for line in lines] == [[1, 2], "text", 42, None, {"type": "custom.kind"}]
    assert [line["type"] for line in lines] == ["generic"] * 4 + ["custom.kind"]


async def test_generic_canonical_json_id_ignores_key_order_and_whitespace(tmp_path, start_relay):
    client = await start_relay(generic_config(tmp_path))
    spellings = [
        b'{"a": 1, "b": {"c": [1, 2], "d": "\\u00e9"}}',
        b'{"b":{"d":"\xc3\xa9","c":[1,2]},"a":1}',
        b'\n{ "b" : { "d" : "\\u00e9", "c" : [ 1 , 2 ] } , "a" : 1 }\n',
    ]
    answers = []
    for body in spellings:
        response = await client.post("/hooks/app", data=body)
        answers.append(await response.json())
    assert answers == [
        {"accepted": 1, "duplicates": 0},
        {"accepted": 0, "duplicates": 1},
        {"accepted": 0, "duplicates": 1},
    ]
    response = await client.post("/hooks/app", data=b'{"a": 2, "b": {"c": [1, 2], "d": "e"}}')
    assert await response.json() == {"accepted": 1, "duplicates": 0}
    assert canonical_json(json.loads(spellings[0])) == canonical_json(json.loads(spellings[1]))


async def test_generic_id_from_json_path_and_type_from(tmp_path, start_relay):
    client = await start_relay(
        generic_config(tmp_path, id_from="$.event.id", type_from="event.kind")
    )
    first = {"event": {"id": "e-1", "kind": "build.done", "attempt": 1}}
    retry = {"event": {"id": "e-1", "kind": "build.done", "attempt": 2}}  # sender's retry
    for body, expected in ((first, 1), (retry, 0)):
        response = await client.post("/hooks/app", json=body)
        assert (await response.json())["accepted"] == expected
    [line] = await eventually(lambda: out_lines(tmp_path))
    assert (line["type"], line["subject"], line["data"]) == ("build.done", "e-1", first)

    response = await client.post("/hooks/app", json={"event": {"kind": "build.done"}})
    answer = await response.json()
    assert (response.status, answer["error"]) == (400, "invalid_event")
    assert "$.event.id" in answer["message"]
    response = await client.post("/hooks/app", json={"event": {"id": {"nested": 1}, "kind": "x"}})
    assert (response.status, (await response.json())["error"]) == (400, "invalid_event")


async def test_generic_id_from_header(tmp_path, start_relay):
    client = await start_relay(generic_config(tmp_path, id_from="header:X-Event-Id"))
    for event_id, body, expected in (("a", {"n": 1}, 1), ("a", {"n": 2}, 0), ("b", {"n": 1}, 1)):
        response = await client.post("/hooks/app", json=body, headers={"X-Event-Id": event_id})
        assert (await response.json())["accepted"] == expected
    response = await client.post("/hooks/app", json={"n": 3})
    assert (response.status, (await response.json())["error"]) == (400, "invalid_event")


async def test_two_generic_sources_never_share_an_id(tmp_path, start_relay):
    config = relay_config(
        tmp_path,
        sources={
            "one": {"kind": "generic", "id_from": "id"},
            "two": {"kind": "generic", "id_from": "id"},
            "three": {"kind": "generic"},
        },
    )
    client = await start_relay(config)
    for name in ("one", "two", "three"):
        response = await client.post(f"/hooks/{name}", json={"id": "same"})
        assert await response.json() == {"accepted": 1, "duplicates": 0}


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("generic", {}),
        ("hmac", {"secrets": ["s"]}),
        ("standard-webhooks", {"secrets": [VECTOR_SECRET]}),
    ],
)
def test_allow_ips_applies_to_every_kind(kind, extra):
    config = {"kind": kind, "allow_ips": ["10.0.0.0/8"], **extra}
    models: dict[str, Any] = {
        "generic": GenericSourceConfig,
        "hmac": HmacSourceConfig,
        "standard-webhooks": StandardWebhooksSourceConfig,
    }
    source = SOURCES[kind]("s", models[kind].model_validate(config))
    with pytest.raises(Forbidden):
        source.authenticate(meta())  # from 127.0.0.1
    inside = RequestMeta(headers={}, query={}, remote="::ffff:10.1.2.3")
    # A mapped IPv4 peer passes the address check; the signed kinds then want a signature.
    with pytest.raises(Unauthorized) if kind != "generic" else nullcontext():
        source.authenticate(inside)


# A secret as some senders hand it out: whsec_ and base64 without its `=` padding. The
# reference library takes it; so must relay, deriving the same key.
UNPADDED_SECRET = "whsec_" + base64.b64encode(b"an unpadded secret!").decode().rstrip("=")


async def test_an_unpadded_standard_webhooks_secret_verifies_as_the_reference_signs(
    tmp_path, start_relay
):
    assert not UNPADDED_SECRET.endswith("=") and len(UNPADDED_SECRET[6:]) % 4
    client = await start_relay(sw_config(tmp_path, secrets=[UNPADDED_SECRET]))
    body = {"type": "padding.check"}
    signed = await client.post("/hooks/vendor", **sw_request(body, secret=UNPADDED_SECRET))
    assert (signed.status, await signed.json()) == (200, {"accepted": 1, "duplicates": 0})
    other = await client.post("/hooks/vendor", **sw_request(body, secret=VECTOR_SECRET))
    assert (other.status, (await other.json())["error"]) == (401, "invalid_signature")


def test_a_secret_the_reference_would_mangle_is_refused_by_name(tmp_path):
    # The reference drops characters outside base64 silently and signs with another key.
    with pytest.raises(ConfigError) as caught:
        sw_config(tmp_path, secrets=["whsec_not-base64_at*all"])
    [problem] = caught.value.problems
    assert problem.startswith("sources.vendor.secrets.0: expected a Standard Webhooks secret")
    assert "not-base64" not in problem
