"""`kind: discord`: a Discord channel webhook (Execute Webhook). Its facts, over the chat kit.

- URL `https://discord.com/api/webhooks/{id}/{token}`: the token in its path is the
  credential. No signing. relay adds `wait=true` to the query (unless the URL sets
  `wait`): Discord then answers once the message is saved, `200` with the message;
  without it, `204` even for a message it did not save (AutoMod). An operator's
  `thread_id` stays.
- A message is `content` (at most 2000 characters) and/or up to 10 `embeds`. An embed's
  title takes 256, description 4096, at most 25 fields of name 256 and value 1024,
  footer 2048, author name 256, and all of these across the message's embeds 6000.
  Characters, counted here as UTF-16 units, never fewer than Discord counts; leading and
  trailing whitespace is trimmed by Discord, so a blank field would be refused.
- relay sends one embed per event (title, the rendered text as description, the
  object's facts as fields, source and event id in the footer, the event time), and
  `content` as a short line a notification shows. `allowed_mentions: {"parse": []}`,
  so a key like `@everyone` never pings; `username` and `avatar_url` from the config.
- Answers: 204 (200 with `wait=true`) sent. 429 waits the JSON body's `retry_after`
  (seconds, a float), else `Retry-After`; 5xx are retried. 400 (50035 invalid form
  body, 200000 AutoMod), 401 (50027 invalid webhook token), 403 (50013 missing
  permissions) and 404 (10015 unknown webhook) are dead-lettered after one request.
- Cloudflare bans an IP for a while after 10,000 invalid requests (401, 403, 429) in
  10 minutes, and a webhook that answered 404 must not be used again: after a 401 or
  404 the sink pauses as after a 410 Gone (its events wait in the store until the
  config is fixed and reloaded), and a 429 always waits before the next request.
- 5 requests per 2 s per webhook and 30 messages a minute per channel: one every 2 s.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from yarl import URL

from relay.config import DiscordSinkConfig
from relay.sinks.answers import describe, json_field, ladder
from relay.sinks.base import MAX_RETRY_AFTER, Outcome, parse_retry_after
from relay.sinks.chat import markdown
from relay.sinks.chat.engine import ChatSink
from relay.sinks.chat.events import WORDS, Language, digest_of, event_facts, text_of
from relay.sinks.chat.markdown import fit
from relay.sinks.chat.text import clean, clip, measure

# Discord's limits (characters; measured here in UTF-16 units).
CONTENT_MAX = 2000
EMBEDS_MAX = 10
TITLE_MAX = 256
DESCRIPTION_MAX = 4096
FIELDS_MAX = 25
FIELD_NAME_MAX = 256
FIELD_VALUE_MAX = 1024
FOOTER_MAX = 2048
EMBED_TOTAL_MAX = 6000

# What relay allows itself within them: the content is one short line, a footer names
# the source and the event, a short fact (bucket, size, type, time) or a digest's event
# type stays short, so that the description keeps most of the 6000.
CONTENT_LINE = 300  # of CONTENT_MAX
FOOTER_BUDGET = 512  # of FOOTER_MAX
SHORT_VALUE = 256
TYPE_NAME = 64

# A 429 without a wait is not Discord's API answering (it always sends `retry_after`
# and Retry-After) but Cloudflare's ban page: wait a minute, at most ten invalid
# requests in the ban's ten minutes.
DEFAULT_RETRY_AFTER = 60.0
# A `retry_after` of 0 still means "wait": the kit reads a zero wait as none.
MIN_RETRY_AFTER = 0.05

COLORS = {
    "create_object": 0x3498DB,
    "complete_multipart": 0x3498DB,
    "delete_object": 0x95A5A6,
    "abort_multipart": 0x95A5A6,
}
COLOR_OTHER = 0x5865F2
COLOR_PASSED = 0x2ECC71
COLOR_ATTENTION = 0xE74C3C
COLOR_DIGEST = 0x5865F2
FLAG = "⚠️ "

# Not in the kit's words: a digest with more event types than an embed has fields.
OTHER_TYPES: dict[Language, str] = {"en": "other types", "zh-CN": "其他类型"}

# Discord underlines `__x__` anywhere and italicises `_x_` at word boundaries; the
# kit's escape leaves `_` alone (create_object must stay comparable in a template).
# An `_` inside a word (create_object, my_file) is no mark and stays as it is.
_UNDERSCORE = re.compile(r"(?<![^\W_])_|_(?![^\W_])")


def escape(text: str) -> str:
    """User data as Discord's markdown shows it literally."""
    return _UNDERSCORE.sub(r"\\_", markdown.escape(text))


def length(text: str) -> int:
    """Characters as Discord's limits count them: UTF-16 units, never fewer."""
    return measure(text, "utf16")


def shown(raw: str, limit: int) -> str:
    """A user value as markdown that shows it literally, within `limit`, never blank
    (Discord trims it and refuses an empty field): a key of spaces shows quoted."""
    text = escape(raw) if raw.strip() else f'"{clean(raw)}"'
    return fit(text, limit, "utf16")


def plain_line(text: str, limit: int) -> str:
    """Text where Discord renders no markdown (a footer): cleaned and cut, not escaped."""
    return clip(clean(text), limit, "utf16").strip() or "?"


def content_line(text: str) -> str:
    """The message's `content`: one short line of markdown."""
    return fit(escape(" ".join(text.split())), CONTENT_LINE, "utf16") or "?"


def embed_length(embed: Mapping[str, Any]) -> int:
    """An embed's characters as Discord sums them against the 6000 of a message."""
    total = length(embed.get("title", "")) + length(embed.get("description", ""))
    total += sum(length(f["name"]) + length(f["value"]) for f in embed.get("fields", []))
    total += length(embed.get("footer", {}).get("text", ""))
    return total + length(embed.get("author", {}).get("name", ""))


def timestamp(value: Any) -> str | None:
    """An ISO 8601 time Discord accepts for an embed, in UTC; None when `value` is none."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (ValueError, OverflowError):
        return None


def color_of(kind: str, attention: bool) -> int:
    if attention:
        return COLOR_ATTENTION
    if kind == "tupu-porn":
        return COLOR_PASSED
    return COLORS.get(kind, COLOR_OTHER)


def field(
    name: str, value: str, limit: int, *, inline: bool, name_limit: int = FIELD_NAME_MAX
) -> dict[str, Any]:
    return {
        "name": shown(name, min(name_limit, FIELD_NAME_MAX)),
        "value": shown(value, min(limit, FIELD_VALUE_MAX)),
        "inline": inline,
    }


# --- answers ----------------------------------------------------------------------------


def _flatten(errors: Any, path: str = "") -> list[str]:
    """`embeds.0.description: Must be 4096 or fewer in length.` from a 50035's errors."""
    if not isinstance(errors, Mapping):
        return []
    found: list[str] = []
    for key, value in errors.items():
        if key == "_errors" and isinstance(value, list):
            found += [f"{path}: {e.get('message')}" for e in value if isinstance(e, Mapping)]
        else:
            found += _flatten(value, f"{path}.{key}" if path else str(key))
    return found


def error_text(status: int, body: str) -> str:
    """`HTTP 404: Unknown Webhook (code 10015)`, else the body on one line."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, Mapping) or "message" not in document:
        return describe(status, body)
    text = f"HTTP {status}: {' '.join(str(document['message']).split())[:200]}"
    code = document.get("code")
    if isinstance(code, int) and code:
        text += f" (code {code})"
    details = _flatten(document.get("errors"))
    if details:
        text += ": " + "; ".join(details[:3])
    return text[:400]


def retry_after_of(body: str, header: str | None, now: float) -> float:
    """A 429's wait: the JSON body's `retry_after` (a float, more precise than the
    header's whole seconds), else Retry-After, else Cloudflare's minute."""
    found, value = json_field(body, "retry_after")
    wait: float | None = None
    if found and isinstance(value, int | float) and not isinstance(value, bool):
        wait = float(value) if math.isfinite(value) else None
    if wait is None:
        wait = parse_retry_after(header, now)
    if wait is None:
        return DEFAULT_RETRY_AFTER
    return min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)


def classify(status: int, retry_after: str | None, body: str, now: float) -> Outcome:
    """Judge one answer from the webhook."""
    if 200 <= status < 300:
        if not body.strip() or body.lstrip().startswith("{"):
            return Outcome("done", status)
        # A 2xx that is neither Discord's 204 nor its message (a proxy's page) confirms
        # nothing: retrying risks a duplicate, never a loss.
        return Outcome("retry", status, describe(status, body) + " (not Discord's answer)")
    error = error_text(status, body)
    if status == 429:
        return Outcome("retry", status, error, retry_after=retry_after_of(body, retry_after, now))
    outcome = replace(ladder(status, retry_after, body, now), error=error)
    if status in (401, 404):
        # The webhook is deleted or its token wrong: Discord asks for no further use of
        # it (each try counts toward its ban). Paused, as a 410 pauses a sink.
        return replace(outcome, result="dead", gone=True)
    return outcome


# --- the sink ---------------------------------------------------------------------------


class DiscordSink(ChatSink):
    platform = "discord"
    default_throttle_wait = DEFAULT_RETRY_AFTER

    def __init__(self, name: str, config: DiscordSinkConfig) -> None:
        super().__init__(name, config)
        self.config: DiscordSinkConfig = config
        parsed = URL(self._url)
        self._send_url = (
            self._url if "wait" in parsed.query else str(parsed.update_query({"wait": "true"}))
        )

    @property
    def language(self) -> Language:
        return self.config.language

    def escape(self, text: str) -> str:
        return escape(text)

    def event_message(self, envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
        words = WORDS[self.language]
        told = event_facts(envelope, self.language)
        long_values = {words["key"], words["review"]}
        fields = [
            field(
                label,
                value,
                FIELD_VALUE_MAX if label in long_values else SHORT_VALUE,
                inline=label not in long_values,
            )
            for label, value in told.facts[:FIELDS_MAX]
        ]
        source = f"{words['source']} {told.source or '?'} · {words['event']} {told.event_id}"
        embed: dict[str, Any] = {
            "title": shown(told.title, TITLE_MAX),
            "color": color_of(text_of(envelope.get("type")), told.attention),
            "fields": fields,
            "footer": {"text": plain_line(source, FOOTER_BUDGET)},
        }
        self._describe(embed, text.strip())
        moment = timestamp(envelope.get("time"))
        if moment is not None:
            embed["timestamp"] = moment
        line = (FLAG if told.attention else "") + told.headline
        return self._message(content_line(line), [embed])

    def digest_message(self, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        language = self.language
        words = WORDS[language]
        digest = digest_of(envelopes, self.config.rollup_keys)
        head = f"{digest.count} {words['events']}"
        if digest.bucket is not None:
            head = (
                f"{digest.bucket} {words['in']} {head}"
                if language == "zh-CN"
                else f"{head} {words['in']} {digest.bucket}"
            )
        ranked = digest.types
        if len(ranked) > FIELDS_MAX:
            other = sum(n for _, n in ranked[FIELDS_MAX - 1 :])
            ranked = [*ranked[: FIELDS_MAX - 1], (OTHER_TYPES[language], other)]
        context = words["rolled_up"].format(
            count=digest.count, threshold=self.config.rollup_threshold
        )
        if digest.sources:
            context = f"{words['source']} {', '.join(digest.sources)} · {context}"
        if digest.first_time and digest.last_time:
            context += f" · {digest.first_time} → {digest.last_time}"
        embed: dict[str, Any] = {
            "title": shown(head, TITLE_MAX),
            "color": COLOR_DIGEST,
            "fields": [
                field(kind, f"{n:,}", SHORT_VALUE, inline=True, name_limit=TYPE_NAME)
                for kind, n in ranked
            ],
            "footer": {"text": plain_line(context, FOOTER_BUDGET)},
        }
        room = self._room(embed)
        lines: list[str] = []
        if digest.more > 0:
            first = words["first"].format(shown=len(digest.shown), count=digest.count)
            lines.append(f"**{first}**")
        # Each listed key gets an equal share of the room: one 5,000-character key
        # cannot crowd out the others.
        share = max(32, (room - 200) // max(len(digest.shown), 1) - 4)
        lines += [f"- {shown(key, share)}" for key in digest.shown]
        if digest.more > 0:
            lines.append(words["more"].format(more=digest.more))
        self._describe(embed, "\n".join(lines))
        moment = timestamp(digest.last_time)
        if moment is not None:
            embed["timestamp"] = moment
        return self._message(content_line(head), [embed])

    def _room(self, embed: Mapping[str, Any]) -> int:
        """What the description may take: its own limit, within the message's total."""
        return max(min(DESCRIPTION_MAX, EMBED_TOTAL_MAX - embed_length(embed)), 0)

    def _describe(self, embed: dict[str, Any], text: str) -> None:
        description = fit(text, self._room(embed), "utf16").strip()
        if description:
            embed["description"] = description

    def _message(self, content: str, embeds: list[dict[str, Any]]) -> dict[str, Any]:
        message: dict[str, Any] = {
            "content": content,
            "embeds": embeds[:EMBEDS_MAX],
            # Nothing in a message pings anyone: a key named `@everyone` included.
            "allowed_mentions": {"parse": []},
        }
        if self.config.username:
            message["username"] = self.config.username
        if self.config.avatar_url:
            message["avatar_url"] = self.config.avatar_url
        return message

    def request(self, message: dict[str, Any]) -> tuple[str | URL, bytes, dict[str, str]]:
        _, body, headers = super().request(message)
        return self._send_url, body, headers

    def read_answer(self, status: int, retry_after: str | None, body: str) -> Outcome:
        return classify(status, retry_after, body, time.time())
