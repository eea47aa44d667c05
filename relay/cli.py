"""The `relay` command. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import structlog

from relay import __version__, dlq, events, logs, migrate, qingstor_admin, sendtest, status
from relay.app import run
from relay.config import (
    RelayConfig,
    SqliteStoreConfig,
    StoreView,
    default_config,
    load_config,
    load_store_view,
)
from relay.errors import ConfigError, StoreUnavailable
from relay.exposure import exposure_of, exposure_warnings
from relay.failures import explain_failure
from relay.logs import configure
from relay.snapshot import ConfigSnapshot
from relay.store import Selection
from relay.store.backup import backup_store
from relay.workers import WorkerRole

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, not {value}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """A usage error in one line, naming the argument and where the usage is: the whole
    usage block buried the one line that said what was wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="relay",
        description="Relay QingStor bucket notifications to files, HTTP services and chat.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (default: $RELAY_CONFIG, else the embedded default)",
    )
    serve.add_argument("--host", help="override server.host")
    serve.add_argument(
        "--port", type=_bounded(0, 65535), help="override server.port (0 picks a free port)"
    )
    serve.add_argument("--watch", action="store_true", help="reload when the config file changes")
    serve.add_argument(
        "--workers",
        type=_bounded(0, 64),
        help="override server.workers (worker processes, 0-64)",
    )
    # Set by a leader on the workers it starts; not for people.
    serve.add_argument("--worker-number", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-link-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-metrics-dir", type=Path, help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config: FILE, else --config FILE, else $RELAY_CONFIG, else"
        " the embedded default. Exit 0 when it is valid (warnings may be printed), 2 if not.",
    )
    check.add_argument("file", metavar="FILE", nargs="?")
    check.add_argument("--config", metavar="FILE", help="the same as FILE")

    # The operator's commands read the config for its store alone.
    config_flag = argparse.ArgumentParser(add_help=False)
    config_flag.add_argument(
        "--config", metavar="FILE", help="YAML config (default: $RELAY_CONFIG, else default)"
    )
    report = commands.add_parser(
        "status",
        parents=[config_flag],
        help="queues, dead letters, circuits and recent traffic, from the store",
    )
    report.add_argument("--json", action="store_true", help="as JSON")

    event = commands.add_parser(
        "event",
        parents=[config_flag],
        help="what happened to one event: its envelope and each sink's delivery",
    )
    event.add_argument("event_id", metavar="EVENT_ID", help="an event id (evt_...)")
    event.add_argument("--json", action="store_true", help="as JSON")

    backup = commands.add_parser(
        "backup",
        parents=[config_flag],
        help="copy the store consistently, while relay runs",
        description="Copy the SQLite store to FILE (a new file) with SQLite's online backup:"
        " safe beside a running relay, and holding every event it had acknowledged.",
    )
    backup.add_argument("destination", metavar="FILE", help="where the copy goes (must not exist)")

    sendtest.add_parser(commands)
    migrate.add_parser(commands)
    qingstor_admin.add_parser(commands)

    dlq = commands.add_parser("dlq", help="list, show, replay or purge dead letters")
    actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION")
    quarantine_flag = argparse.ArgumentParser(add_help=False)
    quarantine_flag.add_argument(
        "--quarantine",
        action="store_true",
        help="the unusable bodies authenticated senders posted, not dead letters",
    )
    listing = actions.add_parser(
        "list",
        parents=[config_flag, quarantine_flag],
        help="a table of dead letters (or quarantined bodies)",
    )
    listing.add_argument("--sink", metavar="S", help="only this sink's")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser(
        "show",
        parents=[config_flag, quarantine_flag],
        help="one event's dead letters (or one quarantined body)",
    )
    show.add_argument("event_id", metavar="ID", help="an event id (a number with --quarantine)")
    for name, purpose, flags in (
        ("replay", "make dead letters pending again, due now", [config_flag]),
        ("purge", "delete dead letters", [config_flag, quarantine_flag]),
    ):
        action = actions.add_parser(name, parents=flags, help=purpose)
        action.add_argument("event_ids", metavar="ID", nargs="*", help="event ids")
        action.add_argument("--sink", metavar="S", help="this sink's (with IDs: only theirs)")
        action.add_argument("--all", action="store_true", help="every dead letter")
    return parser


def _dlq(args: argparse.Namespace, config: StoreView) -> int:
    if getattr(args, "quarantine", False):
        return _quarantine(args, config)
    if args.action == "show":
        return asyncio.run(dlq.show(config, args.event_id))
    if args.action == "list":
        selection = Selection(everything=True, sink=args.sink)
        return asyncio.run(dlq.list_letters(config, selection, as_json=args.json))
    if not (args.all or args.sink or args.event_ids):
        print(f"relay dlq {args.action}: give --all, --sink S, or event ids", file=sys.stderr)
        return EXIT_USAGE
    selection = Selection(everything=args.all, sink=args.sink, event_ids=tuple(args.event_ids))
    command = dlq.replay if args.action == "replay" else dlq.purge
    return asyncio.run(command(config, selection))


def _quarantine(args: argparse.Namespace, config: StoreView) -> int:
    def usage(problem: str) -> int:
        print(f"relay dlq {args.action} --quarantine: {problem}", file=sys.stderr)
        return EXIT_USAGE

    if getattr(args, "sink", None):
        return usage("quarantined bodies have no sink")
    ids = [args.event_id] if args.action == "show" else getattr(args, "event_ids", [])
    try:
        numbers = [int(i) for i in ids]
    except ValueError:
        return usage("ids are numbers, as list shows them")
    if args.action == "list":
        return asyncio.run(dlq.list_quarantine(config, as_json=args.json))
    if args.action == "show":
        return asyncio.run(dlq.show_quarantined(config, numbers[0]))
    if args.all == bool(numbers):
        return usage("give --all or ids, not both")
    return asyncio.run(dlq.purge_quarantine(config, None if args.all else numbers))


def _config_path(path: str | None) -> Path | None:
    given = path or os.environ.get("RELAY_CONFIG") or None
    return None if given is None else Path(given)


def _load(path: str | None) -> RelayConfig:
    file = _config_path(path)
    return default_config() if file is None else load_config(file)


def _print_problems(problems: Sequence[str]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def _check_config(args: argparse.Namespace) -> int:
    if args.file and args.config and args.file != args.config:
        print("relay check-config: give FILE or --config FILE, not both", file=sys.stderr)
        return EXIT_USAGE
    file = _config_path(args.file or args.config)
    name = "embedded default" if file is None else str(file)
    try:
        config = default_config() if file is None else load_config(file)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_USAGE
    where, exposed = exposure_of(config, [config.server.host], config.server.port)
    for warning in exposure_warnings(config, where, exposed):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{name}: OK: {config.summary()}")
    return EXIT_OK


def _operate(args: argparse.Namespace) -> int:
    """`status`, `dlq`, `event` and `backup`: the store alone, so a shell without the service's
    other secrets can run them."""
    try:
        view = load_store_view(_config_path(args.config))
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_USAGE
    try:
        if args.command == "status":
            return asyncio.run(status.show(view, as_json=args.json))
        if args.command == "backup":
            return _backup(view, Path(args.destination))
        if args.command == "event":
            return asyncio.run(events.show(view, args.event_id, as_json=args.json))
        return _dlq(args, view)
    except BrokenPipeError:
        raise  # the reader left (`| head`): main() ends quietly
    except StoreUnavailable as exc:  # no store there, locked, or needing an upgrade
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # the store is unreadable...
        print(f"relay {args.command}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _backup(view: StoreView, destination: Path) -> int:
    if not isinstance(view.store, SqliteStoreConfig):
        print(
            "relay backup: copies an SQLite store; this config's store is Redis, whose"
            " own persistence (an RDB snapshot, BGSAVE, or the AOF) is its backup:"
            " see docs/scaling-out.md",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        copy = asyncio.run(backup_store(view, destination))
    except FileExistsError:
        print(f"relay backup: {destination} exists; give a new file name", file=sys.stderr)
        return EXIT_FAILURE
    except FileNotFoundError:
        print(f"relay backup: no folder {destination.parent}; create it first", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"copied {view.store.path} to {copy.path} ({copy.bytes} bytes in {copy.seconds:.2f} s):"
        f" {copy.events} events, {copy.pending} pending, {copy.dead} dead,"
        f" {copy.quarantined} quarantined; schema version {copy.schema_version}"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `relay dlq show ID | head`: the reader has gone, and that is no error. Point
        # stdout at /dev/null so the interpreter's final flush cannot raise it again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)

    if args.command == "check-config":
        return _check_config(args)
    # These talk to a URL or to QingStor's API; they need no relay config.
    if args.command == "send-test":
        return sendtest.run(args)
    if args.command == "qingstor":
        return qingstor_admin.run(args)
    if args.command == "migrate":
        return migrate.run(args)
    if args.command in ("dlq", "status", "backup", "event"):
        return _operate(args)

    # A worker's --config is its leader's snapshot (relay.snapshot), not a config file.
    snapshot = (
        ConfigSnapshot(Path(args.config))
        if getattr(args, "worker_number", None) is not None and args.config
        else None
    )
    try:
        config = _load(args.config) if snapshot is None else snapshot.load()
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_USAGE
    flags = (
        ("host", args.host),
        ("port", args.port),
        ("watch_config", args.watch or None),
        ("workers", args.workers),
    )
    overrides = {key: value for key, value in flags if value is not None}
    # Until the server installs its own handler, a SIGHUP (a reload sent early, by an
    # operator or a leader) must not kill the process, as its default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    worker = None
    if args.worker_number is not None:
        worker = WorkerRole(
            args.worker_number, args.worker_link_fd, args.worker_metrics_dir, snapshot
        )
        logs.tag(worker=worker.number)
    configure(config.log.level, config.log.format)
    try:
        run(config, _config_path(args.config), overrides, worker)
    except Exception as exc:
        _failed(exc, getattr(config.store, "path", None))
        return EXIT_FAILURE
    return EXIT_OK


def _failed(exc: BaseException, store_path: Path | None) -> None:
    """One line naming the cause and the fix; the traceback only at log level debug."""
    message = explain_failure(exc, store_path)
    log = structlog.get_logger("relay")
    trace = exc if logs.enabled(logging.DEBUG) else None
    if message is None:
        message = f"unexpected {exc.__class__.__name__}: {exc}" + (
            "" if trace else " (set log.level: debug to see where)"
        )
    log.error("relay.failed", message=message, error=exc.__class__.__name__, exc_info=trace)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
