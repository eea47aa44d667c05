"""Message templates: Jinja2 in a sandbox, strict about undefined names. No I/O.

A template is checked when the config loads, by rendering it against sample events,
so that a typo is a config error at start-up rather than a failed send at 3 a.m.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

_ENV = SandboxedEnvironment(
    undefined=StrictUndefined,
    autoescape=False,  # chat markup, not HTML
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
)

# Envelopes of each QingStor shape, as relay builds them: what a template must handle.
SAMPLE_ENVELOPES: list[dict[str, Any]] = [
    {
        "id": "evt_00000000000000000000000000000000",
        "source": "qingstor",
        "type": "create_object",
        "time": "2021-08-31T06:25:46.000Z",
        "subject": "max-test2/abc/5.mp4",
        "bucket": "max-test2",
        "key": "abc/5.mp4",
        "received_at": "2021-08-31T06:25:46.120Z",
        "data": {
            "event_source": "qingstor",
            "event_version": "1.0",
            "event_type": "create_object",
            "event_time": "2021-08-31T06:25:46.000Z",
            "zone_id": "gamma",
            "user_identify": {"principal_id": "usr-iks7Beds"},
            "response_elements": {"request_id": "45b47b6a30678cb2"},
            "qingstor": {
                "schema_version": "1.0",
                "notification_id": "mp4-notify",
                "bucket": {"name": "max-test2"},
                "object": {
                    "name": "abc/5.mp4",
                    "etag": "10c918b1d01aea85864ee65d9e0c2305",
                    "size": 9840497,
                },
            },
        },
    },
    {
        "id": "evt_ff68592c72d7d4d0a8af2fd2c128b7be",
        "source": "qingstor",
        "type": "tupu-porn",
        "time": "2017-06-28T11:03:17.834Z",
        "subject": "fakebucket/porn.jpeg",
        "bucket": "fakebucket",
        "key": "porn.jpeg",
        "received_at": "2017-06-28T11:03:18.000Z",
        "data": {
            "bucket": "fakebucket",
            "object": "porn.jpeg",
            "result": {
                "code": 0,
                "message": "success",
                "54bcfc6c329af61034f7c2fc": {
                    "fileList": [
                        {
                            "label": 2,
                            "name": "porn.jpeg",
                            "rate": 0.9836746454238892,
                            "review": False,
                        }
                    ]
                },
                "nonce": "0.2297668219538047",
                "reviewCount": 0,
                "statistic": [0, 0, 1],
                "timestamp": 1498647797834.0,
            },
        },
    },
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
