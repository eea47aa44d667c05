"""JSON on the hot path: orjson where it gives the standard library's answer, the standard
library where it would not. No body is read, and no envelope written, differently.

orjson parses and writes several times faster, which matters at thousands of requests a
second; but it turns integers beyond 64 bits into floats and refuses a few inputs the
standard library takes (a UTF-8 BOM, escaped lone surrogates). Those rare bodies take the
standard library, which also words every error relay answers with.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Every byte to a space except digits, which become "0": a run of 19 digits is the
# shortest integer that may not fit in 64 bits.
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_NUMBER = b"0" * 19


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # Sinks are sent strict JSON, which has no Infinity: refuse it on the way in.
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


class LoneSurrogate(ValueError):
    """A `\\udXXX` escape without its pair: valid JSON syntax, but no Unicode text, so
    no envelope could carry it and no sink could be sent it."""


def loads(body: bytes) -> Any:
    """Strict JSON (no NaN, no Infinity, no float that overflows), integers kept exact.
    Raises ValueError (bad JSON or UTF-8; LoneSurrogate) or RecursionError (nesting), as
    `json.loads`."""
    if _LONG_NUMBER not in body.translate(_DIGITS):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, and words the error
    value = json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    # orjson refuses lone surrogates; the standard library takes them. Looked for only
    # here, off the usual path, and in any string, key or value, wherever it sits.
    if b"\\u" in body and _has_lone_surrogate(value):
        raise LoneSurrogate("the body holds an unpaired UTF-16 surrogate escape")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def dumps(value: Any) -> str:
    """Compact JSON with non-ASCII kept as UTF-8 text, the same value as
    `json.dumps(separators=(",", ":"), ensure_ascii=False)` (a float may be spelled
    differently: `1e16` for `1e+16`). Raises UnicodeEncodeError for a lone surrogate,
    RecursionError for nesting too deep to write."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except orjson.JSONEncodeError:
        # Integers beyond 64 bits, or a lone surrogate: the standard library writes the
        # first, and the caller's UTF-8 check refuses the second.
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        text.encode("utf-8")
        return text
