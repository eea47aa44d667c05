"""What a chat message says about an event, in the words of a language: the stored
envelope read defensively, what happened to which object, and a tupu-porn verdict.
Pure: every platform renders these facts in its own markup."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from relay.models import Delivery
from relay.sinks.chat.text import human_size
from relay.vocabulary import object_size

Language = Literal["en", "zh-CN"]

_ENVELOPE_FIELDS = (
    "source",
    "type",
    "event_name",
    "time",
    "subject",
    "bucket",
    "key",
    "received_at",
    "data",
)

# What happened, by envelope type.
TITLES: dict[Language, dict[str, str]] = {
    "en": {
        "create_object": "New object",
        "delete_object": "Object deleted",
        "complete_multipart": "Multipart upload completed",
        "abort_multipart": "Multipart upload aborted",
        "image": "Image processed",
    },
    "zh-CN": {
        "create_object": "新对象",
        "delete_object": "对象已删除",
        "complete_multipart": "分段上传完成",
        "abort_multipart": "分段上传已取消",
        "image": "图片已处理",
    },
}

# Labels of the message's facts.
WORDS: dict[Language, dict[str, str]] = {
    "en": {
        "bucket": "Bucket",
        "key": "Key",
        "size": "Size",
        "type": "Type",
        "time": "Time",
        "review": "Review",
        "source": "source",
        "event": "event",
        "review_title": "Content review",
        "review_failed": "Content review failed",
        "review_flagged": "Content review flagged",
        "review_passed": "Content review passed",
        "no_result": "no result",
        "no_files": "no files",
        "needs_review": "needs human review",
        "failed": "failed",
        "code": "code",
        "events": "events",
        "in": "in",
        "first": "First {shown} of {count}",
        "more": "and {more} more",
        "rolled_up": "rolled up: {count} events were waiting (threshold {threshold})",
    },
    "zh-CN": {
        "bucket": "存储空间",
        "key": "对象",
        "size": "大小",
        "type": "事件",
        "time": "时间",
        "review": "审核",
        "source": "来源",
        "event": "事件 ID",
        "review_title": "内容审核",
        "review_failed": "内容审核失败",
        "review_flagged": "内容审核发现违规",
        "review_passed": "内容审核通过",
        "no_result": "无结果",
        "no_files": "无文件",
        "needs_review": "需要人工复审",
        "failed": "失败",
        "code": "错误码",
        "events": "个事件",
        "in": "于",
        "first": "前 {shown} 个，共 {count} 个",
        "more": "另有 {more} 个",
        "rolled_up": "已合并：{count} 个事件在排队（阈值 {threshold}）",
    },
}

# tupu-porn labels: 0 porn, 1 sexy, 2 normal; 0 and 1 are flagged.
TUPU_LABELS: dict[Language, dict[int, str]] = {
    "en": {0: "porn", 1: "sexy", 2: "normal"},
    "zh-CN": {0: "色情", 1: "性感", 2: "正常"},
}
TUPU_FLAGGED = frozenset({0, 1})


def parse_envelope(delivery: Delivery) -> dict[str, Any]:
    """The stored envelope, with every standard field present so that neither a message
    builder nor a template trips over a missing one."""
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


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


def where(envelope: Mapping[str, Any]) -> str:
    """`bucket/key`, else the subject, else the event id."""
    bucket, key = text_of(envelope.get("bucket")), text_of(envelope.get("key"))
    if bucket and key:
        return f"{bucket}/{key}"
    return text_of(envelope.get("subject")) or text_of(envelope.get("id"))


def tupu_review(data: Any, language: Language = "en") -> tuple[str, str, bool]:
    """(title, one-line verdict, flagged or needing review) of a tupu-porn result."""
    words, labels_of = WORDS[language], TUPU_LABELS[language]
    result = data.get("result") if isinstance(data, Mapping) else None
    if not isinstance(result, Mapping):
        return words["review_title"], words["no_result"], False
    code = result.get("code")
    if code not in (0, None):
        verdict = f"{words['failed']}: {result.get('message')} ({words['code']} {code})"
        return words["review_failed"], verdict, True
    labels: Counter[str] = Counter()
    flagged = review = False
    for task in result.values():
        files = task.get("fileList") if isinstance(task, Mapping) else None
        for item in files if isinstance(files, list) else []:
            if not isinstance(item, Mapping):
                continue
            label = item.get("label")
            name = labels_of.get(label, f"label {label}") if isinstance(label, int) else "?"
            labels[name] += 1
            flagged = flagged or label in TUPU_FLAGGED
            review = review or bool(item.get("review"))
    verdict = ", ".join(f"{n} {label}" for label, n in labels.most_common()) or words["no_files"]
    if review:
        verdict += f", {words['needs_review']}"
    title = words["review_flagged"] if flagged else words["review_passed"]
    return title, verdict, flagged or review


@dataclass(frozen=True)
class EventFacts:
    """One event as a message tells it."""

    title: str  # what happened
    headline: str  # what happened, to what
    facts: list[tuple[str, str]]  # labelled values: bucket, key, size, type, time, review
    source: str
    event_id: str
    attention: bool  # a flagged review, or one that needs a human


def event_facts(envelope: Mapping[str, Any], language: Language = "en") -> EventFacts:
    words = WORDS[language]
    kind = text_of(envelope.get("type"))
    title = TITLES[language].get(kind, kind)
    review = None
    attention = False
    if kind == "tupu-porn":
        title, review, attention = tupu_review(envelope.get("data"), language)
    key = text_of(envelope.get("key"))
    target = key or where(envelope)
    colon = "：" if language == "zh-CN" else ": "
    headline = f"{title}{colon}{target}" if target else title
    facts: list[tuple[str, str]] = []
    for label, value in ((words["bucket"], envelope.get("bucket")), (words["key"], key)):
        if isinstance(value, str) and value:
            facts.append((label, value))
    size = object_size(envelope.get("data"))
    if size is not None:
        facts.append((words["size"], human_size(size)))
    facts.append((words["type"], kind))
    if isinstance(envelope.get("time"), str):
        facts.append((words["time"], envelope["time"]))
    if review is not None:
        facts.append((words["review"], review))
    return EventFacts(
        title=title,
        headline=headline,
        facts=facts,
        source=text_of(envelope.get("source")),
        event_id=text_of(envelope.get("id")),
        attention=attention,
    )


@dataclass(frozen=True)
class Digest:
    """Many events as one message tells them: a burst rolled up."""

    count: int
    types: list[tuple[str, int]]  # most common first
    bucket: str | None  # the one bucket they all came from, if so
    shown: list[str]  # the first `keys` objects
    more: int  # how many are not shown
    sources: list[str]
    first_time: str | None
    last_time: str | None


def digest_of(envelopes: Sequence[Mapping[str, Any]], keys: int) -> Digest:
    types = Counter(text_of(e.get("type")) or "event" for e in envelopes)
    buckets = {text_of(e.get("bucket")) for e in envelopes} - {""}
    shown = [where(e) for e in envelopes[:keys]]
    times = sorted(t for t in (e.get("time") for e in envelopes) if isinstance(t, str))
    return Digest(
        count=len(envelopes),
        types=types.most_common(),
        bucket=next(iter(buckets)) if len(buckets) == 1 else None,
        shown=shown,
        more=len(envelopes) - len(shown),
        sources=sorted({text_of(e.get("source")) for e in envelopes} - {""}),
        first_time=times[0] if times else None,
        last_time=times[-1] if times else None,
    )
