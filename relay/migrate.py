"""`relay migrate`: move a single node's queue from its SQLite store to Redis, so that a
user can grow to several relays without losing a delivery or a dedupe claim.

What moves: every pending delivery (its attempts and schedule as they were), every dead
letter, and the dedupe claim of every event still within its window (a QingStor retry
after the move is still a duplicate). What stays: delivered work and expired claims.
The SQLite store is opened with its lock, so nothing runs on it meanwhile; it is left
as it was, as a backup of the moment of the move.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from relay.config import (
    RedisStoreConfig,
    SqliteStoreConfig,
    StoreConfig,
    store_description,
)
from relay.errors import StoreUnavailable
from relay.store import open_store

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# The target's window matters only for events accepted through it; a moved claim keeps
# the end it had.
_ANY_WINDOW = 86400.0


class UsageError(Exception):
    pass


@dataclass
class Moved:
    events: int = 0  # events moved (claims and their deliveries)
    already: int = 0  # found in the target already: a migration run before
    pending: int = 0
    dead: int = 0
    claims_only: int = 0  # delivered everywhere, moved for their dedupe claim alone
    sinks: set[str] = field(default_factory=set)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `migrate` to the `relay` command's subparsers."""
    command = subparsers.add_parser(
        "migrate",
        help="move pending work, dead letters and dedupe claims from SQLite to Redis",
        description=(
            "Move an SQLite store's pending deliveries, dead letters and unexpired dedupe"
            " claims to a Redis store. Stop relay first: the SQLite store is opened with"
            " its lock. Running it again moves nothing twice."
        ),
    )
    command.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="sqlite:PATH",
        help="the SQLite store (store.path of the config it ran with)",
    )
    command.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="URL",
        help="redis://[:PASSWORD@]HOST:PORT/DB, rediss://..., unix://...; or env:VAR to"
        " read it from the environment (keeps a password out of `ps`)",
    )
    command.add_argument(
        "--prefix", default="relay", help="the Redis store's store.prefix (default: relay)"
    )


def plan(args: argparse.Namespace) -> tuple[SqliteStoreConfig, RedisStoreConfig]:
    """The two stores' configs, validated as the config file would be (UsageError)."""
    source = str(args.source)
    if not source.startswith("sqlite:") or not source.removeprefix("sqlite:"):
        raise UsageError("--from takes sqlite:PATH, the SQLite store to move from")
    target = str(args.target)
    if target.startswith("env:"):
        name = target.removeprefix("env:")
        if not os.environ.get(name):
            raise UsageError(f"--to env:{name}: environment variable {name} is not set")
        target = os.environ[name]
    try:
        sqlite = SqliteStoreConfig.model_validate(
            {"path": source.removeprefix("sqlite:")}, context={"base_dir": Path.cwd()}
        )
        redis = RedisStoreConfig.model_validate(
            {"backend": "redis", "url": target, "prefix": args.prefix}
        )
    except ValidationError as exc:
        # The message names the key, never the value: the URL may carry a password.
        problems = "; ".join(
            f"{'--to' if e['loc'][:1] == ('url',) else '--' + str(e['loc'][0])}:"
            f" {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise UsageError(problems) from None
    return sqlite, redis


async def migrate(source: StoreConfig, target: StoreConfig) -> tuple[Moved, list[str]]:
    """Move the work; returns what moved and the target's durability warnings."""
    moved = Moved()
    reader = open_store(source, dedupe_window=_ANY_WINDOW)
    writer = open_store(target, dedupe_window=_ANY_WINDOW)
    try:
        # The lock: a relay still serving this store would go on sending what moves.
        try:
            await reader.open(exclusive=True, create=False)
        except StoreUnavailable as exc:
            if "another relay process is serving" not in str(exc):
                raise
            raise StoreUnavailable(
                f"a relay is serving {store_description(source)}: stop it first, so that"
                " nothing it sends moves as well"
            ) from None
        await writer.open(exclusive=False, create=True)
        warnings = await writer.warnings()
        async for batch in reader.export_work():
            added = set(await writer.import_work(batch))
            moved.events += len(added)
            moved.already += len(batch) - len(added)
            for event in batch:
                if event.id not in added:
                    continue  # moved by an earlier run: counted then
                moved.claims_only += not event.deliveries
                for delivery in event.deliveries:
                    moved.sinks.add(delivery.sink)
                    if delivery.state == "pending":
                        moved.pending += 1
                    else:
                        moved.dead += 1
    finally:
        await reader.close()
        await writer.close()
    return moved, warnings


def run(args: argparse.Namespace) -> int:
    """`relay migrate`: 0 when everything moved, 1 when a store failed, 2 for usage."""
    try:
        source, target = plan(args)
    except UsageError as exc:
        print(f"relay migrate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        moved, warnings = asyncio.run(migrate(source, target))
    except StoreUnavailable as exc:
        print(f"relay migrate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        print(f"relay migrate: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"moved {moved.events} events from {store_description(source)} to"
        f" {store_description(target)}: {moved.pending} pending deliveries,"
        f" {moved.dead} dead letters, {moved.claims_only} dedupe claims alone"
        + (f"; {moved.already} were there already" if moved.already else "")
    )
    if moved.events:
        print(
            f"sinks with work: {', '.join(sorted(moved.sinks)) or 'none'}. Start relay with"
            " the Redis store now; do not serve the SQLite store again, or its pending work"
            " is sent a second time (keep it as the backup of this moment)."
        )
    return EXIT_OK
