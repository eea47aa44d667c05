"""The mechanism every chat sink shares; a platform adds its facts and its body shape.

One robot or webhook takes a handful of messages a minute or a second, so a chat sink
sends one message at a time, paced from the last answer, never before a wait the
platform asked for. A batch of `rollup_threshold` or more due deliveries becomes one
digest message: under a burst (a bulk upload of 5,000 objects) the channel gets a few
summaries rather than a queue of messages that runs for hours. When a send must be
retried, the rest of the batch goes back to the store unsent, costing no attempt.

A platform module subclasses ChatSink with:
- `event_message(envelope, text)` and `digest_message(envelopes)`: its body shapes;
- `read_answer(status, retry_after, body)`: its verdict (relay.sinks.answers);
- optionally `request(message)` (signing, headers) and `escape` (its markup);
and its config section carries `pace`, `rollup_threshold`, `rollup_keys`, `template`.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, ClassVar

import structlog
from yarl import URL

from relay.models import Delivery
from relay.sinks.base import Answer, Outcome, PostingSink, backoff_ceiling, post, url_tokens
from relay.sinks.chat.events import parse_envelope, where
from relay.sinks.chat.text import clip
from relay.sinks.pacing import Pacer
from relay.templates import compile_template, render, render_chat_default

log = structlog.get_logger("relay.sinks.chat")

# Characters of one envelope value a message text is rendered with (UTF-16 units):
# more than any platform shows in one message, less than would crowd out the rest.
VALUE_LIMIT = 1000


def escape_tree(value: Any, escape: Any) -> Any:
    """Every string value escaped, keys untouched (templates index by them)."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, Mapping):
        return {k: escape_tree(v, escape) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escape_tree(v, escape) for v in value]
    return value


class ChatSink(PostingSink):
    # A burst of a few hundred events is taken as one batch and becomes one digest.
    batch_size = 500
    # One robot, one message at a time: its limits are per robot.
    concurrency = 1
    paced = True
    # The platform's name in logs (`<platform>.rolled_up`), and the wait a throttling
    # answer implies when it gives none.
    platform: ClassVar[str] = "chat"
    default_throttle_wait: ClassVar[float] = 1.0

    def __init__(
        self,
        name: str,
        config: Any,
        default_text: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.timeout = config.timeout
        self._url: str = config.url.get_secret_value()
        # Worked out once: the same for every send.
        self._url_secrets = tuple(sorted(url_tokens(self._url), key=len, reverse=True))
        self._template = compile_template(config.template) if config.template else None
        # The markdown platforms' default text, in the sink's language.
        self._default_text = default_text or partial(render_chat_default, language=config.language)
        self._pacer = Pacer(config.pace, from_answer=True)
        self._lock = asyncio.Lock()
        self._last_was_digest = False

    # --- what a platform provides -----------------------------------------------------

    def event_message(self, envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
        raise NotImplementedError

    def digest_message(self, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def read_answer(self, status: int, retry_after: str | None, body: str) -> Outcome:
        raise NotImplementedError

    def escape(self, text: str) -> str:
        """User data as the platform's markup shows it literally."""
        return text

    def request(self, message: dict[str, Any]) -> tuple[str | URL, bytes, dict[str, str]]:
        """(url, body, headers) of one message; a signing platform signs here, at send
        time, so that every retry carries a fresh timestamp."""
        body = json.dumps(message, ensure_ascii=False).encode("utf-8", "replace")
        return self._url, body, {"Content-Type": "application/json; charset=utf-8"}

    def secrets(self) -> Sequence[str]:
        """Credentials that an answer must never carry back, besides the URL as sent: the
        configured URL's tokens and query (a signing platform sends another URL), in
        every form; a platform adds its signing secret."""
        return self._url_secrets

    # --- the mechanism ----------------------------------------------------------------

    async def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        async with self._lock:
            if len(batch) >= self.config.rollup_threshold:
                return await self._send_digest(batch)
            return await self._send_each(batch)

    async def _send_digest(self, batch: Sequence[Delivery]) -> list[Outcome]:
        envelopes = [parse_envelope(d) for d in batch]
        try:
            message = self.digest_message(envelopes)
        except Exception:
            # An event no message builder foresaw: one by one, where it costs only
            # itself, rather than a digest that fails for all of them at every try.
            log.exception(f"{self.platform}.digest_failed", sink=self.name, events=len(batch))
            return await self._send_each(batch)
        # Back-to-back digests mean a burst is still on: a digest stands for at least
        # `rollup_threshold` messages, so it waits their share of the pace. The next
        # digest then gathers more events instead of the channel getting one per pace.
        gap = self.config.pace * (self.config.rollup_threshold if self._last_was_digest else 1)
        await self._pacer.wait(gap)
        outcome = await self._post(message)
        self._last_was_digest = True
        log.info(
            f"{self.platform}.rolled_up",
            sink=self.name,
            events=len(batch),
            types=dict(Counter(e["type"] for e in envelopes)),
            result=outcome.result,
        )
        if outcome.gone:
            # The robot is gone: one event says so (and pauses the sink), the others wait
            # in the store, unsent and costing no attempt, for the sink to be fixed.
            return [outcome] + [Outcome("defer")] * (len(batch) - 1)
        if outcome.result == "retry":
            throttled = outcome.status == 429 or outcome.retry_after is not None
            outcome = replace(
                outcome,
                retry_after=self._together(batch, outcome.retry_after),
                # The regrouping floor is not the robot asking to wait: a failure still
                # counts toward the circuit breaker.
                failure=not throttled,
            )
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
            try:
                message = self.event_message(envelope, self.render_text(envelope))
            except Exception as exc:
                # Its message cannot be built (a field no builder foresaw): it would fail
                # at every try. Dead-lettered, where an operator sees it; the rest of the
                # batch goes on, none of it sent twice.
                log.exception(f"{self.platform}.message_failed", sink=self.name)
                error = f"cannot build the message: {exc.__class__.__name__}"
                outcomes.append(Outcome("dead", error=error))
                continue
            await self._pacer.wait()
            outcome = await self._post(message)
            self._last_was_digest = False
            outcomes.append(outcome)
            if outcome.result == "retry" or outcome.gone:
                # The robot is unwell, asked us to wait, or is gone: the rest of this
                # batch goes back to the store rather than holding already-sent outcomes
                # unsettled through a long wait (a shutdown then would resend them), or
                # meeting the same refusal one by one.
                rest = Outcome("defer", retry_after=self._pacer.left() or None)
                outcomes.extend([rest] * (len(batch) - len(outcomes)))
                break
        return outcomes

    def render_text(self, envelope: dict[str, Any]) -> str:
        """The message text: the sink's template, else the platform's default. Values are
        escaped, the template's own text is not: an operator's template may carry the
        platform's markup (links, mentions); user data never becomes markup."""
        # A value longer than any message can show (a 48 KB object key) is cut first:
        # cut only with the whole message, it would take the text's markup and all the
        # lines after it along.
        context = escape_tree(envelope, lambda v: self.escape(clip(v, VALUE_LIMIT, "utf16")))
        if self._template is not None:
            try:
                return render(self._template, context)
            except Exception as exc:
                # The load-time check covers the sample shapes only; never lose the
                # delivery over a template: the default reads well for any event.
                log.warning(
                    f"{self.platform}.template_failed",
                    sink=self.name,
                    event_id=envelope.get("id"),
                    type=envelope.get("type"),
                    error=f"{exc.__class__.__name__}: {exc}",
                )
        try:
            return self._default_text(context)
        except Exception:
            log.exception(f"{self.platform}.default_template_failed", sink=self.name)
            return self.escape(f"{envelope['type']}: {where(envelope)}")

    async def _post(self, message: dict[str, Any]) -> Outcome:
        url, body, headers = self.request(message)
        try:
            answer = await post(self.session, url, body, headers, self.secrets())
        finally:
            self._pacer.answered()
        outcome = (
            self.read_answer(answer.status, answer.retry_after, answer.body)
            if isinstance(answer, Answer)
            else answer
        )
        if outcome.result == "retry" and (outcome.status == 429 or outcome.retry_after):
            wait = outcome.retry_after or self.default_throttle_wait
            self._pacer.hold(wait)
            log.info(
                f"{self.platform}.rate_limited", sink=self.name, status=outcome.status, wait_s=wait
            )
        return outcome
