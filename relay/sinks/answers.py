"""What an answer means, for every sink that POSTs: one status ladder, and a hook through
which a platform reads the body first. Pure: no I/O.

Chat robots (DingTalk, Feishu, WeCom) answer HTTP 200 with the error in the body
(`{"errcode": 310000, ...}`): a ladder that counts any 2xx as delivered loses those
messages without a trace, so a platform's `BodyReader` speaks before the ladder does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from relay.sinks.base import Outcome, parse_retry_after

# Throttling statuses whose Retry-After is honoured; 4xx worth retrying (timeout,
# conflict, too early, too many requests).
THROTTLED = frozenset({429, 502, 503, 504})
RETRYABLE_4XX = frozenset({408, 409, 425, 429})

# What a platform makes of an answer before the ladder: an Outcome, or None (the body
# says nothing the status does not).
BodyReader = Callable[[int, str], Outcome | None]


def describe(status: int, body: str, limit: int = 200) -> str:
    """`HTTP <status>: <the body on one line>`, short enough for a log line."""
    shown = " ".join(body.split())[:limit]
    return f"HTTP {status}: {shown}" if shown else f"HTTP {status}"


def ladder(status: int, retry_after: str | None, body: str, now: float) -> Outcome:
    """The status alone, read as the Standard Webhooks receiver conventions describe it:
    2xx done; 410 the endpoint is gone; 3xx a wrong URL (redirects are not followed: a
    POST would turn into a GET); 429/502/503/504 back off, honouring Retry-After; other
    4xx, except 408/409/425/429, will not improve with retrying; the rest is transient."""
    if 200 <= status < 300:
        return Outcome("done", status)
    error = describe(status, body)
    if status == 410:
        return Outcome("dead", status, error, gone=True)
    if 300 <= status < 400:
        return Outcome("dead", status, f"{error} (redirect not followed: fix the url)")
    wait = parse_retry_after(retry_after, now) if status in THROTTLED else None
    if 400 <= status < 500 and status not in RETRYABLE_4XX:
        return Outcome("dead", status, error)
    return Outcome("retry", status, error, retry_after=wait)


def judge(
    status: int,
    retry_after: str | None,
    body: str,
    now: float,
    read_body: BodyReader | None = None,
) -> Outcome:
    """The body's verdict where the platform has one, else the status ladder's."""
    if read_body is not None:
        verdict = read_body(status, body)
        if verdict is not None:
            return verdict
    return ladder(status, retry_after, body, now)


def json_field(body: str, field: str) -> tuple[bool, Any]:
    """(found, value) of a top-level field of a JSON object body."""
    try:
        document = json.loads(body)
    except ValueError:
        return False, None
    if not isinstance(document, Mapping) or field not in document:
        return False, None
    return True, document[field]


@dataclass(frozen=True)
class ErrorCodes:
    """A chat platform's way of answering in the body: a numeric code field whose `ok`
    value means delivered, codes that will pass (rate limits) and codes no retry can fix
    (a bad signature, a keyword check, a wrong token). An unknown code is retried: it
    costs a duplicate at worst, never a lost message, and `max_attempts` bounds it."""

    field: str
    ok: int = 0
    transient: Collection[int] = ()
    permanent: Collection[int] = ()
    # Seconds to hold the sink after a transient code (the platform's rate window).
    transient_wait: float | None = None
    # Permanent codes that mean the robot itself is gone (deleted, its token revoked):
    # the sink pauses, as after a 410, rather than spend a request on every event.
    gone: Collection[int] = ()
    # Other fields that may carry the code (Feishu answers `StatusCode` on some paths).
    also: tuple[str, ...] = ()
    message_fields: tuple[str, ...] = ("errmsg", "msg", "message", "StatusMessage")

    def __call__(self, status: int, body: str) -> Outcome | None:
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, Mapping):
            if 200 <= status < 300:
                # A 2xx that is not the platform's JSON (a proxy's page) confirms nothing.
                error = describe(status, body) + " (not the robot's answer)"
                return Outcome("retry", status, error)
            return None
        code = next(
            (document[f] for f in (self.field, *self.also) if isinstance(document.get(f), int)),
            None,
        )
        if code is None:
            if 200 <= status < 300:
                return Outcome("retry", status, describe(status, body) + f" (no {self.field})")
            return None
        if code == self.ok and 200 <= status < 300:
            return Outcome("done", status)
        message = next(
            (str(document[f]) for f in self.message_fields if document.get(f) is not None), ""
        )
        error = f"HTTP {status}: {self.field} {code}" + (f" {message[:200]}" if message else "")
        if code in self.permanent or code in self.gone:
            return Outcome("dead", status, error, gone=code in self.gone)
        if code in self.transient:
            return Outcome("retry", status, error, retry_after=self.transient_wait)
        if code == self.ok:
            return None  # ok in the body, an error status: the status decides
        return Outcome("retry", status, error)


@dataclass(frozen=True)
class ExpectedField:
    """The `http` sink's `success` option: a 2xx is delivered only when the JSON body's
    `field` equals `equals` (a robot behind `kind: http` answers 200 with its error in
    the body). Anything else is retried, and dead-lettered after `max_attempts`, where
    an operator sees it: never recorded as delivered."""

    field: str
    equals: Any

    def __call__(self, status: int, body: str) -> Outcome | None:
        if not 200 <= status < 300:
            return None
        found, value = json_field(body, self.field)
        if found and value == self.equals and type(value) is type(self.equals):
            return Outcome("done", status)
        got = f"{self.field} {json.dumps(value)}" if found else f"no {self.field}"
        error = f"{describe(status, body)} ({got}, expected {json.dumps(self.equals)})"
        return Outcome("retry", status, error)
