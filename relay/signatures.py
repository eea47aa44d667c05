"""Signing and verifying webhook signatures. Pure functions: no I/O, no clock reads.

Verification fails closed (no signature, no secret, a malformed header: all False),
compares with `hmac.compare_digest`, and never returns or raises the expected value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Literal

Algorithm = Literal["sha1", "sha256", "sha512"]
_DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def whsec_key(secret: str) -> bytes:
    """The key bytes of a Standard Webhooks secret (`whsec_` + base64, its `=` padding
    optional, as the reference libraries take it). Raises ValueError for anything else:
    the reference would silently drop characters outside base64 and sign with another key.
    """
    text = secret.removeprefix("whsec_").rstrip("=")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise ValueError("expected a Standard Webhooks secret: whsec_ followed by base64")
    return key


def standard_webhooks_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def standard_webhooks_header(
    keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes
) -> str:
    """One signature per key, space-separated, so receivers can rotate secrets."""
    return " ".join(standard_webhooks_signature(k, msg_id, timestamp, body) for k in keys)


def verify_standard_webhooks(
    keys: Sequence[bytes],
    msg_id: str | None,
    timestamp: str | None,
    signature_header: str | None,
    body: bytes,
    *,
    now: float,
    tolerance: float,
) -> Literal["ok", "missing", "stale", "mismatch"]:
    """Check the headers of a Standard Webhooks request against every key."""
    if not keys or not msg_id or not timestamp or not signature_header:
        return "missing"
    try:
        sent_at = int(timestamp)
    except ValueError:
        return "mismatch"
    if abs(now - sent_at) > tolerance:
        return "stale"
    presented = []
    for item in signature_header.split():
        version, _, value = item.partition(",")
        if version == "v1" and value:
            presented.append(value.encode("ascii", "replace"))
    if not presented:
        return "mismatch"
    signed = f"{msg_id}.{timestamp}.".encode() + body
    for key in keys:
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
        # Every comparison runs, so timing reveals neither which key nor which entry.
        matched = False
        for candidate in presented:
            matched |= hmac.compare_digest(expected, candidate)
        if matched:
            return "ok"
    return "mismatch"


def verify_hmac(
    secrets: Sequence[bytes],
    header_value: str | None,
    body: bytes,
    *,
    algorithm: Algorithm,
    encoding: Literal["hex", "base64"],
    prefix: str = "",
) -> Literal["ok", "missing", "mismatch"]:
    """GitHub-style: `<prefix><hex or base64 HMAC of the raw body>` in one header."""
    if not secrets or not header_value:
        return "missing"
    value = header_value.strip()
    if prefix:
        if not value.startswith(prefix):
            return "mismatch"
        value = value[len(prefix) :]
    try:
        presented = (
            bytes.fromhex(value)
            if encoding == "hex"
            else base64.b64decode(value.encode("ascii"), validate=True)
        )
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return "mismatch"
    digest = _DIGESTS[algorithm]
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(hmac.new(secret, body, digest).digest(), presented)
    return "ok" if matched else "mismatch"
