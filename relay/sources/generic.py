"""`kind: generic`: any sender that POSTs JSON, authenticated by a token and/or basic auth.

Such senders sign nothing, so everything is decided from the request line and headers
before the body is read. With both a token and basic auth configured, a request must
carry both; with neither, the source is open (narrow it with `allow_ips`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from relay.config import BasicAuthConfig, GenericSourceConfig
from relay.errors import Unauthorized
from relay.models import Envelope
from relay.sources.base import RequestMeta, check_peer, check_token, header_value
from relay.sources.extract import BodySource

REALM = "relay"


class BasicAuthRequired(Unauthorized):
    """A 401 that tells HTTP clients which credentials to send (RFC 7235)."""

    # Extra answer headers for the error path to add to the response.
    headers: Mapping[str, str] = MappingProxyType({"WWW-Authenticate": f'Basic realm="{REALM}"'})


def basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    """(username, password) from `Authorization: Basic ...`; None when absent or malformed.

    Bytes, not text: RFC 7617 leaves the charset to the client, and comparing bytes
    against the UTF-8 of the configured values needs no guess.
    """
    if not header:
        return None
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    return (username, password) if colon else None


def check_basic(expected: BasicAuthConfig, headers: Mapping[str, str]) -> None:
    header = header_value(headers, "Authorization")
    credentials = basic_credentials(header)
    if credentials is None:
        what = "invalid" if header else "missing"
        raise BasicAuthRequired(
            f"{what} credentials: send HTTP basic auth (Authorization: Basic ...)",
            code=f"{what}_credentials",
        )
    username, password = credentials
    # Both compared every time: stopping at a wrong username would tell, by timing,
    # that the username was wrong.
    matched = hmac.compare_digest(username, expected.username.encode("utf-8"))
    matched &= hmac.compare_digest(password, expected.password.get_secret_value().encode("utf-8"))
    if not matched:
        raise BasicAuthRequired(
            "invalid credentials: wrong username or password", code="invalid_credentials"
        )


class GenericSource(BodySource):
    kind = "generic"

    def __init__(self, name: str, config: GenericSourceConfig) -> None:
        super().__init__(name, config)
        self.config = config
        self.authenticates = config.authenticates

    def authenticate(self, meta: RequestMeta) -> None:
        check_peer(self.name, self.config.allow_ips, meta)
        check_token(self.config.token, meta)
        if self.config.basic_auth is not None:
            check_basic(self.config.basic_auth, meta.headers)

    def verify(self, meta: RequestMeta, body: bytes, now: float) -> None:
        """Nothing signs the body; authenticate() decided from the headers."""

    def parse(self, meta: RequestMeta, document: Any, received_at: datetime) -> list[Envelope]:
        return self._envelopes(meta, document, received_at)
