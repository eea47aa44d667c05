"""`kind: slack`: Block Kit messages to an incoming webhook: Slack's facts (its limits,
its error codes, mrkdwn escaping) and its message shapes, over the chat kit's mechanism
(relay.sinks.chat.engine: pacing, roll-ups, deferral, templates).

One webhook takes about one message a second: messages go `pace` apart, never before a
`Retry-After` the webhook gave.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import structlog

from relay.config import SlackSinkConfig
from relay.sinks.answers import judge
from relay.sinks.base import Outcome
from relay.sinks.chat.engine import ChatSink
from relay.sinks.chat.events import digest_of, event_facts
from relay.sinks.chat.text import clean, measure
from relay.sinks.chat.text import clip as _clip
from relay.templates import DEFAULT_SLACK_TEMPLATE, compile_template, render

log = structlog.get_logger("relay.sinks.slack")

# Slack's answers that no retry can fix: the payload is refused, or the webhook, its
# channel or its workspace is gone or forbidden. Matched on the body, whatever the status.
PERMANENT_ERRORS = frozenset(
    {
        "invalid_payload",
        "no_text",
        "channel_not_found",
        "channel_is_archived",
        "action_prohibited",
        "invalid_token",
        "no_active_hooks",
        "no_service",
        "team_disabled",
        "user_not_found",
        "posting_to_general_channel_denied",
        "too_many_attachments",
    }
)
TRANSIENT_ERRORS = frozenset({"rollup_error"})

# Slack's documented limits for a message (Block Kit).
MAX_BLOCKS = 50
HEADER_MAX = 150
SECTION_TEXT_MAX = 3000
FIELDS_MAX = 10
FIELD_TEXT_MAX = 2000
CONTEXT_TEXT_MAX = 2000
TEXT_MAX = 40000
ELLIPSIS = "…"

# Without a Retry-After, a 429 still means "slow down": wait as long as the rate
# Slack documents (one message a second) before the next try.
DEFAULT_RETRY_AFTER = 1.0

_PARTIAL_ENTITY = re.compile(r"&[a-z]{0,3}$")

_DEFAULT_TEMPLATE = compile_template(DEFAULT_SLACK_TEMPLATE)


# --- text that Slack accepts ------------------------------------------------------------


def slack_length(text: str) -> int:
    # Counted in UTF-16 units, never fewer than code points: within the limit whichever
    # way Slack counts, an emoji-heavy key included.
    return measure(text, "utf16")


def clip(text: str, limit: int, *, escaped: bool = True) -> str:
    """At most `limit` characters; when cut, ends with an ellipsis. Half an entity
    ("&am") would show as garbage: an escaped text is cut before it."""
    return _clip(text, limit, "utf16", tail=_PARTIAL_ENTITY if escaped else None)


def escape(text: str) -> str:
    """Slack's mrkdwn control characters; user data must never become markup (a key
    named `<!channel>` would otherwise notify the whole channel)."""
    return clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _plain(text: str, limit: int) -> dict[str, Any]:
    return {"type": "plain_text", "text": clip(clean(text), limit, escaped=False) or " "}


def _mrkdwn(text: str, limit: int) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": clip(text, limit)}


def _field(label: str, value: str) -> dict[str, Any]:
    head = f"*{clip(escape(label), 100)}*\n"
    return {"type": "mrkdwn", "text": head + clip(escape(value), FIELD_TEXT_MAX - len(head))}


# --- messages ---------------------------------------------------------------------------


def event_message(envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
    """One event: `text` (already mrkdwn) as fallback and body, the object as fields."""
    told = event_facts(envelope)
    header = told.headline
    fields = told.facts

    text = text.strip()
    blocks: list[dict[str, Any]] = [{"type": "header", "text": _plain(header, HEADER_MAX)}]
    if text:
        blocks.append({"type": "section", "text": _mrkdwn(text, SECTION_TEXT_MAX)})
    blocks.append({"type": "section", "fields": [_field(k, v) for k, v in fields[:FIELDS_MAX]]})
    context = f"source *{escape(told.source or '?')}*  ·  event `{escape(told.event_id)}`"
    blocks.append({"type": "context", "elements": [_mrkdwn(context, CONTEXT_TEXT_MAX)]})
    # Slack shows `text` in notifications; without it, the header says what happened.
    fallback = text or escape(clip(clean(header), HEADER_MAX, escaped=False))
    return {"text": clip(fallback, TEXT_MAX), "blocks": blocks[:MAX_BLOCKS]}


def digest_message(
    envelopes: Sequence[Mapping[str, Any]], *, keys: int, threshold: int
) -> dict[str, Any]:
    """Many events in one message: count, breakdown by type, the first `keys` objects."""
    digest = digest_of(envelopes, keys)
    count, shown, more = digest.count, digest.shown, digest.more
    breakdown = ", ".join(f"{n} {kind}" for kind, n in digest.types)

    header = f"{count} events"
    if digest.bucket is not None:
        header += f" in {digest.bucket}"
    # Each listed key gets an equal share of the section, so one 5000-character key
    # cannot crowd out the others.
    share = max(40, (SECTION_TEXT_MAX - 100) // max(len(shown), 1) - 4)
    lines = [f"• {clip(escape(key), share)}" for key in shown]
    if more > 0:
        lines.append(f"_and {more} more_")
    listing = f"*First {len(shown)} of {count}:*\n" if more > 0 else ""
    listing += "\n".join(lines)

    ranked = digest.types
    if len(ranked) > FIELDS_MAX:
        other = sum(n for _, n in ranked[FIELDS_MAX - 1 :])
        ranked = [*ranked[: FIELDS_MAX - 1], ("other types", other)]
    context = f"rolled up: {count} events were waiting (threshold {threshold})"
    if digest.sources:
        context = f"source *{escape(', '.join(digest.sources))}*  ·  " + context
    if digest.first_time and digest.last_time:
        context += f"  ·  {escape(digest.first_time)} → {escape(digest.last_time)}"

    summary_keys = ", ".join(escape(clip(k, 200, escaped=False)) for k in shown)
    text = f"{count} events: {escape(breakdown)}. {summary_keys}"
    if more > 0:
        text += f" and {more} more"
    blocks = [
        {"type": "header", "text": _plain(header, HEADER_MAX)},
        {"type": "section", "fields": [_field(kind, str(n)) for kind, n in ranked]},
        {"type": "section", "text": _mrkdwn(listing, SECTION_TEXT_MAX)},
        {"type": "context", "elements": [_mrkdwn(context, CONTEXT_TEXT_MAX)]},
    ]
    return {"text": clip(text, TEXT_MAX), "blocks": blocks}


# --- answers ----------------------------------------------------------------------------


def read_body(status: int, body: str) -> Outcome | None:
    """What Slack's answer body says, before the shared status ladder: its error codes
    (whatever the status), and `ok`, the only body that confirms a posted message."""
    code = body.strip()
    shown = clip(clean(code).replace("\n", " "), 100, escaped=False)
    error = f"HTTP {status}: {shown}" if shown else f"HTTP {status}"
    if code in PERMANENT_ERRORS:
        return Outcome("dead", status=status, error=error)
    if code in TRANSIENT_ERRORS:
        return Outcome("retry", status=status, error=error)
    if 200 <= status < 300:
        # Slack answers exactly `ok`; anything else (a proxy's page, say) does not
        # confirm the message was posted. Retrying risks a duplicate, never a loss, and
        # max_attempts bounds it.
        return Outcome("done", status=status) if code == "ok" else Outcome("retry", status, error)
    if status == 410:
        # Not the endpoint gone for good (as the ladder reads a 410): an archived
        # channel Slack named in a body this list does not know yet. Dead-letter it.
        return Outcome("dead", status=status, error=error)
    return None


def classify(status: int, body: str, retry_after: str | None = None) -> Outcome:
    """Judge one answer from the webhook: Slack's body first, then the status ladder
    every sink shares (a 429 or 5xx retried after Retry-After, other 4xx and redirects
    dead-lettered: the same payload to the same URL gets the same answer)."""
    outcome = judge(status, retry_after, body, time.time(), read_body)
    if status == 429 and outcome.retry_after is None:
        # Slack always sends Retry-After with a 429; without one, wait its 1 msg/s.
        outcome = replace(outcome, retry_after=DEFAULT_RETRY_AFTER)
    return outcome


# --- the sink ---------------------------------------------------------------------------


class SlackSink(ChatSink):
    platform = "slack"
    # Without a Retry-After, a 429 still means "slow down": Slack's one message a second.
    default_throttle_wait = DEFAULT_RETRY_AFTER

    def __init__(self, name: str, config: SlackSinkConfig) -> None:
        super().__init__(name, config, partial(render, _DEFAULT_TEMPLATE))

    def escape(self, text: str) -> str:
        return escape(text)

    def event_message(self, envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
        return event_message(envelope, text)

    def digest_message(self, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return digest_message(
            envelopes, keys=self.config.rollup_keys, threshold=self.config.rollup_threshold
        )

    def read_answer(self, status: int, retry_after: str | None, body: str) -> Outcome:
        return classify(status, body, retry_after)
