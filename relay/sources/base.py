"""The source protocol: what ingest asks of every source kind."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, Protocol

from pydantic import SecretStr, ValidationError

from relay import jsoncodec
from relay.errors import Forbidden, InvalidBody, Unauthorized, UnsupportedMediaType
from relay.models import Envelope


@dataclass(frozen=True)
class RequestMeta:
    """The parts of a request a source may judge before its body is read."""

    headers: Mapping[str, str]
    query: Mapping[str, str]
    # The sender's address: the socket peer, or the client a trusted proxy forwarded for
    # (relay.forwarded); None when a trusted proxy's header could not be read.
    remote: str | None = None

    @cached_property
    def peer(self) -> IPv4Address | IPv6Address | None:
        # Parsed only for a source with allow_ips: most never look.
        try:
            return ip_address(self.remote or "")
        except ValueError:
            return None


class Source(Protocol):
    name: str
    # Whether a request must prove who sent it (a token, a signature, a password). Only
    # then is a body that passed and still could not be used kept in quarantine.
    authenticates: bool

    def authenticate(self, meta: RequestMeta) -> None:
        """Raise Unauthorized or Forbidden; return quietly when the request may proceed."""

    def decode(self, meta: RequestMeta, body: bytes, content_type: str) -> Any:
        """The body as the document parse() reads: for most kinds its JSON
        (`decode_json`); raise InvalidBody or UnsupportedMediaType when it is none."""

    def records_in(self, document: Any) -> int | None:
        """How many events the document holds, if that can be told without validating
        it (a batch's length), so that a body over server.max_records costs nothing."""

    def quarantine_form(
        self, meta: RequestMeta, body: bytes, content_type: str
    ) -> tuple[bytes, str]:
        """The body and content type to keep in quarantine for a request that could not
        be used: what it takes to post it again."""

    def verify(self, meta: RequestMeta, body: bytes, now: float) -> None:
        """Check a signature over the raw body; raise Unauthorized when it fails.
        Pure: `now` is passed in, so tests can move the clock."""

    def parse(self, meta: RequestMeta, document: Any, received_at: datetime) -> list[Envelope]:
        """Turn a parsed JSON document into events; raise InvalidBody when it is none."""


def check_peer(
    source: str, networks: Sequence[IPv4Network | IPv6Network] | None, meta: RequestMeta
) -> None:
    """Raise Forbidden unless the peer is in one of `networks` (None: every address may
    post, and the peer's address is never parsed)."""
    if networks is None:
        return
    peer = meta.peer
    candidates: list[IPv4Address | IPv6Address] = [] if peer is None else [peer]
    # A dual-stack listener reports IPv4 senders as ::ffff:a.b.c.d; operators write a.b.c.d.
    if isinstance(peer, IPv6Address) and peer.ipv4_mapped is not None:
        candidates.append(peer.ipv4_mapped)
    if not any(address in net for address in candidates for net in networks):
        raise Forbidden(f"address {peer} is not in sources.{source}.allow_ips")


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """The header's value, whatever its case; aiohttp's mapping is case-insensitive
    already, a plain dict (as tests and other callers may pass) is not."""
    value = headers.get(name)
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    return value


TOKEN_HEADER = "X-Relay-Token"


def token_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison that fails closed on a missing token."""
    if presented is None:
        return False
    # aiohttp hands undecodable header bytes over as surrogates: keep them, don't crash.
    return hmac.compare_digest(
        expected.encode("utf-8"), presented.encode("utf-8", "surrogateescape")
    )


def bearer_token(meta: RequestMeta) -> str | None:
    """The token of `Authorization: Bearer <token>`, as MinIO sends its auth_token."""
    scheme, _, token = (header_value(meta.headers, "Authorization") or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def check_token(
    token: SecretStr | None,
    meta: RequestMeta,
    *,
    bearer: bool = False,
    header: str | None = None,
) -> None:
    """Raise Unauthorized unless the request presents `token` (None: no token needed),
    as `?token=` (the only place QingStor's notify_url can carry it) or a header: X-Relay-
    Token, `header` when the source names one, and `Authorization: Bearer` when `bearer`."""
    if token is None:
        return
    presented = [
        value
        for value in (
            header_value(meta.headers, header) if header else None,
            header_value(meta.headers, TOKEN_HEADER),
            bearer_token(meta) if bearer else None,
            meta.query.get("token"),
        )
        if value
    ]
    expected = token.get_secret_value()
    # Any place may carry it: a proxy, or MinIO's auth_token, may fill Authorization
    # with something else while the URL has the token. Each is compared in full.
    if not any([token_matches(expected, value) for value in presented]):
        what = "invalid" if presented else "missing"
        headers = [
            TOKEN_HEADER,
            *([header] if header else []),
            *(["Authorization: Bearer"] if bearer else []),
        ]
        hint = ""
        if bearer and not presented and header_value(meta.headers, "Authorization"):
            # MinIO sends a two-word auth_token as it is ("Token abc").
            hint = "; Authorization must read `Bearer <token>` (give MinIO a one-word auth_token)"
        raise Unauthorized(
            f"{what} token: pass it as ?token= in the URL or in {' or '.join(headers)}{hint}",
            code=f"{what}_token",
        )


def decode_json(body: bytes, content_type: str) -> Any:
    """Parse the body as JSON whatever it is labelled (senders mislabel), but answer 415
    rather than 400 when a body that is not JSON also said it was something else.
    """
    if not body.strip():
        raise InvalidBody("the body is empty; expected a JSON object", code="invalid_json")
    try:
        return jsoncodec.loads(body)
    except jsoncodec.LoneSurrogate:
        raise InvalidBody(
            "the body holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff without its"
            " pair), which is no Unicode text",
            code="invalid_json",
        ) from None
    # ValueError covers bad UTF-8, bad JSON, and integers too long to convert.
    except (ValueError, RecursionError) as exc:
        declared = content_type.lower()
        if declared not in ("", "application/octet-stream") and "json" not in declared:
            raise UnsupportedMediaType(
                f"the body is not JSON (Content-Type: {declared}); send application/json"
            ) from None
        where = (
            f" at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        raise InvalidBody(f"the body is not valid JSON{where}", code="invalid_json") from None


class JsonBody:
    """For the kinds whose every body is a JSON document."""

    # The key of the document's list of records, for kinds that batch them.
    batch_key: str | None = None

    def decode(self, meta: RequestMeta, body: bytes, content_type: str) -> Any:
        return decode_json(body, content_type)

    def records_in(self, document: Any) -> int | None:
        batch = document.get(self.batch_key) if self.batch_key and type(document) is dict else None
        return len(batch) if isinstance(batch, list) else None

    def quarantine_form(
        self, meta: RequestMeta, body: bytes, content_type: str
    ) -> tuple[bytes, str]:
        return body, content_type


def describe(error: ValidationError, prefix: str = "") -> str:
    """A short, sender-facing account of what is wrong, without echoing the input."""
    parts = []
    for item in error.errors()[:5]:
        loc = ".".join(str(p) for p in item["loc"])
        parts.append(f"{prefix}{loc}: {item['msg']}")
    more = error.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def looks_like(document: Any) -> str | None:
    """What another sender's body this is, for a refusal that points at the right
    source kind: a wrong pairing of sender and source is the usual first-hour mistake."""
    if not isinstance(document, dict):
        return None
    if document.get("Type") in ("Notification", "SubscriptionConfirmation") and (
        "TopicArn" in document
    ):
        return "an SNS message: relay does not read SNS's envelope; forward the bare S3 message"
    if "specversion" in document:
        return "a CloudEvent: post it to a `kind: cloudevents` source"
    if isinstance(document.get("Records"), list):
        return "an S3 event notification: post it to a `kind: s3` source"
    if isinstance(document.get("events"), list):
        return "a QingStor notifier batch: post it to a `kind: qingstor` source"
    return None
