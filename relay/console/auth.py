"""Who may use the console, and how a browser proves it. Pure: no I/O, and everything
fails closed.

Two ways in: `Authorization: Bearer <token>` on any request (scripts, curl), or a
session cookie set by the login form (people). The cookie holds an expiry and an
HMAC-SHA256 over it keyed by a key derived from the console token: changing the token
ends every session, and the token itself never leaves the server. Every action that
changes state is a POST carrying a CSRF token derived from the session (synchronizer
token, bound to that one session), checked with `hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

SESSION_COOKIE = "relay_console"
_DIGITS = re.compile(r"[0-9]{1,12}")
SESSION_SECONDS = 12 * 3600  # a night on call, not a week


def _key(token: str, purpose: bytes) -> bytes:
    # One key per purpose, none of them the token: a leaked cookie or CSRF value says
    # nothing about the token, nor about the other key.
    return hmac.new(token.encode("utf-8"), b"relay-console:" + purpose, hashlib.sha256).digest()


def _mac(key: bytes, message: str) -> str:
    digest = hmac.new(key, message.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def token_matches(given: str | None, token: str) -> bool:
    """Whether `given` is the console token (constant time in its content)."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def new_session(token: str, now: float | None = None) -> str:
    """A session cookie value: `<expiry>.<mac>`."""
    expiry = str(int((time.time() if now is None else now) + SESSION_SECONDS))
    return f"{expiry}.{_mac(_key(token, b'session'), expiry)}"


def session_valid(value: str | None, token: str, now: float | None = None) -> bool:
    if not value or value.count(".") != 1:
        return False
    expiry, mac = value.split(".")
    if not _DIGITS.fullmatch(expiry) or not mac.isascii():
        return False
    if not hmac.compare_digest(
        mac.encode("ascii", "replace"), _mac(_key(token, b"session"), expiry).encode("ascii")
    ):
        return False
    return int(expiry) > (time.time() if now is None else now)


def csrf_token(session: str, token: str) -> str:
    """The CSRF token of a session: what its forms carry back."""
    return _mac(_key(token, b"csrf"), session)


def csrf_valid(given: str | None, session: str | None, token: str) -> bool:
    if not given or not session:
        return False
    return hmac.compare_digest(
        given.encode("ascii", "replace"), csrf_token(session, token).encode("ascii")
    )
