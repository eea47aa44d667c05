"""The sink protocol: what the dispatcher asks of every sink kind."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Literal, Protocol

import aiohttp
from yarl import URL

from relay.config import RetryConfig
from relay.models import Delivery

# A Retry-After beyond this is read as this: a typo must not park events for a year.
MAX_RETRY_AFTER = 86400.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            return None
        seconds = moment.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True, slots=True)
class _Redaction:
    """What a sink's answers and errors must never carry, worked out once per sink
    (`_redaction`), not once per send: webhook URLs carry their credential in the path
    or query (Slack, Discord, DingTalk), receivers' error pages like to quote them and
    the credentials sent ("Incorrect API key provided: ..."). Longest first, so that no
    part of a longer value survives a shorter one's replacement."""

    url_forms: tuple[str, ...]  # the URL and its path and query: raw, decoded, JSON-escaped
    secrets: tuple[str, ...]
    spare: int  # bytes read past the KiB kept, so a value across the cut is there whole

    def scrub(self, text: str) -> str:
        for form in self.url_forms:
            text = text.replace(form, "<url>")
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def without_partial_tail(self, text: str) -> str:
        """`text`, cut where it ends with the first part of a URL form or a secret: what
        was read stopped inside it, so the whole value was never there to be scrubbed."""
        for value in (*self.url_forms, *self.secrets):
            for size in range(min(len(value) - 1, len(text)), 0, -1):
                if text.endswith(value[:size]):
                    text = text[:-size]
                    break
        return text


_CREDENTIAL_NAMES = ("token", "key", "sig", "secret", "password", "auth", "sign")


def url_tokens(url: str) -> set[str]:
    """The credentials a webhook URL carries, in every form an answer could quote back:
    its path segments and query values long enough to be tokens (short ones are words
    like "send"), raw and decoded, and its query string whole."""
    parsed = URL(url)
    raw_parts = parsed.raw_path.split("/")
    found = {p for p in (*parsed.parts, *raw_parts, *parsed.query.values()) if len(p) >= 16}
    for pair in parsed.raw_query_string.split("&"):
        name, _, value = pair.partition("=")
        # A value named as a credential is one, however short; others only when long.
        named = any(w in name.lower() for w in _CREDENTIAL_NAMES)
        if len(value) >= 16 or (named and len(value) >= 4):
            found.add(value)
            found.add(URL.build(query_string=f"v={value}").query.get("v", value))
    if len(parsed.raw_query_string) >= 16:
        found.add(parsed.raw_query_string)
    return found


@lru_cache(maxsize=64)
def _redaction(url: str, secrets: tuple[str, ...]) -> _Redaction:
    parsed = URL(url)
    forms = [url, str(parsed), parsed.raw_path_qs, parsed.path_qs, parsed.raw_path]
    forms = [form for form in forms if form and form != "/"]
    forms += [form.replace("/", "\\/") for form in forms]
    return _Redaction(
        url_forms=tuple(sorted(forms, key=len, reverse=True)),
        secrets=tuple(sorted(secrets, key=len, reverse=True)),
        spare=max(len(value.encode()) for value in (url, *secrets)),
    )


class PostingSink:
    """For sinks that POST: one aiohttp session, opened by start() and closed by close(),
    with `connections` sockets at most and `timeout` seconds per request."""

    timeout: float
    connections: int = 1
    linger: float = 0.0
    paced: bool = False
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": "relay"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"{type(self).__name__} used before start()")
        return self._session


# Characters of an answer's body kept to describe it.
ANSWER_KEPT = 1024


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    retry_after: str | None
    body: str  # the first KiB, the URL scrubbed out


async def post(
    session: aiohttp.ClientSession,
    url: str | URL,
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str] = (),
) -> Answer | Outcome:
    """POST once: the answer to judge, or the Outcome of a request that got none.
    Neither carries the URL or any of `secrets`. A `URL` is sent as it is (a signature
    already percent-encoded stays so); a string is normalised as aiohttp does."""
    redaction = _redaction(str(url), tuple(secrets))
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
            # Read past the KiB kept by the longest secret, and scrubbed before the cut:
            # a secret straddling it would otherwise leave its first part behind.
            wanted = ANSWER_KEPT + redaction.spare
            raw = await response.content.read(wanted)
            text = redaction.scrub(raw.decode("utf-8", "replace"))
            if len(raw) == wanted:
                # More followed: the read itself may have stopped inside a secret.
                text = redaction.without_partial_tail(text)
            return Answer(response.status, response.headers.get("Retry-After"), text[:ANSWER_KEPT])
    except aiohttp.InvalidURL:
        # Its message would echo the URL.
        return Outcome("dead", error="invalid url")
    except TimeoutError:
        return Outcome("retry", error=f"timed out after {session.timeout.total or 0:g}s")
    except aiohttp.ClientResponseError as exc:
        # A malformed answer: its message names the request URL. The status is enough.
        return Outcome("retry", status=exc.status or None, error=exc.__class__.__name__)
    except aiohttp.ClientError as exc:
        return Outcome("retry", error=redaction.scrub(f"{exc.__class__.__name__}: {exc}"))


def backoff_ceiling(attempts: int, retry: RetryConfig) -> float:
    """The top of the backoff range after `attempts` failures: initial * 2**(n-1), capped."""
    return min(retry.max, retry.initial * 2.0 ** min(attempts - 1, 62))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt came to, as the sink judges it.

    `done`: the sink has it. `retry`: try again later (not before `retry_after` seconds,
    when the sink said so). `dead`: retrying cannot help; dead-letter it now.
    `defer`: not attempted at all (the sink held it back, e.g. after a 429 to an earlier
    message): back to the queue, due after `retry_after`, costing no attempt.
    """

    result: Literal["done", "retry", "dead", "defer"]
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    # The receiver said the endpoint is gone for good (HTTP 410): report the sink.
    gone: bool = False
    # Whether it counts toward the circuit breaker; None: judged from the outcome (a
    # retry without a wait the receiver asked for is a failure).
    failure: bool | None = None


DONE = Outcome("done")


class Sink(Protocol):
    name: str
    # How many deliveries one send() takes (a file sink writes them with one fsync),
    # and how many send() calls may be in flight at once (an HTTP sink's connections).
    batch_size: int
    concurrency: int
    # Seconds to wait, once caught up, before taking the next batch: a few more events
    # arrive meanwhile and share its one write and one settlement (0: send at once).
    linger: float
    # Spaced out in time (a rate limit, a chat robot's pace): where several relays share
    # a store, one of them at a time sends to it, so that the pace holds for the robot.
    paced: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        """One Outcome per delivery, in order. Must not raise for a delivery's failure."""
        ...
