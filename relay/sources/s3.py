"""`kind: s3`: S3 event notifications pushed over HTTP (MinIO's webhook target, Ceph's
HTTP topics), one event per record.

MinIO wraps the S3 message as `{"EventName", "Key", "Records"}`; Ceph sends
`{"Records": [...]}`, as S3 itself does. Neither signs its POSTs: MinIO sends its
`auth_token` as `Authorization: Bearer`, and a URL can carry `?token=`. MinIO re-posts
an unanswered event until it is answered, unchanged: the id comes from the event, so a
repeat is a duplicate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from relay.config import S3SourceConfig
from relay.errors import InvalidBody
from relay.models import Envelope, IsoTime, canonical_json, event_id, isoformat
from relay.sources.base import (
    JsonBody,
    RequestMeta,
    check_peer,
    check_token,
    describe,
    looks_like,
)
from relay.vocabulary import s3_event_name, s3_type


class _Lenient(BaseModel):
    # The stores add fields of their own (MinIO's `source`, Ceph's `opaqueData`); the
    # record is kept whole in `data` whatever it holds.
    model_config = ConfigDict(extra="allow")


class S3Bucket(_Lenient):
    name: str = Field(min_length=1)


class S3Object(_Lenient):
    # Only what the id needs is read; the rest stays in `data` as sent. MinIO re-posts
    # a refused event for ever and holds its queue behind it, so a 400 over a field
    # relay does not need (a size written oddly) would stall the bucket's notifications.
    # Bucket events (MinIO's s3:BucketCreated) have no object key.
    key: str | None = None
    version_id: Any = Field(None, alias="versionId")
    sequencer: Any = None


class S3Entity(_Lenient):
    bucket: S3Bucket
    object: S3Object = S3Object()


class S3Record(_Lenient):
    event_time: IsoTime = Field(alias="eventTime")
    event_name: str = Field(min_length=1, alias="eventName")
    event_source: Any = Field(None, alias="eventSource")
    response_elements: Any = Field(None, alias="responseElements")
    s3: S3Entity


class S3Message(_Lenient):
    records: list[S3Record] = Field(alias="Records")


def decode_key(raw: str) -> str:
    """An object key as S3 records carry it, URL-encoded with `+` for a space, decoded.
    A key whose escapes are not UTF-8 is refused: no store writes one, and a lossy
    decode could make two objects one."""
    try:
        return unquote_plus(raw, errors="strict")
    except UnicodeDecodeError:
        raise InvalidBody(
            "s3.object.key holds a %-escape that is not UTF-8; S3 keys are UTF-8",
            code="invalid_event",
        ) from None


def _request_id(record: S3Record) -> str:
    elements = record.response_elements
    value = elements.get("x-amz-request-id") if isinstance(elements, dict) else None
    return value if isinstance(value, str) else ""


def _mark(value: Any) -> str:
    # A sequencer or version id as a part of the id: stores write strings, but any
    # value still identifies; only its absence is "".
    if value is None:
        return ""
    return value if isinstance(value, str) else canonical_json(value)


# Stores that write keys into their records as they are, not URL-encoded.
_RAW_KEYS = frozenset({"ceph:s3"})


def s3_envelopes(
    document: dict[str, Any],
    message: S3Message,
    source: str,
    received_at: datetime,
    key_encoding: str = "auto",
) -> list[Envelope]:
    received = isoformat(received_at)
    envelopes = []
    for record, original in zip(message.records, document["Records"], strict=True):
        bucket = record.s3.bucket.name
        store = record.event_source if isinstance(record.event_source, str) else ""
        raw = key_encoding == "raw" or (key_encoding == "auto" and store in _RAW_KEYS)
        obj = record.s3.object
        key = (obj.key if raw else decode_key(obj.key)) if obj.key else None
        name = s3_event_name(record.event_name)
        request_id = _request_id(record)
        sequencer = _mark(obj.sequencer)
        # What tells one event from another: the object, what happened, and S3's own
        # marks for this change (the sequencer orders changes to one key, the request
        # id names the request). Without either mark, the event's time stands in.
        marks: tuple[str, ...] = (sequencer, request_id, _mark(obj.version_id))
        if not sequencer and not request_id:
            marks += (record.event_time,)
        envelopes.append(
            Envelope(
                id=event_id("s3", bucket, key or "", name, *marks),
                source=source,
                type=s3_type(name),
                time=record.event_time,
                subject=f"{bucket}/{key}" if key else bucket,
                bucket=bucket,
                key=key,
                received_at=received,
                data=original,
                event_name=name,
            )
        )
    return envelopes


def _is_test_event(document: dict[str, Any]) -> bool:
    # S3's check of the wiring when a notification is configured, should a forwarder
    # pass it on: `{"Service": "Amazon S3", "Event": "s3:TestEvent", ...}`.
    return document.get("Event") == "s3:TestEvent" and "Records" not in document


class S3Source(JsonBody):
    batch_key = "Records"

    def __init__(self, name: str, config: S3SourceConfig) -> None:
        self.name = name
        self.config = config
        self.authenticates = config.authenticates

    def authenticate(self, meta: RequestMeta) -> None:
        check_peer(self.name, self.config.allow_ips, meta)
        check_token(self.config.token, meta, bearer=True)

    def verify(self, meta: RequestMeta, body: bytes, now: float) -> None:
        """Nothing signs S3 notifications; authenticate() checked the token."""

    def parse(self, meta: RequestMeta, document: Any, received_at: datetime) -> list[Envelope]:
        if not isinstance(document, dict) or (
            "Records" not in document and not _is_test_event(document)
        ):
            seen = looks_like(document)
            raise InvalidBody(
                'not an S3 event notification: expected {"Records": [...]}'
                + (f"; this is {seen}" if seen else ""),
                code="not_an_event",
            )
        if "Records" not in document:
            return []
        try:
            message = S3Message.model_validate(document)
        except ValidationError as exc:
            raise InvalidBody(describe(exc), code="invalid_event") from None
        return s3_envelopes(document, message, self.name, received_at, self.config.key_encoding)
