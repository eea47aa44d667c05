"""relay's object vocabulary, and how other stores' events map onto it. Pure: no I/O.

relay names what happened to an object as QingStor's rules do: `create_object`,
`delete_object`, `complete_multipart`, `abort_multipart`. Other stores have names of
their own; where one means the same, the envelope's `type` is relay's word and its
`event_name` keeps the store's, so that a route may name either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CREATE = "create_object"
DELETE = "delete_object"
COMPLETE_MULTIPART = "complete_multipart"
ABORT_MULTIPART = "abort_multipart"

# --- S3 (AWS, MinIO, Ceph) -------------------------------------------------------------

S3_PREFIX = "s3:"


def s3_event_name(name: str) -> str:
    """The S3 event name as S3's configuration spells it, `s3:` first: AWS and newer
    Ceph leave the prefix out of their records (`ObjectCreated:Put`), MinIO keeps it."""
    return name if name.startswith(S3_PREFIX) else S3_PREFIX + name


def s3_type(event_name: str) -> str:
    """relay's type for an S3 event name (already through s3_event_name): creations,
    removals and completed multipart uploads map; every other name (restores,
    replication, lifecycle, tagging, ACLs, MinIO's reads) is its own type."""
    if event_name == "s3:ObjectCreated:CompleteMultipartUpload":
        return COMPLETE_MULTIPART
    if event_name.startswith("s3:ObjectCreated:"):
        return CREATE
    if event_name.startswith("s3:ObjectRemoved:"):
        return DELETE
    return event_name


# --- cloud event buses (CloudEvents) ---------------------------------------------------


@dataclass(frozen=True)
class Bus:
    """What one cloud's event bus puts where in an object-storage CloudEvent: a table of
    facts from its documentation, read by one mechanism (`bus_object`)."""

    name: str
    sources: frozenset[str]  # the CloudEvent `source` values of its storage events
    # Paths into the CloudEvent's `data`.
    bucket: tuple[str, ...]
    key: tuple[str, ...]
    size: tuple[str, ...]
    # The event's own time, for when the CloudEvent's `time` is not RFC 3339.
    time: tuple[str, ...]
    # CloudEvent type -> relay's type; any other type of the bus stays as it is.
    types: dict[str, str] = field(default_factory=dict)


# Alibaba Cloud EventBridge, OSS: https://www.alibabacloud.com/help/en/eventbridge/user-guide/oss-events
# type is "oss:" + data.eventName; the bucket and key sit under data.oss.
OSS = Bus(
    name="Alibaba Cloud OSS (EventBridge)",
    sources=frozenset({"acs.oss"}),
    bucket=("oss", "bucket", "name"),
    key=("oss", "object", "key"),
    size=("oss", "object", "size"),
    time=("eventTime",),
    types={
        **dict.fromkeys(
            (
                "oss:ObjectCreated:PutObject",
                "oss:ObjectCreated:PostObject",
                "oss:ObjectCreated:CopyObject",
                "oss:ObjectCreated:AppendObject",
                "oss:ObjectCreated:PutSymlink",
            ),
            CREATE,
        ),
        # InitiateMultipartUpload, UploadPart and UploadPartCopy are steps of an upload,
        # not a new object: they keep their own names.
        "oss:ObjectCreated:CompleteMultipartUpload": COMPLETE_MULTIPART,
        "oss:ObjectRemoved:AbortMultipartUpload": ABORT_MULTIPART,
        "oss:ObjectRemoved:DeleteObject": DELETE,
        "oss:ObjectRemoved:DeleteObjects": DELETE,
    },
)

# Huawei Cloud EventGrid, OBS (the "OBS Application Service" source, HC.OBS.DWR): the
# types as Huawei's Terraform provider lists them; bucket and key under data.obs.
OBS = Bus(
    name="Huawei Cloud OBS (EventGrid)",
    sources=frozenset({"HC.OBS.DWR"}),
    bucket=("obs", "bucket", "name"),
    key=("obs", "object", "key"),
    size=("obs", "object", "size"),
    time=("eventTime",),
    types={
        "OBS:DWR:ObjectCreated:PUT": CREATE,
        "OBS:DWR:ObjectCreated:POST": CREATE,
        "OBS:DWR:ObjectCreated:COPY": CREATE,
        "OBS:DWR:ObjectCreated:CompleteMultipartUpload": COMPLETE_MULTIPART,
        "OBS:DWR:ObjectRemoved:Delete": DELETE,
        "OBS:DWR:ObjectRemoved:DeleteMarkerCreated": DELETE,
    },
)

# Tencent Cloud EventBridge's COS events are not here: its documentation shows the
# envelope (source cos.cloud.tencent) but not where `data` keeps the bucket and key.
BUSES = (OSS, OBS)
_BY_SOURCE = {source: bus for bus in BUSES for source in bus.sources}


@dataclass(frozen=True, slots=True)
class BusObject:
    bus: Bus
    type: str  # relay's type, or the CloudEvent's own
    bucket: str | None
    key: str | None
    size: int | None
    time: str | None  # the storage event's own time, as the bus wrote it


def dig(value: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def bus_object(event: dict[str, Any]) -> BusObject | None:
    """What a cloud bus's storage CloudEvent (JSON format) says about its object; None
    for a CloudEvent from any other source."""
    source = event.get("source")
    bus = _BY_SOURCE.get(source) if isinstance(source, str) else None
    if bus is None:
        return None
    ce_type = event.get("type")
    data = event.get("data")
    return BusObject(
        bus=bus,
        type=bus.types.get(ce_type, ce_type) if isinstance(ce_type, str) else "",
        bucket=_text(dig(data, bus.bucket)),
        key=_text(dig(data, bus.key)),
        size=byte_count(dig(data, bus.size)),
        time=_text(dig(data, bus.time)),
    )


# --- sizes -----------------------------------------------------------------------------


def byte_count(value: Any) -> int | None:
    """A size as the stores write it: a number, or (Ceph's older records) its digits."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def object_size(data: Any) -> int | None:
    """The object's size in bytes, from the record an envelope keeps in `data`, in
    each shape relay maps (QingStor's notifier, S3, the buses' CloudEvents); None when
    it has none (a delete, a review result, a shape relay does not know)."""
    if not isinstance(data, dict):
        return None
    if "qingstor" in data:
        size = dig(data, ("qingstor", "object", "size"))  # QingStor writes a number
        return size if type(size) is int and size >= 0 else None
    if "s3" in data:
        return byte_count(dig(data, ("s3", "object", "size")))
    if "specversion" in data:
        found = bus_object(data)
        return found.size if found is not None else None
    return None
