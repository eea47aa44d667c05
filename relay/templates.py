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
]


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
        except TemplateError as exc:
            raise ValueError(f"template fails on a sample {sample['type']} event: {exc}") from None
    return source
