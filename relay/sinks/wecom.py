"""`kind: wecom`: a WeCom (企业微信) group robot (群机器人). Its facts, over the chat kit.

- URL `https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...`: the `key` is the
  robot's only credential (no signing, no secret). POST JSON, UTF-8.
- `markdown` (`{"msgtype": "markdown", "markdown": {"content": ...}}`) by default: at
  most 4096 bytes of UTF-8 in `content`; no title, no mentions. Or `text`
  (`{"msgtype": "text", "text": {"content": ..., "mentioned_list": [...],
  "mentioned_mobile_list": [...]}}`): at most 2048 bytes of UTF-8 in `content`, and the
  only type that mentions (user ids, mobiles, `"@all"`).
- It answers HTTP 200 with `errcode`: 0 sent; 45009 (api freq out of limit: more than
  20 messages a minute) is retried after a minute; 93000 (invalid webhook url: a wrong
  or deleted robot key), 40058 (content too long, or an invalid parameter), 40008
  (invalid msgtype) and 44004 (empty content) are dead-lettered at once; -1 (system
  busy) and any other code are retried with backoff.
- 20 messages a minute per robot: one every 3 s by default.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from relay.config import WeComSinkConfig
from relay.sinks.answers import ErrorCodes, judge
from relay.sinks.base import Outcome
from relay.sinks.chat.engine import ChatSink
from relay.sinks.chat.markdown import (
    Markdown,
    digest_markdown,
    escape,
    event_markdown,
    fit,
    plain,
)
from relay.sinks.chat.text import measure

log = structlog.get_logger("relay.sinks.wecom")

# Bytes of UTF-8 WeCom takes in `content` (40058 beyond them). A little room is kept:
# the cut is exact, but how the robot counts a character it normalises is not ours.
MARKDOWN_LIMIT = 4096 - 64
TEXT_LIMIT = 2048 - 32

ANSWERS = ErrorCodes(
    "errcode",
    transient={45009},  # api freq out of limit: 20 messages a minute per robot
    permanent={40058, 40008, 44004},
    gone={93000},  # the webhook URL is invalid: the robot was removed
    # The robot's window is a minute: try again after one.
    transient_wait=60.0,
)


class WeComSink(ChatSink):
    platform = "wecom"
    default_throttle_wait = 60.0

    def __init__(self, name: str, config: WeComSinkConfig) -> None:
        super().__init__(name, config)
        self.config: WeComSinkConfig = config
        at = config.at
        self._mentioned = [*at.user_ids, *(["@all"] if at.all else [])]
        self._mentioned_mobiles = list(at.mobiles)

    def escape(self, text: str) -> str:
        return escape(text)

    def _limit(self) -> int:
        return TEXT_LIMIT if self.config.msgtype == "text" else MARKDOWN_LIMIT

    def event_message(self, envelope: Mapping[str, Any], text: str) -> dict[str, Any]:
        limit, language = self._limit(), self.config.language
        # The kit cuts each fact to a share of the limit, but not the rendered text: a
        # long key in it would push the facts (type, time, source) past WeCom's few KB.
        # The text gets the room the facts leave (the 2 bytes: its blank line).
        facts = event_markdown(envelope, "", language, limit, "utf8").text
        room = max(limit - measure(facts, "utf8") - 2, limit // 4)
        markdown = event_markdown(envelope, fit(text, room, "utf8"), language, limit, "utf8")
        return self._message(markdown)

    def digest_message(self, envelopes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        markdown = digest_markdown(
            envelopes,
            keys=self.config.rollup_keys,
            threshold=self.config.rollup_threshold,
            language=self.config.language,
            limit=self._limit(),
            unit="utf8",
        )
        return self._message(markdown)

    def _message(self, markdown: Markdown) -> dict[str, Any]:
        if self.config.msgtype == "markdown":
            # No title field: the text's first line, in bold, is the headline.
            return {"msgtype": "markdown", "markdown": {"content": markdown.text}}
        # plain() only removes marks: the text stays within the limit it was cut to.
        text: dict[str, Any] = {"content": plain(markdown.text)}
        if self._mentioned:
            text["mentioned_list"] = self._mentioned
        if self._mentioned_mobiles:
            text["mentioned_mobile_list"] = self._mentioned_mobiles
        return {"msgtype": "text", "text": text}

    def read_answer(self, status: int, retry_after: str | None, body: str) -> Outcome:
        return judge(status, retry_after, body, time.time(), ANSWERS)
