"""Text a chat platform accepts: cleaned of what cannot be sent, and cut to its limits
as the platform counts them. Pure.

Platforms count differently: Slack and Discord in characters (UTF-16 units is the safe
reading), DingTalk, Feishu and WeCom in bytes of UTF-8, where one Chinese character is
three. A cut never splits a character (nor a surrogate pair), and a caller that sends
markup says what a cut must not leave half-open.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Literal, TypeVar

Unit = Literal["utf8", "utf16", "chars"]
T = TypeVar("T")

ELLIPSIS = "…"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean(text: str) -> str:
    """Any string made safe to encode and show: a lone surrogate (valid in JSON, not in
    UTF-8) or a control character in a user's object key must not make the message
    unsendable."""
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _CONTROL.sub("\ufffd", text)


def measure(text: str, unit: Unit) -> int:
    if unit == "utf8":
        return len(text.encode("utf-8", "surrogatepass"))
    if unit == "utf16":
        return len(text.encode("utf-16-le", "surrogatepass")) // 2
    return len(text)


def clip(
    text: str, limit: int, unit: Unit = "utf16", *, tail: re.Pattern[str] | None = None
) -> str:
    """At most `limit` units of `unit`; when cut, ends with an ellipsis. `tail`: what a
    cut must not leave at the end (half an HTML entity, an unclosed markdown mark),
    removed before the ellipsis goes on."""
    if measure(text, unit) <= limit:
        return text
    room = max(limit - measure(ELLIPSIS, unit), 0)
    if unit == "utf8":
        # "ignore" drops the part of a character the cut went through.
        cut = text.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
    elif unit == "utf16":
        cut = text.encode("utf-16-le", "surrogatepass")[: room * 2].decode("utf-16-le", "ignore")
    else:
        cut = text[:room]
    if tail is not None:
        cut = tail.sub("", cut)
    return cut + ELLIPSIS


def shrink_to_fit(
    build: Callable[[int], T], size: Callable[[T], int], target: int, floor: int
) -> T:
    """`build(limit)` for about the largest `limit` whose result's `size` is within
    `target`: for a platform that bounds the whole body (Feishu, Teams), where JSON
    escaping and the message's structure count too. Each try lowers `limit` in
    proportion to the overshoot; at `floor` the result is taken as it is."""
    limit = target
    while True:
        built = build(limit)
        measured = size(built)
        if measured <= target or limit <= floor:
            return built
        limit = max(int(limit * target / measured * 0.9), floor)


def human_size(size: int) -> str:
    if size < 1024 or size >= 1024**6:
        # Beyond PiB no sender means it; floats would overflow on what it might send.
        return f"{size:,} bytes"
    exponent = min(int(math.log(size, 1024)), 5)
    unit = ("KiB", "MiB", "GiB", "TiB", "PiB")[exponent - 1]
    return f"{size / 1024**exponent:.1f} {unit} ({size:,} bytes)"
