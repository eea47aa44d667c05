"""Why `relay serve` could not start, in one line an operator can act on: the cause and
the fix. Pure: it words an exception, it does not handle it."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from relay.errors import ConfigError, ListenError, StoreUnavailable

_LISTEN_FIXES = {
    errno.EADDRINUSE: (
        "the address is already in use (another relay, or another program, listens there):"
        " stop it, or choose another port with --port or server.port"
    ),
    errno.EACCES: (
        "permission denied (ports below 1024 need privileges): choose a port above 1023"
        " with --port or server.port"
    ),
    errno.EADDRNOTAVAIL: (
        "no network interface of this machine has that address: fix server.host (or --host)"
    ),
}


def explain_failure(exc: BaseException, store_path: Path | None = None) -> str | None:
    """The line for a start-up failure relay knows, or None for one it does not."""
    where = f" at {store_path}" if store_path is not None else ""
    if isinstance(exc, ListenError):
        fix = _LISTEN_FIXES.get(exc.reason or 0)
        return f"cannot listen on {exc.host}:{exc.port}: {fix}" if fix else str(exc)
    if isinstance(exc, StoreUnavailable):
        return str(exc)  # the store words its own refusals, fix included
    if isinstance(exc, ConfigError):
        return "; ".join(exc.problems)
    if isinstance(exc, PermissionError):
        return (
            f"cannot open the store{where}: permission denied ({exc.filename or exc}):"
            " make its folder writable by this user, or change store.path"
        )
    if isinstance(exc, sqlite3.DatabaseError):
        text = str(exc)
        if "not a database" in text:
            return (
                f"the file{where} is not a relay store (not an SQLite database):"
                " point store.path at a new file, or restore the store from a backup"
            )
        if "unable to open" in text or "readonly" in text or "read-only" in text:
            return (
                f"cannot open the store{where} ({text}): make its folder exist and be"
                " writable by this user, or change store.path"
            )
        return f"the store{where} failed ({text}): see `relay backup` and docs/operating.md"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on the disk of the store{where}: free some, then start again"
    return None
