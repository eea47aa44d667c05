"""`kind: slack`: Block Kit messages to an incoming webhook, paced, with burst roll-ups.

One webhook takes about one message a second, so this sink sends one message at a
time, spaced `pace` apart, and never before a `Retry-After` the webhook gave. A batch
of `rollup_threshold` or more due deliveries becomes one digest message: under a burst
the channel gets a few summaries instead of a queue of messages that runs for minutes.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import structlog

from relay.config import SlackSinkConfig
from relay.models import Delivery, qingstor_object_size
from relay.sinks.base import (
    Answer,
    Outcome,
    PostingSink,
    backoff_ceiling,
    parse_retry_after,
    post,
)
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

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_PARTIAL_ENTITY = re.compile(r"&[a-z]{0,3}$")

_TITLES = {
    "create_object": "New object",
    "delete_object": "Object deleted",
    "complete_multipart": "Multipart upload completed",
    "abort_multipart": "Multipart upload aborted",
    "image": "Image processed",
}
_TUPU_LABELS = {0: "porn", 1: "sexy", 2: "normal"}
_TUPU_FLAGGED = frozenset({0, 1})

_DEFAULT_TEMPLATE = compile_template(DEFAULT_SLACK_TEMPLATE)


# --- text that Slack accepts ------------------------------------------------------------


def clean(text: str) -> str:
    """Make any string safe to encode and show.

    Keys come from users: a lone surrogate (valid in JSON, not in UTF-8) or a control
    character must not make the payload unsendable.
    """
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return _CONTROL.sub("\ufffd", text)


def slack_length(text: str) -> int:
    # Counted in UTF-16 units, never fewer than code points: within the limit whichever
    # way Slack counts, an emoji-heavy key included.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def clip(text: str, limit: int, *, escaped: bool = True) -> str:
    """At most `limit` characters; when cut, ends with an ellipsis."""
    if slack_length(text) <= limit:
        return text
    units = text.encode("utf-16-le", "surrogatepass")[: (limit - 1) * 2]
    # "ignore" drops half a surrogate pair left by the cut.
    cut = units.decode("utf-16-le", "ignore")
    if escaped:
        # Half an entity ("&am") would show as garbage: cut before it.
        cut = _PARTIAL_ENTITY.sub("", cut)
    return cut + ELLIPSIS


def escape(text: str) -> str:
    """Slack's mrkdwn control characters; user data must never become markup (a key
    named `<!channel>` would otherwise notify the whole channel)."""
    return clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape_tree(value: Any) -> Any:
    """Every string value escaped, keys untouched (templates index by them)."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, Mapping):
        return {k: escape_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escape_tree(v) for v in value]
    return value


def _plain(text: str, limit: int) -> dict[str, Any]:
    return {"type": "plain_text", "text": clip(clean(text), limit, escaped=False) or " "}


def _mrkdwn(text: str, limit: int) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": clip(text, limit)}


def _field(label: str, value: str) -> dict[str, Any]:
    head = f"*{clip(escape(label), 100)}*\n"
    return {"type": "mrkdwn", "text": head + clip(escape(value), FIELD_TEXT_MAX - len(head))}


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size:,} bytes"
    exponent = min(int(math.log(size, 1024)), 5)
    unit = ("KiB", "MiB", "GiB", "TiB", "PiB")[exponent - 1]
    return f"{size / 1024**exponent:.1f} {unit} ({size:,} bytes)"


# --- reading envelopes ------------------------------------------------------------------

_ENVELOPE_FIELDS = ("source", "type", "time", "subject", "bucket", "key", "received_at", "data")


def parse_envelope(delivery: Delivery) -> dict[str, Any]:
    """The stored envelope, with every standard field present so that neither the
    message builder nor a template trips over a missing one."""
    try:
        envelope = json.loads(delivery.envelope)
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict):
        envelope = {}
    envelope.setdefault("id", delivery.event_id)
    for name in _ENVELOPE_FIELDS:
        envelope.setdefault(name, None)
    if not isinstance(envelope["type"], str) or not envelope["type"]:
        envelope["type"] = "event"
    return envelope


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _where(envelope: Mapping[str, Any]) -> str:
    bucket, key = _text(envelope.get("bucket")), _text(envelope.get("key"))
    if bucket and key:
        return f"{bucket}/{key}"
    return _text(envelope.get("subject")) or _text(envelope.get("id"))


def tupu_review(data: Any) -> tuple[str, str]:
    """(header title, one-line verdict) of a tupu-porn result."""
    result = data.get("result") if isinstance(data, Mapping) else None
    if not isinstance(result, Mapping):
        return "Content review", "no result"
    code = result.get("code")
    if code not in (0, None):
        return "Content review failed", f"failed: {result.get('message')} (code {code})"
    labels: Counter[str] = Counter()
    flagged = review = False
    for task in result.values():
        files = task.get("fileList") if isinstance(task, Mapping) else None
        for item in files if isinstance(files, list) else []:
            if not isinstance(item, Mapping):
                continue
            label = item.get("label")
            name = _TUPU_LABELS.get(label, f"label {label}") if isinstance(label, int) else "?"
            labels[name] += 1
            flagged = flagged or label in _TUPU_FLAGGED
            review = review or bool(item.get("review"))
    verdict = ", ".join(f"{n} {label}" for label, n in labels.most_common()) or "no files"
    if review:
        verdict += ", needs human review"
    return ("Content review flagged" if flagged else "Content review passed"), verdict


# --- messages ---------------------------------------------------------------------------


def event_message(envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
    """One event: `text` (already mrkdwn) as fallback and body, the object as fields."""
    kind = _text(envelope.get("type"))
    title = _TITLES.get(kind, kind)
    fields: list[tuple[str, str]] = []
    review = None
    if kind == "tupu-porn":
        title, review = tupu_review(envelope.get("data"))
    key = _text(envelope.get("key"))
    header = f"{title}: {key or _where(envelope)}" if key or _where(envelope) else title
    for label, value in (("Bucket", envelope.get("bucket")), ("Key", envelope.get("key"))):
        if isinstance(value, str) and value:
            fields.append((label, value))
    size = qingstor_object_size(envelope.get("data"))
    if size is not None:
        fields.append(("Size", human_size(size)))
    fields.append(("Type", kind))
    if isinstance(envelope.get("time"), str):
        fields.append(("Time", envelope["time"]))
    if review is not None:
        fields.append(("Review", review))

    text = text.strip()
    blocks: list[dict[str, Any]] = [{"type": "header", "text": _plain(header, HEADER_MAX)}]
    if text:
        blocks.append({"type": "section", "text": _mrkdwn(text, SECTION_TEXT_MAX)})
    blocks.append({"type": "section", "fields": [_field(k, v) for k, v in fields[:FIELDS_MAX]]})
    context = (
        f"source *{escape(_text(envelope.get('source')) or '?')}*"
        f"  ·  event `{escape(_text(envelope.get('id')))}`"
    )
    blocks.append({"type": "context", "elements": [_mrkdwn(context, CONTEXT_TEXT_MAX)]})
    # Slack shows `text` in notifications; without it, the header says what happened.
    fallback = text or escape(clip(clean(header), HEADER_MAX, escaped=False))
    return {"text": clip(fallback, TEXT_MAX), "blocks": blocks[:MAX_BLOCKS]}


def digest_message(
    envelopes: Sequence[Mapping[str, Any]], *, keys: int, threshold: int
) -> dict[str, Any]:
    """Many events in one message: count, breakdown by type, the first `keys` objects."""
    count = len(envelopes)
    types = Counter(_text(e.get("type")) or "event" for e in envelopes)
    breakdown = ", ".join(f"{n} {kind}" for kind, n in types.most_common())
    buckets = {_text(e.get("bucket")) for e in envelopes} - {""}
    shown = [_where(e) for e in envelopes[:keys]]
    more = count - len(shown)

    header = f"{count} events"
    if len(buckets) == 1:
        header += f" in {next(iter(buckets))}"
    # Each listed key gets an equal share of the section, so one 5000-character key
    # cannot crowd out the others.
    share = max(40, (SECTION_TEXT_MAX - 100) // max(len(shown), 1) - 4)
    lines = [f"• {clip(escape(key), share)}" for key in shown]
    if more > 0:
        lines.append(f"_and {more} more_")
    listing = f"*First {len(shown)} of {count}:*\n" if more > 0 else ""
    listing += "\n".join(lines)

    ranked = types.most_common()
    if len(ranked) > FIELDS_MAX:
        other = sum(n for _, n in ranked[FIELDS_MAX - 1 :])
        ranked = [*ranked[: FIELDS_MAX - 1], ("other types", other)]
    times = sorted(t for t in (e.get("time") for e in envelopes) if isinstance(t, str))
    sources = sorted({_text(e.get("source")) for e in envelopes} - {""})
    context = f"rolled up: {count} events were waiting (threshold {threshold})"
    if sources:
        context = f"source *{escape(', '.join(sources))}*  ·  " + context
    if times:
        context += f"  ·  {escape(times[0])} → {escape(times[-1])}"

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


def _retry_after(value: str | None) -> float | None:
    return parse_retry_after(value, time.time())


def classify(status: int, body: str, retry_after: str | None = None) -> Outcome:
    """Judge one answer from the webhook."""
    code = body.strip()
    shown = clip(clean(code).replace("\n", " "), 100, escaped=False)
    error = f"HTTP {status}: {shown}" if shown else f"HTTP {status}"
    if code in PERMANENT_ERRORS:
        return Outcome("dead", status=status, error=error)
    if code in TRANSIENT_ERRORS:
        return Outcome("retry", status=status, error=error)
    if status == 200 and code == "ok":
        return Outcome("done", status=status)
    if status == 429:
        wait = _retry_after(retry_after)
        # Slack always sends Retry-After with a 429; without one, wait its 1 msg/s.
        wait = DEFAULT_RETRY_AFTER if wait is None else wait
        return Outcome("retry", status=status, error=error, retry_after=wait)
    if status >= 500:
        floor = _retry_after(retry_after)
        return Outcome("retry", status=status, error=error, retry_after=floor)
    if 200 <= status < 300:
        # Slack answers exactly `ok`; anything else (a proxy's page, say) does not
        # confirm the message was posted. Retrying risks a duplicate, never a loss, and
        # max_attempts bounds it.
        return Outcome("retry", status=status, error=error)
    if status in (408, 409, 425):
        # Timeout, conflict, too early: about this moment, not about the message.
        return Outcome("retry", status=status, error=error)
    # Any other 4xx (an error code Slack added after this list was written, such as
    # `invalid_blocks`, or a 401/403/404/410 from the webhook endpoint) and 3xx (a
    # webhook URL never redirects; a redirect means a wrong URL): sending the same
    # payload to the same URL will get the same answer. Dead-letter it, where an
    # operator sees it and can replay after fixing the config.
    return Outcome("dead", status=status, error=error)


# --- the sink ---------------------------------------------------------------------------


class SlackSink(PostingSink):
    # A burst of a few hundred events is taken as one batch and becomes one digest.
    batch_size = 500
    # One webhook, one message at a time: pacing is per webhook.
    concurrency = 1
    paced = True

    def __init__(self, name: str, config: SlackSinkConfig) -> None:
        self.name = name
        self.config = config
        self._url = config.url.get_secret_value()
        self._template = compile_template(config.template) if config.template else None
        self.timeout = config.timeout
        self._lock = asyncio.Lock()
        # Monotonic times: when the last answer came back (the pace counts from there,
        # so messages arrive at least `pace` apart however long each took), and no send
        # before `_not_before` (set from Retry-After).
        self._last_answer: float | None = None
        self._not_before = 0.0
        self._last_was_digest = False

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        async with self._lock:
            if len(batch) >= self.config.rollup_threshold:
                return await self._send_digest(batch)
            return await self._send_each(batch)

    async def _send_digest(self, batch: Sequence[Delivery]) -> list[Outcome]:
        envelopes = [parse_envelope(d) for d in batch]
        message = digest_message(
            envelopes, keys=self.config.rollup_keys, threshold=self.config.rollup_threshold
        )
        # Back-to-back digests mean a burst is still on: a digest stands for at least
        # `rollup_threshold` messages, so it waits their share of the pace. The next
        # digest then gathers more events instead of the channel getting one a second.
        gap = self.config.pace * (self.config.rollup_threshold if self._last_was_digest else 1)
        await self._wait_turn(gap)
        outcome = await self._post(message)
        self._last_was_digest = True
        log.info(
            "slack.rolled_up",
            sink=self.name,
            events=len(batch),
            types=dict(Counter(e["type"] for e in envelopes)),
            result=outcome.result,
        )
        if outcome.result == "retry":
            outcome = replace(outcome, retry_after=self._together(batch, outcome.retry_after))
        # One message for all of them: each is accounted for by the one answer.
        return [outcome] * len(batch)

    def _together(self, batch: Sequence[Delivery], floor: float | None) -> float:
        """A retry floor at the top of the backoff range of every delivery in `batch`.

        Backoff is jittered per delivery; a failed digest's events would come back due
        one by one and go out as single messages. With the floor at the top of the
        range they all come due at once and make one digest again. (The dispatcher's
        full-jitter ceiling: min(max, initial * 2**(attempts-1)).)
        """
        attempts = max(d.attempts for d in batch) + 1
        return max(backoff_ceiling(attempts, self.config.retry), floor or 0.0)

    async def _send_each(self, batch: Sequence[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for delivery in batch:
            envelope = parse_envelope(delivery)
            message = event_message(envelope, self._render(envelope))
            await self._wait_turn(self.config.pace)
            outcome = await self._post(message)
            self._last_was_digest = False
            outcomes.append(outcome)
            if outcome.result == "retry":
                # The webhook is unwell or asked us to wait: the rest of this batch goes
                # back to the store rather than holding already-sent outcomes unsettled
                # through a long wait (a shutdown then would resend them).
                rest = Outcome("defer", retry_after=self._wait_left() or None)
                outcomes.extend([rest] * (len(batch) - len(outcomes)))
                break
        return outcomes

    def _render(self, envelope: dict[str, Any]) -> str:
        # Values are escaped, the template's own text is not: an operator's template
        # may carry Slack markup (links, mentions), user data never becomes markup.
        context = escape_tree(envelope)
        if self._template is not None:
            try:
                return render(self._template, context)
            except Exception as exc:
                # The load-time check covers the sample shapes only; never lose the
                # delivery over a template: the default reads well for any event.
                log.warning(
                    "slack.template_failed",
                    sink=self.name,
                    event_id=envelope.get("id"),
                    type=envelope.get("type"),
                    error=f"{exc.__class__.__name__}: {exc}",
                )
        try:
            return render(_DEFAULT_TEMPLATE, context)
        except Exception:
            log.exception("slack.default_template_failed", sink=self.name)
            return escape(f"{envelope['type']}: {_where(envelope)}")

    def _wait_left(self, gap: float | None = None) -> float:
        gap = self.config.pace if gap is None else gap
        now = time.monotonic()
        ready = self._not_before
        if self._last_answer is not None:
            ready = max(ready, self._last_answer + gap)
        return max(ready - now, 0.0)

    async def _wait_turn(self, gap: float) -> None:
        # Waiting happens before a send, never after one: a shutdown that cancels the
        # wait cancels nothing that Slack has already seen.
        delay = self._wait_left(gap)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _post(self, message: dict[str, Any]) -> Outcome:
        body = json.dumps(message, ensure_ascii=False).encode("utf-8", "replace")
        headers = {"Content-Type": "application/json; charset=utf-8"}
        try:
            answer = await post(self.session, self._url, body, headers)
        finally:
            self._last_answer = time.monotonic()
        outcome = (
            classify(answer.status, answer.body, answer.retry_after)
            if isinstance(answer, Answer)
            else answer
        )
        if outcome.status == 429 or (outcome.retry_after and outcome.result == "retry"):
            wait = outcome.retry_after or DEFAULT_RETRY_AFTER
            self._not_before = max(self._not_before, time.monotonic() + wait)
            log.info("slack.rate_limited", sink=self.name, status=outcome.status, wait_s=wait)
        return outcome
