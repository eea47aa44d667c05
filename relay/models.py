"""Event models: QingStor bodies in, the relay envelope out. Pure data, no I/O."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from relay import jsoncodec

# QingStor rules say complete_multipart/abort_multipart, its records complete_upload/
# abort_upload. relay speaks the rule spelling everywhere and maps the other onto it.
EVENT_TYPE_ALIASES = {"complete_upload": "complete_multipart", "abort_upload": "abort_multipart"}


def normalize_event_type(value: str) -> str:
    return EVENT_TYPE_ALIASES.get(value, value)


def canonical_json(value: Any) -> str:
    """One spelling per JSON value, so equal content always hashes to the same id."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_id(*parts: str) -> str:
    # Unit separator between parts: ("a/b", "c") and ("a", "b/c") must not collide.
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return f"evt_{digest[:32]}"


def isoformat(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- QingStor notifier -----------------------------------------------------------------


def _iso_time(value: str) -> str:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO-8601 time") from None
    return value


# A time as the stores write them; the error names the field by its place.
IsoTime = Annotated[str, AfterValidator(_iso_time)]


class _Lenient(BaseModel):
    # Unknown fields are QingStor's to add; relay keeps the original record whole anyway.
    model_config = ConfigDict(extra="allow")


class QsBucket(_Lenient):
    name: str = Field(min_length=1)


class QsObject(_Lenient):
    name: str = Field(min_length=1)
    etag: str | None = None
    size: int | None = Field(None, ge=0)


class QsDetail(_Lenient):
    schema_version: str | None = None
    notification_id: str
    bucket: QsBucket
    object: QsObject


class QsResponseElements(_Lenient):
    request_id: str = Field(min_length=1)


class QsUserIdentify(_Lenient):
    principal_id: str | None = None


class NotifierRecord(_Lenient):
    event_source: str | None = None
    event_version: str | None = None
    event_type: str = Field(min_length=1)
    event_time: IsoTime
    zone_id: str | None = None
    user_identify: QsUserIdentify | None = None
    response_elements: QsResponseElements
    qingstor: QsDetail


class NotifierBatch(BaseModel):
    model_config = ConfigDict(extra="allow")
    events: list[NotifierRecord] = Field(min_length=1)


# --- QingStor tupu-porn ----------------------------------------------------------------


class TupuResult(_Lenient):
    code: int | None = None
    message: str | None = None
    nonce: str | None = None
    timestamp: float | None = None


class TupuPornResult(_Lenient):
    bucket: str = Field(min_length=1)
    object: str = Field(min_length=1)
    result: TupuResult


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event due at one sink, as the store hands it to the dispatcher."""

    id: int
    event_id: str
    sink: str
    attempts: int  # attempts made before this one
    created_at: float
    envelope: str  # the envelope's JSON, sent as stored
    # Only for sinks with `order: per_key`:
    # it holds up its object's later events until it is settled (it has an object, and
    # order_timeout has not released it);
    keyed: bool = False
    # an object already had a later event delivered to this sink (the sender's retry
    # came late): sent all the same, marked late;
    late: bool = False
    # coalesce: the ids of the object's older waiting events this one stands in for,
    # which the claim settled as coalesced;
    supersedes: tuple[str, ...] = ()
    # earlier events of its object that held it longer than order_timeout and that this
    # one now goes past: (event id, seconds held since its first failure), each once.
    overtakes: tuple[tuple[str, float], ...] = ()


def mark_late(delivery: Delivery) -> Delivery:
    """The delivery with `"late": true` in the envelope it sends: a later event of its
    object reached this sink before it (order: per_key)."""
    try:
        envelope = json.loads(delivery.envelope)
    except ValueError:
        return delivery
    if not isinstance(envelope, dict):
        return delivery
    envelope["late"] = True
    return replace(delivery, envelope=jsoncodec.dumps(envelope))


# --- the envelope ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """What sinks receive; attribute names follow CloudEvents."""

    id: str
    source: str
    type: str
    time: str
    subject: str
    bucket: str | None
    key: str | None
    received_at: str
    data: Any
    # The sender's own name for the event, for stores with a vocabulary of their own
    # (`s3:ObjectCreated:Put`, a CloudEvent's type) whose `type` relay mapped onto its
    # own; routes match either. None (and left out of the JSON) for QingStor's events.
    event_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        envelope = {
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "subject": self.subject,
            "bucket": self.bucket,
            "key": self.key,
            "received_at": self.received_at,
            "data": self.data,
        }
        if self.event_name is not None:
            envelope["event_name"] = self.event_name
        return envelope

    def to_json(self) -> str:
        """Compact JSON; raises UnicodeEncodeError when `data` holds a lone surrogate."""
        return jsoncodec.dumps(self.to_dict())

    def order_key(self) -> str | None:
        """The object this event is about, as a sink with `order: per_key` orders by:
        its source, bucket and key, hashed to a fixed length (keys run to 1,024 bytes).
        None for an event about no object (a generic webhook): it is never held."""
        if not self.bucket or self.key is None:
            return None
        name = "\x1f".join((self.source, self.bucket, self.key))
        return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def order_at(self, fallback: float) -> float:
        """Where this event sorts among its object's: its own time, as the sender
        stamped it (epoch seconds); `fallback` (the receipt) when it has none."""
        try:
            moment = datetime.fromisoformat(self.time)
        except (TypeError, ValueError):
            return fallback
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()


def notifier_envelopes(
    raw: dict[str, Any], batch: NotifierBatch, source: str, received_at: datetime
) -> list[Envelope]:
    """One envelope per record; `raw` supplies each record untouched for `data`."""
    received = isoformat(received_at)
    envelopes = []
    for record, original in zip(batch.events, raw["events"], strict=True):
        detail = record.qingstor
        kind = normalize_event_type(record.event_type)
        bucket, key = detail.bucket.name, detail.object.name
        envelopes.append(
            Envelope(
                id=event_id(
                    "notifier",
                    record.response_elements.request_id,
                    detail.notification_id,
                    kind,
                    bucket,
                    key,
                ),
                source=source,
                type=kind,
                time=record.event_time,
                subject=f"{bucket}/{key}",
                bucket=bucket,
                key=key,
                received_at=received,
                data=original,
            )
        )
    return envelopes


def tupu_porn_envelope(
    raw: dict[str, Any], result: TupuPornResult, source: str, received_at: datetime
) -> Envelope:
    nonce = result.result.nonce
    # Without a nonce the whole result is what identifies this review.
    identity = nonce if nonce is not None else canonical_json(raw["result"])
    when = received_at
    if result.result.timestamp is not None:
        try:
            when = datetime.fromtimestamp(result.result.timestamp / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            when = received_at
    return Envelope(
        id=event_id("tupu-porn", result.bucket, result.object, identity),
        source=source,
        type="tupu-porn",
        time=isoformat(when),
        subject=f"{result.bucket}/{result.object}",
        bucket=result.bucket,
        key=result.object,
        received_at=isoformat(received_at),
        data=raw,
    )


def image_envelope(raw: dict[str, Any], source: str, received_at: datetime) -> Envelope:
    # The image result's shape is undocumented: its content is its identity.
    bucket = raw.get("bucket") if isinstance(raw.get("bucket"), str) else None
    key = raw.get("object") if isinstance(raw.get("object"), str) else None
    subject = f"{bucket}/{key}" if bucket and key else (bucket or "")
    return Envelope(
        id=event_id("image", canonical_json(raw)),
        source=source,
        type="image",
        time=isoformat(received_at),
        subject=subject,
        bucket=bucket,
        key=key,
        received_at=isoformat(received_at),
        data=raw,
    )
