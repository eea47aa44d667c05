"""Messages in the markdown DingTalk and WeCom share: a title, the text, the object's
facts, and a line naming the source and the event; or a digest of a burst. Pure. Its
escaping and `fit` serve Discord and Teams too; Feishu escapes with HTML entities and
builds its cards itself.

Only `**bold**`, `> quotes`, `- lists` and plain lines are used. User data is escaped
(`escape`): a key named `**x**` or `[a](b)` must show as itself, never as markup. Each
platform counts its limit its own way (`unit`); every value is cut to a share of the
limit first, and the whole message cut last without leaving a mark open.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relay.sinks.chat.events import WORDS, Language, digest_of, event_facts
from relay.sinks.chat.text import ELLIPSIS, Unit, clean, clip, measure

# Marks that would turn user data into markup. Not `_` (no platform here italicises
# inside a word, and envelope types such as create_object must stay comparable in a
# template), nor `(`/`)` (a link needs the `]` before them, which is escaped).
_SPECIAL = re.compile(r"([\\`*~\[\]#>|<])")
_LEADING_LIST = re.compile(r"^(\s*)([-+]|\d+\.)(\s)", re.MULTILINE)


def escape(text: str) -> str:
    """User data as markdown shows it literally. A `<@` (WeCom markdown's mention) also
    gets a zero-width space, where a platform might not honour the backslash."""
    text = _SPECIAL.sub(r"\\\1", clean(text).replace("<@", "<\u200b@"))
    return _LEADING_LIST.sub(r"\1\\\2\3", text)


def plain(text: str) -> str:
    """The markdown text as plain text (for a robot's `text` message type)."""
    text = text.replace("**", "")
    return re.sub(r"\\(.)", r"\1", text)


def _escaped_last(text: str) -> bool:
    """Whether the last character of `text` is escaped (an odd run of backslashes)."""
    body = text[:-1]
    return (len(body) - len(body.rstrip("\\"))) % 2 == 1


def fit(text: str, limit: int, unit: Unit, *, tail: re.Pattern[str] | None = None) -> str:
    """The whole message within `limit`, cut without breaking a character or a mark: a
    bold the cut went through is closed after the ellipsis (`**bucket/很长的…**`), not
    dropped with the object's name; no lone backslash is left to escape the ellipsis;
    `tail`, a platform's own half-cut markup (an HTML entity), is removed."""
    if measure(text, unit) <= limit:
        return text
    # Room for the ellipsis and a closing mark.
    head = clip(text, max(limit - measure("**", unit), 1), unit, tail=tail)[: -len(ELLIPSIS)]
    while head.endswith("*") and not _escaped_last(head):
        head = head[:-1]  # half a mark, or a mark with nothing after it
    if head and _escaped_last(head + "x"):
        head = head[:-1]  # a backslash whose character was cut off
    last = head.rpartition("\n")[2]
    return head + ELLIPSIS + ("**" if last.count("**") % 2 else "")


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
        bucket = escape(digest.bucket)
        head = f"{bucket}：{head}" if zh else f"{head} {words['in']} {bucket}"
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
