"""A consistent copy of the store, safe to take while relay serves and writes to it.

Copying the files (`cp relay.db*`) while relay runs can catch the database and its WAL
at different moments, a copy SQLite may call corrupt. SQLite's online backup API copies
from one read transaction instead: a snapshot of everything committed when it began,
and so of every event relay had acknowledged by then (an acknowledgement comes only
after its commit is on disk).
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from relay.config import SqliteStoreConfig, StoreConfig
from relay.errors import StoreUnavailable
from relay.store.sqlite import schema_version


class _HasStore(Protocol):
    """A RelayConfig, or the operator commands' view of one: only its store matters."""

    @property
    def store(self) -> StoreConfig: ...


@dataclass(frozen=True, slots=True)
class BackupResult:
    """What the copy holds, read from the copy itself."""

    path: Path
    bytes: int
    schema_version: int  # the store's PRAGMA user_version (0: relay 0.1.0's schema)
    events: int
    pending: int  # deliveries by state
    done: int
    dead: int
    quarantined: int
    seconds: float


async def backup_store(config: _HasStore, destination: Path) -> BackupResult:
    """Copy the SQLite store at `config.store.path` to `destination`, a new file.

    Raises StoreUnavailable when there is no store there, FileExistsError when
    `destination` exists (it is never overwritten), FileNotFoundError when its folder
    does not. The copy is a self-contained database (no -wal beside it) with mode 0600:
    it holds events as they came, and a store's folder is usually kept private.
    """
    if not isinstance(config.store, SqliteStoreConfig):
        raise StoreUnavailable("relay backup copies an SQLite store; Redis keeps its own")
    return await asyncio.to_thread(backup_file, config.store.path, destination)


def backup_file(source: Path, destination: Path) -> BackupResult:
    """backup_store() for a store's path, in the calling thread."""
    started = time.monotonic()
    if not source.is_file():
        raise StoreUnavailable(f"no store at {source}")
    if destination.exists() or destination.is_symlink():
        raise FileExistsError(errno.EEXIST, "will not overwrite an existing file", str(destination))
    folder = destination.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(folder))
    # Written under another name and linked into place when complete: a backup cut short
    # (a full disk, a kill) never looks like a finished one.
    partial = folder / f".{destination.name}.partial-{os.getpid()}-{os.urandom(4).hex()}"
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        contents = _copy(source, partial)
        _fsync(partial)
        _publish(partial, destination)
        _fsync(folder)
    finally:
        partial.unlink(missing_ok=True)
    return BackupResult(
        path=destination,
        bytes=destination.stat().st_size,
        schema_version=contents.schema_version,
        events=contents.events,
        pending=contents.pending,
        done=contents.done,
        dead=contents.dead,
        quarantined=contents.quarantined,
        seconds=time.monotonic() - started,
    )


# What filesystems without hard links (vfat, SMB shares, bucket mounts) answer link().
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


def _publish(partial: Path, destination: Path) -> None:
    """Give the finished copy its name, never over a file that appeared there meanwhile:
    link() refuses an existing name where rename() would replace it. Where the
    filesystem has no links, the name is claimed empty first (O_EXCL), then replaced."""
    try:
        os.link(partial, destination)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        os.close(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(partial, destination)


class _Contents(NamedTuple):
    schema_version: int
    events: int
    pending: int
    done: int
    dead: int
    quarantined: int


def _copy(source: Path, target: Path) -> _Contents:
    # mode=rw: a store that vanished after the check above is not created anew.
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True, isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout=5000")
        src.execute("PRAGMA temp_store=MEMORY")  # nothing written outside the store's folder
        src.execute("PRAGMA query_only=ON")
        dst = sqlite3.connect(target, isolation_level=None)
        try:
            dst.execute("PRAGMA temp_store=MEMORY")
            # All pages in one step, so in one read transaction: WAL lets relay commit
            # meanwhile. Copied a few pages at a time, the backup would start over after
            # each commit by another connection, and under steady traffic never finish.
            src.backup(dst, pages=-1)
            # The copy arrives marked as WAL like its source; in rollback-journal mode it
            # is one file, whole once closed, that can be moved or restored alone.
            dst.execute("PRAGMA journal_mode=DELETE")
            return _counts(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _counts(db: sqlite3.Connection) -> _Contents:
    [(events,)] = db.execute("SELECT COUNT(*) FROM events").fetchall()
    by_state = dict(db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
    [(quarantined,)] = db.execute("SELECT COUNT(*) FROM quarantine").fetchall()
    return _Contents(
        schema_version(db),
        events,
        by_state.get("pending", 0),
        by_state.get("done", 0),
        by_state.get("dead", 0),
        quarantined,
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
