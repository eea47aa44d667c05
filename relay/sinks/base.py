"""The sink protocol: what the dispatcher asks of every sink kind."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal, Protocol

from relay.config import RetryConfig
from relay.models import Delivery

# A Retry-After beyond this is read as this: a typo must not park events for a year.
MAX_RETRY_AFTER = 86400.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            return None
        seconds = moment.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def backoff_ceiling(attempts: int, retry: RetryConfig) -> float:
    """The top of the backoff range after `attempts` failures: initial * 2**(n-1), capped."""
    return min(retry.max, retry.initial * 2.0 ** min(attempts - 1, 62))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt came to, as the sink judges it.

    `done`: the sink has it. `retry`: try again later (not before `retry_after` seconds,
    when the sink said so). `dead`: retrying cannot help; dead-letter it now.
    """

    result: Literal["done", "retry", "dead"]
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    # The receiver said the endpoint is gone for good (HTTP 410): report the sink.
    gone: bool = False


DONE = Outcome("done")


class Sink(Protocol):
    name: str
    # How many deliveries one send() takes (a file sink writes them with one fsync),
    # and how many send() calls may be in flight at once (an HTTP sink's connections).
    batch_size: int
    concurrency: int

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        """One Outcome per delivery, in order. Must not raise for a delivery's failure."""
        ...
