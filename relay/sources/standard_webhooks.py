"""`kind: standard-webhooks`: senders that sign per the Standard Webhooks specification.

A request carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
`webhook-signature` (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, several
space-separated while the sender rotates). The sender reuses `webhook-id` on every
retry, so it is what relay dedupes on.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from relay.config import StandardWebhooksSourceConfig
from relay.errors import Unauthorized
from relay.models import Envelope
from relay.signatures import verify_standard_webhooks, whsec_key
from relay.sources.base import RequestMeta, check_peer, header_value
from relay.sources.extract import BodySource

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
_HEADERS = (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)

# Whole seconds only: int() would also take " 17", "+17" and "1_7", which no sender means.
# Eleven digits reach the year 5138; anything longer is not a Unix time in seconds.
_TIMESTAMP = re.compile(r"[0-9]{1,11}")


class StandardWebhooksSource(BodySource):
    kind = "standard-webhooks"

    def __init__(self, name: str, config: StandardWebhooksSourceConfig) -> None:
        super().__init__(name, config)
        self.config = config
        self._keys = [whsec_key(secret.get_secret_value()) for secret in config.secrets]

    def authenticate(self, meta: RequestMeta) -> None:
        check_peer(self.name, self.config.allow_ips, meta)
        # Refused before the body is read: an unsigned request costs relay nothing.
        self._require_headers(meta)

    def _require_headers(self, meta: RequestMeta) -> None:
        missing = [h for h in _HEADERS if not header_value(meta.headers, h)]
        if missing:
            raise Unauthorized(
                f"missing {', '.join(missing)}: sign the request per Standard Webhooks"
                f" with one of the secrets of sources.{self.name}",
                code="missing_signature",
            )

    def verify(self, meta: RequestMeta, body: bytes, now: float) -> None:
        self._require_headers(meta)
        msg_id = header_value(meta.headers, ID_HEADER)
        timestamp = header_value(meta.headers, TIMESTAMP_HEADER)
        signature = header_value(meta.headers, SIGNATURE_HEADER)
        if timestamp and not _TIMESTAMP.fullmatch(timestamp):
            raise Unauthorized(
                f"{TIMESTAMP_HEADER} must be whole seconds since the Unix epoch",
                code="invalid_signature",
            )
        tolerance = self.config.tolerance
        outcome = verify_standard_webhooks(
            self._keys, msg_id, timestamp, signature, body, now=now, tolerance=tolerance
        )
        if outcome == "ok":
            return
        if outcome == "stale" and timestamp is not None:
            skew = int(timestamp) - now
            direction = "in the future" if skew > 0 else "old"
            raise Unauthorized(
                f"{TIMESTAMP_HEADER} is {abs(skew):.0f}s {direction}, outside the tolerance"
                f" of {tolerance:g}s: check the sender's clock, or the request is a replay",
                code="stale_timestamp",
            )
        raise Unauthorized(
            f"no signature in {SIGNATURE_HEADER} matches the body under any secret of"
            f" sources.{self.name}",
            code="invalid_signature",
        )

    def parse(self, meta: RequestMeta, document: Any, received_at: datetime) -> list[Envelope]:
        sent_at: datetime | None = None
        timestamp = header_value(meta.headers, TIMESTAMP_HEADER)
        if timestamp and _TIMESTAMP.fullmatch(timestamp):
            sent_at = datetime.fromtimestamp(int(timestamp), tz=UTC)
        return self._envelopes(
            meta,
            document,
            received_at,
            default_id=header_value(meta.headers, ID_HEADER) or None,
            time=sent_at,
        )
