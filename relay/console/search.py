"""Finding events: the console's filters over the store's newest-first listing. Pure
filtering; the reading is bounded (at most SCAN events per page), so a filter that
matches nothing in a store of a million events answers at once and offers to look
further back instead of reading them all."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from relay.store import EventSummary, Observations

SCAN = 5000  # events read for one page at most
BATCH = 500  # events read from the store at a time

State = Literal["delivered", "pending", "dead"]


@dataclass(frozen=True)
class EventFilter:
    source: str | None = None
    bucket: str | None = None
    key: str | None = None  # a prefix, or a glob when it has * ? or [
    type: str | None = None
    state: State | None = None

    def matches(self, event: EventSummary, envelope: dict[str, Any]) -> bool:
        if self.source and event.source != self.source:
            return False
        if self.bucket and envelope.get("bucket") != self.bucket:
            return False
        # relay's type or the store's own name (s3:ObjectCreated:Put), exactly or by a
        # glob (s3:ObjectRemoved:*), as routes match.
        if self.type:
            names = [
                n for n in (envelope.get("type"), envelope.get("event_name")) if isinstance(n, str)
            ]
            if not any(n == self.type or fnmatch.fnmatchcase(n, self.type) for n in names):
                return False
        if self.key:
            key = envelope.get("key")
            if not isinstance(key, str):
                return False
            glob = any(c in self.key for c in "*?[")
            if not (fnmatch.fnmatchcase(key, self.key) if glob else key.startswith(self.key)):
                return False
        return self.state is None or state_of(event) == self.state


def state_of(event: EventSummary) -> State:
    """Dead if any sink's delivery is dead, pending if any is pending, else delivered."""
    states = {state for _, state in event.states}
    if "dead" in states:
        return "dead"
    if "pending" in states:
        return "pending"
    return "delivered"


@dataclass(frozen=True)
class Found:
    events: list[tuple[EventSummary, dict[str, Any]]]
    cursor: str | None  # where to look further back, if anything is left
    scanned: int


async def find(
    store: Observations, wanted: EventFilter, cursor: str | None, limit: int = 50
) -> Found:
    """Up to `limit` matching events from `cursor` back. The cursor the page hands on is
    the store's cursor of the run it stopped in plus how many of that run were read
    (`<store cursor>|<skip>`), so that the next page resumes exactly there."""
    found: list[tuple[EventSummary, dict[str, Any]]] = []
    scanned = 0
    base, skip = _parse(cursor)
    size = limit  # a first run the size of the page: the newest, unfiltered, in one go
    while scanned < SCAN:
        run = await store.recent_events(base, size)
        size = BATCH
        for position, event in enumerate(run.events[skip:], start=skip):
            scanned += 1
            if wanted.matches(event, _envelope(event)):
                found.append((event, _envelope(event)))
                if len(found) == limit:
                    more = position + 1 < len(run.events) or run.cursor is not None
                    return Found(found, f"{base or ''}|{position + 1}" if more else None, scanned)
        if run.cursor is None:
            return Found(found, None, scanned)
        base, skip = run.cursor, 0
    return Found(found, f"{base or ''}|0", scanned)


_CURSOR = re.compile(r"([0-9.e+-]{1,32}:[^|\s]{1,300})?\|[0-9]{1,6}")


def valid_cursor(cursor: str) -> bool:
    """Whether `cursor` has the shape the pages hand on (`<store cursor>|<skip>`)."""
    return bool(_CURSOR.fullmatch(cursor))


def _parse(cursor: str | None) -> tuple[str | None, int]:
    if not cursor:
        return None, 0
    base, _, skip = cursor.rpartition("|")
    return (base or None), int(skip) if skip.isdigit() else 0


def _envelope(event: EventSummary) -> dict[str, Any]:
    try:
        envelope = json.loads(event.envelope)
    except ValueError:
        return {}
    return envelope if isinstance(envelope, dict) else {}
