"""`relay send-test URL`: post a QingStor notification the way QingStor does.

An operator points this at relay (or at anything QingStor will call) to check the
wiring before touching a bucket. It posts the documented sample, or a JSON file, with
`Content-Type: application/json` and QingStor's retry behaviour:

- every attempt times out after `TIMEOUT` (5 s);
- `notifier`: a timed-out attempt (or one that could not connect) is retried
  `NOTIFIER_INTERVAL` (1 s) later; any HTTP answer, 200 or not, ends the event.
  QingStor documents no limit, so this command stops after `NOTIFIER_ATTEMPTS` (5);
- `tupu-porn`: any answer but 200 (a timeout and a connection error too) is retried
  `TUPU_PORN_INTERVAL` (500 ms) later, at most `TUPU_PORN_RETRIES` (3) times.

A retry re-sends the same bytes. With `--count N` it sends N distinct events (a fresh
`response_elements.request_id` or `result.nonce` each). One line per attempt, then a
summary; exit 0 only if every event got a 200, 1 if any did not, 2 for bad arguments.
The URL's query string (where the token travels) is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import aiohttp
from yarl import URL

from relay import __version__
from relay.logs import redact_text
from relay.samples import NOTIFIER_SAMPLE, TUPU_PORN_SAMPLE

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

Kind = Literal["notifier", "tupu-porn"]
KINDS: tuple[Kind, ...] = ("notifier", "tupu-porn")

# QingStor's sender behaviour (docs/sources.md): the defaults must stay these values.
TIMEOUT = 5.0  # seconds per attempt, connect to last byte of the answer
NOTIFIER_INTERVAL = 1.0  # seconds between a timed-out attempt and its retry
NOTIFIER_ATTEMPTS = 5  # QingStor documents no bound; ours: the first try and 4 retries
TUPU_PORN_INTERVAL = 0.5  # seconds between a non-200 answer and its retry
TUPU_PORN_RETRIES = 3  # retries after the first attempt, on any non-200

BODY_PREVIEW = 200  # characters of each answer's body printed
USER_AGENT = f"relay-send-test/{__version__}"

SAMPLES: dict[Kind, dict[str, Any]] = {"notifier": NOTIFIER_SAMPLE, "tupu-porn": TUPU_PORN_SAMPLE}


class UsageError(Exception):
    """Bad arguments: the command exits 2 with this message."""


@dataclass(frozen=True)
class Policy:
    """How one event is sent: QingStor's behaviour for `kind`, unless overridden."""

    kind: Kind
    timeout: float
    interval: float
    attempts: int

    @classmethod
    def for_kind(
        cls,
        kind: Kind,
        *,
        timeout: float | None = None,
        interval: float | None = None,
        attempts: int | None = None,
    ) -> Policy:
        if kind == "notifier":
            default_interval, default_attempts = NOTIFIER_INTERVAL, NOTIFIER_ATTEMPTS
        else:
            default_interval, default_attempts = TUPU_PORN_INTERVAL, 1 + TUPU_PORN_RETRIES
        policy = cls(
            kind=kind,
            timeout=TIMEOUT if timeout is None else timeout,
            interval=default_interval if interval is None else interval,
            attempts=default_attempts if attempts is None else attempts,
        )
        if not policy.timeout > 0:
            raise UsageError("--timeout must be more than 0 seconds")
        if not policy.interval >= 0:
            raise UsageError("--interval must be 0 seconds or more")
        if policy.attempts < 1:
            raise UsageError("--attempts must be at least 1")
        return policy

    def retries_answer(self, status: int) -> bool:
        """Whether an HTTP answer (not a timeout) leads to another attempt."""
        return self.kind == "tupu-porn" and status != 200

    def describe(self) -> str:
        when = "on timeout or connection error" if self.kind == "notifier" else "on any non-200"
        return (
            f"timeout {_seconds(self.timeout)}, up to {self.attempts} attempts "
            f"{_seconds(self.interval)} apart {when}"
        )


@dataclass
class Attempt:
    number: int
    status: int | None  # None: timed out or failed before an answer
    latency: float  # seconds
    error: str = ""  # "timeout" or the client error, when status is None
    body: str = ""  # the answer's body, as printed


@dataclass
class EventResult:
    number: int
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].status == 200

    @property
    def last_outcome(self) -> str:
        if not self.attempts:
            return "not sent"
        last = self.attempts[-1]
        if last.status is not None:
            return str(last.status)
        return last.error.partition(":")[0]  # "timeout" or the client error's class


@dataclass
class Report:
    events: list[EventResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(event.ok for event in self.events)

    @property
    def attempts(self) -> int:
        return sum(len(event.attempts) for event in self.events)


# ---------------------------------------------------------------------------- output


def _seconds(value: float) -> str:
    """5 -> '5.0s', 0.3 -> '0.3s', 0.05 -> '0.05s'."""
    return f"{value:.1f}s" if round(value, 1) == value else f"{value:g}s"


def display_url(url: URL) -> str:
    """The URL without secrets: user info dropped, every query value `[redacted]`."""
    shown = url.with_user(None).with_query(None).with_fragment(None)
    if not url.raw_query_string:
        return str(shown)
    names = [name for name in dict.fromkeys(url.query.keys()) if name]
    query = "&".join(f"{name}=[redacted]" for name in names) or "[redacted]"
    return f"{shown}?{query}"


@dataclass(frozen=True)
class Redactor:
    """Keeps one URL's secrets out of printed text."""

    secrets: tuple[str, ...]

    @classmethod
    def for_url(cls, url: URL) -> Redactor:
        found = {url.raw_query_string, url.query_string, url.password or "", url.raw_password or ""}
        found.update(url.query.values())
        found.update(pair.partition("=")[2] for pair in url.raw_query_string.split("&"))
        # Short values ("1", "json") are not secrets and would mangle the text.
        return cls(tuple(sorted((s for s in found if len(s) >= 6), key=len, reverse=True)))

    def literal(self, text: str) -> str:
        """This URL's secret values, wherever they appear: the last line of defence."""
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def untrusted(self, text: str) -> str:
        """For text relay did not write (answers, error messages): any URL's query
        string and query-style secrets too, since an answer may echo a request URL."""
        return self.literal(redact_text(text))


def _preview(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return text if len(text) <= BODY_PREVIEW else text[: BODY_PREVIEW - 1] + "…"


# ---------------------------------------------------------------------------- bodies


def _notifier_with_id(document: Any, request_id: str) -> dict[str, Any] | None:
    """The batch with every record's response_elements.request_id set, else None.

    All records of one POST share the request id, as when one request deletes many
    objects; relay's event id also includes the object name, so they stay distinct."""
    if not isinstance(document, dict) or not isinstance(document.get("events"), list):
        return None
    batch = copy.deepcopy(document)
    changed = False
    for record in batch["events"]:
        if not isinstance(record, dict):
            continue
        elements = record.setdefault("response_elements", {})
        if isinstance(elements, dict):
            elements["request_id"] = request_id
            changed = True
    return batch if changed else None


def _tupu_porn_with_nonce(document: Any, nonce: str) -> dict[str, Any] | None:
    if not isinstance(document, dict) or not isinstance(document.get("result"), dict):
        return None
    result = copy.deepcopy(document)
    result["result"]["nonce"] = nonce
    return result


def _fresh_ids(kind: Kind, count: int) -> list[str]:
    """`count` distinct ids shaped like QingStor's: 16 hex digits, or a random float."""
    fresh: dict[str, None] = {}
    while len(fresh) < count:
        if kind == "notifier":
            fresh[secrets.token_hex(8)] = None
        else:
            fresh[repr(secrets.SystemRandom().random())] = None
    return list(fresh)


def infer_kind(document: Any) -> Kind:
    """tupu-porn for a `{"result": ...}` document without `events`, else notifier."""
    if isinstance(document, dict) and "result" in document and "events" not in document:
        return "tupu-porn"
    return "notifier"


def build_bodies(
    kind: Kind, count: int, document: Any = None, raw: bytes | None = None
) -> list[bytes]:
    """The bytes of each of `count` distinct events.

    Without a document: the documented sample with a fresh id for every event, so
    each run is a new event for relay (not a duplicate of the last run). With a file:
    its exact bytes when count is 1; with a fresh id per copy when count is more."""
    if count < 1:
        raise UsageError("--count must be at least 1")
    if document is None:
        document = SAMPLES[kind]
        raw = None
    elif count == 1 and raw is not None:
        return [raw]
    rewrite = _notifier_with_id if kind == "notifier" else _tupu_porn_with_nonce
    bodies = []
    for fresh in _fresh_ids(kind, count):
        body = rewrite(document, fresh)
        if body is None:
            need = (
                'a notifier batch {"events": [...]} (each copy gets its own '
                "response_elements.request_id)"
                if kind == "notifier"
                else 'a tupu-porn result {"result": {...}} (each copy gets its own result.nonce)'
            )
            raise UsageError(f"--count {count} needs {need}")
        bodies.append(json.dumps(body, ensure_ascii=False).encode())
    return bodies


def read_document(path: str) -> tuple[Any, bytes]:
    """The parsed JSON and the exact bytes of `path` (`-` for standard input)."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as handle:
                raw = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read --file {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(raw.decode("utf-8")), raw
    except UnicodeDecodeError:
        raise UsageError(f"--file {path} is not valid JSON: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--file {path} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def parse_url(text: str) -> URL:
    try:
        url = URL(text)
    except (ValueError, TypeError):
        raise UsageError("URL is not a valid URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(
            "URL must be an absolute http:// or https:// URL, "
            "e.g. https://relay.example.com/hooks/qingstor?token=..."
        )
    return url


# ---------------------------------------------------------------------------- sending


async def _attempt(
    session: aiohttp.ClientSession,
    url: URL,
    body: bytes,
    number: int,
    policy: Policy,
    redactor: Redactor,
) -> Attempt:
    started = time.perf_counter()
    try:
        async with session.post(
            url,
            data=body,
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=policy.timeout),
            allow_redirects=False,  # a 3xx is an answer that is not 200, as for QingStor
        ) as response:
            content = await response.read()
            latency = time.perf_counter() - started
            preview = redactor.untrusted(_preview(content))
            return Attempt(number, response.status, latency, body=preview)
    except TimeoutError:
        return Attempt(number, None, time.perf_counter() - started, error="timeout")
    except aiohttp.ClientError as exc:
        latency = time.perf_counter() - started
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return Attempt(number, None, latency, error=redactor.untrusted(detail))


def _describe(attempt: Attempt, timeout: float) -> str:
    if attempt.status is not None:
        line = f"{attempt.status} in {attempt.latency * 1000:.1f} ms"
        return f"{line} {attempt.body}" if attempt.body else line
    if attempt.error == "timeout":
        return f"timed out after {_seconds(timeout)}"
    return f"failed after {attempt.latency * 1000:.1f} ms: {attempt.error}"


async def send_event(
    session: aiohttp.ClientSession,
    url: URL,
    body: bytes,
    policy: Policy,
    label: str,
    emit: Callable[[str], None],
    redactor: Redactor,
) -> list[Attempt]:
    """Send one event until it gets a 200, the policy stops retrying, or attempts run out."""
    attempts: list[Attempt] = []
    for number in range(1, policy.attempts + 1):
        attempt = await _attempt(session, url, body, number, policy, redactor)
        attempts.append(attempt)
        line = f"{label} attempt {number}: {_describe(attempt, policy.timeout)}"
        if attempt.status == 200:
            emit(line)
            break
        if attempt.status is not None and not policy.retries_answer(attempt.status):
            emit(f"{line}; not retried (notifier retries only on timeout)")
            break
        if number == policy.attempts:
            emit(f"{line}; giving up after {number} attempts")
            break
        emit(f"{line}; retry in {_seconds(policy.interval)}")
        await asyncio.sleep(policy.interval)
    return attempts


async def send_test(
    url: str,
    bodies: Sequence[bytes],
    policy: Policy,
    out: TextIO | None = None,
) -> Report:
    """Post each body in turn as one QingStor event, retrying per `policy`.

    Prints a header line, one line per attempt and a summary to `out` (stdout when
    None), with the URL's secrets redacted. Raises UsageError for a bad URL."""
    target = parse_url(url)
    redactor = Redactor.for_url(target)
    stream = out if out is not None else sys.stdout

    def emit(line: str) -> None:
        print(redactor.literal(line), file=stream, flush=True)

    total = len(bodies)
    noun = "event" if total == 1 else "events"
    emit(f"POST {display_url(target)}: {total} {policy.kind} {noun}, {policy.describe()}")
    report = Report()
    # A fresh connection per attempt, as independent notifications arrive: no stale
    # keep-alive connection can turn into a spurious error between retries.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for index, body in enumerate(bodies, start=1):
            label = f"event {index}/{total}"
            attempts = await send_event(session, target, body, policy, label, emit, redactor)
            report.events.append(EventResult(index, attempts))
    emit(_summary(report))
    return report


def _summary(report: Report) -> str:
    good = sum(event.ok for event in report.events)
    total = len(report.events)
    tries = report.attempts
    line = f"summary: {good}/{total} events got 200 ({tries} attempt{'s' if tries != 1 else ''})"
    failed = [event for event in report.events if not event.ok]
    if failed:
        shown = ", ".join(f"event {e.number} (last: {e.last_outcome})" for e in failed[:10])
        more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
        line += f"; not delivered: {shown}{more}"
    return line


# ---------------------------------------------------------------------------- command


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `send-test` to the `relay` command's subparsers."""
    command = subparsers.add_parser(
        "send-test",
        help="post a sample QingStor notification, retrying as QingStor does",
        description=(
            "Post the documented QingStor sample (or --file) to URL as QingStor does: "
            "Content-Type: application/json, a 5 s timeout per attempt; notifier retries "
            "a timeout or connection error 1 s later (up to 5 attempts), tupu-porn retries "
            "any non-200 500 ms later (3 retries). Exit 0 if every event got a 200, "
            "1 if not, 2 for bad arguments."
        ),
    )
    command.add_argument(
        "url", metavar="URL", help="where QingStor would post, e.g. .../hooks/qingstor?token=..."
    )
    command.add_argument(
        "--file",
        metavar="F",
        help="post this JSON instead of the documented sample (- for standard input)",
    )
    command.add_argument(
        "--kind",
        choices=KINDS,
        help="whose behaviour and sample (default: from --file's shape, else notifier)",
    )
    command.add_argument(
        "--count",
        type=_positive_int,
        default=1,
        metavar="N",
        help="send N distinct events, each with its own request id / nonce (default 1)",
    )
    command.add_argument(
        "--timeout",
        type=_seconds_arg,
        metavar="SECONDS",
        help=f"per-attempt timeout (default {TIMEOUT:g}, QingStor's)",
    )
    command.add_argument(
        "--interval",
        type=_seconds_arg,
        metavar="SECONDS",
        help=(
            f"pause before a retry (default: notifier {NOTIFIER_INTERVAL:g}, "
            f"tupu-porn {TUPU_PORN_INTERVAL:g})"
        ),
    )
    command.add_argument(
        "--attempts",
        type=_positive_int,
        metavar="N",
        help=(
            f"attempts per event, retries included (default: notifier {NOTIFIER_ATTEMPTS}, "
            f"tupu-porn {1 + TUPU_PORN_RETRIES})"
        ),
    )


@dataclass(frozen=True)
class Plan:
    url: str
    bodies: list[bytes]
    policy: Policy


def plan(args: argparse.Namespace) -> Plan:
    """Check the arguments and build what to send; UsageError when they are wrong."""
    parse_url(args.url)
    document, raw = read_document(args.file) if args.file is not None else (None, None)
    kind: Kind = args.kind or (infer_kind(document) if args.file is not None else "notifier")
    policy = Policy.for_kind(
        kind,
        timeout=getattr(args, "timeout", None),
        interval=getattr(args, "interval", None),
        attempts=getattr(args, "attempts", None),
    )
    count = getattr(args, "count", 1)
    return Plan(args.url, build_bodies(kind, count, document, raw), policy)


async def run_async(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """`relay send-test` inside a running event loop; returns the exit code."""
    try:
        prepared = plan(args)
    except UsageError as exc:
        print(f"relay send-test: {exc}", file=err if err is not None else sys.stderr)
        return EXIT_USAGE
    report = await send_test(prepared.url, prepared.bodies, prepared.policy, out)
    return EXIT_OK if report.ok else EXIT_FAILURE


def run(args: argparse.Namespace) -> int:
    """`relay send-test`: the exit code (0 every event got a 200, 1 not, 2 usage)."""
    try:
        prepared = plan(args)  # before any event loop: usage errors are immediate
    except UsageError as exc:
        print(f"relay send-test: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = asyncio.run(send_test(prepared.url, prepared.bodies, prepared.policy))
    except KeyboardInterrupt:
        print("relay send-test: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if report.ok else EXIT_FAILURE
