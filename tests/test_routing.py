"""Route conditions, each alone and combined, over real envelopes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.config import QingStorSourceConfig, build_config
from relay.routing import Router
from relay.sources import RequestMeta
from relay.sources.qingstor import QingStorSource
from tests.conftest import notifier_body, sample

META = RequestMeta(headers={}, query={})


def event(key="photos/cat.jpg", kind="create_object", size=2048, notification="mp4-notify"):
    body = notifier_body(key, kind=kind)
    body["events"][0]["qingstor"]["object"]["size"] = size
    body["events"][0]["qingstor"]["notification_id"] = notification
    source = QingStorSource("qingstor", QingStorSourceConfig(kind="qingstor"))
    return source.parse(META, body, datetime.now(UTC))[0]


def routed(when, envelope, tmp_path) -> bool:
    config = build_config(
        {
            "sources": {"qingstor": {"kind": "qingstor"}},
            "sinks": {"a": {"kind": "file", "path": "a"}},
            "routes": [{"when": when, "to": ["a"]}],
        },
        base_dir=tmp_path,
        env={},
    )
    return Router(config.effective_routes).sinks_for(envelope) == ("a",)


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ({}, True),
        ({"event_types": ["create_object"]}, True),
        ({"event_types": ["delete_object"]}, False),
        ({"buckets": ["max-test2"]}, True),
        ({"buckets": ["other"]}, False),
        ({"keys": ["*.jpg"]}, True),
        ({"keys": ["photos/*.png"]}, False),
        ({"sources": ["qingstor"]}, True),
        ({"notification_ids": ["mp4-notify"]}, True),
        ({"notification_ids": ["other"]}, False),
        ({"prefixes": ["photos/", "videos/"]}, True),
        ({"prefixes": ["videos/"]}, False),
        ({"suffixes": [".jpg", ".png"]}, True),
        ({"suffixes": [".mp4"]}, False),
        ({"min_size": 2048}, True),
        ({"min_size": 2049}, False),
        ({"max_size": 2048}, True),
        ({"max_size": 2047}, False),
        ({"min_size": 1000, "max_size": 3000, "prefixes": ["photos/"]}, True),
        ({"not": {"suffixes": [".tmp"]}}, True),
        ({"not": {"suffixes": [".jpg"]}}, False),
        ({"not": {"prefixes": ["tmp/"], "min_size": 1_000_000}}, True),
        ({"not": {"prefixes": ["tmp/"], "max_size": 4096}}, False),  # any one negated holds
        ({"prefixes": ["photos/"], "not": {"event_types": ["delete_object"]}}, True),
    ],
)
def test_each_condition(when, expected, tmp_path):
    assert routed(when, event(), tmp_path) is expected


def test_multipart_spellings_route_alike(tmp_path):
    when = {"event_types": ["complete_multipart"]}
    assert routed(when, event(kind="complete_upload"), tmp_path)
    assert routed({"event_types": ["complete_upload"]}, event(kind="complete_multipart"), tmp_path)


def test_size_conditions_do_not_match_events_without_a_size(tmp_path):
    source = QingStorSource("qingstor", QingStorSourceConfig(kind="qingstor"))
    tupu = source.parse(META, sample("tupu-porn-result.json"), datetime.now(UTC))[0]
    assert not routed({"min_size": 0}, tupu, tmp_path)
    assert routed({"not": {"min_size": 0}}, tupu, tmp_path)
