"""structlog setup: JSON lines off a terminal, readable lines on one, secrets scrubbed."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

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


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
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


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    global _threshold
    out = stream or sys.stdout
    _threshold = logging.getLevelNamesMapping()[level.upper()]
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
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
    structlog.configure(
        processors=[*shared, *readable, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_threshold),
        # One write per line: workers share the leader's stdout, and print() writes the
        # line and its newline apart when Python runs unbuffered (PYTHONUNBUFFERED=1, as
        # most container images set), so two processes' lines could run into each other.
        # On a pipe a write is whole up to 4 KiB; a longer line (a traceback) can still
        # be split by another process's.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
