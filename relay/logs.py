"""structlog setup: JSON lines off a terminal, readable lines on one, secrets scrubbed;
and the request line, the one line per request that is most of the log's volume."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError

# Keys whose values are secrets whatever they hold.
_SECRET_KEYS = re.compile(r"token|secret|password|authorization|signature|api[_-]?key", re.I)
# A URL's query string is where tokens travel (notify_url, DingTalk, WeCom, ...).
_URL_QUERY = re.compile(r"(https?://[^\s?#\"']+)\?[^\s#\"']*")
# The same outside a full URL, e.g. a raw request line quoted by the HTTP parser.
_QUERY_SECRET = re.compile(
    r"(?i)([?&](?:token|access_token|key|sign|sig|signature|secret|password)=)[^&\s\"'\\]+"
)
# As a header line, and as a mapping prints it (`"Authorization": "Bearer ..."`).
_HEADER_SECRET = re.compile(
    r"(?i)((?:x-relay-token|authorization|webhook-signature|x-hub-signature(?:-256)?)"
    r"[\"']?\s*:\s*[\"']?)[^\r\n\"']*"
)
# Webhook URLs carry their credential in the path as often as in the query
# (hooks.slack.com/services/T.../B.../<secret>, discord.com/api/webhooks/<id>/<token>,
# open.feishu.cn/open-apis/bot/v2/hook/<token>, api.telegram.org/bot<token>/...,
# <tenant>.webhook.office.com/webhookb2/...), and user info is a password. No list of
# vendors can be complete, so in logs every URL keeps its scheme and host only.
_URL_PARTS = re.compile(
    r"(?i)\b((?:https?|wss?)://)"
    r"((?:[^\s/?#\"'<>\\`]*@)?)"  # user info: up to the last @ before the host ends
    r"([^\s/?#\"'<>\\`@]+)"  # host and port
    r"([^\s\"'<>\\`]*)"  # path, query and fragment
)


def redact_url(text: str) -> str:
    return _URL_QUERY.sub(r"\1?[redacted]", text)


def redact_url_paths(text: str) -> str:
    """Every URL in `text` cut to its scheme and host, `/[redacted]` standing for the
    user info, path, query and fragment it had; a bare `https://host/` stays as it is."""

    def cut(match: re.Match[str]) -> str:
        scheme, userinfo, host, rest = match.groups()
        if not userinfo and rest in ("", "/"):
            return match.group(0)
        return f"{scheme}{host}/[redacted]"

    return _URL_PARTS.sub(cut, text)


def redact_text(text: str) -> str:
    """Scrub URL query strings, query-style secrets and secret headers from free text."""
    text = redact_url(text)
    text = _QUERY_SECRET.sub(r"\1[redacted]", text)
    return _HEADER_SECRET.sub(r"\1[redacted]", text)


def scrub_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Last line of defence: relay logs no secret on purpose, and this catches accidents."""
    for key, value in event_dict.items():
        if _SECRET_KEYS.search(key):
            event_dict[key] = "[redacted]"
        else:
            event_dict[key] = _scrub(value)
    return event_dict


# Every pattern above needs one of these characters: a string without any is left as it
# is, which spares the log line's usual values (names, ids, paths) five regexes each.
_MAY_HOLD_SECRET = re.compile(r"[:?&]")


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        if _MAY_HOLD_SECRET.search(value) is None:
            return value
        # Paths too, unlike redact_text: a log line has no use for a webhook's path,
        # while the commands that print URLs (send-test, qingstor) need theirs.
        return redact_text(redact_url_paths(value))
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {
            k: "[redacted]" if _SECRET_KEYS.search(str(k)) else _scrub(v) for k, v in value.items()
        }
    return value


class _QuietParserErrors(logging.Filter):
    """aiohttp logs a malformed request at ERROR with a traceback quoting the raw bytes,
    tokens included. It is the sender's mistake, not ours: one warning line, no bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "http.malformed_request"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.reason = type(exc).__name__
        return True


# The configured level, so the hot path can skip building a line nobody will see.
# Until configure() runs (tests that build an app in-process), everything is logged.
_threshold = logging.NOTSET


def enabled(level: int) -> bool:
    return level >= _threshold


# Fields on every line this process logs (a worker's number), kept across reconfigures.
_tags: dict[str, Any] = {}


def tag(**fields: Any) -> None:
    _tags.update(fields)


def _add_tags(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in _tags.items():
        event_dict.setdefault(key, value)
    return event_dict


def _message_first(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    message = event_dict.pop("message", None)
    if isinstance(message, str):
        event_dict["event"] = f"{event_dict.get('event', '')}: {message}"
    return event_dict


# A write to a pipe of at most this many bytes arrives whole (POSIX PIPE_BUF on Linux):
# processes sharing stdout (the workers) cannot cut into it.
_WHOLE_WRITE = 4096


class LineOutput:
    """The stream every log line goes to, written in whole lines only.

    Lines logged as things happen are written at once (structlog and the standard
    library flush after each). Request lines, most of the log's volume, are held until
    the event loop's current turn ends and then written together: under load one write
    carries the lines of many requests, in writes of whole lines of at most 4 KiB. A
    line is held for one turn of the loop (well under a millisecond at rest), and a line
    logged meanwhile flushes the held ones first, so the order stays as it happened. A
    `kill -9` can take the request lines of the turn it interrupted."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.StringIO and the like
            self._fd = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        # Reentrant: a line logged while a flush runs on the same thread (a finalizer
        # that logs, run by the garbage collector mid-flush) must not wait on itself.
        self._lock = threading.RLock()
        self._flush_pending = False
        self._failing = False

    def isatty(self) -> bool:
        return self.stream.isatty()

    def write(self, text: str) -> int:
        with self._lock:
            self._held.append(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def hold(self, line: bytes) -> None:
        """Keep a line for the end of the loop's turn (or now, off the loop)."""
        with self._lock:
            self._held.append(line)
            self._held_bytes += len(line)
            if self._flush_pending and self._held_bytes < 16 * _WHOLE_WRITE:
                return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._held_bytes >= 16 * _WHOLE_WRITE:
            self.flush()
        else:
            self._flush_pending = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            held, self._held, self._held_bytes = self._held, [], 0
            self._flush_pending = False
            if not held:
                return
            chunks: list[bytes] = []
            chunk: list[bytes] = []
            size = 0
            for line in held:
                if chunk and size + len(line) > _WHOLE_WRITE:
                    chunks.append(b"".join(chunk))
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            chunks.append(b"".join(chunk))
            try:
                self._write(chunks)
                self._failing = False
            except (OSError, ValueError) as exc:
                # stdout closed, or full: the lines are lost. Said once per spell on
                # stderr, the one place left to say it.
                if not self._failing:
                    self._failing = True
                    with contextlib.suppress(Exception):
                        sys.stderr.write(f"relay: log lines lost, stdout failed: {exc!r}\n")

    def _write(self, chunks: list[bytes]) -> None:
        if self._fd is None:
            for chunk in chunks:
                self.stream.write(chunk.decode("utf-8", "replace"))
            self.stream.flush()
            return
        self.stream.flush()  # whatever was print()ed before goes first
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self._fd, view) :]


_output: LineOutput | None = None
# The processors configure() gave structlog: while they are in place (not replaced by a
# test's capture_logs, say), request lines are written straight to the output.
_processors: list[Any] | None = None
_renderer: Any = None


def _fallback(value: Any) -> Any:
    return repr(value)


def dumps(value: Any, **_: Any) -> str:
    """A log line's JSON, all ASCII: orjson where it can, the standard library where it
    cannot (an integer beyond 64 bits, a lone surrogate) or where the line is not ASCII."""
    try:
        line = orjson.dumps(value, default=_fallback, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(value, default=_fallback)
    if line.isascii():
        return line.decode()
    # Escaped, as the standard library writes it: raw, a client's path could put
    # terminal control codes or Unicode line separators into the log.
    return json.dumps(value, default=_fallback)


_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info"}
_SECRET_KEY: dict[str, bool] = {}


def request_line(level: int, fields: dict[str, Any]) -> None:
    """The line logged for each request: `fields` (method, path, status and so on), the
    request's bound context (request id, source, counts, error) and the process's tags.

    It is the one line written per request, so it skips structlog's general processor
    chain where the fields are known: it is built as that chain would (the same keys,
    the same scrubbing of secrets), encoded by orjson, and held for one write per turn
    of the event loop. Elsewhere (a terminal, a test capturing logs) it goes through
    structlog like any line."""
    output = _output
    chain = structlog.get_config()["processors"]
    # configure()'s chain ends in its renderer; a test's capture_logs() refills the same
    # list with its own processor, and then takes the line through structlog.
    if output is None or chain is not _processors or not chain or chain[-1] is not _renderer:
        structlog.get_logger("relay.app").log(level, "request", **fields)
        return
    line = fields
    line["event"] = "request"
    for key, value in structlog.contextvars.get_contextvars().items():
        line.setdefault(key, value)
    for key, value in _tags.items():
        line.setdefault(key, value)
    for key, value in line.items():
        secret = _SECRET_KEY.get(key)
        if secret is None:
            secret = _SECRET_KEY[key] = _SECRET_KEYS.search(key) is not None
        if secret:
            line[key] = "[redacted]"
        elif not isinstance(value, _PLAIN) and value is not None:
            line[key] = _scrub(value)
    line["level"] = _LEVELS.get(level) or logging.getLevelName(level).lower()
    line["timestamp"] = _timestamp()
    output.hold(dumps(line).encode() + b"\n")


_PLAIN = (int, float)
_second: tuple[int, str] = (-1, "")


def _timestamp() -> str:
    """Now as structlog's `TimeStamper(fmt="iso", utc=True)` writes it, the date and
    time formatted once a second rather than once a line."""
    global _second
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    global _threshold, _output, _processors, _renderer
    if _output is not None:
        _output.flush()
    out = LineOutput(stream or sys.stdout)
    _threshold = logging.getLevelNamesMapping()[level.upper()]
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=dumps)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    # On a terminal a person reads the line: its sentence goes first, not among the keys.
    readable = [] if as_json else [_message_first]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_tags,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        scrub_secrets,
    ]
    # Libraries log through the standard library: render their records the same way,
    # through the same scrubber, so nothing reaches stdout unscrubbed or as plain text.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *readable,
                renderer,
            ],
        )
    )
    handler.addFilter(_QuietParserErrors())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    processors = [*shared, *readable, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_threshold),
        # Whole lines per write: workers share the leader's stdout, and print() writes
        # the line and its newline apart when Python runs unbuffered (PYTHONUNBUFFERED=1,
        # as most container images set), so two processes' lines could run into each
        # other. On a pipe a write is whole up to 4 KiB; a longer line (a traceback) can
        # still be split by another process's.
        logger_factory=structlog.WriteLoggerFactory(out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    _output = out
    _processors = processors if as_json else None
    _renderer = renderer


@atexit.register
def _flush_at_exit() -> None:
    if _output is not None:
        _output.flush()
