"""Ids, types and envelopes for sources whose bodies have no shape relay knows. Pure: no I/O.

`id_from` / `type_from` name where a value comes from: `header:<Name>`, or a JSON path
into the parsed body (`$.a.b` or `a.b`; a numeric segment indexes a list).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relay.config import GenericSourceBase
from relay.errors import InvalidBody
from relay.models import Envelope, canonical_json, event_id, isoformat
from relay.sources.base import JsonBody, RequestMeta, header_value

# Leads every generic id so it cannot collide with a QingStor id, whose first part is
# always "notifier", "tupu-porn" or "image".
_ID_DOMAIN = "source"


@dataclass(frozen=True, slots=True)
class Extractor:
    """A parsed `id_from` / `type_from`: either a header name or a path into the body."""

    spec: str  # as configured, for messages
    header: str | None = None
    path: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Extractor:
        if spec.startswith("header:"):
            name = spec.removeprefix("header:")
            if not name:
                raise ValueError(f"{spec!r}: the header name is empty")
            return cls(spec=spec, header=name)
        path = tuple(spec.removeprefix("$").removeprefix(".").split("."))
        if not all(path):
            raise ValueError(f"{spec!r}: expected a JSON path such as $.data.id or data.id")
        return cls(spec=spec, path=path)

    @classmethod
    def optional(cls, spec: str | None) -> Extractor | None:
        return None if spec is None else cls.parse(spec)


_MISSING = object()


def _walk(document: Any, path: tuple[str, ...]) -> Any:
    current = document
    for segment in path:
        if isinstance(current, dict):
            current = current.get(segment, _MISSING)
        elif isinstance(current, list) and segment.isascii() and segment.isdigit():
            index = int(segment)
            current = current[index] if index < len(current) else _MISSING
        else:
            return _MISSING
        if current is _MISSING:
            return _MISSING
    return current


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def extract(extractor: Extractor, headers: Mapping[str, str], document: Any, *, what: str) -> str:
    """The value `extractor` names, as a non-empty string; else 400 `invalid_event`.

    `what` is the config key (`id_from`, `type_from`) so the sender's message points at
    the setting that asked for the value. Values are never echoed: they may be large.
    """
    if extractor.header is not None:
        value = header_value(headers, extractor.header)
        if not value:
            raise InvalidBody(
                f"{what} is {extractor.spec}, but the request has no {extractor.header}"
                " header (or it is empty)",
                code="invalid_event",
            )
        return value
    found = _walk(document, extractor.path)
    where = "$." + ".".join(extractor.path)
    if found is _MISSING:
        raise InvalidBody(
            f"{what} is {extractor.spec}, but the body has nothing at {where}",
            code="invalid_event",
        )
    # bool is an int in Python, but true/false identify nothing.
    if isinstance(found, bool) or not isinstance(found, str | int | float):
        raise InvalidBody(
            f"{what} is {extractor.spec}, but {where} is {_json_type(found)};"
            " expected a string or a number",
            code="invalid_event",
        )
    text = found if isinstance(found, str) else canonical_json(found)
    if not text:
        raise InvalidBody(
            f"{what} is {extractor.spec}, but {where} is an empty string",
            code="invalid_event",
        )
    return text


def source_event_id(source: str, identity: str, *, from_body: bool) -> str:
    """Scoped by the source's name, so two senders that reuse an id never collide.

    `from_body` tells a hash of the whole body from a named identifier, so that a body
    `"x"` can never pass for an identifier `"x"` and the other way round.
    """
    return event_id(_ID_DOMAIN, source, "body" if from_body else "id", identity)


def generic_envelope(
    *,
    source: str,
    kind: str,
    headers: Mapping[str, str],
    document: Any,
    received_at: datetime,
    id_from: Extractor | None,
    type_from: Extractor | None,
    default_id: str | None = None,
    time: datetime | None = None,
) -> Envelope:
    """One envelope for one body of any JSON value, kept whole in `data`.

    The id comes from `id_from`, else `default_id` (the sender's own message id, when
    its protocol has one), else the body's canonical JSON, so that a retry of the same
    content is a duplicate however the sender spaced or ordered it.
    """
    if id_from is not None:
        subject: str | None = extract(id_from, headers, document, what="id_from")
    else:
        subject = default_id
    if subject is not None:
        identity = source_event_id(source, subject, from_body=False)
    else:
        identity = source_event_id(source, canonical_json(document), from_body=True)

    if type_from is not None:
        event_type = extract(type_from, headers, document, what="type_from")
    elif isinstance(document, dict) and isinstance(document.get("type"), str) and document["type"]:
        event_type = document["type"]
    else:
        event_type = kind

    return Envelope(
        id=identity,
        source=source,
        type=event_type,
        time=isoformat(time if time is not None else received_at),
        subject=subject or "",
        bucket=None,
        key=None,
        received_at=isoformat(received_at),
        data=document,
    )


class BodySource(JsonBody):
    """What the kinds with no model of their bodies share: the extractors, built once
    from `id_from` / `type_from`, and the one envelope each request becomes."""

    kind: str
    authenticates = True  # signed kinds; `generic` decides by its config

    def __init__(self, name: str, config: GenericSourceBase) -> None:
        self.name = name
        self._id_from = Extractor.optional(config.id_from)
        self._type_from = Extractor.optional(config.type_from)

    def _envelopes(
        self,
        meta: RequestMeta,
        document: Any,
        received_at: datetime,
        *,
        default_id: str | None = None,
        time: datetime | None = None,
    ) -> list[Envelope]:
        return [
            generic_envelope(
                source=self.name,
                kind=self.kind,
                headers=meta.headers,
                document=document,
                received_at=received_at,
                id_from=self._id_from,
                type_from=self._type_from,
                default_id=default_id,
                time=time,
            )
        ]
