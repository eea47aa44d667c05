"""Message templates: Jinja2 in a sandbox, strict about undefined names. No I/O.

A template is checked when the config loads, by rendering it against sample events,
so that a typo is a config error at start-up rather than a failed send at 3 a.m.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from relay.models import NotifierBatch, TupuPornResult, notifier_envelopes, tupu_porn_envelope
from relay.samples import NOTIFIER_SAMPLE, TUPU_PORN_SAMPLE

_ENV = SandboxedEnvironment(
    undefined=StrictUndefined,
    autoescape=False,  # chat markup, not HTML
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)

# Envelopes of each QingStor shape, as relay builds them: what a template must handle.
_AT = datetime(2021, 8, 31, 6, 25, 46, 120000, tzinfo=UTC)
SAMPLE_ENVELOPES: list[dict[str, Any]] = [
    *(
        e.to_dict()
        for e in notifier_envelopes(
            NOTIFIER_SAMPLE, NotifierBatch.model_validate(NOTIFIER_SAMPLE), "qingstor", _AT
        )
    ),
    tupu_porn_envelope(
        TUPU_PORN_SAMPLE, TupuPornResult.model_validate(TUPU_PORN_SAMPLE), "qingstor", _AT
    ).to_dict(),
]

# The Slack message text when a sink sets no `template`. It must read well for every
# shape relay relays, including ones it has never seen (an `image` result, a generic
# source), so it reaches into `data` only through `.get` and type tests: a strict
# undefined here would cost a fallback on every such event. Tupu labels: 0 porn,
# 1 sexy, 2 normal; `review` asks for a human to look.
DEFAULT_SLACK_TEMPLATE = """\
{% set what = (bucket ~ "/" ~ key) if bucket and key else subject %}
{% set d = data if data is mapping else {} %}
{% set q = d.get("qingstor") if d.get("qingstor") is mapping else {} %}
{% set o = q.get("object") if q.get("object") is mapping else {} %}
{% set size = o.get("size") %}
{% set sized = (" (" ~ (size | filesizeformat(true)) ~ ")") if size is number else "" %}
{% if type == "create_object" %}
:inbox_tray: New object *{{ what }}*{{ sized }}
{% elif type == "delete_object" %}
:wastebasket: Deleted *{{ what }}*
{% elif type == "complete_multipart" %}
:package: Multipart upload completed: *{{ what }}*{{ sized }}
{% elif type == "abort_multipart" %}
:x: Multipart upload aborted: *{{ what }}*
{% elif type == "tupu-porn" %}
{% set r = d.get("result") if d.get("result") is mapping else {} %}
{% set ns = namespace(files=[], flagged=0) %}
{% for task, v in r.items() if v is mapping and v.get("fileList") is iterable %}
{% for f in v.get("fileList") if f is mapping %}
{% set ns.files = ns.files + [f] %}
{% set ns.flagged = ns.flagged + (1 if f.get("label") in (0, 1) else 0) %}
{% endfor %}
{% endfor %}
{% if r.get("code", 0) not in (0, none) %}
:grey_question: Content review of *{{ what }}* failed: {{ r.get("message") }} \
(code {{ r.get("code") }})
{% elif ns.flagged %}
:rotating_light: Content review flagged *{{ what }}*
{% else %}
:white_check_mark: Content review passed: *{{ what }}*
{% endif %}
{% for f in ns.files %}
• {{ f.get("name", "?") }}: \
{{ {0: "porn", 1: "sexy", 2: "normal"}.get(f.get("label"), "label " ~ f.get("label")) }}\
{% if f.get("rate") is number %} ({{ "%.1f" | format(f.get("rate") * 100) }}%){% endif %}\
{% if f.get("review") %}, needs human review{% endif %}

{% endfor %}
{% else %}
:bell: *{{ type }}*{% if what %} for *{{ what }}*{% endif %}

{% endif %}
"""


# The message text of the markdown chat sinks (DingTalk, Feishu, WeCom, Discord, Teams)
# when a sink sets no `template`, by language: one line saying what happened to which
# object, and for a content review a line per file with its label and rate. Bold is
# `**`, the one mark every one of those platforms renders; values arrive escaped.
_CHAT_TEMPLATE = """\
{% set what = (bucket ~ "/" ~ key) if bucket and key else subject %}
{% set d = data if data is mapping else {} %}
{% set q = d.get("qingstor") if d.get("qingstor") is mapping else {} %}
{% set o = q.get("object") if q.get("object") is mapping else {} %}
{% set size = o.get("size") %}
{% set sized = (W.open ~ (size | filesizeformat(true)) ~ W.close) if size is number else "" %}
{% if type == "create_object" %}
{{ W.create }} **{{ what }}**{{ sized }}
{% elif type == "delete_object" %}
{{ W.delete }} **{{ what }}**
{% elif type == "complete_multipart" %}
{{ W.complete }} **{{ what }}**{{ sized }}
{% elif type == "abort_multipart" %}
{{ W.abort }} **{{ what }}**
{% elif type == "tupu-porn" %}
{% set r = d.get("result") if d.get("result") is mapping else {} %}
{% set ns = namespace(files=[], flagged=0, review=0) %}
{% for task, v in r.items() if v is mapping and v.get("fileList") is iterable %}
{% for f in v.get("fileList") if f is mapping %}
{% set ns.files = ns.files + [f] %}
{% set ns.flagged = ns.flagged + (1 if f.get("label") in (0, 1) else 0) %}
{% set ns.review = ns.review + (1 if f.get("review") else 0) %}
{% endfor %}
{% endfor %}
{% if r.get("code", 0) not in (0, none) %}
{{ W.review_failed }} **{{ what }}**: {{ r.get("message") }} ({{ r.get("code") }})
{% elif ns.flagged %}
{{ W.review_flagged }} **{{ what }}**
{% else %}
{{ W.review_passed }} **{{ what }}**
{% endif %}
{% for f in ns.files %}
- {{ f.get("name", "?") }}: {{ W.labels.get(f.get("label"), "label " ~ f.get("label")) }}\
{% if f.get("rate") is number %} ({{ "%.1f" | format(f.get("rate") * 100) }}%){% endif %}\
{% if f.get("review") %}, **{{ W.needs_review }}**{% endif %}

{% endfor %}
{% else %}
**{{ type }}**{% if what %} {{ what }}{% endif %}

{% endif %}
"""

# The words of _CHAT_TEMPLATE, by language: `W` in the template.
CHAT_WORDS: dict[str, dict[str, Any]] = {
    "en": {
        "create": "New object",
        "delete": "Deleted",
        "complete": "Multipart upload completed:",
        "abort": "Multipart upload aborted:",
        "review_failed": "Content review failed for",
        "review_flagged": "Content review flagged",
        "review_passed": "Content review passed:",
        "needs_review": "needs human review",
        "labels": {0: "porn", 1: "sexy", 2: "normal"},
        "open": " (",
        "close": ")",
    },
    "zh-CN": {
        "create": "新对象",
        "delete": "已删除",
        "complete": "分段上传完成：",
        "abort": "分段上传已取消：",
        "review_failed": "内容审核失败",
        "review_flagged": "内容审核发现违规",
        "review_passed": "内容审核通过：",
        "needs_review": "需要人工复审",
        "labels": {0: "色情", 1: "性感", 2: "正常"},
        "open": "（",
        "close": "）",
    },
}


def compile_template(source: str) -> Template:
    """Compile in the sandbox; raises ValueError with a readable reason."""
    try:
        return _ENV.from_string(source)
    except TemplateError as exc:
        raise ValueError(f"template does not compile: {exc}") from None


def render(template: Template, envelope: dict[str, Any]) -> str:
    return template.render(event=envelope, **envelope)


def check_template(source: str) -> str:
    """Compile and render against the sample events; returns the source unchanged."""
    template = compile_template(source)
    for sample in SAMPLE_ENVELOPES:
        try:
            render(template, sample)
        # Not only TemplateError: `{{ key + 1 }}` raises TypeError, and any exception
        # escaping a validator would be a crash instead of a config error naming the path.
        except Exception as exc:
            raise ValueError(f"template fails on a sample {sample['type']} event: {exc}") from None
    return source


DEFAULT_CHAT_TEMPLATE = compile_template(_CHAT_TEMPLATE)


def render_chat_default(envelope: dict[str, Any], language: str) -> str:
    """The default chat text of `envelope` in `language` (values already escaped)."""
    return DEFAULT_CHAT_TEMPLATE.render(event=envelope, W=CHAT_WORDS[language], **envelope)
