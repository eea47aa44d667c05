"""`kind: cloudevents`: any CloudEvents 1.0 producer over HTTP, in each content mode of
the HTTP protocol binding: structured (`application/cloudevents+json`), batched
(`application/cloudevents-batch+json`) and binary (attributes in `ce-*` headers, the
body is the data). A JSON object or array of events posted as plain JSON is read as
structured or batched: event buses post "the complete event" that way.

Each event is kept whole in `data`, in the CloudEvents JSON format whatever mode it
came in, so that one event reads the same however it was sent. Its id is its `source`
and `id`, which the specification makes unique. Storage events of the cloud buses
relay knows (relay.vocabulary) get their bucket, key and relay's type.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from relay import jsoncodec
from relay.config import CloudEventsSourceConfig
from relay.errors import InvalidBody, UnsupportedMediaType
from relay.models import Envelope, event_id, isoformat
from relay.sources.base import (
    RequestMeta,
    check_peer,
    check_token,
    decode_json,
    header_value,
    looks_like,
)
from relay.sources.hmac_header import HmacHeader
from relay.vocabulary import bus_object

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
SPECVERSION = "1.0"
_REQUIRED = ("id", "source", "type")
_NAME = re.compile(r"[a-z0-9]+")
_HEADER_PREFIX = "ce-"
_RESERVED = frozenset({"data", "data_base64"})
# A quoted-string header value (RFC 7230), which the binding says to read for older
# senders: the quotes go, and each backslash-escaped character stands for itself.
_QUOTED_PAIR = re.compile(r"\\(.)")


@dataclass(frozen=True, slots=True)
class RawData:
    """A binary-mode body that is not JSON: kept as text, or as base64 if it is none."""

    body: bytes


class _NoData:
    """A binary-mode event with an empty body: an event without data."""


NO_DATA = _NoData()


def is_json_type(media_type: str) -> bool:
    """Whether data of this media type is JSON, as the JSON format reads it: `*/json`
    and `*/*+json`."""
    media = media_type.split(";", 1)[0].strip().lower()
    return media.endswith("/json") or media.endswith("+json")


def header_attribute(name: str, value: str) -> str:
    """A `ce-*` header value as the attribute's text: a quoted string unquoted, then one
    round of percent-decoding, which must leave UTF-8 (the binding's rules)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
    # aiohttp hands raw non-ASCII header bytes over as surrogates: back to the bytes.
    raw = unquote_to_bytes(value.encode("utf-8", "surrogateescape"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidBody(f"{name} is not percent-encoded UTF-8", code="invalid_event") from None


def binary_attributes(headers: Mapping[str, str], *, strict: bool = True) -> dict[str, Any]:
    """The attributes a binary-mode request carries in its `ce-*` headers. Not `strict`
    (for quarantine), what is wrong is kept as it came rather than refused: a repeated
    header's first value, a value as sent when it does not decode."""
    attributes: dict[str, Any] = {}
    for header, value in headers.items():
        lowered = header.lower()
        if not lowered.startswith(_HEADER_PREFIX):
            continue
        name = lowered.removeprefix(_HEADER_PREFIX)
        if name == "datacontenttype":
            continue  # Content-Type carries it in binary mode
        try:
            if not _NAME.fullmatch(name) or name in _RESERVED:
                raise InvalidBody(
                    f"{header}: CloudEvents attribute names are lower-case letters and"
                    " digits, and not data",
                    code="invalid_event",
                )
            if name in attributes:
                # Which of two ids (or sources) is the event's? Dedupe would rest on a
                # guess.
                raise InvalidBody(f"{header} is given more than once", code="invalid_event")
            attributes[name] = header_attribute(header, value)
        except InvalidBody:
            if strict:
                raise
            attributes.setdefault(name, value)
    content_type = header_value(headers, "Content-Type")
    if content_type:
        attributes["datacontenttype"] = content_type
    return attributes


def with_data(attributes: dict[str, Any], document: Any) -> dict[str, Any]:
    """The binary-mode event in the JSON format: attributes, then `data` (JSON data and
    text) or `data_base64` (bytes that are not UTF-8)."""
    event = dict(attributes)
    if isinstance(document, RawData):
        try:
            event["data"] = document.body.decode("utf-8")
        except UnicodeDecodeError:
            event["data_base64"] = base64.b64encode(document.body).decode("ascii")
    elif document is not NO_DATA:
        event["data"] = document
    return event


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def check_event(event: Any, where: str = "", prefix: str = "") -> dict[str, Any]:
    """The event, if it is a CloudEvent 1.0 in the JSON format; else InvalidBody saying
    what is wrong (`where` names the event of a batch)."""
    if not isinstance(event, dict):
        raise InvalidBody(
            f"{where}expected a CloudEvent (a JSON object), got {_json_type(event)}",
            code="not_an_event",
        )
    version = event.get("specversion")
    if version is None:
        seen = looks_like(event)
        raise InvalidBody(
            f"{where}not a CloudEvent: no specversion (relay reads CloudEvents 1.0)"
            + (f"; this is {seen}" if seen else ""),
            code="not_an_event",
        )
    if version != SPECVERSION:
        raise InvalidBody(
            f"{where}specversion must be {SPECVERSION!r}; relay reads CloudEvents 1.0",
            code="invalid_event",
        )
    missing = [n for n in _REQUIRED if not isinstance(event.get(n), str) or not event[n]]
    if missing:
        names = ", ".join(f"{prefix}{n}" for n in missing)
        raise InvalidBody(
            f"{where}missing {names}: a CloudEvent needs a non-empty id, source and type",
            code="invalid_event",
        )
    if "data" in event and "data_base64" in event:
        raise InvalidBody(
            f"{where}an event carries data or data_base64, not both", code="invalid_event"
        )
    if "data_base64" in event and not _is_base64(event["data_base64"]):
        raise InvalidBody(f"{where}data_base64 is not a base64 string", code="invalid_event")
    for name, value in event.items():
        if name in ("data", "data_base64"):
            continue
        if not _NAME.fullmatch(name):
            raise InvalidBody(
                f"{where}attribute {name[:40]!r}: names are lower-case letters and digits",
                code="invalid_event",
            )
        if isinstance(value, dict | list):
            raise InvalidBody(
                f"{where}attribute {name}: a value is a string, number, boolean or null,"
                f" not {_json_type(value)}",
                code="invalid_event",
            )
    return event


def _is_base64(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def is_rfc3339(value: Any) -> bool:
    """A full date and time with its offset, as CloudEvents' `time` must be; Python's
    ISO reader would also take a bare date or a time without a zone."""
    if not isinstance(value, str) or len(value) < 20 or value[10] not in "Tt":
        return False
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return False
    return moment.tzinfo is not None


def event_time(value: Any, fallback: str | None, received_at: datetime) -> str:
    """The envelope's time: the event's `time` when it is RFC 3339; the storage event's
    own time when a bus wrote something else there (Tencent's epoch milliseconds,
    Alibaba's `...Asia/Shanghai`); else the receipt."""
    for candidate in (value, fallback):
        if is_rfc3339(candidate):
            return str(candidate)
    millis = value if type(value) is int else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        millis = int(value)
    if millis is not None:
        try:
            return isoformat(datetime.fromtimestamp(millis / 1000, tz=UTC))
        except (OverflowError, OSError, ValueError):
            pass
    return isoformat(received_at)


def cloudevent_envelope(event: dict[str, Any], source: str, received_at: datetime) -> Envelope:
    ce_type: str = event["type"]
    found = bus_object(event)
    bucket = found.bucket if found is not None else None
    key = found.key if found is not None else None
    subject = event.get("subject") if isinstance(event.get("subject"), str) else ""
    if bucket and key:
        subject = f"{bucket}/{key}"
    return Envelope(
        id=event_id("cloudevents", event["source"], event["id"]),
        source=source,
        type=found.type if found is not None and found.type else ce_type,
        time=event_time(event.get("time"), found.time if found else None, received_at),
        subject=subject or "",
        bucket=bucket,
        key=key if bucket else None,
        received_at=isoformat(received_at),
        data=event,
        event_name=ce_type,
    )


class CloudEventsSource:
    def __init__(self, name: str, config: CloudEventsSourceConfig) -> None:
        self.name = name
        self.config = config
        self.authenticates = config.authenticates
        self._hmac = None if config.hmac is None else HmacHeader(name, config.hmac)

    def authenticate(self, meta: RequestMeta) -> None:
        check_peer(self.name, self.config.allow_ips, meta)
        check_token(self.config.token, meta, bearer=True, header=self.config.token_header)
        if self._hmac is not None:
            self._hmac.require(meta)

    def verify(self, meta: RequestMeta, body: bytes, now: float) -> None:
        if self._hmac is not None:
            self._hmac.verify(meta, body)

    def records_in(self, document: Any) -> int | None:
        return len(document) if type(document) is list else None

    def quarantine_form(
        self, meta: RequestMeta, body: bytes, content_type: str
    ) -> tuple[bytes, str]:
        """A binary-mode event's attributes are in its headers, which quarantine does not
        keep: it keeps the event in the JSON format instead, so it can be posted again."""
        if self._mode(meta, content_type) != "binary":
            return body, content_type
        try:
            data = self.decode(meta, body, content_type)
        except InvalidBody:
            data = RawData(body)  # not the JSON it said it was: kept as it came
        event = with_data(binary_attributes(meta.headers, strict=False), data)
        return jsoncodec.dumps(event).encode("utf-8"), STRUCTURED

    @staticmethod
    def _mode(meta: RequestMeta, content_type: str) -> str:
        if content_type.startswith("application/cloudevents-batch"):
            return "batch"
        if content_type.startswith("application/cloudevents"):
            return "structured"
        if header_value(meta.headers, "ce-specversion") is not None:
            return "binary"
        return "json"

    def decode(self, meta: RequestMeta, body: bytes, content_type: str) -> Any:
        mode = self._mode(meta, content_type)
        if mode in ("batch", "structured") and not content_type.endswith("+json"):
            raise UnsupportedMediaType(
                f"{content_type}: relay reads the CloudEvents JSON format"
                f" ({STRUCTURED} or {BATCH}) or binary mode"
            )
        if mode != "binary":
            return decode_json(body, content_type)
        if not body:
            return NO_DATA
        declared = header_value(meta.headers, "Content-Type")
        if declared is None or is_json_type(content_type):
            # No Content-Type: the data is JSON by the JSON format's default.
            return decode_json(body, content_type)
        return RawData(body)

    def parse(self, meta: RequestMeta, document: Any, received_at: datetime) -> list[Envelope]:
        mode = self._mode(meta, meta_type(meta))
        if mode == "binary":
            events = [with_data(binary_attributes(meta.headers), document)]
        elif isinstance(document, list) and mode in ("batch", "json"):
            events = document
        elif mode == "batch":
            raise InvalidBody(f"{BATCH} is a JSON array of events", code="not_an_event")
        else:
            events = [document]
        batch = len(events) > 1 or mode == "batch"
        # In binary mode the attributes came as headers: name those.
        prefix = _HEADER_PREFIX if mode == "binary" else ""
        checked = [
            check_event(e, f"event {i + 1} of the batch: " if batch else "", prefix)
            for i, e in enumerate(events)
        ]
        return [cloudevent_envelope(e, self.name, received_at) for e in checked]


def meta_type(meta: RequestMeta) -> str:
    """The declared media type, lower-cased and without parameters, as decode() got it."""
    declared = header_value(meta.headers, "Content-Type") or ""
    return declared.split(";", 1)[0].strip().lower()
