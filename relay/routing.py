"""Routes: which sinks an event goes to. Pure functions of the envelope."""

from __future__ import annotations

from fnmatch import fnmatchcase

from relay.config import Route, When
from relay.models import Envelope


def matches(when: When | None, event: Envelope) -> bool:
    if when is None:
        return True
    if when.event_types is not None and event.type not in when.event_types:
        return False
    if when.buckets is not None and event.bucket not in when.buckets:
        return False
    if when.sources is not None and event.source not in when.sources:
        return False
    if when.keys is not None:
        # `*` crosses `/`, as in QingStor's own object_filters.
        return event.key is not None and any(fnmatchcase(event.key, p) for p in when.keys)
    return True


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes

    def sinks_for(self, event: Envelope) -> tuple[str, ...]:
        """Every sink of every matching route, each once, in the order first named."""
        chosen: dict[str, None] = {}
        for route in self.routes:
            if matches(route.when, event):
                chosen.update(dict.fromkeys(route.to))
        return tuple(chosen)
