"""Messages in the markdown the chat robots share (DingTalk, WeCom, Feishu's lark_md,
Discord, Teams): a title, the text, the object's facts, and a line naming the source and
the event; or a digest of a burst. Pure.

Only `**bold**`, `> quotes`, `- lists` and plain lines are used: the subset every one of
these platforms renders. User data is escaped (`escape`): a key named `**x**` or
`[a](b)` must show as itself, never as markup. Each platform counts its limit its own
way (`unit`); every value is cut to a share of the limit first, and the whole message
cut last without leaving a mark open.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relay.sinks.chat.events import WORDS, Language, digest_of, event_facts
from relay.sinks.chat.text import Unit, clean, clip, measure

# Marks that would turn user data into markup. Not `_` (no platform here italicises
# inside a word, and envelope types such as create_object must stay comparable in a
# template), nor `(`/`)` (a link needs the `]` before them, which is escaped).
_SPECIAL = re.compile(r"([\\`*~\[\]#>|<])")
_LEADING_LIST = re.compile(r"^(\s*)([-+]|\d+\.)(\s)", re.MULTILINE)


def escape(text: str) -> str:
    """User data as markdown shows it literally."""
    text = _SPECIAL.sub(r"\\\1", clean(text))
    return _LEADING_LIST.sub(r"\1\\\2\3", text)


def plain(text: str) -> str:
    """The markdown text as plain text (for a robot's `text` message type)."""
    text = text.replace("**", "")
    return re.sub(r"\\(.)", r"\1", text)


def close_marks(text: str) -> str:
    """`text` without a mark a cut left open at its end: an odd `**` on the last line
    (cut from it), or a lone trailing backslash."""
    head, _, last = text.rpartition("\n")
    if last.count("**") % 2:
        last = last[: last.rindex("**")]
    if last.endswith("\\") and not last.endswith("\\\\"):
        last = last[:-1]
    return f"{head}\n{last}" if head else last


def fit(text: str, limit: int, unit: Unit) -> str:
    """The whole message within `limit`, cut without breaking a character or a mark."""
    if measure(text, unit) <= limit:
        return text
    # Room for the ellipsis that clip adds, after close_marks may have shortened it.
    return close_marks(clip(text, limit, unit)[:-1]) + "…"


@dataclass(frozen=True)
class Markdown:
    title: str  # plain text: a notification's preview, DingTalk's `title`
    text: str  # the message body, in markdown


def event_markdown(
    envelope: Mapping[str, Any],
    text: str,
    language: Language,
    limit: int,
    unit: Unit,
) -> Markdown:
    """One event: a bold title, the (already rendered) text, its facts, the source."""
    words = WORDS[language]
    told = event_facts(envelope, language)
    # A user value gets at most a quarter of the limit: a 5,000-character key cannot
    # crowd out what happened.
    share = max(limit // 4, 64)
    colon = "：" if language == "zh-CN" else ": "
    lines = [f"**{escape(clip(told.headline, share, unit))}**", ""]
    body = text.strip()
    if body:
        lines += [body, ""]
    for label, value in told.facts:
        lines.append(f"> **{label}**{colon}{escape(clip(value, share, unit))}")
    lines += [
        "",
        f"{words['source']} {escape(told.source or '?')} · {words['event']} {told.event_id}",
    ]
    title = clip(clean(told.headline), 64, unit)
    return Markdown(title, fit("\n".join(lines), limit, unit))


def digest_markdown(
    envelopes: Sequence[Mapping[str, Any]],
    *,
    keys: int,
    threshold: int,
    language: Language,
    limit: int,
    unit: Unit,
) -> Markdown:
    """Many events in one message: how many, of what types, the first `keys` objects."""
    words = WORDS[language]
    digest = digest_of(envelopes, keys)
    zh = language == "zh-CN"
    head = f"{digest.count} {words['events']}"
    if digest.bucket is not None:
        head = (
            f"{escape(digest.bucket)} {words['in']} {head}"
            if zh
            else f"{head} {words['in']} {escape(digest.bucket)}"
        )
    title = clip(clean(head.replace("\\", "")), 64, unit)
    breakdown = ", ".join(f"{n} {escape(kind)}" for kind, n in digest.types)
    lines = [f"**{head}**", "", breakdown, ""]
    if digest.more > 0:
        lines.append(f"**{words['first'].format(shown=len(digest.shown), count=digest.count)}**")
    # Each listed key gets an equal share of the room left.
    share = max(32, (limit - 400) // max(len(digest.shown), 1) - 8)
    lines += [f"- {escape(clip(key, share, unit))}" for key in digest.shown]
    if digest.more > 0:
        lines.append(words["more"].format(more=digest.more))
    context = words["rolled_up"].format(count=digest.count, threshold=threshold)
    if digest.sources:
        context = f"{words['source']} {escape(', '.join(digest.sources))} · {context}"
    if digest.first_time and digest.last_time:
        context += f" · {escape(digest.first_time)} → {escape(digest.last_time)}"
    lines += ["", context]
    return Markdown(title, fit("\n".join(lines), limit, unit))
