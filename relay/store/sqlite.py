"""The durable store: SQLite in WAL mode, one connection, one thread.

Every write goes through one thread, so SQLite never sees two writers and the event
loop never blocks on a disk. Durability: `synchronous=FULL` makes each commit fsync
the WAL before `accept()` returns, so an acknowledged event survives `kill -9` and
power loss alike.

The schema's version is SQLite's `PRAGMA user_version`: a new store gets SCHEMA at
SCHEMA_VERSION; the server brings an older store up to it with MIGRATIONS on open.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import structlog

from relay.config import SqliteStoreConfig
from relay.errors import StoreNeedsUpgrade, StoreNotWritable, StoreTooNew, StoreUnavailable
from relay.models import Delivery
from relay.store.contract import Store
from relay.store.groupcommit import GroupCommit
from relay.store.types import (
    AcceptResult,
    DeadLetter,
    DeliveryRecord,
    EventRecord,
    EventSummary,
    MovedDelivery,
    MovedEvent,
    NewEvent,
    Ordering,
    Quarantined,
    RecentEvents,
    Selection,
    Settlement,
    SinkStats,
)

T = TypeVar("T")

log = structlog.get_logger("relay.store")

# Schema version 1, as relay 0.1.0 created it (unstamped) and 0.2.0 stamps it. Frozen:
# the 0 -> 1 migration completes a store with it.
_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS events (
    id          TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    envelope    TEXT NOT NULL,
    received_at REAL NOT NULL,
    expires_at  REAL NOT NULL          -- end of the dedupe window
);
CREATE INDEX IF NOT EXISTS events_expires ON events (expires_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL REFERENCES events (id),
    sink        TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending',   -- pending | done | dead
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    last_status INTEGER,
    last_error  TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (sink, state, next_at);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
-- Events received per source and minute, duplicates included: for `relay status`.
CREATE TABLE IF NOT EXISTS receipts (
    source      TEXT NOT NULL,
    minute      INTEGER NOT NULL,     -- unix time // 60
    received    INTEGER NOT NULL,
    duplicates  INTEGER NOT NULL,
    PRIMARY KEY (source, minute)
);
-- What the server knows of each sink beyond its deliveries, for other processes to read.
CREATE TABLE IF NOT EXISTS sink_state (
    sink        TEXT PRIMARY KEY,
    circuit     TEXT NOT NULL,        -- closed | open | half-open
    open_until  REAL NOT NULL,
    gone        INTEGER NOT NULL,     -- 1 after a 410 Gone, until a send succeeds
    updated_at  REAL NOT NULL
);
-- Bodies a source's authenticated sender posted that relay could not use (400/413/415):
-- kept, within bounds, so an upstream format change loses nothing.
CREATE TABLE IF NOT EXISTS quarantine (
    id           INTEGER PRIMARY KEY,
    source       TEXT NOT NULL,
    digest       TEXT NOT NULL,        -- sha256 of the body: a retried body is kept once
    received_at  REAL NOT NULL,        -- the latest time it came
    repeats      INTEGER NOT NULL,     -- how many times it came
    error        TEXT NOT NULL,        -- the answer's error code, e.g. invalid_event
    reason       TEXT NOT NULL,        -- the answer's message
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    body         BLOB NOT NULL,
    UNIQUE (source, digest)
);
"""

# Schema version 2: per-object ordering. A delivery to a sink with `order: per_key`
# carries its object's key and its place among that object's events; one that failed
# holds the key from `blocking_since` until it settles or `released_at`.
_SCHEMA_2_CHANGES = """
ALTER TABLE deliveries ADD COLUMN order_key TEXT;
ALTER TABLE deliveries ADD COLUMN order_at REAL NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN blocking_since REAL;
ALTER TABLE deliveries ADD COLUMN released_at REAL;
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (sink, state, order_key, order_at)
    WHERE order_key IS NOT NULL;
"""

# What a new store gets, at SCHEMA_VERSION: the statements of every version in turn, so
# a new store and a migrated one are the same (tests/test_store_upgrade.py checks it).
SCHEMA = _SCHEMA_1 + _SCHEMA_2_CHANGES

# Receipts older than this are pruned; `relay status` looks back one hour.
RECEIPTS_KEPT = 86400.0


# The tables and columns relay 0.1.0 wrote. Frozen: SCHEMA moves on, 0.1.0 stores don't.
_SCHEMA_0_1_0 = {
    "events": ("id", "source", "envelope", "received_at", "expires_at"),
    "deliveries": (
        "id",
        "event_id",
        "sink",
        "state",
        "attempts",
        "next_at",
        "created_at",
        "updated_at",
        "last_status",
        "last_error",
    ),
    "receipts": ("source", "minute", "received", "duplicates"),
    "sink_state": ("sink", "circuit", "open_until", "gone", "updated_at"),
    "quarantine": (
        "id",
        "source",
        "digest",
        "received_at",
        "repeats",
        "error",
        "reason",
        "content_type",
        "size",
        "body",
    ),
}


# An ordered claim looks at this many objects at most; the next claim goes on from
# where it stopped.
_MAX_OBJECTS_PER_CLAIM = 2000
# Of one object, events are read this many at a time while each one read held it past
# order_timeout.
_HEAD_PAGE = 64


def _object_head(
    rows: list[tuple[Any, ...]], at: float, order: Ordering
) -> tuple[tuple[Any, ...] | None, list[tuple[Any, ...]]]:
    """Of one object's pending deliveries (id, event id, next_at, blocking_since,
    released_at, order_at), in their order (newest first when coalescing): the one to
    send now, if any, and the ones it goes past (coalesced, or reported released)."""
    if order.coalesce:
        newest = rows[0]
        return (newest, rows[1:]) if newest[2] <= at else (None, [])
    past: list[tuple[Any, ...]] = []
    for row in rows:
        if row[2] <= at:
            return row, past
        if _holds(row, at, order):
            return None, []  # nothing after it goes
        if row[4] is None:
            past.append(row)  # held its object too long: passed, and reported once
    return None, []


def _holds(row: tuple[Any, ...], at: float, order: Ordering) -> bool:
    """Whether a pending event (as _object_head reads it) still holds its object: not
    released, and not failed first more than order.timeout ago."""
    return row[4] is None and (row[3] is None or row[3] > at - order.timeout)


def _decided(row: tuple[Any, ...], at: float, order: Ordering) -> bool:
    """Whether this event settles what a claim does with its object: it is due (it
    goes), or it still holds the object (nothing after it goes)."""
    return bool(row[2] <= at or _holds(row, at, order))


def _place(event: NewEvent, sink: str) -> tuple[str | None, float]:
    """A delivery's object key and place: only for a sink that orders by object."""
    if event.order_key is not None and sink in event.ordered:
        return event.order_key, event.order_at
    return None, 0.0


def _adopt_0_1_0(db: sqlite3.Connection) -> None:
    """0 -> 1: relay 0.1.0 wrote schema 1 without stamping it. A database without its
    first table is not relay's and is refused, not stamped. 0.1.0 created its tables
    one statement at a time, so a crash could leave the later ones missing: they are
    made here (its statements were all IF NOT EXISTS), then every column is checked."""
    if not db.execute("PRAGMA table_info(events)").fetchall():
        raise StoreUnavailable("it has no table events: not a relay store?")
    for statement in _statements(_SCHEMA_1):
        db.execute(statement)
    for table, columns in _SCHEMA_0_1_0.items():
        found = {row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()}
        if missing := [c for c in columns if c not in found]:
            raise StoreUnavailable(f"table {table} lacks column(s) {', '.join(missing)}")


# MIGRATIONS[n] takes a store from schema version n to n + 1, inside the transaction
# that also stamps n + 1: a crash or an error part-way leaves the store at n. To change
# the schema, append a function here and make SCHEMA what it produces
# (tests/test_store_upgrade.py checks that a migrated store matches a new one).
Migration = Callable[[sqlite3.Connection], None]


def _add_ordering(db: sqlite3.Connection) -> None:
    """1 -> 2: the columns and index of per-object ordering; existing deliveries have no
    object key, so no sink holds them."""
    for statement in _statements(_SCHEMA_2_CHANGES):
        db.execute(statement)


MIGRATIONS: tuple[Migration, ...] = (_adopt_0_1_0, _add_ordering)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    [(version,)] = db.execute("PRAGMA user_version").fetchall()
    return int(version)


def _statements(script: str) -> Iterator[str]:
    """The statements of `script` one by one: executescript() would commit the
    transaction they must run in."""
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            yield current.strip()
            current = ""
    if current.strip():
        yield current  # a statement without its `;` still runs (or fails) rather than vanish


@contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _tune(db: sqlite3.Connection, busy_timeout: float) -> None:
    """Settings every connection to a store needs."""
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    # SQLite's temporary files (big sorts, transient indexes, statement journals) stay in
    # memory: on disk they would go to /tmp or $TMPDIR, outside the store's folder, and a
    # container with a read-only root filesystem would fail those statements.
    db.execute("PRAGMA temp_store=MEMORY")


def _where(selection: Selection, table: str = "") -> tuple[str, list[object]]:
    """SQL condition and parameters over `deliveries` for a dead-letter selection,
    columns prefixed by `table`."""
    t = f"{table}." if table else ""
    clauses: list[str] = [f"{t}state = 'dead'"]
    params: list[object] = []
    if selection.sink is not None:
        clauses.append(f"{t}sink = ?")
        params.append(selection.sink)
    if selection.event_ids:
        clauses.append(f"{t}event_id IN ({','.join('?' * len(selection.event_ids))})")
        params.extend(selection.event_ids)
    if not selection.everything and len(clauses) == 1:
        raise ValueError("select --all, a sink, or event ids")
    return " AND ".join(clauses), params


def _nearest_existing(path: Path) -> Path:
    # The store's folder may not exist yet (a full disk refused to create it).
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def disk_state(path: Path) -> tuple[int | None, bool]:
    """(free bytes, mounted read-only) of the file system the store lives on."""
    try:
        stat = os.statvfs(_nearest_existing(path.parent))
    except OSError:
        return None, False
    return stat.f_bavail * stat.f_frsize, bool(stat.f_flag & os.ST_RDONLY)


# What SQLite and the OS say when a write found no room or no right to write.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_WORDS = ("database or disk is full",)
_READ_ONLY_WORDS = ("readonly database", "read-only file system")
# Said of a full or read-only disk too, but also of a failing one, a missing right or
# a bad path: believed only when the disk is in fact all but full, or read-only.
_VAGUE_WORDS = ("disk i/o error", "unable to open database file")
_ALL_BUT_FULL = 1 << 20


def not_writable(path: Path, exc: BaseException) -> StoreNotWritable | None:
    """`exc`, raised opening the store, as a disk that takes no writes; None when it is
    something else (a corrupt file, a lock held, a bad path), which start-up reports."""
    if not isinstance(exc, sqlite3.OperationalError | OSError):
        return None
    text = str(exc).lower()
    code = exc.errno if isinstance(exc, OSError) else None
    free, mounted_ro = disk_state(path)
    full = code in _FULL_ERRNOS or any(w in text for w in _FULL_WORDS)
    read_only = code == errno.EROFS or any(w in text for w in _READ_ONLY_WORDS)
    if not (full or read_only) and any(w in text for w in _VAGUE_WORDS):
        full = free is not None and free < _ALL_BUT_FULL
        read_only = mounted_ro
    if not (full or read_only):
        return None
    cause = str(exc) or exc.__class__.__name__
    return StoreNotWritable(str(path), free_bytes=free, read_only=read_only, cause=cause)


def _in_chunks(ids: Sequence[T]) -> Iterator[tuple[Sequence[T], str]]:
    """`ids` in slices of 500 (well within SQLite's bound-variable limit), each with the
    placeholders of its `IN (...)`."""
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        yield chunk, ",".join("?" * len(chunk))


def _placeholders(ids: Sequence[object]) -> str:
    if len(ids) > _MAX_VARIABLES:
        raise ValueError(f"at most {_MAX_VARIABLES} ids at once")
    return ",".join("?" * len(ids))


def _not_in(ids: Collection[int]) -> str:
    return f" AND d.id NOT IN ({','.join('?' * len(ids))})" if ids else ""


def _has_tables(db: sqlite3.Connection) -> bool:
    return bool(db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall())


# Bound variables per statement: SQLite before 3.32 allows 999.
_MAX_VARIABLES = 999


def _insert_rows(db: sqlite3.Connection, into: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """INSERT many rows in a few statements of many VALUES each, not one per row as
    executemany does. Each statement is one trip into SQLite, and the store thread must
    win the GIL back from the event loop after every trip: per row, that wait made a
    group's transaction (and the write lock it holds) last several times longer."""
    if not rows:
        return
    width = len(rows[0])
    one = f"({','.join('?' * width)})"
    per_statement = _MAX_VARIABLES // width
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        values = ",".join([one] * len(chunk))
        db.execute(f"INSERT INTO {into} VALUES {values}", [v for row in chunk for v in row])


class SqliteStore:
    @classmethod
    def from_config(cls, config: SqliteStoreConfig, *, dedupe_window: float) -> SqliteStore:
        return cls(config.path, dedupe_window=dedupe_window)

    def __init__(self, path: Path, *, dedupe_window: float) -> None:
        self.path = path
        self.dedupe_window = dedupe_window
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-store")
        # Whether the writer connection runs synchronous=FULL, as every acknowledging
        # commit must: settlements lower it for their own commit (see _settle_group).
        self._fsyncs = False
        # The dispatcher's reads get their own connection and thread: WAL lets them run
        # beside the writer, so looking for due work never delays an ingest commit.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-read")
        self._rdb: sqlite3.Connection | None = None
        self._db: sqlite3.Connection | None = None
        self._lock: BinaryIO | None = None
        # How long a write waits for another process's (a `relay dlq` command's)
        # transaction before it fails as StoreUnavailable.
        self.busy_timeout = 5.0
        self._accepts: GroupCommit[tuple[Sequence[NewEvent], float], AcceptResult] = GroupCommit(
            self._executor.submit, self._accept_group
        )
        self._settles: GroupCommit[tuple[Sequence[Settlement], float], None] = GroupCommit(
            self._executor.submit, self._settle_group
        )
        self._closed = False
        self._shut_down = False
        # Claimed deliveries: id -> sink. See claim().
        self._claims: dict[int, str] = {}
        # The object keys of claims made in order (order: per_key): while one of a key's
        # deliveries is out, none other of that key is claimed.
        self._claim_keys: dict[int, str] = {}
        # Per ordered sink, the object its last claim stopped at.
        self._walked: dict[str, str] = {}
        self._claiming: dict[str, asyncio.Lock] = {}

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self, *, exclusive: bool = False, create: bool = True) -> None:
        """Open the database; `exclusive` (the server) also takes the store's lock file.

        Two servers on one store would both dispatch the same pending rows, so the
        second one refuses to start. The DLQ commands open without it.

        A new store gets the current schema. An older one is migrated by an exclusive
        open (logged as `store.migrated`) and refused by others with StoreNeedsUpgrade,
        since another process may be running an older relay on it; a newer one is refused
        with StoreTooNew.
        """
        if not create and not self.path.exists():
            # An operator's command on a mistyped path must not answer from a new,
            # empty store as if all were well.
            raise StoreUnavailable(
                f"no store at {self.path} (is --config, or RELAY_CONFIG, the service's"
                " config file?)"
            )
        try:
            migrated_from = await self._run(lambda: self._open(exclusive))
        except (sqlite3.OperationalError, OSError, StoreUnavailable) as exc:
            # A migration that ran out of room says so through its cause.
            cause = exc.__cause__ if isinstance(exc, StoreUnavailable) else exc
            problem = None if cause is None else not_writable(self.path, cause)
            if problem is None:
                raise
            raise problem from exc
        if migrated_from is not None:
            log.info(
                "store.migrated",
                path=str(self.path),
                from_version=migrated_from,
                to_version=SCHEMA_VERSION,
            )

    def _open(self, exclusive: bool) -> int | None:
        """Returns the schema version the store was migrated from, if it was."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            lock = open(f"{self.path}.lock", "a+b")  # noqa: SIM115 - held until close()
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                raise StoreUnavailable(
                    f"another relay process is serving {self.path} (it holds the store's"
                    " lock): stop that one, or give this relay a store.path of its own"
                ) from None
            self._lock = lock
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            _tune(db, self.busy_timeout)
            # Before anything else touches it: a newer relay's store is not ours to change.
            self._refuse_newer(schema_version(db))
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            migrated_from = self._prepare(db, exclusive)
        except BaseException:
            if db is not None:
                db.close()
            self._close()
            raise
        self._db = db
        return migrated_from

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreTooNew(
                f"the store at {self.path} has schema version {version} but this relay"
                f" knows up to {SCHEMA_VERSION}: it was written by a newer relay; upgrade"
                " relay, or restore a backup taken before that upgrade"
            )

    def _prepare(self, db: sqlite3.Connection, exclusive: bool) -> int | None:
        """Bring the store to SCHEMA_VERSION: create a new one, migrate an older one."""
        version = schema_version(db)
        if version == 0 and not _has_tables(db):
            with _immediate(db):
                # Checked again under the write lock: another process may have been first.
                if schema_version(db) == 0 and not _has_tables(db):
                    for statement in _statements(SCHEMA):
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            version = schema_version(db)
        self._refuse_newer(version)
        if version == SCHEMA_VERSION:
            return None
        if not exclusive:
            raise StoreNeedsUpgrade(
                f"the store at {self.path} has schema version {version}, older than this"
                f" relay's {SCHEMA_VERSION}: start `relay serve` on it once to upgrade it"
                " (`relay backup FILE` first keeps a copy the older relay can still use)"
            )
        for step in range(version, SCHEMA_VERSION):
            try:
                with _immediate(db):
                    MIGRATIONS[step](db)
                    db.execute(f"PRAGMA user_version = {step + 1}")
            except Exception as exc:
                raise StoreUnavailable(
                    f"could not upgrade the store at {self.path} from schema version {step}"
                    f" to {step + 1} (it is left at {step}): {exc}"
                ) from exc
        return version

    def _open_reader(self) -> None:
        rdb = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        _tune(rdb, 5.0)
        rdb.execute("PRAGMA query_only=ON")
        self._rdb = rdb

    def _close_reader(self) -> None:
        if self._rdb is not None:
            self._rdb.close()
            self._rdb = None

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()

        if self._closed:
            raise StoreUnavailable("the store is closed")

        def run() -> T:
            if self._rdb is None:
                if self._db is None or self._closed:
                    raise StoreUnavailable("store is not open")
                self._open_reader()
            assert self._rdb is not None
            return fn(self._rdb)

        return await loop.run_in_executor(self._reader, run)

    async def close(self) -> None:
        if self._shut_down:  # closed already: closing again changes nothing
            return
        self._closed = True
        # Whoever is waiting for a commit gets its answer before the store goes.
        await self._accepts.finish()
        await self._settles.finish()
        try:
            await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
            await self._run(self._close)
        finally:
            self._reader.shutdown(wait=True)
            self._executor.shutdown(wait=True)
            self._shut_down = True

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable("store is not open")
        return self._db

    def _before_acknowledging_commit(self) -> None:
        """Called with an ingest group's writes done and not yet committed: a seam for
        fault injection, which the tests compose around the store (tests/crashing_relay.py);
        nothing happens here in relay itself."""

    @contextmanager
    def _transaction(self, acknowledging: bool = False) -> Iterator[sqlite3.Connection]:
        db = self.db
        # IMMEDIATE takes the write lock up front, so a transaction never fails half-way
        # for want of it.
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            if acknowledging:
                self._before_acknowledging_commit()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # --- ingest ------------------------------------------------------------------------

    async def accept(self, events: Sequence[NewEvent], now: float | None = None) -> AcceptResult:
        """Claim each id for the dedupe window and enqueue its deliveries, durably.

        Group commit: requests that arrive while a commit is on disk wait for the next
        one, which takes them all in ONE transaction and ONE fsync. Each caller's events
        are claimed in that transaction and the answer comes only after it committed.
        Raises StoreUnavailable when the commit failed; then nothing of it was stored.
        """
        at = time.time() if now is None else now
        if self._closed:
            raise StoreUnavailable("the store is closed")
        return await self._accepts.submit((events, at))

    def _accept_group(
        self, group: Sequence[tuple[Sequence[NewEvent], float]]
    ) -> list[AcceptResult]:
        """Claim and enqueue for a whole group in one transaction, with a handful of
        bulk statements rather than several per event."""
        # Whatever a failed settlement left behind, an acknowledging commit fsyncs.
        if not self._fsyncs:
            self.db.execute("PRAGMA synchronous=FULL")
            self._fsyncs = True
        with self._transaction(acknowledging=True) as db:
            ids = list({event.id for events, _ in group for event in events})
            claimed: dict[str, float] = {}
            for chunk, marks in _in_chunks(ids):
                claimed.update(
                    db.execute(
                        f"SELECT id, expires_at FROM events WHERE id IN ({marks})", chunk
                    ).fetchall()
                )
            fresh: list[tuple[str, str, str, float, float]] = []
            reclaimed: list[tuple[str, str, float, float, str]] = []
            new_deliveries: list[tuple[str, str, float, float, float, str | None, float]] = []
            old_deliveries: list[
                tuple[str, str, float, float, float, str | None, float, str, str]
            ] = []
            receipts: dict[tuple[str, int], list[int]] = {}
            results = []
            for events, now in group:
                accepted: list[str] = []
                duplicates: list[str] = []
                for event in events:
                    expires = claimed.get(event.id)
                    if expires is not None and expires > now:
                        duplicates.append(event.id)
                        continue
                    accepted.append(event.id)
                    claimed[event.id] = now + self.dedupe_window  # a repeat in the group
                    if expires is None:
                        fresh.append(
                            (event.id, event.source, event.envelope, now, now + self.dedupe_window)
                        )
                        # A new id has no deliveries: events are pruned only once none
                        # references them.
                        new_deliveries.extend(
                            (event.id, s, now, now, now, *_place(event, s))
                            for s in dict.fromkeys(event.sinks)
                        )
                    else:
                        # A claim that has outlived its window is taken again: after the
                        # window a repeat is, by definition, a new event.
                        reclaimed.append(
                            (event.source, event.envelope, now, now + self.dedupe_window, event.id)
                        )
                        old_deliveries.extend(
                            (event.id, s, now, now, now, *_place(event, s), event.id, s)
                            for s in event.sinks
                        )
                if events:
                    counts = receipts.setdefault((events[0].source, int(now // 60)), [0, 0])
                    counts[0] += len(events)
                    counts[1] += len(duplicates)
                results.append(AcceptResult(accepted, duplicates))
            _insert_rows(db, "events (id, source, envelope, received_at, expires_at)", fresh)
            db.executemany(
                "UPDATE events SET source = ?, envelope = ?, received_at = ?, expires_at = ?"
                " WHERE id = ?",
                reclaimed,
            )
            _insert_rows(
                db,
                "deliveries (event_id, sink, next_at, created_at, updated_at, order_key, order_at)",
                new_deliveries,
            )
            # A re-claimed event may still have a delivery pending from its first claim:
            # one pending delivery per event and sink is enough. INDEXED BY: the planner
            # otherwise picks (sink, state) and walks the sink's whole backlog.
            db.executemany(
                "INSERT INTO deliveries"
                " (event_id, sink, next_at, created_at, updated_at, order_key, order_at)"
                " SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM deliveries"
                "  INDEXED BY deliveries_event"
                "  WHERE event_id = ? AND sink = ? AND state = 'pending')",
                old_deliveries,
            )
            db.executemany(
                "INSERT INTO receipts (source, minute, received, duplicates)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (source, minute) DO UPDATE SET"
                " received = received + excluded.received,"
                " duplicates = duplicates + excluded.duplicates",
                [(source, minute, *counts) for (source, minute), counts in receipts.items()],
            )
            return results

    # --- dispatch ----------------------------------------------------------------------

    # One process per file (the store's lock): nobody else claims, and claims need no
    # lease or renewal.
    shared = False
    lease = math.inf

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
        """Up to `limit` of `sink`'s due deliveries, oldest first: no other claim gets
        them until they are settled or released. The claims live here, in this process:
        the store's lock keeps every other server off the file, so their only holder is
        this process, which cannot die and keep them (a restart begins with none). So
        `lease` never runs out here: a send that outlasts it (parked for hours by a
        Retry-After, say) must not be handed out a second time while it goes on."""
        at = time.time() if now is None else now
        async with self._claiming.setdefault(sink, asyncio.Lock()):
            if order is not None:
                return await self._claim_in_order(sink, limit, at, order)
            held = self._held(sink)
            skip = _not_in(held)

            def query(db: sqlite3.Connection) -> list[Delivery]:
                rows = db.execute(
                    "SELECT d.id, d.event_id, d.sink, d.attempts, d.created_at, e.envelope"
                    " FROM deliveries d JOIN events e ON e.id = d.event_id"
                    f" WHERE d.sink = ? AND d.state = 'pending' AND d.next_at <= ?{skip}"
                    " ORDER BY d.next_at, d.id LIMIT ?",
                    (sink, at, *held, limit),
                ).fetchall()
                return [Delivery(*row) for row in rows]

            taken = await self._read(query)
            for delivery in taken:
                self._claims[delivery.id] = sink
        return taken

    async def _claim_in_order(
        self, sink: str, limit: int, at: float, order: Ordering
    ) -> list[Delivery]:
        """claim() for a sink with `order: per_key` (see the contract): one read that
        walks the sink's objects, then one write for what it settles (coalesced events;
        objects reported released).

        The walk goes object by object through the `deliveries_order` index (sink,
        state, key, place), from where the last claim stopped, so that no object waits
        behind others and a claim costs the objects it looks at, not the backlog."""
        held = self._held(sink)
        busy = {self._claim_keys[i] for i in held if i in self._claim_keys}
        start = self._walked.get(sink, "")
        select = (
            "SELECT d.id, d.event_id, d.sink, d.attempts, d.created_at, e.envelope,"
            " EXISTS (SELECT 1 FROM deliveries x INDEXED BY deliveries_order"
            "  WHERE x.sink = ? AND x.state = 'done' AND x.order_key = ? AND x.order_at > ?)"
            " FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.id = ?"
        )

        def walk(db: sqlite3.Connection) -> tuple[list[Delivery], list[int], list[int], str]:
            skip = _not_in(held)
            plain = [
                Delivery(*row)
                for row in db.execute(
                    "SELECT d.id, d.event_id, d.sink, d.attempts, d.created_at, e.envelope"
                    " FROM deliveries d JOIN events e ON e.id = d.event_id"
                    " WHERE d.sink = ? AND d.state = 'pending' AND d.next_at <= ?"
                    f" AND d.order_key IS NULL{skip} ORDER BY d.next_at, d.id LIMIT ?",
                    (sink, at, *held, limit),
                ).fetchall()
            ]
            taken: list[Delivery] = []
            coalesced: list[int] = []
            released: list[int] = []
            key, wrapped, looked = start, False, 0
            while len(plain) + len(taken) < limit and looked < _MAX_OBJECTS_PER_CLAIM:
                # The next object and its first event, in one look at the index.
                first = db.execute(
                    "SELECT order_key, id, event_id, next_at, blocking_since, released_at,"
                    " order_at FROM deliveries INDEXED BY deliveries_order"
                    " WHERE sink = ? AND state = 'pending' AND order_key > ?"
                    " ORDER BY order_key, order_at, id LIMIT 1",
                    (sink, key),
                ).fetchall()
                if not first or (wrapped and first[0][0] > start):
                    if wrapped or not start:
                        break
                    wrapped, key = True, ""  # round to the first object again
                    continue
                key, looked = first[0][0], looked + 1
                if key in busy:
                    continue
                rows = [first[0][1:]]
                if order.coalesce:
                    # The newest, and every other to settle for it.
                    rows = db.execute(
                        "SELECT id, event_id, next_at, blocking_since, released_at, order_at"
                        " FROM deliveries INDEXED BY deliveries_order"
                        " WHERE sink = ? AND state = 'pending' AND order_key = ?"
                        " ORDER BY order_at DESC, id DESC",
                        (sink, key),
                    ).fetchall()
                elif not _decided(rows[0], at, order):
                    # Past events that held the object too long, page by page, until
                    # one is due or one still holds it.
                    rows = []
                    after: tuple[float, int] = (-math.inf, 0)
                    while True:
                        page = db.execute(
                            "SELECT id, event_id, next_at, blocking_since, released_at,"
                            " order_at FROM deliveries INDEXED BY deliveries_order"
                            " WHERE sink = ? AND state = 'pending' AND order_key = ?"
                            " AND (order_at > ? OR (order_at = ? AND id > ?))"
                            " ORDER BY order_at, id LIMIT ?",
                            (sink, key, after[0], after[0], after[1], _HEAD_PAGE),
                        ).fetchall()
                        rows.extend(page)
                        if len(page) < _HEAD_PAGE or any(_decided(r, at, order) for r in page):
                            break
                        after = (page[-1][5], page[-1][0])
                pick, past = _object_head(rows, at, order)
                if pick is None:
                    continue
                [row] = db.execute(select, (sink, key, pick[5], pick[0])).fetchall()
                # One released by order_timeout holds its object no more.
                holding = pick[4] is None
                delivery = replace(Delivery(*row[:6]), keyed=holding, late=bool(row[6]))
                if order.coalesce:
                    coalesced.extend(p[0] for p in past)
                    delivery = replace(delivery, supersedes=tuple(p[1] for p in past))
                elif past:
                    released.extend(p[0] for p in past)
                    delivery = replace(
                        delivery, overtakes=tuple((p[1], round(at - p[3], 3)) for p in past)
                    )
                self._claim_keys[delivery.id] = key
                taken.append(delivery)
            return [*plain, *taken], coalesced, released, key

        taken, coalesced, released, stopped = await self._read(walk)
        self._walked[sink] = stopped
        for delivery in taken:
            self._claims[delivery.id] = sink
        if coalesced or released:
            try:
                await self._run(partial(self._order_settle, coalesced, released, at))
            except BaseException:
                self.release([d.id for d in taken])
                raise
        return taken

    def _order_settle(self, coalesced: list[int], released: list[int], at: float) -> None:
        """On the writer thread: what an ordered claim decided, in one transaction."""
        with self._transaction() as db:
            for chunk, marks in _in_chunks(coalesced):
                db.execute(
                    "UPDATE deliveries SET state = 'coalesced', updated_at = ?,"
                    " last_error = 'coalesced: a newer event of its object went instead'"
                    f" WHERE id IN ({marks}) AND state = 'pending'",
                    (at, *chunk),
                )
            for chunk, marks in _in_chunks(released):
                db.execute(
                    f"UPDATE deliveries SET released_at = ? WHERE id IN ({marks})", (at, *chunk)
                )

    def _held(self, sink: str) -> tuple[int, ...]:
        """The ids of `sink` under a claim."""
        return tuple(i for i, name in self._claims.items() if name == sink)

    def release(self, ids: Collection[int]) -> None:
        """Give back claims that will not be settled (a send cancelled by a drain, or
        whose settlement failed): their deliveries are due again at once."""
        for delivery_id in ids:
            self._claims.pop(delivery_id, None)
            self._claim_keys.pop(delivery_id, None)

    async def renew(
        self, sink: str, ids: Collection[int], lease: float, now: float | None = None
    ) -> list[int]:
        """Nothing to renew: claims here never run out (see claim)."""
        return []

    async def next_due_at(self, sink: str) -> float | None:
        """When `sink`'s next unclaimed pending delivery is due, if it has one."""
        held = self._held(sink)
        skip = _not_in(held)

        def query(db: sqlite3.Connection) -> float | None:
            # fetchall, not fetchone: a statement left un-stepped keeps its read
            # snapshot open, and later reads on this connection would see the past.
            [(earliest,)] = db.execute(
                "SELECT MIN(d.next_at) FROM deliveries d"
                f" WHERE d.sink = ? AND d.state = 'pending'{skip}",
                (sink, *held),
            ).fetchall()
            return float(earliest) if earliest is not None else None

        return await self._read(query)

    async def settle(self, settlements: Sequence[Settlement], now: float | None = None) -> None:
        """Record what became of deliveries. Grouped like accept(): the sends that finish
        while a commit is on disk share the next one."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        await self._settles.submit((settlements, time.time() if now is None else now))
        # Recorded: whatever comes of them next is the store's, not the claim's.
        self.release([s.delivery_id for s in settlements])

    def _settle_group(self, group: Sequence[tuple[Sequence[Settlement], float]]) -> list[None]:
        # A delivery's outcome is committed without waiting for the disk (the next
        # ingest's fsync takes it along). Lost to a power cut, it costs one repeated
        # delivery with the same id, which at-least-once allows; a process crash loses
        # nothing, the WAL is in the OS's cache. With an fsync each, settlements took a
        # fifth of the writer's time under load, and ingest commits queued behind them.
        self._fsyncs = False
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            settlements = [s for batch, _ in group for s in batch]
            self._settle(settlements, max(n for _, n in group))
        finally:
            self.db.execute("PRAGMA synchronous=FULL")
            self._fsyncs = True
        return [None] * len(group)

    def _settle(self, settlements: Sequence[Settlement], now: float) -> None:
        # Settlements alike but for their id (a delivered batch, typically) become one
        # UPDATE over an id list instead of one statement each.
        alike: dict[tuple[str, float, bool, int | None, str | None, int | None], list[int]] = {}
        for s in settlements:
            key = (s.state, s.next_at, s.attempted, s.status, s.error, s.attempts_before)
            alike.setdefault(key, []).append(s.delivery_id)
        with self._transaction() as db:
            for (state, next_at, attempted, status, error, before), ids in alike.items():
                for chunk, marks in _in_chunks(ids):
                    db.execute(
                        "UPDATE deliveries SET state = ?, next_at = ?, attempts = attempts + ?,"
                        " last_status = CASE WHEN ? THEN ? ELSE last_status END,"
                        " last_error = CASE WHEN ? THEN ? ELSE last_error END,"
                        # A failed attempt left pending holds its object's later events
                        # (order: per_key) from the first such failure on.
                        " blocking_since = CASE WHEN ? THEN COALESCE(blocking_since, ?)"
                        " ELSE blocking_since END,"
                        f" updated_at = ? WHERE id IN ({marks}) AND state = 'pending'"
                        " AND (? IS NULL OR attempts = ?)",
                        (
                            state,
                            next_at,
                            int(attempted),
                            attempted,
                            status,
                            attempted,
                            error,
                            attempted and state == "pending",
                            now,
                            now,
                            *chunk,
                            before,
                            before,
                        ),
                    )

    # --- dead letters ------------------------------------------------------------------

    async def dead_letters(self, selection: Selection) -> list[DeadLetter]:
        where, params = _where(selection, "d")

        def query() -> list[DeadLetter]:
            rows = self.db.execute(
                "SELECT d.id, d.event_id, d.sink, d.attempts, d.last_status, d.last_error,"
                " d.updated_at, e.envelope FROM deliveries d JOIN events e ON e.id = d.event_id"
                f" WHERE {where}"
                " ORDER BY d.updated_at, d.id",
                params,
            ).fetchall()
            return [DeadLetter(*row) for row in rows]

        return await self._run(query)

    async def replay(self, selection: Selection, now: float | None = None) -> int:
        """Make dead letters pending again, due now, with a fresh attempt budget.

        A running `relay serve` on the same database picks them up on its next look.
        """
        at = time.time() if now is None else now
        where, params = _where(selection)

        def work() -> int:
            with self._transaction() as db:
                return db.execute(
                    # A fresh start: it holds its object (order: per_key) again until it
                    # fails, and then for order_timeout.
                    "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ?,"
                    " blocking_since = NULL, released_at = NULL,"
                    f" created_at = ?, updated_at = ? WHERE {where}",
                    [at, at, at, *params],
                ).rowcount

        return await self._run(work)

    async def purge(self, selection: Selection) -> int:
        """Delete dead letters; their events go with the next prune once unreferenced."""
        where, params = _where(selection)

        def work() -> int:
            with self._transaction() as db:
                return db.execute(f"DELETE FROM deliveries WHERE {where}", params).rowcount

        return await self._run(work)

    # --- quarantine ----------------------------------------------------------------------

    async def quarantine(self, entry: Quarantined, max_entries: int, max_bytes: int) -> None:
        """Keep an unusable body (a body already kept is counted again, not stored
        twice), then drop the oldest entries beyond `max_entries` or `max_bytes` of
        bodies in all."""
        digest = hashlib.sha256(entry.body).hexdigest()

        def work() -> None:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO quarantine (source, digest, received_at, repeats, error,"
                    " reason, content_type, size, body) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (source, digest) DO UPDATE SET"
                    " received_at = excluded.received_at, repeats = repeats + 1",
                    (
                        entry.source,
                        digest,
                        entry.received_at,
                        entry.error,
                        entry.reason,
                        entry.content_type,
                        len(entry.body),
                        entry.body,
                    ),
                )
                # The newest entry whose running total (newest first) passes a bound,
                # and everything older than it, goes.
                row = db.execute(
                    "SELECT MAX(id) FROM (SELECT id, ROW_NUMBER() OVER w AS n,"
                    " SUM(size) OVER w AS total FROM quarantine WINDOW w AS (ORDER BY id DESC))"
                    " WHERE n > ? OR total > ?",
                    (max_entries, max_bytes),
                ).fetchone()
                if row[0] is not None:
                    db.execute("DELETE FROM quarantine WHERE id <= ?", (row[0],))

        await self._run(work)

    async def quarantined(
        self, ids: Sequence[int] | None = None, *, with_bodies: bool = True
    ) -> list[Quarantined]:
        """Entries oldest first: all (`ids` None), or those with these ids."""
        ids = None if ids is None else list(ids)
        where = "" if ids is None else f" WHERE id IN ({_placeholders(ids)})"
        body = "body" if with_bodies else "x''"

        def query(db: sqlite3.Connection) -> list[Quarantined]:
            rows = db.execute(
                "SELECT source, received_at, error, reason, content_type,"
                f" {body}, id, repeats, size FROM quarantine{where} ORDER BY id",
                ids or [],
            ).fetchall()
            return [Quarantined(*row) for row in rows]

        return await self._read(query)

    async def purge_quarantine(self, ids: Sequence[int] | None) -> int:
        """Delete quarantined bodies: those with these ids, or every one (`ids` None)."""
        ids = None if ids is None else list(ids)
        where = "" if ids is None else f" WHERE id IN ({_placeholders(ids)})"

        def work() -> int:
            with self._transaction() as db:
                return db.execute(f"DELETE FROM quarantine{where}", ids or []).rowcount

        return await self._run(work)

    # --- what operators look at ---------------------------------------------------------

    async def sink_stats(self, now: float | None = None) -> dict[str, SinkStats]:
        """Per sink: pending deliveries, age of the oldest, dead letters; from the rows,
        so right after a restart and whichever process asks."""
        at = time.time() if now is None else now

        def query() -> dict[str, SinkStats]:
            stats: dict[str, SinkStats] = {}
            for sink, state, count, oldest in self.db.execute(
                "SELECT sink, state, COUNT(*), MIN(created_at) FROM deliveries"
                " WHERE state IN ('pending', 'dead', 'coalesced') GROUP BY sink, state"
            ):
                current = stats.get(sink, SinkStats())
                if state == "pending":
                    current = replace(current, pending=count, oldest_pending_s=at - oldest)
                elif state == "dead":
                    current = replace(current, dead=count)
                else:
                    current = replace(current, coalesced=count)
                stats[sink] = current
            for sink, circuit, open_until, gone in self.db.execute(
                "SELECT sink, circuit, open_until, gone FROM sink_state"
            ):
                current = stats.get(sink, SinkStats())
                stats[sink] = replace(
                    current, circuit=circuit, open_until=open_until, gone=bool(gone)
                )
            return stats

        return await self._run(query)

    async def move_schedule_back(self, seconds: float, now: float | None = None) -> int:
        """After the wall clock stepped back by `seconds`: pending deliveries scheduled
        for later are due that much sooner, as they were meant to be."""
        at = time.time() if now is None else now

        def work() -> int:
            with self._transaction() as db:
                return db.execute(
                    "UPDATE deliveries SET next_at = MAX(next_at - ?, ?)"
                    " WHERE state = 'pending' AND next_at > ?",
                    (seconds, at, at),
                ).rowcount

        return await self._run(work)

    async def seen(self, ids: Sequence[str], now: float | None = None) -> set[str]:
        """Which of `ids` are claimed within their dedupe window: would be duplicates."""
        at = time.time() if now is None else now

        def query(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for chunk, marks in _in_chunks(ids):
                rows = db.execute(
                    f"SELECT id FROM events WHERE id IN ({marks}) AND expires_at > ?",
                    (*chunk, at),
                ).fetchall()
                found.update(row[0] for row in rows)
            return found

        return await self._read(query)

    async def queued(self, sinks: Collection[str]) -> dict[str, int]:
        """Per sink: deliveries pending (waiting, or being retried). On the reader
        connection, a sink at a time: each count walks only that sink's pending
        entries of the index, never the finished deliveries kept for keep_done, and
        the writer thread that ingest commits on is not held up."""

        def query(db: sqlite3.Connection) -> dict[str, int]:
            return {
                sink: db.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE sink = ? AND state = 'pending'",
                    (sink,),
                ).fetchall()[0][0]
                for sink in sinks
            }

        return await self._read(query)

    async def receipts_since(self, since: float) -> dict[str, tuple[int, int]]:
        """Per source: (events received, of which duplicates) since `since`."""

        def query() -> dict[str, tuple[int, int]]:
            rows = self.db.execute(
                "SELECT source, SUM(received), SUM(duplicates) FROM receipts"
                " WHERE minute >= ? GROUP BY source",
                (int(since // 60),),
            )
            return {source: (received, dup) for source, received, dup in rows}

        return await self._run(query)

    async def receipts_by_minute(self, since: float) -> dict[str, dict[int, tuple[int, int]]]:
        def query() -> dict[str, dict[int, tuple[int, int]]]:
            by: dict[str, dict[int, tuple[int, int]]] = {}
            for source, minute, received, dup in self.db.execute(
                "SELECT source, minute, received, duplicates FROM receipts WHERE minute >= ?",
                (int(since // 60),),
            ):
                by.setdefault(source, {})[minute] = (received, dup)
            return by

        return await self._run(query)

    async def save_sink_state(
        self, sink: str, circuit: str, open_until: float, gone: bool, now: float | None = None
    ) -> None:
        at = time.time() if now is None else now

        def work() -> None:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO sink_state (sink, circuit, open_until, gone, updated_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sink) DO UPDATE SET"
                    " circuit = excluded.circuit, open_until = excluded.open_until,"
                    " gone = excluded.gone, updated_at = excluded.updated_at",
                    (sink, circuit, open_until, int(gone), at),
                )

        await self._run(work)

    async def retire_sinks(self, keep: Collection[str], now: float | None = None) -> int:
        """Dead-letter the pending deliveries of every sink not in `keep`, with the reason
        `sink removed`: never silently dropped, and `relay dlq replay` can bring them
        back once a sink of that name exists again."""
        at = time.time() if now is None else now
        names = list(keep)
        marks = ",".join("?" * len(names))
        other = f" AND sink NOT IN ({marks})" if names else ""

        def work() -> int:
            with self._transaction() as db:
                count = db.execute(
                    "UPDATE deliveries SET state = 'dead', last_error = 'sink removed',"
                    f" updated_at = ? WHERE state = 'pending'{other}",
                    [at, *names],
                ).rowcount
                db.execute(f"DELETE FROM sink_state WHERE 1 = 1{other}", names)
            return count

        return await self._run(work)

    async def warnings(self) -> list[str]:
        return []  # every acknowledgement waits for its fsync

    # --- moving to another store -------------------------------------------------------

    async def export_work(
        self, now: float | None = None, batch: int = 500
    ) -> AsyncIterator[list[MovedEvent]]:
        """Every event still claimed for dedupe or with a pending or dead delivery, with
        those deliveries, in batches; done deliveries and expired claims stay behind."""
        at = time.time() if now is None else now
        after = ""
        while True:

            def query(db: sqlite3.Connection, start: str = after) -> list[MovedEvent]:
                rows = db.execute(
                    "SELECT id, source, envelope, received_at, expires_at FROM events e"
                    " WHERE id > ? AND (expires_at > ? OR EXISTS (SELECT 1 FROM deliveries d"
                    " WHERE d.event_id = e.id AND d.state IN ('pending', 'dead')))"
                    " ORDER BY id LIMIT ?",
                    (start, at, batch),
                ).fetchall()
                moved: dict[str, list[MovedDelivery]] = {row[0]: [] for row in rows}
                for chunk, marks in _in_chunks(list(moved)):
                    for event_id, *fields in db.execute(
                        "SELECT event_id, sink, state, attempts, next_at, created_at,"
                        " updated_at, last_status, last_error, order_key, order_at"
                        " FROM deliveries"
                        f" WHERE event_id IN ({marks}) AND state IN ('pending', 'dead')"
                        " ORDER BY id",
                        chunk,
                    ):
                        moved[event_id].append(MovedDelivery(*fields))
                return [
                    MovedEvent(i, source, envelope, received, expires, tuple(moved[i]))
                    for i, source, envelope, received, expires in rows
                ]

            events = await self._read(query)
            if not events:
                return
            yield events
            after = events[-1].id

    async def import_work(self, events: Sequence[MovedEvent]) -> list[str]:
        """Store moved events as they were; one already here (a migration run twice) is
        left alone. Returns the ids added."""

        def work() -> list[str]:
            added: list[str] = []
            with self._transaction() as db:
                for e in events:
                    if not db.execute(
                        "INSERT OR IGNORE INTO events (id, source, envelope, received_at,"
                        " expires_at) VALUES (?, ?, ?, ?, ?)",
                        (e.id, e.source, e.envelope, e.received_at, e.expires_at),
                    ).rowcount:
                        continue
                    added.append(e.id)
                    db.executemany(
                        "INSERT INTO deliveries (event_id, sink, state, attempts, next_at,"
                        " created_at, updated_at, last_status, last_error, order_key,"
                        " order_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (e.id, d.sink, d.state, d.attempts, d.next_at, d.created_at,
                             d.updated_at, d.last_status, d.last_error, d.order_key,
                             d.order_at)
                            for d in e.deliveries
                        ],
                    )  # fmt: skip
            return added

        return await self._run(work)

    async def watch_work(self) -> AsyncIterator[set[str]]:
        """Never yields: only this process (and its workers, through it) writes here,
        and it wakes its own lanes."""
        await asyncio.Event().wait()
        yield set()  # pragma: no cover

    async def heartbeat(self, sinks: Collection[str], now: float | None = None) -> None:
        """No other relay shares this file: nobody to tell."""

    # --- housekeeping ------------------------------------------------------------------

    async def prune(self, keep_done: float, now: float | None = None) -> tuple[int, int]:
        """Drop finished deliveries older than `keep_done`, then events whose dedupe
        window has passed and that no delivery still needs. Returns (deliveries, events).
        """
        at = time.time() if now is None else now

        def work() -> tuple[int, int]:
            with self._transaction() as db:
                deliveries = db.execute(
                    "DELETE FROM deliveries WHERE state IN ('done', 'coalesced')"
                    " AND updated_at < ?",
                    (at - keep_done,),
                ).rowcount
                events = db.execute(
                    "DELETE FROM events WHERE expires_at < ? AND NOT EXISTS"
                    " (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)",
                    (at,),
                ).rowcount
                db.execute(
                    "DELETE FROM receipts WHERE minute < ?", (int((at - RECEIPTS_KEPT) // 60),)
                )
            return deliveries, events

        return await self._run(work)

    async def health(self, min_free_bytes: int) -> str | None:
        # A sender is better told to wait before a full disk turns every ingest into a 503.
        free, _ = await asyncio.to_thread(disk_state, self.path)
        if free is not None and free < min_free_bytes:
            return f"the store's disk is nearly full ({free} bytes free at {self.path.parent})"
        return None

    async def ping(self) -> None:
        await self._run(lambda: self.db.execute("SELECT 1 FROM events LIMIT 1").fetchall())

    async def recent_events(self, cursor: str | None, limit: int) -> RecentEvents:
        """Newest first by dedupe claim (expires_at, then rowid): the events_expires
        index read backwards, no sort and no scan of what comes after the page."""
        if cursor is None:
            where, params = "", []
        else:
            expires, _, rowid = cursor.partition(":")
            where = " WHERE expires_at < ? OR (expires_at = ? AND rowid < ?)"
            params = [float(expires), float(expires), int(rowid)]

        def query(db: sqlite3.Connection) -> RecentEvents:
            rows = db.execute(
                "SELECT rowid, id, source, envelope, received_at, expires_at FROM events"
                f"{where} ORDER BY expires_at DESC, rowid DESC LIMIT ?",
                [*params, limit],
            ).fetchall()
            states: dict[str, list[tuple[str, str]]] = {row[1]: [] for row in rows}
            for chunk, marks in _in_chunks(list(states)):
                for event_id, sink, state in db.execute(
                    f"SELECT event_id, sink, state FROM deliveries WHERE event_id IN ({marks})"
                    " ORDER BY sink, id",
                    chunk,
                ):
                    states[event_id].append((sink, state))
            events = [
                EventSummary(event_id, source, envelope, received_at, tuple(states[event_id]))
                for _, event_id, source, envelope, received_at, _ in rows
            ]
            last = rows[-1] if len(rows) == limit else None
            return RecentEvents(events, None if last is None else f"{last[5]!r}:{last[0]}")

        return await self._read(query)

    async def event(self, event_id: str) -> EventRecord | None:
        """The event with this id and each of its deliveries, or None if the store does
        not hold it (never received, or pruned after its dedupe window)."""

        def query(db: sqlite3.Connection) -> EventRecord | None:
            found = db.execute(
                "SELECT id, source, envelope, received_at FROM events WHERE id = ?",
                (event_id,),
            ).fetchall()
            if not found:
                return None
            rows = db.execute(
                "SELECT sink, state, attempts, last_status, last_error, created_at,"
                " updated_at, next_at FROM deliveries WHERE event_id = ? ORDER BY sink, id",
                (event_id,),
            ).fetchall()
            [(found_id, source, envelope, received_at)] = found
            return EventRecord(
                found_id, source, envelope, received_at, tuple(DeliveryRecord(*r) for r in rows)
            )

        return await self._read(query)

    async def counts(self) -> dict[str, int]:
        """Events and deliveries by state: for readiness detail, status and tests."""

        def query() -> dict[str, int]:
            [(events,)] = self.db.execute("SELECT COUNT(*) FROM events").fetchall()
            result = {"events": events}
            for state, n in self.db.execute(
                "SELECT state, COUNT(*) FROM deliveries GROUP BY state"
            ):
                result[state] = n
            return result

        return await self._run(query)


def _meets_the_contract(store: SqliteStore) -> Store:
    return store  # mypy checks here that SqliteStore implements every protocol of Store
