"""The sink protocol: what the dispatcher asks of every sink kind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from relay.models import Delivery


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
