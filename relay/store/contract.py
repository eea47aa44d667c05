"""What callers need of a store, one narrow protocol per concern, so that each caller
asks for what it uses and a backend shows what it must provide. Every backend
implements `Store`, the sum of them. No I/O here, and no backend's vocabulary."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from typing import Protocol

from relay.models import Delivery
from relay.store.types import (
    AcceptResult,
    DeadLetter,
    EventRecord,
    MovedEvent,
    NewEvent,
    Ordering,
    Quarantined,
    RecentEvents,
    Selection,
    Settlement,
    SinkStats,
)


class Accepting(Protocol):
    """Ingest: claim event ids for the dedupe window and enqueue their deliveries in one
    durable step; and what the backlog bounds need."""

    dedupe_window: float

    async def accept(
        self, events: Sequence[NewEvent], now: float | None = None
    ) -> AcceptResult: ...

    async def seen(self, ids: Sequence[str], now: float | None = None) -> set[str]: ...

    async def queued(self, sinks: Collection[str]) -> dict[str, int]: ...


class Deliveries(Protocol):
    """The dispatcher's side: claim due work for a sink, send it, settle what became of
    it; the store, not the dispatcher, knows what is taken."""

    # Whether other relays share this store (Redis): then claims run out unless renewed,
    # and sinks are retired only when no running relay has them.
    shared: bool
    # How long a claim lasts unless renewed, as the config sets it (inf: never ends).
    lease: float

    async def claim(
        self,
        sink: str,
        limit: int,
        lease: float,
        now: float | None = None,
        *,
        exclusive: bool = False,
        order: Ordering | None = None,
    ) -> list[Delivery]:
        """Up to `limit` of `sink`'s due deliveries: nobody else gets them until they
        are settled or released. With `order` (a sink with `order: per_key`), only the
        head of each object's events: a delivery with an object key is taken only while
        no other of its key is claimed (by anyone), and no other of its key that sorts
        before it is pending, unless that one failed first more than `order.timeout`
        ago. A delivery taken after a later one of its key was done comes `late`.
        Where claims are shared between processes (Redis),
        they are held for `lease` seconds, after which a holder that died is presumed
        dead and anyone may claim them again; a backend whose claims live and die with
        their one process (SQLite) never lets them run out. `exclusive`: nothing while
        another process is the sink's one consumer (a paced sink), which it stays for
        `lease` after its last claim or renewal."""

    async def renew(
        self, sink: str, ids: Collection[int], lease: float, now: float | None = None
    ) -> list[int]:
        """Extend the claims on `ids` (sends still running) by `lease` from now; returns
        the ids no longer held (taken over by another process after their lease ran
        out)."""

    def release(self, ids: Collection[int]) -> None:
        """Give back claims that will not be settled; a backend whose leases are shared
        may instead let them run out."""

    def watch_work(self) -> AsyncIterator[set[str]]:
        """Yields the names of sinks other processes just queued work for (a shared
        store); a store only this process writes never yields."""
        ...

    async def next_due_at(self, sink: str) -> float | None:
        """When `sink`'s next unclaimed pending delivery is due, if it has one."""

    async def settle(self, settlements: Sequence[Settlement], now: float | None = None) -> None:
        """Record what became of deliveries that are pending (a delivery another holder
        settled, or claimed since, is left as that holder has it)."""

    async def save_sink_state(
        self, sink: str, circuit: str, open_until: float, gone: bool, now: float | None = None
    ) -> None: ...

    async def move_schedule_back(self, seconds: float, now: float | None = None) -> int: ...


class DeadLetters(Protocol):
    async def dead_letters(self, selection: Selection) -> list[DeadLetter]: ...

    async def replay(self, selection: Selection, now: float | None = None) -> int: ...

    async def purge(self, selection: Selection) -> int: ...


class QuarantineKeeper(Protocol):
    async def quarantine(self, entry: Quarantined, max_entries: int, max_bytes: int) -> None: ...

    async def quarantined(
        self, ids: Sequence[int] | None = None, *, with_bodies: bool = True
    ) -> list[Quarantined]: ...

    async def purge_quarantine(self, ids: Sequence[int] | None) -> int: ...


class Observations(Protocol):
    """What `relay status`, `/metrics` and `/readyz` read."""

    async def sink_stats(self, now: float | None = None) -> dict[str, SinkStats]: ...

    async def receipts_since(self, since: float) -> dict[str, tuple[int, int]]: ...

    async def receipts_by_minute(self, since: float) -> dict[str, dict[int, tuple[int, int]]]:
        """Per source, per minute (unix time // 60) since `since`: (received, of which
        duplicates); minutes without any are absent."""

    async def counts(self) -> dict[str, int]: ...

    async def recent_events(self, cursor: str | None, limit: int) -> RecentEvents:
        """Up to `limit` events, newest first (by when their dedupe claim was taken),
        from `cursor` (None: the newest) on; an opaque cursor for the next run."""

    async def event(self, event_id: str) -> EventRecord | None:
        """One event and what became of it at each sink, or None if not held."""

    async def ping(self) -> None: ...

    async def health(self, min_free_bytes: int) -> str | None:
        """What keeps the backend from taking events soon (for SQLite: a nearly full
        disk), or None."""

    async def warnings(self) -> list[str]:
        """Where the backend keeps acknowledged events less safely than an operator
        would assume (Redis without persistence, say), each with its fix."""


class Housekeeping(Protocol):
    async def prune(self, keep_done: float, now: float | None = None) -> tuple[int, int]: ...

    async def retire_sinks(self, keep: Collection[str], now: float | None = None) -> int:
        """Dead-letter (`sink removed`) the pending deliveries of sinks not in `keep`,
        nor, on a shared store, run by any other running relay."""

    async def heartbeat(self, sinks: Collection[str], now: float | None = None) -> None:
        """This process runs `sinks` (every few seconds, on a shared store)."""


class Moving(Protocol):
    """`relay migrate`: what one store hands over to another."""

    def export_work(
        self, now: float | None = None, batch: int = 500
    ) -> AsyncIterator[list[MovedEvent]]:
        """Events still claimed for dedupe or with pending or dead deliveries, with
        those deliveries, in batches."""
        ...

    async def import_work(self, events: Sequence[MovedEvent]) -> list[str]:
        """Store moved events as they were, skipping any already here; the ids added."""


class Store(
    Accepting,
    Deliveries,
    DeadLetters,
    QuarantineKeeper,
    Observations,
    Housekeeping,
    Moving,
    Protocol,
):
    """A whole store, as `open_store` hands it out."""

    async def open(self, *, exclusive: bool = False, create: bool = True) -> None:
        """`exclusive`: the serving process, which alone may migrate and dispatch;
        `create=False`: an operator's command, which must not make a store where there
        was none."""

    async def close(self) -> None: ...
