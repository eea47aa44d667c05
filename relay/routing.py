"""Routes: which sinks an event goes to. Pure functions of the envelope."""

from __future__ import annotations

from collections.abc import Iterator
from fnmatch import fnmatchcase
from typing import Any

from relay.config import Conditions, Route, When
from relay.models import Envelope
from relay.vocabulary import object_size as size_in


def _qingstor_detail(event: Envelope) -> dict[str, Any]:
    detail = event.data.get("qingstor") if isinstance(event.data, dict) else None
    return detail if isinstance(detail, dict) else {}


def object_size(event: Envelope) -> int | None:
    return size_in(event.data)


def notification_id(event: Envelope) -> str | None:
    value = _qingstor_detail(event).get("notification_id")
    return value if isinstance(value, str) else None


def _type_matches(c: Conditions, event: Envelope) -> bool:
    """relay's type or the sender's own name (`s3:ObjectCreated:Put`), exactly or by a
    glob (`s3:ObjectCreated:*`), as S3 users write them."""
    names = (event.type,) if event.event_name is None else (event.type, event.event_name)
    listed = c.event_types or ()
    if any(name in listed for name in names):
        return True
    return any(fnmatchcase(name, p) for p in c.type_globs for name in names)


def _checks(c: Conditions, event: Envelope) -> Iterator[bool]:
    """One verdict per condition that is given; conditions left out yield nothing."""
    key = event.key
    if c.event_types is not None:
        yield _type_matches(c, event)
    if c.buckets is not None:
        yield event.bucket in c.buckets
    if c.sources is not None:
        yield event.source in c.sources
    if c.notification_ids is not None:
        yield notification_id(event) in c.notification_ids
    if c.keys is not None:
        # `*` crosses `/`, as in QingStor's own object_filters.
        yield key is not None and any(fnmatchcase(key, p) for p in c.keys)
    if c.prefixes is not None:
        yield key is not None and key.startswith(tuple(c.prefixes))
    if c.suffixes is not None:
        yield key is not None and key.endswith(tuple(c.suffixes))
    if c.min_size is not None or c.max_size is not None:
        # An event without a size (a delete, a tupu-porn result) fails size conditions.
        size = object_size(event)
        yield (
            size is not None
            and (c.min_size is None or size >= c.min_size)
            and (c.max_size is None or size <= c.max_size)
        )


def matches(when: When | None, event: Envelope) -> bool:
    if when is None:
        return True
    if not all(_checks(when, event)):
        return False
    return when.not_ is None or not any(_checks(when.not_, event))


class Router:
    def __init__(self, routes: list[Route], ordered: frozenset[str] = frozenset()) -> None:
        self.routes = routes
        # The sinks with `order: per_key`: their deliveries carry the object's key.
        self.ordered = ordered

    def sinks_for(self, event: Envelope) -> tuple[str, ...]:
        """Every sink of every matching route, each once, in the order first named."""
        chosen: dict[str, None] = {}
        for route in self.routes:
            if matches(route.when, event):
                chosen.update(dict.fromkeys(route.to))
        return tuple(chosen)
