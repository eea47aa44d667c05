"""`relay qingstor register|show|unregister`: manage a bucket's notification rule for relay.

QingStor keeps a bucket's notification rules as ONE list, and `PUT /<bucket>?notification`
replaces the whole list. So every change here reads the list first (`get_notification`),
adds, replaces or removes only the rule with our id, and writes the rest back untouched.

The official qingstor-sdk (the optional extra `qingstor-relay[qingstor]`) builds and signs the
requests. It is imported only when one of these commands runs, so relay itself works
without it. The SDK is untyped: everything that comes from it is `Any`, kept inside the
few functions below.

Secrets: the notify_url carries the source's token in its query string, so no URL is
printed with its query string, and QingStor's own error texts are scrubbed the same way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit, urlunsplit

from relay.exposure import ANYONE
from relay.logs import redact_text

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

EVENT_TYPES = ("create_object", "delete_object", "abort_multipart", "complete_multipart")
# Notifier records spell the multipart events differently from rules (docs/sources.md).
_RECORD_SPELLINGS = {"complete_upload": "complete_multipart", "abort_upload": "abort_multipart"}
DEFAULT_ID = "relay"
ENV_ACCESS_KEY_ID = "QINGSTOR_ACCESS_KEY_ID"
ENV_SECRET_ACCESS_KEY = "QINGSTOR_SECRET_ACCESS_KEY"
INSTALL_HINT = "pip install 'qingstor-relay[qingstor]'"
REDACTED = "[redacted]"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # bucket names and zone ids
_RULE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AdminError(Exception):
    """A failure to report on stderr, with the exit code it maps to."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _usage(message: str) -> AdminError:
    return AdminError(message, EXIT_USAGE)


# -- command line ---------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `qingstor register|show|unregister` to relay's command parser."""
    qingstor = subparsers.add_parser(
        "qingstor",
        help="add, show or remove the bucket notification rule that points QingStor at relay",
        description=(
            "Manage a QingStor bucket's notification rule for relay. Other rules on the "
            "bucket are always kept. Credentials come from $QINGSTOR_ACCESS_KEY_ID and "
            "$QINGSTOR_SECRET_ACCESS_KEY (or the flags). Needs " + INSTALL_HINT + "."
        ),
    )
    actions = qingstor.add_subparsers(dest="qingstor_action", required=True, metavar="ACTION")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bucket", required=True, metavar="B", help="bucket name")
    common.add_argument(
        "--zone",
        metavar="Z",
        help="the bucket's zone, e.g. pek3b (required unless --endpoint is given)",
    )
    common.add_argument(
        "--endpoint",
        metavar="URL",
        help=(
            "a QingStor-compatible API, e.g. http://127.0.0.1:9000; used exactly as "
            "given: the zone is not added to its host name (default: https://<zone>.qingstor.com)"
        ),
    )
    common.add_argument("--access-key-id", metavar="ID", help=f"default: ${ENV_ACCESS_KEY_ID}")
    common.add_argument(
        "--secret-access-key",
        metavar="KEY",
        help=f"default: ${ENV_SECRET_ACCESS_KEY} (prefer it: flags show up in `ps`)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="per-request connect and read timeout (default: 30)",
    )
    common.add_argument(
        "--retries",
        type=int,
        default=3,
        metavar="N",
        help="retries, with backoff, on connection errors and 5xx answers (default: 3)",
    )

    register = actions.add_parser(
        "register",
        parents=[common],
        help="add or replace relay's rule (cloudfunc: notifier), keeping the other rules",
    )
    register.add_argument(
        "--notify-url",
        required=True,
        metavar="URL",
        help="relay's hook, e.g. https://relay.example.com/hooks/qingstor?token=...",
    )
    register.add_argument("--id", default=DEFAULT_ID, help=f"rule id (default: {DEFAULT_ID})")
    register.add_argument(
        "--event-types",
        default=",".join(EVENT_TYPES),
        metavar="a,b",
        help="comma-separated (default: all four: " + ", ".join(EVENT_TYPES) + ")",
    )
    register.add_argument(
        "--filters",
        default="*",
        metavar="GLOB,...",
        help="comma-separated object name globs (default: *)",
    )

    actions.add_parser(
        "show", parents=[common], help="print the bucket's rules as JSON, URL queries redacted"
    )

    unregister = actions.add_parser(
        "unregister", parents=[common], help="remove relay's rule, keeping the other rules"
    )
    unregister.add_argument("--id", default=DEFAULT_ID, help=f"rule id (default: {DEFAULT_ID})")


def run(args: argparse.Namespace) -> int:
    """Run `relay qingstor <action>`; 0 ok, 1 runtime failure, 2 usage or config error."""
    action: str = args.qingstor_action
    try:
        return _ACTIONS[action](args)
    except AdminError as exc:
        print(f"relay qingstor {action}: {exc.message}", file=sys.stderr)
        return exc.code


# -- validating the flags -----------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    protocol: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.protocol}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Target:
    bucket: str
    zone: str
    endpoint: Endpoint | None
    access_key_id: str
    secret_access_key: str
    timeout: float
    retries: int


def parse_endpoint(url: str) -> Endpoint:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _usage(f"--endpoint {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _usage(f"--endpoint {url!r}: give http(s)://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise _usage(
            f"--endpoint {redact_url(url)!r}: only scheme, host and port are allowed "
            "(the SDK builds the path itself)"
        )
    host = parts.hostname
    if ":" in host:  # IPv6 literal: the SDK appends ":port" to whatever host it is given
        host = f"[{host}]"
    return Endpoint(parts.scheme, host, port or (443 if parts.scheme == "https" else 80))


def _target(args: argparse.Namespace) -> Target:
    bucket: str = args.bucket
    if not _NAME.match(bucket):
        raise _usage(f"--bucket {bucket!r}: not a bucket name")
    endpoint = parse_endpoint(args.endpoint) if args.endpoint else None
    zone: str = (args.zone or "").lower()
    if not zone and endpoint is None:
        raise _usage("give --zone (e.g. pek3b), or --endpoint for a QingStor-compatible API")
    if zone and not _NAME.match(zone):
        raise _usage(f"--zone {zone!r}: not a zone id")
    if not args.timeout > 0:
        raise _usage("--timeout must be more than 0 seconds")
    if args.retries < 0:
        raise _usage("--retries must be 0 or more")
    access_key_id = args.access_key_id or os.environ.get(ENV_ACCESS_KEY_ID, "")
    secret = args.secret_access_key or os.environ.get(ENV_SECRET_ACCESS_KEY, "")
    missing = [
        name
        for name, value in (
            (f"${ENV_ACCESS_KEY_ID} (or --access-key-id)", access_key_id),
            (f"${ENV_SECRET_ACCESS_KEY} (or --secret-access-key)", secret),
        )
        if not value
    ]
    if missing:
        raise _usage("missing QingStor credentials: set " + " and ".join(missing))
    return Target(
        bucket, zone, endpoint, access_key_id, secret, float(args.timeout), int(args.retries)
    )


def _split_list(flag: str, value: str) -> list[str]:
    items: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if item and item not in items:
            items.append(item)
    if not items:
        raise _usage(f"{flag}: give at least one value")
    return items


def _event_types(value: str) -> list[str]:
    types = _split_list("--event-types", value)
    for kind in types:
        if kind not in EVENT_TYPES:
            hint = (
                f" (rules call it {_RECORD_SPELLINGS[kind]})" if kind in _RECORD_SPELLINGS else ""
            )
            raise _usage(
                f"--event-types: unknown event type {kind!r}{hint}; "
                f"choose from {', '.join(EVENT_TYPES)}"
            )
    return types


def _notify_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = SplitResult("", "", "", "", "")
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
        raise _usage(f"--notify-url {redact_url(url)!r}: give an http(s) URL")
    if "token" not in parse_qs(parts.query):
        print(
            f"warning: --notify-url carries no ?token=: {ANYONE} Give the source a token"
            " (sources.<name>.token) and add it to the URL as ?token=..., unless its"
            " allow_ips admits QingStor alone.",
            file=sys.stderr,
        )
    elif parts.scheme == "http":
        print(
            "warning: --notify-url is plain http: its token crosses the network in clear "
            "text; prefer https",
            file=sys.stderr,
        )
    return url


def _rule_id(value: str) -> str:
    if not _RULE_ID.match(value):
        raise _usage(f"--id {value!r}: use 1 to 128 letters, digits, '.', '_', ':' or '-'")
    return value


# -- redaction ------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL with every query value (and any password or fragment) replaced.

    `https://relay.example.com/hooks/qingstor?token=abc` becomes
    `https://relay.example.com/hooks/qingstor?token=[redacted]`. A query part that is not
    `key=value` is replaced whole: it may be the secret itself.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    except ValueError:  # unparsable: keep only what precedes any query or fragment
        base = re.split(r"[?#]", url, maxsplit=1)[0]
        return base if base == url else f"{base}?{REDACTED}"
    query = "&".join(
        f"{part.split('=', 1)[0]}={REDACTED}" if "=" in part else REDACTED
        for part in parts.query.split("&")
        if part
    )
    fragment = REDACTED if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_rules(value: Any) -> Any:
    """A copy of rules in which every string that looks like a URL is redacted."""
    if isinstance(value, dict):
        return {key: redact_rules(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_rules(item) for item in value]
    if isinstance(value, str) and re.match(r"(?i)^[a-z][a-z0-9+.-]*://", value):
        return redact_url(value)
    return value


# -- talking to QingStor through the SDK ------------------------------------------------


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AdminError(
            f"the QingStor SDK is not installed ({exc}); install it with: {INSTALL_HINT}"
        ) from None


def sdk_bucket(target: Target) -> Any:
    """The SDK's Bucket object for `target` (nothing is sent yet).

    The SDK builds the request host as `[<zone>.]<config.host>[:<config.port>]`: it
    prefixes the zone whenever the zone is not empty, and omits the port only for
    https:443 and http:80. With --endpoint the endpoint's host and port go into the
    config and the SDK gets zone "" so the request goes to the endpoint exactly (an IP
    address or a private deployment's own zone host name would break with a prefix).
    Without it, the default config (https, qingstor.com, 443) and the zone give
    `https://<zone>.qingstor.com/<bucket>?notification`, path style.
    """
    config_module = _import("qingstor.sdk.config")
    service_module = _import("qingstor.sdk.service.qingstor")
    # Config() loads the SDK's built-in defaults only (it never reads ~/.qingstor).
    config = config_module.Config(target.access_key_id, target.secret_access_key)
    if target.endpoint is not None:
        config.protocol = target.endpoint.protocol
        config.host = target.endpoint.host
        config.port = target.endpoint.port
    config.enable_virtual_host_style = False  # path style: /<bucket>?notification
    config.timeout = target.timeout  # the SDK's default, 0, waits forever
    config.connection_retries = target.retries  # urllib3 Retry: errors and 500/502/503/504
    service = service_module.QingStor(config)
    return service.Bucket(target.bucket, "" if target.endpoint is not None else target.zone)


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def _call(target: Target, what: str, request: Callable[[], Any]) -> Answer:
    errors = _import("qingstor.sdk.error")
    try:
        response = request()
    except OSError as exc:  # requests' errors (connection refused, timeout, TLS, DNS)
        where = target.endpoint or f"zone {target.zone}"
        raise AdminError(
            f"{what}: request to QingStor ({where}) failed: {redact_text(str(exc))}"
        ) from None
    except (errors.ParameterRequiredError, errors.ParameterValueNotAllowedError) as exc:
        raise AdminError(f"{what}: the SDK refused the rules: {exc}") from None
    status = int(response.status_code)
    raw = bytes(response.content or b"")
    text = raw.decode("utf-8", "replace")
    try:
        parsed = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        parsed = None
    return Answer(status, parsed if isinstance(parsed, dict) else {}, text)


def _failure(what: str, answer: Answer) -> AdminError:
    code = answer.body.get("code")
    if code or answer.body.get("message"):
        detail = f"{code or 'error'}: {answer.body.get('message', '')}".rstrip(": ")
        request_id = answer.body.get("request_id")
        if request_id:
            detail += f" (request_id {request_id})"
    else:
        detail = " ".join(answer.text.split())[:300] or "(empty body)"
    return AdminError(f"{what}: QingStor answered {answer.status} {redact_text(detail)}")


def read_rules(target: Target, bucket: Any) -> list[dict[str, Any]]:
    """The bucket's rules; [] when it has none yet (an empty answer or a 404 that is not
    `bucket_not_exists`)."""
    answer = _call(target, "get_notification", bucket.get_notification)
    if answer.status == 404 and answer.body.get("code") != "bucket_not_exists":
        return []
    if not answer.ok:
        raise _failure("get_notification", answer)
    if answer.text.strip() and not answer.body:
        raise AdminError(f"get_notification: QingStor answered {answer.status} without JSON")
    rules = answer.body.get("notifications") or []
    if not isinstance(rules, list) or not all(isinstance(rule, dict) for rule in rules):
        raise AdminError("get_notification: `notifications` is not a list of rules")
    return rules


def _write_rules(target: Target, bucket: Any, rules: list[dict[str, Any]]) -> None:
    if rules:
        answer = _call(target, "put_notification", lambda: bucket.put_notification(rules))
        what = "put_notification"
    else:
        answer = _call(target, "delete_notification", bucket.delete_notification)
        what = "delete_notification"
    if not answer.ok:
        raise _failure(what, answer)


# -- the actions ----------------------------------------------------------------------


def _count(rules: Sequence[object]) -> str:
    return f"{len(rules)} rule{'' if len(rules) == 1 else 's'}"


def _register(args: argparse.Namespace) -> int:
    target = _target(args)
    rule_id = _rule_id(args.id)
    rule: dict[str, Any] = {
        "id": rule_id,
        "event_types": _event_types(args.event_types),
        "object_filters": _split_list("--filters", args.filters),
        "cloudfunc": "notifier",
        "notify_url": _notify_url(args.notify_url),
    }
    bucket = sdk_bucket(target)
    current = read_rules(target, bucket)
    ours = [existing for existing in current if existing.get("id") == rule_id]
    if ours == [rule]:
        print(
            f"rule '{rule_id}' on bucket {target.bucket} is already up to date "
            f"({_count(current)} in total)"
        )
        return EXIT_OK
    rules: list[dict[str, Any]] = []
    placed = False
    for existing in current:
        if existing.get("id") != rule_id:
            rules.append(existing)
        elif not placed:  # in place of the first old copy; any duplicates go
            rules.append(rule)
            placed = True
    if not placed:
        rules.append(rule)
    _write_rules(target, bucket, rules)
    verb = "replaced" if ours else "registered"
    print(
        f"{verb} rule '{rule_id}' on bucket {target.bucket} ({_count(rules)} in total): "
        f"{','.join(rule['event_types'])} {','.join(rule['object_filters'])} -> "
        f"{redact_url(rule['notify_url'])}"
    )
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    target = _target(args)
    rules = read_rules(target, sdk_bucket(target))
    print(json.dumps({"notifications": redact_rules(rules)}, indent=2, ensure_ascii=False))
    return EXIT_OK


def _unregister(args: argparse.Namespace) -> int:
    target = _target(args)
    rule_id = _rule_id(args.id)
    bucket = sdk_bucket(target)
    current = read_rules(target, bucket)
    remaining = [rule for rule in current if rule.get("id") != rule_id]
    if len(remaining) == len(current):
        print(
            f"no rule '{rule_id}' on bucket {target.bucket}; nothing to do "
            f"({_count(current)} in total)"
        )
        return EXIT_OK
    _write_rules(target, bucket, remaining)
    print(f"unregistered rule '{rule_id}' from bucket {target.bucket} ({_count(remaining)} left)")
    return EXIT_OK


_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "register": _register,
    "show": _show,
    "unregister": _unregister,
}
