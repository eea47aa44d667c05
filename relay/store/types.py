"""The store's value types, the same whatever the backend: what callers hand it and
what it hands back. Pure data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class NewEvent:
    id: str
    source: str
    envelope: str  # the envelope's JSON, stored and sent as is
    sinks: tuple[str, ...]
    # For the sinks among `sinks` with `order: per_key` (`ordered`): the object it is
    # about (None: it is held by none) and where it sorts among that object's events
    # (ties: the order of acceptance).
    order_key: str | None = None
    order_at: float = 0.0
    ordered: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ordering:
    """How a sink with `order: per_key` is claimed (see Deliveries.claim): a pending
    delivery stops holding up its object's later events `timeout` seconds after its
    first failed attempt; `coalesce`: of an object's waiting events, only the newest
    is taken and the others are settled as coalesced."""

    timeout: float
    coalesce: bool = False


@dataclass(frozen=True, slots=True)
class AcceptResult:
    accepted: list[str]
    duplicates: list[str]


@dataclass(frozen=True, slots=True)
class Settlement:
    """What became of one delivery attempt."""

    delivery_id: int
    state: Literal["done", "pending", "dead"]
    next_at: float
    status: int | None
    error: str | None
    attempted: bool = True  # False: the sink held it back; the attempt is not counted
    # The attempts the delivery had when claimed: where given, the settlement applies
    # only while they still are (a settlement applied twice counts once).
    attempts_before: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    delivery_id: int
    event_id: str
    sink: str
    attempts: int
    last_status: int | None
    last_error: str | None
    dead_since: float
    envelope: str


@dataclass(frozen=True, slots=True)
class Quarantined:
    source: str
    received_at: float
    error: str
    reason: str
    content_type: str
    body: bytes
    # Given by the store.
    id: int = 0
    repeats: int = 1
    size: int = 0


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a DLQ command acts on: all, or those of a sink and/or events."""

    everything: bool = False
    sink: str | None = None
    event_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.everything or self.sink is not None or self.event_ids):
            raise ValueError("select --all, a sink, or event ids")


@dataclass(frozen=True, slots=True)
class SinkStats:
    pending: int = 0
    oldest_pending_s: float = 0.0
    dead: int = 0
    # Deliveries a newer event of their object stood in for (coalesce: true), kept as
    # long as delivered ones (store.keep_done).
    coalesced: int = 0
    circuit: str = "closed"
    open_until: float = 0.0
    gone: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery of an event to one sink, as the store has it now."""

    sink: str
    state: Literal["pending", "done", "dead", "coalesced"]
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: float
    updated_at: float
    next_at: float  # for a pending delivery: when it is due


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An event and what became of it: its envelope, when it came, and a delivery per
    sink it was routed to (a delivered one only for as long as `store.keep_done`)."""

    id: str
    source: str
    envelope: str
    received_at: float
    deliveries: tuple[DeliveryRecord, ...]


@dataclass(frozen=True, slots=True)
class MovedDelivery:
    """A delivery as `relay migrate` carries it from one store to another: only what is
    still to send (pending) or kept for an operator (dead)."""

    sink: str
    state: Literal["pending", "dead"]
    attempts: int
    next_at: float
    created_at: float
    updated_at: float
    last_status: int | None
    last_error: str | None
    # For a sink with `order: per_key` (see NewEvent): carried, so order holds after a move.
    order_key: str | None = None
    order_at: float = 0.0


@dataclass(frozen=True, slots=True)
class MovedEvent:
    """An event with its dedupe claim (until `expires_at`) and the deliveries that move
    with it; none when only its claim is still worth keeping."""

    id: str
    source: str
    envelope: str
    received_at: float
    expires_at: float
    deliveries: tuple[MovedDelivery, ...]


@dataclass(frozen=True, slots=True)
class EventSummary:
    """An event as a listing shows it: its envelope and each routed sink's state (a
    delivered one only for as long as `store.keep_done`)."""

    id: str
    source: str
    envelope: str
    received_at: float
    states: tuple[tuple[str, str], ...]  # (sink, pending|done|dead)


@dataclass(frozen=True, slots=True)
class RecentEvents:
    """A run of events, newest first, and where the next run starts (None: no more)."""

    events: list[EventSummary]
    cursor: str | None
