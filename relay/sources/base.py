"""The source protocol: what ingest asks of every source kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Protocol

from relay.models import Envelope


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """The parts of a request a source may judge before its body is read."""

    headers: Mapping[str, str]
    query: Mapping[str, str]
    peer: IPv4Address | IPv6Address | None


class Source(Protocol):
    name: str

    def authenticate(self, meta: RequestMeta) -> None:
        """Raise Unauthorized or Forbidden; return quietly when the request may proceed."""

    def verify(self, meta: RequestMeta, body: bytes, now: float) -> None:
        """Check a signature over the raw body; raise Unauthorized when it fails.
        Pure: `now` is passed in, so tests can move the clock."""

    def parse(self, meta: RequestMeta, document: Any, received_at: datetime) -> list[Envelope]:
        """Turn a parsed JSON document into events; raise InvalidBody when it is none."""
