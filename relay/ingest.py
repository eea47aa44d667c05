"""POST /hooks/{source}: authenticate, bound, parse, store in one commit, then answer.

Nothing here waits for a sink. The answer is 200 only once the store has committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from relay.config import ServerConfig
from relay.errors import (
    BodyTooLarge,
    IngestError,
    InvalidBody,
    Overloaded,
    RequestTimeout,
    SenderGone,
    TooManyRecords,
    UndecodableBody,
    UnknownSource,
)
from relay.forwarded import READERS, client_address
from relay.metrics import Metrics
from relay.models import Envelope
from relay.routing import Router
from relay.sources import SOURCES, RequestMeta, Source
from relay.store import AcceptResult, NewEvent, Quarantined

log = structlog.get_logger("relay.ingest")

_CHUNK = 64 * 1024


@dataclass
class Ingest:
    """Everything the hook handler needs; the app builds one and keeps it in an AppKey."""

    # The first three are replaced whole by a config reload, between two requests.
    sources: dict[str, Source]
    router: Router
    limits: ServerConfig  # its max_* bounds and read_timeout
    # Stores the events durably and wakes the sinks that got work: the store's group
    # commit in this process, or the leader's when this is a worker (server.workers).
    accept: Callable[[Sequence[NewEvent]], Awaitable[AcceptResult]]
    metrics: Metrics
    # Keeps a body an authenticated sender posted that relay could not use, in the
    # background: the answer does not wait for it.
    quarantine: Callable[[Quarantined], None]
    in_flight: int = field(default=0, init=False)

    async def handle(self, request: web.Request) -> web.Response:
        # Refused before any work: under a flood, answering fast is what keeps relay up.
        self._check_capacity()
        self.in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1

    def _check_capacity(self) -> None:
        if self.in_flight >= self.limits.max_concurrent:
            raise Overloaded(
                f"relay is answering {self.in_flight} hooks already; retry in a moment"
            )

    def refusal(self, request: web.Request) -> IngestError | None:
        """What the headers alone already say to refuse, for a sender waiting on
        `Expect: 100-continue`: it then never uploads a body relay would not read."""
        try:
            self._check_capacity()
            self._admit(request)
            if (
                request.content_length is not None
                and request.content_length > self.limits.max_body_bytes
            ):
                raise BodyTooLarge(
                    f"body is {request.content_length} bytes; the limit is"
                    f" {self.limits.max_body_bytes} (server.max_body_bytes)"
                )
        except IngestError as exc:
            return exc
        return None

    def probe(self, request: web.Request) -> None:
        """Raise what a POST with these headers would be refused for, from its head."""
        self._admit(request)

    def _admit(self, request: web.Request) -> tuple[str, Source, RequestMeta]:
        """The source and the sender's address, checked against it (allow_ips, token,
        the signature headers' presence): all of it from the request head."""
        limits = self.limits
        name = request.match_info["source"]
        source = self.sources.get(name)
        if source is None:
            hint = (
                f"; the path takes a source's name (sources.<name>), not its kind {name!r}"
                if name in SOURCES
                else ""
            )
            raise UnknownSource(f"no source named {name!r} is configured{hint}")
        structlog.contextvars.bind_contextvars(source=name)

        remote = request.remote
        if limits.trusted_proxies:
            header, read_hops = READERS[limits.forwarded_header]
            hops = read_hops(request.headers.getall(header, ()))
            remote = client_address(remote, hops, limits.trusted_proxies)
            structlog.contextvars.bind_contextvars(client=remote)
        meta = RequestMeta(headers=request.headers, query=request.query, remote=remote)
        source.authenticate(meta)
        return name, source, meta

    async def _handle(self, request: web.Request) -> web.Response:
        limits = self.limits
        name, source, meta = self._admit(request)

        if request.content.is_eof():
            # All here already (a notifier batch comes in one packet): no timer to set.
            body = await read_limited(request, limits.max_body_bytes)
        else:
            try:
                async with asyncio.timeout(limits.read_timeout):
                    body = await read_limited(request, limits.max_body_bytes)
            except TimeoutError:
                raise RequestTimeout(
                    f"the body did not arrive within {limits.read_timeout:g} s"
                ) from None
        received_at = datetime.now(UTC)
        source.verify(meta, body, received_at.timestamp())
        content_type = declared_type(request)
        try:
            events = self._decode(name, source, meta, body, content_type, received_at)
        except IngestError as exc:
            if source.authenticates:
                # The sender proved who it is, so this is no scanner: likely an upstream
                # format change. Keep the body; the answer stays the 4xx.
                kept, kept_type = source.quarantine_form(meta, body, content_type)
                self.quarantine(
                    Quarantined(
                        source=name,
                        received_at=received_at.timestamp(),
                        error=exc.code,
                        reason=exc.message,
                        content_type=kept_type,
                        body=kept,
                    )
                )
            raise
        return await self._commit(name, events)

    def _decode(
        self,
        name: str,
        source: Source,
        meta: RequestMeta,
        body: bytes,
        content_type: str,
        received_at: datetime,
    ) -> list[NewEvent]:
        """The body's events, or the IngestError that says why it has none."""
        limits = self.limits
        document = source.decode(meta, body, content_type)
        if too_deep(body, document, limits.max_json_depth):
            raise InvalidBody(
                f"the body nests deeper than {limits.max_json_depth} levels", code="invalid_json"
            )
        # A batch is counted before its records are validated, which is where the CPU
        # goes; any other shape is counted by what it becomes.
        count = source.records_in(document)
        if count is not None and count > limits.max_records:
            raise TooManyRecords(
                f"the body holds {count} events; the limit is {limits.max_records}"
            )
        try:
            envelopes = source.parse(meta, document, received_at)
            if len(envelopes) > limits.max_records:
                raise TooManyRecords(
                    f"the body holds {len(envelopes)} events; the limit is {limits.max_records}"
                )
            events = self._events(name, envelopes, received_at.timestamp())
        except RecursionError:
            # Only with max_json_depth raised far past its default: orjson reads nesting
            # the standard library cannot write back. The sender's mistake, not ours.
            raise InvalidBody("the body nests too deeply", code="invalid_json") from None
        return events

    async def _commit(self, name: str, events: list[NewEvent]) -> web.Response:
        """Store the events (200 only once committed), count them, answer."""
        result = await self.accept(events)
        accepted = set(result.accepted)
        fresh = [e for e in events if e.id in accepted]
        structlog.contextvars.bind_contextvars(
            accepted=len(result.accepted), duplicates=len(result.duplicates)
        )
        received, duplicates = self.metrics.source_counters(name)
        received.inc(len(events))
        if result.duplicates:
            duplicates.inc(len(result.duplicates))
        unrouted = sum(1 for e in fresh if not e.sinks)
        if unrouted:
            # Not an error: stored and deduplicated, just wanted by no sink.
            self.metrics.unrouted.labels(name).inc(unrouted)
            log.info("ingest.unrouted", count=unrouted)
        # Formatted by hand: the hot path's answer has one shape and two integers.
        answer = f'{{"accepted": {len(result.accepted)}, "duplicates": {len(result.duplicates)}}}'
        return web.Response(body=answer.encode(), content_type="application/json")

    def _events(self, name: str, envelopes: Sequence[Envelope], received: float) -> list[NewEvent]:
        events = []
        for envelope in envelopes:
            sinks = self.router.sinks_for(envelope)
            try:
                text = envelope.to_json()
            except UnicodeEncodeError:
                raise InvalidBody(
                    "body contains an unpaired UTF-16 surrogate escape", code="invalid_json"
                ) from None
            ordered = self.router.ordered
            if ordered and (key := envelope.order_key()) is not None:
                held = tuple(s for s in sinks if s in ordered)
                events.append(
                    NewEvent(envelope.id, name, text, sinks, key, envelope.order_at(received), held)
                )
            else:
                events.append(NewEvent(envelope.id, name, text, sinks))
        return events


async def read_limited(request: web.Request, limit: int) -> bytes:
    """Read at most `limit` bytes; refuse early on Content-Length, else once past it."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"body is {request.content_length} bytes; the limit is {limit} (server.max_body_bytes)"
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await request.content.read(_CHUNK)
        except web.RequestPayloadError:
            # The rest cannot be read either: say it ended, or aiohttp would try to read
            # on after the answer and log the same error as unhandled.
            request.content.feed_eof()
            raise UndecodableBody(
                "the body could not be decoded as its Content-Encoding says"
            ) from None
        except ConnectionResetError:
            # A sender that gave up half-way (it timed out, or its process died): an
            # everyday event on the internet, not a bug of relay's.
            raise SenderGone(f"the connection closed after {size} bytes of the body") from None
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds the limit of {limit} bytes (server.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def too_deep(body: bytes, document: Any, limit: int) -> bool:
    """Whether `document` nests more than `limit` arrays and objects deep. Free for the
    usual body: one with fewer brackets than the limit cannot nest that deep."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    return type(document) in (dict, list) and _exceeds(document, limit)


def _exceeds(container: dict[str, Any] | list[Any], levels: int) -> bool:
    # Recursion, bounded by max_json_depth's ceiling, and only into containers: about
    # 1.6 us a record of a notifier batch, against 2.8 us to parse it.
    if not levels:
        return True
    children = container.values() if isinstance(container, dict) else container
    for child in children:
        kind = type(child)
        if (kind is dict or kind is list) and _exceeds(child, levels - 1):
            return True
    return False


def declared_type(request: web.Request) -> str:
    """The media type the sender declared, lower-cased, without parameters. aiohttp
    parses the header with the standard library's email parser, which raises on some
    malformed parameters (`;0*`): a sender's garbage must not cost a 500."""
    try:
        return request.content_type
    except Exception:
        raw = request.headers.get("Content-Type", "")
        return raw.split(";", 1)[0].strip().lower() or "application/octet-stream"
