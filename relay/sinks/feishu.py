"""`kind: feishu`: a Feishu (飞书) or Lark group custom bot (自定义机器人). Its facts, over
the chat kit.

- URL `https://open.feishu.cn/open-apis/bot/v2/hook/<token>` (Lark:
  `open.larksuite.com`). With the bot's 签名校验 secret each request body also carries
  `timestamp` (seconds, as a string) and `sign`, the Base64 HMAC-SHA256 of an empty
  message keyed by `"{timestamp}\\n{secret}"` (in the JSON, so not URL-encoded), valid
  for an hour: signed at send time, so every retry is signed afresh.
- `msg_type` `interactive` (a message card: a coloured header, the text and the object's
  facts in `lark_md`, a note) by default, or `text`, or `post` (rich text). Card markdown
  takes HTML entities (`&#42;`) as escapes, not backslashes; a text message turns
  `<at user_id="all">` into a mention, so user data never carries one.
- It answers HTTP 200 with `code` (older paths: `StatusCode`): 0 sent; 11232 too frequent
  (100 a minute and 5 a second per bot) is retried after a minute; 9499 (bad request:
  format, or over 20 KB), 19001 (no such webhook), 19021 (signature or timestamp),
  19022 (IP allow-list) and 19024 (keyword check) are dead-lettered at once.
- At most 20 KB per request body, counted here as 20,000 bytes of UTF-8 of the whole
  JSON; one message every 0.6 s by default.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from yarl import URL

from relay.config import FeishuSinkConfig
from relay.sinks.answers import ErrorCodes, judge
from relay.sinks.base import Outcome
from relay.sinks.chat.engine import ChatSink
from relay.sinks.chat.events import WORDS, Language, digest_of, event_facts
from relay.sinks.chat.markdown import fit
from relay.sinks.chat.text import clean, clip, shrink_to_fit

# Bytes of UTF-8 Feishu takes in one request body (9499 beyond 20 KB), with room left
# for the signature's two fields, added at send time.
BODY_LIMIT = 20_000
SIGNATURE_ROOM = 128
# Bytes of a card header or a post title: one line in the chat list.
TITLE_LIMIT = 150
# Bytes of a card note or a digest's closing line.
NOTE_LIMIT = 1000
# A user value or the message text never gets less than this, however tight the body.
SMALLEST = 64

# A bot that sent more than 100 in a minute (or 5 in a second) is refused until the
# minute has passed: try again in one. Each refusal is one request.
FREQUENCY_WAIT = 60.0

ANSWERS = ErrorCodes(
    "code",
    also=("StatusCode",),
    transient={11232},  # too frequent
    # Bad request (format or size), no such webhook, signature or timestamp, IP
    # allow-list, keyword check: the same message would get the same answer.
    permanent={9499, 19021, 19022, 19024},
    gone={19001},  # no such webhook: the bot was removed
    transient_wait=FREQUENCY_WAIT,
)

# Header colours (the card's `template`): what happened at a glance; red asks for a look.
_COLOURS = {
    "create_object": "blue",
    "complete_multipart": "green",
    "delete_object": "grey",
    "abort_multipart": "orange",
    "tupu-porn": "green",
}
_ATTENTION = "red"
_DIGEST = "wathet"

# Post (rich text) content by language.
_POST_LOCALES: dict[Language, str] = {"zh-CN": "zh_cn", "en": "en_us"}
_COLONS: dict[Language, str] = {"zh-CN": "\uff1a", "en": ": "}

# --- text Feishu accepts -----------------------------------------------------------------

# Marks of Feishu's card markdown that user data must not form: bold/italic, strike,
# code, links, tags (`<at id=all>`, `<font>`), headings, tables, emoji (`:DONE:`), the
# escape itself, a `&` that would start an entity, and `__bold__`. Not `_` alone (envelope
# types such as create_object stay comparable in a template), nor `/`, `(`, `)`.
_SPECIAL = re.compile(r"[\\`*~\[\]<>#|:]|&(?=[#A-Za-z])|__+")
_LEADING = re.compile(r"^([ \t]*)([-+]|\d+\.)(?=[ \t])", re.MULTILINE)
_ENTITY = re.compile(r"&#(\d{1,7});")
# What a cut must not leave at the end: part of an entity.
_PARTIAL_ENTITY = re.compile(r"&[#\w]*$")
# A text message's mention tag, as user data would spell it once unescaped.
_MENTION = re.compile(r"<(?=\s*/?\s*at\b)", re.IGNORECASE)
_ESCAPED_MENTION = re.compile(r"&#60;(?=\s*/?\s*at\b)", re.IGNORECASE)
_NO_TAG = "\u200b"  # after a `<`, keeps what follows from reading as a tag


def _entities(text: str) -> str:
    return "".join(f"&#{ord(c)};" for c in text)


def escape(text: str) -> str:
    """User data as Feishu's card markdown (`lark_md`) shows it literally: its marks as
    numeric HTML entities, which is how Feishu documents escaping (a backslash is not)."""
    text = _SPECIAL.sub(lambda m: _entities(m.group()), clean(text))
    return _LEADING.sub(lambda m: m[1] + _marker(m[2]), text)


def _marker(marker: str) -> str:
    """A list marker at the start of a line, made plain: `-`, `+`, or the `.` of `1.`."""
    return marker[:-1] + _entities(marker[-1])


def _unescape(text: str) -> str:
    def char(match: re.Match[str]) -> str:
        code = int(match[1])
        return chr(code) if code <= 0x10FFFF else match[0]

    return _ENTITY.sub(char, text)


def plain(text: str) -> str:
    """Card markdown as a text or post message shows it: without bold marks, entities
    back to characters; a `<at` that was user data gets a zero-width space after its `<`,
    so it never mentions anyone. (An operator's template may write a mention itself.)"""
    text = text.replace("**", "")
    return _unescape(_ESCAPED_MENTION.sub("&#60;" + _NO_TAG, text))


def plain_value(value: str) -> str:
    """A user value for a text or post message: cleaned, and never a mention."""
    return _MENTION.sub("<" + _NO_TAG, clean(value))


def clip_markdown(text: str, limit: int) -> str:
    """An escaped value in at most `limit` bytes, never cut inside an entity."""
    return clip(text, limit, "utf8", tail=_PARTIAL_ENTITY)


def fit_card(text: str, limit: int) -> str:
    """Card markdown within `limit` bytes, never cut inside an entity."""
    return fit(text, limit, "utf8", tail=_PARTIAL_ENTITY)


def sign(secret: str, timestamp: int) -> str:
    """Feishu's `sign` for a request at `timestamp` (seconds): the HMAC-SHA256 of an
    empty message keyed by `"{timestamp}\\n{secret}"`, in Base64. Pure."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode("ascii")


def _size(message: Mapping[str, Any]) -> int:
    return len(json.dumps(message, ensure_ascii=False).encode("utf-8", "replace"))


def within_body(build: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """The message `build(limit)` makes, with `limit` (the bytes its text may take)
    lowered until the whole JSON body, as sent, is within Feishu's 20 KB: JSON escaping
    and the card's structure are counted as Feishu counts them, in bytes."""
    target = BODY_LIMIT - SIGNATURE_ROOM
    return shrink_to_fit(build, _size, target, SMALLEST * 4)


# --- the sink ------------------------------------------------------------------------------


class FeishuSink(ChatSink):
    platform = "feishu"
    default_throttle_wait = FREQUENCY_WAIT

    def __init__(self, name: str, config: FeishuSinkConfig) -> None:
        super().__init__(name, config)
        self.config: FeishuSinkConfig = config
        self._secret = None if config.secret is None else config.secret.get_secret_value()

    def escape(self, text: str) -> str:
        return escape(text)

    def event_message(self, envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
        return self._with_keyword(within_body(partial(self._event, envelope, text)))

    def digest_message(self, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self._with_keyword(within_body(partial(self._digest, envelopes)))

    def _with_keyword(self, message: dict[str, Any]) -> dict[str, Any]:
        """A keyword bot refuses (19024) any message without its word: at the head of
        the title, whatever the message type, digests included."""
        word = self.config.keyword
        if not word:
            return message
        mark = f"【{word}】"
        if message["msg_type"] == "interactive":
            title = message["card"]["header"]["title"]
            title["content"] = mark + title["content"]
        elif message["msg_type"] == "post":
            for post in message["content"]["post"].values():
                post["title"] = mark + post["title"]
        else:
            message["content"]["text"] = mark + message["content"]["text"]
        return message

    # --- one event ----------------------------------------------------------------------

    def _event(self, envelope: Mapping[str, Any], text: str, limit: int) -> dict[str, Any]:
        language = self.config.language
        words, colon = WORDS[language], _COLONS[language]
        told = event_facts(envelope, language)
        # Plain text everywhere, never a mention.
        title = clip(plain_value(told.headline), TITLE_LIMIT, "utf8")
        footer = clean(f"{words['source']} {told.source or '?'} · {words['event']} {told.event_id}")
        # The text gets half the room, a user value a quarter: a 5,000-character key
        # cannot crowd out what happened.
        share = max(limit // 4, SMALLEST)
        body = text.strip()
        if self.config.msgtype == "interactive":
            wide = {words["key"], words["review"]}
            fields = [
                {
                    "is_short": label not in wide,
                    "text": {
                        "tag": "lark_md",
                        "content": f"**{escape(label)}**\n{clip_markdown(escape(value), share)}",
                    },
                }
                for label, value in told.facts
            ]
            elements: list[dict[str, Any]] = []
            if body:
                elements.append(_markdown(fit_card(body, max(limit // 2, SMALLEST))))
            elements += [{"tag": "div", "fields": fields}, {"tag": "hr"}, _note(footer)]
            colour = (
                _ATTENTION if told.attention else _COLOURS.get(str(envelope.get("type")), "blue")
            )
            return _card(title, colour, elements)
        lines = []
        if body:
            lines += [*clip(plain(body), max(limit // 2, SMALLEST), "utf8").splitlines(), ""]
        lines += [
            f"{label}{colon}{clip(plain_value(value), share, 'utf8')}"
            for label, value in told.facts
        ]
        lines += ["", footer]
        return self._plain_message(title, lines)

    # --- a digest -----------------------------------------------------------------------

    def _digest(self, envelopes: Sequence[Mapping[str, Any]], limit: int) -> dict[str, Any]:
        language = self.config.language
        words, colon = WORDS[language], _COLONS[language]
        digest = digest_of(envelopes, self.config.rollup_keys)
        head = f"{digest.count} {words['events']}"
        if digest.bucket is not None:
            head = (
                f"{digest.bucket}{colon}{head}"
                if language == "zh-CN"
                else f"{head} {words['in']} {digest.bucket}"
            )
        title = clip(plain_value(head), TITLE_LIMIT, "utf8")
        breakdown = ", ".join(f"{n} {kind}" for kind, n in digest.types)
        breakdown = clip(clean(breakdown), max(limit // 4, SMALLEST), "utf8")
        flagged = sum(1 for e in envelopes if event_facts(e, language).attention)
        context = words["rolled_up"].format(
            count=digest.count, threshold=self.config.rollup_threshold
        )
        if digest.sources:
            context = f"{words['source']} {', '.join(digest.sources)} · {context}"
        if digest.first_time and digest.last_time:
            context += f" · {digest.first_time} → {digest.last_time}"
        context = clip(clean(context), NOTE_LIMIT, "utf8")
        first = words["first"].format(shown=len(digest.shown), count=digest.count)
        more = words["more"].format(more=digest.more)
        # Each listed key gets an equal share of the room left.
        share = max(32, (limit - 400) // max(len(digest.shown), 1) - 8)
        # (label, value) lines: the types, how many need a look.
        summary = [(words["type"], breakdown)]
        if flagged:
            summary.append((words["needs_review"], str(flagged)))
        if self.config.msgtype == "interactive":
            lines = [f"**{escape(label)}**{colon}{escape(value)}" for label, value in summary]
            lines.append("")
            if digest.more > 0:
                lines.append(f"**{escape(first)}**")
            lines += [f"- {clip_markdown(escape(key), share)}" for key in digest.shown]
            if digest.more > 0:
                lines.append(escape(more))
            elements = [_markdown(fit_card("\n".join(lines), limit)), {"tag": "hr"}, _note(context)]
            return _card(title, _ATTENTION if flagged else _DIGEST, elements)
        plain_lines = [f"{label}{colon}{plain_value(value)}" for label, value in summary]
        plain_lines.append("")
        if digest.more > 0:
            plain_lines.append(first)
        plain_lines += [f"- {clip(plain_value(key), share, 'utf8')}" for key in digest.shown]
        if digest.more > 0:
            plain_lines.append(more)
        plain_lines += ["", context]
        return self._plain_message(title, plain_lines)

    # --- shapes -------------------------------------------------------------------------

    def _plain_message(self, title: str, lines: list[str]) -> dict[str, Any]:
        """A `text` message (title, then the lines) or a `post` (title, a paragraph a line)."""
        if self.config.msgtype == "post":
            locale = _POST_LOCALES[self.config.language]
            paragraphs = [[{"tag": "text", "text": line}] for line in lines]
            post = {"title": title, "content": paragraphs}
            return {"msg_type": "post", "content": {"post": {locale: post}}}
        text = "\n".join([title, "", *lines])
        return {"msg_type": "text", "content": {"text": text}}

    # --- sending ------------------------------------------------------------------------

    def request(self, message: dict[str, Any]) -> tuple[str | URL, bytes, dict[str, str]]:
        if self._secret is not None:
            timestamp = int(time.time())
            signature = {"timestamp": str(timestamp), "sign": sign(self._secret, timestamp)}
            message = {**signature, **message}
        return super().request(message)

    def secrets(self) -> Sequence[str]:
        return (*super().secrets(), *(() if self._secret is None else (self._secret,)))

    def read_answer(self, status: int, retry_after: str | None, body: str) -> Outcome:
        return judge(status, retry_after, body, time.time(), ANSWERS)


def _card(title: str, colour: str, elements: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "msg_type": "interactive",
        "card": {
            "config": {"wide_screen_mode": True},
            "header": {"title": {"tag": "plain_text", "content": title}, "template": colour},
            "elements": elements,
        },
    }


def _markdown(content: str) -> dict[str, Any]:
    # A `div` of `lark_md` rather than the `markdown` element: every client renders it
    # (lists in a `markdown` element show an upgrade prompt on Feishu before 7.6).
    return {"tag": "div", "text": {"tag": "lark_md", "content": content}}


def _note(text: str) -> dict[str, Any]:
    return {
        "tag": "note",
        "elements": [{"tag": "plain_text", "content": clip(text, NOTE_LIMIT, "utf8")}],
    }
