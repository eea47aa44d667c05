"""`kind: dingtalk`: a DingTalk group robot (自定义机器人). Its facts, over the chat kit.

- URL `https://oapi.dingtalk.com/robot/send?access_token=...`; with the robot's 加签
  secret (`SEC...`) each request also carries `timestamp` (ms) and `sign`, the
  URL-encoded Base64 HMAC-SHA256 of `"{timestamp}\\n{secret}"` keyed by the secret,
  valid for an hour: signed at send time, so every retry is signed afresh.
- `markdown` (title + text) by default, or `text`; `at` mentions by mobile, user id or
  everyone (a markdown message names them in its text, or DingTalk ignores them).
- It answers HTTP 200 with `errcode`: 0 sent; 130101 too fast (20 messages a minute,
  then a 10-minute block) is retried after a minute; 310000 (signature, keyword or IP
  check failed), 300001/300005 (token) and 460101 (too long) are dead-lettered at once.
- At most 20,000 bytes of UTF-8 per message; one message every 3 s by default.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote_plus

from yarl import URL

from relay.config import DingTalkSinkConfig
from relay.sinks.answers import ErrorCodes, judge
from relay.sinks.base import Outcome
from relay.sinks.chat.engine import ChatSink
from relay.sinks.chat.markdown import Markdown, digest_markdown, escape, event_markdown, plain

# Bytes of UTF-8 DingTalk takes in one message (460101 beyond it); some room is left
# for the JSON around the text and the mentions.
TEXT_LIMIT = 19_000
TITLE_LIMIT = 64

ANSWERS = ErrorCodes(
    "errcode",
    transient={130101},  # too fast: the robot is blocked for a while
    permanent={310000, 460101},
    gone={300001, 300005},  # the robot's token is invalid: deleted, or never was
    # A robot that sent 20 in a minute is blocked for 10: try again when the block has
    # ended, not at each minute of it (every try would cost an attempt).
    transient_wait=600.0,
)


def sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's `sign` for a request at `timestamp_ms`: URL-encoded, as it goes into
    the query. Pure."""
    digest = hmac.new(
        secret.encode("utf-8"), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256
    ).digest()
    return quote_plus(base64.b64encode(digest).decode("ascii"))


class DingTalkSink(ChatSink):
    platform = "dingtalk"
    default_throttle_wait = 60.0

    def __init__(self, name: str, config: DingTalkSinkConfig) -> None:
        super().__init__(name, config)
        self.config: DingTalkSinkConfig = config
        self._secret = None if config.secret is None else config.secret.get_secret_value()

    def escape(self, text: str) -> str:
        return escape(text)

    def event_message(self, envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
        markdown = event_markdown(envelope, text, self.config.language, TEXT_LIMIT, "utf8")
        return self._message(markdown)

    def digest_message(self, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        markdown = digest_markdown(
            envelopes,
            keys=self.config.rollup_keys,
            threshold=self.config.rollup_threshold,
            language=self.config.language,
            limit=TEXT_LIMIT,
            unit="utf8",
        )
        return self._message(markdown)

    def _message(self, markdown: Markdown) -> dict[str, Any]:
        at = self.config.at
        mentions = " ".join(f"@{m}" for m in [*at.mobiles, *at.user_ids])
        text = markdown.text + (f"\n\n{mentions}" if mentions else "")
        title = markdown.title
        if self.config.keyword:
            # A keyword robot refuses (310000) any message without its word: digests and
            # a template's fallback included.
            text, title = f"【{self.config.keyword}】{text}", f"【{self.config.keyword}】{title}"
        message: dict[str, Any]
        if self.config.msgtype == "text":
            message = {"msgtype": "text", "text": {"content": plain(text)}}
        else:
            message = {"msgtype": "markdown", "markdown": {"title": title, "text": text}}
        message["at"] = {"atMobiles": at.mobiles, "atUserIds": at.user_ids, "isAtAll": at.all}
        return message

    def request(self, message: dict[str, Any]) -> tuple[str | URL, bytes, dict[str, str]]:
        url: str | URL = self._url
        if self._secret is not None:
            timestamp = int(time.time() * 1000)
            # Sent as encoded here: a sign's %2B decoded to `+` would read as a space.
            parsed = URL(self._url)
            signed = f"timestamp={timestamp}&sign={sign(self._secret, timestamp)}"
            query = "&".join(part for part in (parsed.raw_query_string, signed) if part)
            url = URL(f"{parsed.with_query(None)}?{query}", encoded=True)
        body = json.dumps(message, ensure_ascii=False).encode("utf-8", "replace")
        return url, body, {"Content-Type": "application/json; charset=utf-8"}

    def secrets(self) -> Sequence[str]:
        # The access_token, quoted alone ("token ... is not exist") or with the query.
        return (*super().secrets(), *(() if self._secret is None else (self._secret,)))

    def read_answer(self, status: int, retry_after: str | None, body: str) -> Outcome:
        return judge(status, retry_after, body, time.time(), ANSWERS)
