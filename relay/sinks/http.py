"""`kind: http`: POST each event to a service, optionally signed per Standard Webhooks.

Answers are read by the status ladder every sink shares (relay.sinks.answers): 2xx
done; 410 the endpoint is gone; 429/502/503/504 back off, honouring Retry-After; other
4xx, except 408/409/425/429, will not improve with retrying; the rest is transient. With
`success`, a 2xx counts only when its JSON body carries the expected field value.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from yarl import URL

from relay.config import HttpSinkConfig
from relay.models import Delivery, isoformat
from relay.signatures import standard_webhooks_header, whsec_key
from relay.sinks.answers import ExpectedField, judge, ladder
from relay.sinks.base import Answer, Outcome, PostingSink, post, url_tokens
from relay.sinks.pacing import Pacer

# The status ladder every sink shares; the name the tests and docs know it by.
judge_response = ladder


# CloudEvents HTTP binding 3.1.3.2: of printable ASCII (U+0021-U+007E) all but `"` and
# `%` go as is; everything else, the space included, as UTF-8 %XX. An unencoded space
# is not safe: HTTP strips it at either end of a header value, changing the object key.
_CE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '%"')


def cloudevent_time(value: str) -> str:
    """`time` as CloudEvents requires it, RFC 3339 with an offset: in UTC, `Z`.

    QingStor's event_time may be any ISO 8601 that fromisoformat reads, naive or dated
    only; without an offset it is taken as UTC. A value that does not parse (no source
    stores one, but stored envelopes outlive code) goes as it is rather than fail a send
    that would fail on every retry.
    """
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return isoformat(moment)
    except (TypeError, ValueError, OverflowError):
        return value


def cloudevent_attributes(envelope: dict[str, Any]) -> dict[str, str]:
    """The envelope's CloudEvents context attributes (all but `data`)."""
    attributes = {
        "specversion": "1.0",
        "id": envelope["id"],
        "source": envelope["source"],
        "type": envelope["type"],
        "time": cloudevent_time(envelope["time"]),
    }
    if envelope.get("subject"):
        attributes["subject"] = envelope["subject"]
    # Extension attributes: lowercase alphanumeric names, string values.
    for name in ("bucket", "key"):
        if envelope.get(name) is not None:
            attributes[name] = str(envelope[name])
    if isinstance(envelope.get("event_name"), str):
        attributes["eventname"] = envelope["event_name"]  # the store's own name
    return attributes


def encode(format_: str, envelope_json: str) -> tuple[bytes, dict[str, str]]:
    """The request body and format headers for one stored envelope."""
    if format_ == "envelope":
        return envelope_json.encode("utf-8"), {"Content-Type": "application/json"}
    envelope = json.loads(envelope_json)
    attributes = cloudevent_attributes(envelope)
    if format_ == "cloudevents":
        event = {**attributes, "datacontenttype": "application/json", "data": envelope["data"]}
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        return body.encode("utf-8"), {"Content-Type": "application/cloudevents+json"}
    headers = {f"ce-{name}": quote(value, safe=_CE_SAFE) for name, value in attributes.items()}
    headers["Content-Type"] = "application/json"
    body = json.dumps(envelope["data"], separators=(",", ":"), ensure_ascii=False)
    return body.encode("utf-8"), headers


# Shorter values are not credentials, and scrubbing them ("json", "1") mangles text.
_MIN_SECRET = 6


def credentials(config: HttpSinkConfig) -> tuple[str, ...]:
    """What the sink sends as credentials, in every form an answer could quote back:
    each header value whole and without its scheme (`Bearer <token>`), and the URL's
    password, which aiohttp sends as basic auth."""
    found: set[str] = set()
    for secret in config.headers.values():
        value = secret.get_secret_value()
        found.update((value, value.partition(" ")[2].strip()))
    url = URL(config.url.get_secret_value())
    # Service URLs may carry their token as a path segment or a query value.
    found.update(url_tokens(config.url.get_secret_value()))
    if url.password:
        found.update((url.password, url.raw_password or ""))
        pair = f"{url.user or ''}:{url.password}"
        # aiohttp encodes it as latin-1; the UTF-8 form is there for any other client.
        for encoding in ("latin-1", "utf-8"):
            with suppress(UnicodeEncodeError):
                found.add(base64.b64encode(pair.encode(encoding)).decode("ascii"))
    return tuple(s for s in found if len(s) >= _MIN_SECRET)


class HttpSink(PostingSink):
    def __init__(self, name: str, config: HttpSinkConfig) -> None:
        self.name = name
        self.config = config
        self.batch_size = 1
        self.concurrency = config.concurrency
        self.paced = config.rate_limit is not None
        self._keys = [whsec_key(s.get_secret_value()) for s in config.signing_secret or []]
        self._credentials = credentials(config)
        # Spaces sends per rate_limit, and holds them all back after a Retry-After.
        self._pacer = Pacer.per_second(config.rate_limit)
        # A robot-like service that answers 200 with its error in the body: a 2xx is
        # delivered only when the body says so.
        self._read_body = (
            None
            if config.success is None
            else ExpectedField(config.success.field, config.success.equals)
        )
        self.timeout = config.timeout
        self.connections = config.concurrency

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        if len(batch) == 1:  # the dispatcher's usual call (batch_size 1): no extra task
            return [await self._post(batch[0])]
        return list(await asyncio.gather(*(self._post(d) for d in batch)))

    def request_for(self, delivery: Delivery, now: float) -> tuple[bytes, dict[str, str]]:
        body, format_headers = encode(self.config.format, delivery.envelope)
        headers = {k: v.get_secret_value() for k, v in self.config.headers.items()}
        headers.update(format_headers)
        # The stable event id, identical on every retry, lets the receiver dedupe.
        headers["webhook-id"] = delivery.event_id
        headers["Idempotency-Key"] = delivery.event_id
        if self._keys:
            timestamp = int(now)
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = standard_webhooks_header(
                self._keys, delivery.event_id, timestamp, body
            )
        return body, headers

    async def _post(self, delivery: Delivery) -> Outcome:
        await self._pacer.wait()
        # Signed when sent, not when queued: the timestamp must be fresh on every retry.
        body, headers = self.request_for(delivery, time.time())
        url = self.config.url.get_secret_value()
        answer = await post(self.session, url, body, headers, self._credentials)
        if not isinstance(answer, Answer):
            return answer
        outcome = judge(
            answer.status, answer.retry_after, answer.body, time.time(), self._read_body
        )
        if outcome.retry_after:
            # The receiver asked the sink, not one delivery, to wait.
            self._pacer.hold(outcome.retry_after)
        return outcome
