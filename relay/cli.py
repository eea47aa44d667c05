"""The `relay` command. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import structlog

from relay import __version__
from relay.app import run
from relay.config import RelayConfig, default_config, load_config
from relay.errors import ConfigError
from relay.logs import configure

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    serve.add_argument("--port", type=int, help="override server.port (0 picks a free port)")

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file", metavar="FILE")
    return parser


def _load(path: str | None) -> RelayConfig:
    path = path or os.environ.get("RELAY_CONFIG") or None
    return default_config() if path is None else load_config(path)


def _print_problems(problems: Sequence[str]) -> None:
    for problem in problems:
        print(problem, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    if args.command == "check-config":
        try:
            config = load_config(args.file)
        except ConfigError as exc:
            _print_problems(exc.problems)
            return EXIT_USAGE
        print(f"{args.file}: OK: {config.summary()}")
        return EXIT_OK

    try:
        config = _load(args.config)
    except ConfigError as exc:
        _print_problems(exc.problems)
        return EXIT_USAGE
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    configure(config.log.level, config.log.format)
    try:
        run(config)
    except Exception:
        structlog.get_logger("relay").exception("relay.failed")
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
