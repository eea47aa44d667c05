"""`kind: teams`: a Microsoft Teams channel through a Workflows (Power Automate) webhook.
Its facts, over the chat kit.

- URL: the one the "Send webhook alerts to a channel" workflow template shows
  (`https://….logic.azure.com/workflows/…/triggers/manual/paths/invoke?…&sig=…` or
  `https://….environment.api.powerplatform.com/…`): its `sig` query parameter is the
  credential, so the URL is sent byte for byte as copied. No request signing.
- One message type: `{"type": "message", "attachments": [{"contentType":
  "application/vnd.microsoft.card.adaptive", "content": <Adaptive Card 1.2>}]}`, the card
  made of TextBlock and FactSet elements. Their markdown is Teams' subset (`**bold**`,
  `_italic_`, `- lists`, links; no quotes, headings or tables); a line break outside a
  list takes a blank line (`\\n\\n`), inside one a single `\\n`.
- Any 2xx is delivered (a workflow answers 202 with an empty body, a retiring Office 365
  connector 200 `1`). The connector hides a failure in a 200 body, `Microsoft Teams
  endpoint returned HTTP error 429` (or 413, ...): the hidden status is read as if
  HTTP had answered it. 429, hidden or not, waits `Retry-After`, else a minute; other
  answers follow the status ladder (relay.sinks.answers.ladder): 5xx, 408/409/425
  retried; 400, 401/403 (the flow does not let anyone trigger it), 404 (the flow is
  gone), 413 dead-lettered at once.
- A Teams message is at most 28 KB (28,672 bytes) as Teams stores it, after Power
  Automate's wrapping (a 24 KB body has been refused): relay keeps the body within
  20,000 bytes even counted with every non-ASCII character escaped (`\\uXXXX`, six
  bytes for one Chinese character), the largest form a re-serialisation can give it.
  A workflow answers 202 before it posts, so a card Teams refuses is lost without an
  error: never send one near the limit.
- One message a second by default (`pace`); a connector takes 4 a second, 60 in 30 s and
  100 an hour.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from yarl import URL

from relay.config import TeamsSinkConfig
from relay.sinks.answers import describe, ladder
from relay.sinks.base import Outcome
from relay.sinks.chat.engine import ChatSink
from relay.sinks.chat.events import WORDS, Language, digest_of, event_facts
from relay.sinks.chat.markdown import escape, fit
from relay.sinks.chat.text import clean, clip, shrink_to_fit

CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
CARD_VERSION = "1.2"

# Bytes of the JSON body, counted with non-ASCII escaped (see `body_size`). Teams takes
# 28,672 bytes of message; Power Automate's wrapping adds a few KB to the body.
BODY_LIMIT = 20_000
# What the card's text gets to start with, in bytes of UTF-8; shrunk until the whole
# body is within BODY_LIMIT.
TEXT_LIMIT = 18_000
TITLE_LIMIT = 400  # the bold headline, in bytes of UTF-8
FALLBACK_LIMIT = 200  # `fallbackText`: plain text for clients that cannot render the card
CONTEXT_LIMIT = 600
MAX_TYPES = 10  # rows of a digest's breakdown by event type

# A 429 without Retry-After (a connector's hidden 429 comes without one): the
# connector's windows are 1 s, 30 s and an hour; a minute clears the short ones, and
# the dispatcher's backoff, growing past it, the rest.
THROTTLE_WAIT = 60.0

# An Office 365 connector answers 200 with the error of its own post inside.
_HIDDEN_STATUS = re.compile(r"Microsoft Teams endpoint returned HTTP error (\d{3})")
_DELIVERY_FAILED = re.compile(r"webhook message delivery failed", re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*([-+*]|\d+\.)\s")


def classify(status: int, retry_after: str | None, body: str, now: float) -> Outcome:
    """Judge one answer from a Workflows webhook or an Office 365 connector. Pure."""
    hidden = _HIDDEN_STATUS.search(body) if 200 <= status < 300 else None
    if hidden is not None:
        code = int(hidden.group(1))
        verdict = ladder(code, retry_after, body, now)
        if verdict.result == "done":
            verdict = Outcome("retry")  # "returned HTTP error 2xx": confirms nothing
        error = f"{describe(status, body)} (the connector's post failed: HTTP {code})"
        outcome = replace(verdict, status=status, error=error, gone=False)
        throttled = code == 429
    elif 200 <= status < 300 and _DELIVERY_FAILED.search(body):
        return Outcome("retry", status, describe(status, body))
    elif 200 <= status < 300 and not _teams_answer(body):
        # A proxy's or a login page: it confirms nothing was posted.
        return Outcome("retry", status, describe(status, body) + " (not the webhook's answer)")
    else:
        outcome = ladder(status, retry_after, body, now)
        throttled = status == 429
    if throttled and outcome.result == "retry" and outcome.retry_after is None:
        outcome = replace(outcome, retry_after=THROTTLE_WAIT)
    return outcome


def _teams_answer(body: str) -> bool:
    """Whether a 2xx body is one Teams gives: empty (Workflows' 202), a connector's `1`,
    or JSON."""
    text = body.strip()
    if text in ("", "1"):
        return True
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def body_size(message: Mapping[str, Any]) -> int:
    """Bytes of the JSON body as sent (the kit's separators) but with every non-ASCII
    character escaped: never fewer than its UTF-8 on the wire, and as large as a
    re-serialisation on the way can make it."""
    return len(json.dumps(message, ensure_ascii=True))


def teams_text(markdown: str) -> str:
    """Markdown lines as a TextBlock breaks them: blank lines dropped, a list item after
    a list item on the next line, anything else a paragraph of its own."""
    lines = [line.rstrip() for line in markdown.strip().splitlines() if line.strip()]
    out = ""
    for index, line in enumerate(lines):
        if index:
            both_items = _LIST_ITEM.match(line) and _LIST_ITEM.match(lines[index - 1])
            out += "\n" if both_items else "\n\n"
        out += line
    return out


def text_block(text: str, **style: Any) -> dict[str, Any]:
    return {"type": "TextBlock", "text": text, "wrap": True, **style}


def fact(title: str, value: str, limit: int) -> dict[str, str]:
    return {"title": escape(clip(title, 100, "utf8")), "value": escape(clip(value, limit, "utf8"))}


def message(body: list[dict[str, Any]], fallback: str) -> dict[str, Any]:
    """The Workflows webhook's body: one Adaptive Card 1.2 attachment."""
    card = {
        "$schema": SCHEMA,
        "type": "AdaptiveCard",
        "version": CARD_VERSION,
        "fallbackText": clip(clean(fallback), FALLBACK_LIMIT, "utf8"),
        "body": body,
        "msteams": {"width": "Full"},
    }
    return {"type": "message", "attachments": [{"contentType": CONTENT_TYPE, "content": card}]}


def event_card(
    envelope: Mapping[str, Any], text: str, language: Language, limit: int
) -> dict[str, Any]:
    """One event: its headline (in the attention colour when a review flagged it), the
    rendered text, the object's facts, and a subtle line naming the source and event."""
    words = WORDS[language]
    told = event_facts(envelope, language)
    headline = escape(clip(told.headline, TITLE_LIMIT, "utf8"))
    title = text_block(headline, weight="Bolder", size="Medium")
    if told.attention:
        title["color"] = "Attention"
    body = [title]
    shaped = teams_text(fit(text, limit // 2, "utf8"))
    if shaped:
        body.append(text_block(shaped))
    share = max(limit // 8, 64)
    if told.facts:
        body.append({"type": "FactSet", "facts": [fact(k, v, share) for k, v in told.facts]})
    source = clip(told.source or "?", 100, "utf8")
    context = f"{words['source']} {escape(source)} · {words['event']} {escape(told.event_id)}"
    body.append(text_block(fit(context, CONTEXT_LIMIT, "utf8"), isSubtle=True, size="Small"))
    return message(body, told.headline)


def digest_card(
    envelopes: Sequence[Mapping[str, Any]],
    *,
    keys: int,
    threshold: int,
    language: Language,
    limit: int,
) -> dict[str, Any]:
    """Many events in one card: how many, a fact per event type, the first `keys`
    objects, how many more, and the span of time they cover."""
    words = WORDS[language]
    digest = digest_of(envelopes, keys)
    head = f"{digest.count} {words['events']}"
    if digest.bucket is not None:
        bucket = clip(digest.bucket, 200, "utf8")
        zh = language == "zh-CN"
        head = f"{bucket} {words['in']} {head}" if zh else f"{head} {words['in']} {bucket}"
    body: list[dict[str, Any]] = [text_block(escape(head), weight="Bolder", size="Medium")]
    ranked = digest.types
    if len(ranked) > MAX_TYPES:
        rest = sum(n for _, n in ranked[MAX_TYPES - 1 :])
        ranked = [*ranked[: MAX_TYPES - 1], ("…", rest)]
    body.append({"type": "FactSet", "facts": [fact(kind, str(n), 100) for kind, n in ranked]})
    if digest.more > 0:
        shown = words["first"].format(shown=len(digest.shown), count=digest.count)
        body.append(text_block(f"**{shown}**"))
    # Each listed key gets an equal share of the room.
    share = max(32, (limit // 2) // max(len(digest.shown), 1) - 8)
    listing = "\n".join(f"- {escape(clip(key, share, 'utf8'))}" for key in digest.shown)
    if listing:
        body.append(text_block(listing))
    if digest.more > 0:
        body.append(text_block(words["more"].format(more=digest.more)))
    context = words["rolled_up"].format(count=digest.count, threshold=threshold)
    if digest.sources:
        context = f"{words['source']} {escape(', '.join(digest.sources))} · {context}"
    if digest.first_time and digest.last_time:
        context += f" · {escape(digest.first_time)} → {escape(digest.last_time)}"
    body.append(text_block(fit(context, CONTEXT_LIMIT, "utf8"), isSubtle=True, size="Small"))
    return message(body, head)


def within_limit(build: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """`build(limit)` for the largest limit whose body is within BODY_LIMIT as Teams may
    count it (each part is cut to a share of `limit`, bytes of UTF-8)."""
    return shrink_to_fit(build, body_size, BODY_LIMIT, 256)


class TeamsSink(ChatSink):
    platform = "teams"
    default_throttle_wait = THROTTLE_WAIT

    def __init__(self, name: str, config: TeamsSinkConfig) -> None:
        super().__init__(name, config)
        self.config: TeamsSinkConfig = config
        # The query's `sp=%2Ftriggers%2F…` and `sig` are sent as copied, not re-quoted.
        printable = self._url.isascii() and not any(c.isspace() for c in self._url)
        self._target: str | URL = URL(self._url, encoded=True) if printable else self._url

    def escape(self, text: str) -> str:
        return escape(text)

    def event_message(self, envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
        language = self.config.language
        return within_limit(lambda limit: event_card(envelope, text, language, limit))

    def digest_message(self, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return within_limit(
            lambda limit: digest_card(
                envelopes,
                keys=self.config.rollup_keys,
                threshold=self.config.rollup_threshold,
                language=self.config.language,
                limit=limit,
            )
        )

    def request(self, message: dict[str, Any]) -> tuple[str | URL, bytes, dict[str, str]]:
        _, body, headers = super().request(message)
        return self._target, body, headers

    def read_answer(self, status: int, retry_after: str | None, body: str) -> Outcome:
        return classify(status, retry_after, body, time.time())
