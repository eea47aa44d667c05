"""`kind: hmac`: one header carrying an HMAC of the raw body, GitHub-style.

GitHub sends `X-Hub-Signature-256: sha256=<hex HMAC-SHA256>`; other senders choose the
header, the hash, hex or base64, and a prefix. Such a signature covers the body only
(no timestamp), so a captured request can be replayed: dedupe absorbs an identical
replay, and `allow_ips` narrows who can send one at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from relay.config import HmacCheck, HmacSourceConfig
from relay.errors import Unauthorized
from relay.models import Envelope
from relay.signatures import verify_hmac
from relay.sources.base import RequestMeta, check_peer, header_value
from relay.sources.extract import BodySource


class HmacHeader:
    """The check itself, for `kind: hmac` and for any kind that takes an `hmac:`."""

    def __init__(self, source: str, config: HmacCheck) -> None:
        self.source = source
        self.config = config
        self._secrets = [secret.get_secret_value().encode("utf-8") for secret in config.secrets]

    def _expected_format(self) -> str:
        # Names the format, never a value: enough for the sender to fix its signing code.
        config = self.config
        return (
            f"{config.header}: {config.prefix}<{config.encoding}"
            f" HMAC-{config.algorithm.upper()} of the raw body>"
        )

    def _missing(self) -> Unauthorized:
        return Unauthorized(
            f"missing signature; expected {self._expected_format()}",
            code="missing_signature",
        )

    def require(self, meta: RequestMeta) -> None:
        """Refused before the body is read: an unsigned request costs relay nothing."""
        if not header_value(meta.headers, self.config.header):
            raise self._missing()

    def verify(self, meta: RequestMeta, body: bytes) -> None:
        outcome = verify_hmac(
            self._secrets,
            header_value(meta.headers, self.config.header),
            body,
            algorithm=self.config.algorithm,
            encoding=self.config.encoding,
            prefix=self.config.prefix,
        )
        if outcome == "ok":
            return
        if outcome == "missing":
            raise self._missing()
        raise Unauthorized(
            f"{self.config.header} does not match the body under any secret of"
            f" sources.{self.source}; expected {self._expected_format()}",
            code="invalid_signature",
        )


class HmacSource(BodySource):
    kind = "hmac"

    def __init__(self, name: str, config: HmacSourceConfig) -> None:
        super().__init__(name, config)
        self.config = config
        self._check = HmacHeader(name, config)

    def authenticate(self, meta: RequestMeta) -> None:
        check_peer(self.name, self.config.allow_ips, meta)
        self._check.require(meta)

    def verify(self, meta: RequestMeta, body: bytes, now: float) -> None:
        self._check.verify(meta, body)

    def parse(self, meta: RequestMeta, document: Any, received_at: datetime) -> list[Envelope]:
        return self._envelopes(meta, document, received_at)
