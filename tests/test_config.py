"""Config loading: YAML, environment, durations, paths, and errors that name their path."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import (
    ConfigError,
    build_config,
    default_config,
    interpolate,
    load_config,
    parse_duration,
)

# What a config file needs to be runnable at all: a source and a sink.
MINIMAL = "sources: {q: {kind: qingstor, token: t}}\nsinks: {a: {kind: file, path: a.jsonl}}\n"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5),
        ("10m", 600),
        ("24h", 86400),
        ("7d", 604800),
        ("1.5s", 1.5),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5", "soon", "5 minutes", "-1s", True, None, -3, [1]])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_interpolation_with_defaults_escapes_and_missing_variables():
    problems: list[str] = []
    data = {
        "a": "${HOST}:${PORT:-8080}",
        "b": ["$${LITERAL}", "${EMPTY:-}"],
        "c": {"d": "${MISSING}"},
        "n": 5,
    }
    out = interpolate(data, {"HOST": "h"}, problems=problems)
    assert out == {"a": "h:8080", "b": ["${LITERAL}", ""], "c": {"d": ""}, "n": 5}
    assert problems == ["c.d: environment variable MISSING is not set"]


def test_environment_supplies_typed_values(tmp_path: Path):
    (tmp_path / "relay.yaml").write_text(
        "server: {port: '${PORT:-9999}', max_body_bytes: '${LIMIT}'}\n" + MINIMAL
    )
    config = load_config(tmp_path / "relay.yaml", env={"LIMIT": "2048"})
    assert (config.server.port, config.server.max_body_bytes) == (9999, 2048)


def test_relative_paths_follow_the_config_file_not_the_working_directory(tmp_path: Path):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "relay.yaml").write_text(
        "store: {path: data/relay.db}\n"
        "sources: {q: {kind: qingstor, token: t}}\n"
        "sinks: {a: {kind: file, path: out/a.jsonl}, b: {kind: file, path: /abs/b.jsonl}}\n"
    )
    config = load_config(folder / "relay.yaml", env={})
    assert config.store.path == folder / "data/relay.db"
    assert config.sinks["a"].path == folder / "out/a.jsonl"  # type: ignore[union-attr]
    assert config.sinks["b"].path == Path("/abs/b.jsonl")  # type: ignore[union-attr]


def test_store_default_path_also_follows_the_config_file(tmp_path: Path):
    config = build_config({}, base_dir=tmp_path, env={})
    assert config.store.path == tmp_path / "relay-data/relay.db"


def test_embedded_default_matches_the_design():
    config = default_config()
    assert list(config.sources) == ["qingstor"]
    assert config.sources["qingstor"].token is None
    assert [s.kind for s in config.sinks.values()] == ["file"]
    assert config.store.backend == "sqlite"
    assert config.store.path == Path.cwd() / "relay-data/relay.db"


def test_absent_routes_send_everything_everywhere_and_empty_routes_nothing(tmp_path):
    sinks = {"a": {"kind": "file", "path": "a"}, "b": {"kind": "file", "path": "b"}}
    implicit = build_config({"sinks": sinks}, base_dir=tmp_path, env={})
    assert [r.to for r in implicit.effective_routes] == [["a", "b"]]
    explicit = build_config({"sinks": sinks, "routes": []}, base_dir=tmp_path, env={})
    assert explicit.effective_routes == []


def problems_of(data, tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build_config(data, base_dir=tmp_path, env={})
    return caught.value.problems


def test_every_problem_is_reported_with_its_path(tmp_path):
    problems = problems_of(
        {
            "server": {"port": 70000},
            "store": {"backend": "mongodb"},
            "sources": {"q": {"kind": "qingstor", "allow_ips": ["not-a-cidr"], "token": ""}},
            "sinks": {
                "h": {"kind": "http", "url": "ftp://x", "retry": {"initial": "5s", "max": "1s"}},
                "f": {"kind": "file", "path": "x", "colour": 1},
            },
            "routes": [{"to": []}],
            "extra": {},
        },
        tmp_path,
    )
    paths = [p.split(":", 1)[0] for p in problems]
    assert paths == [
        "server.port",
        "store.backend",
        "sources.q.allow_ips.0",
        "sources.q.token",
        "sinks.h.retry",
        "sinks.h.url",
        "sinks.f.colour",
        "routes.0.to",
        "extra",
    ], problems


def test_missing_kind_and_bad_names(tmp_path):
    assert problems_of({"sinks": {"a": {"path": "x"}}}, tmp_path) == [
        "sinks.a.kind: missing (expected one of: file, http, slack, dingtalk, feishu, wecom,"
        " discord, teams)"
    ]
    assert problems_of({"sinks": {"a b/c": {"kind": "file", "path": "x"}}}, tmp_path) == [
        "sinks.a b/c: names are 1-64 letters, digits, '_', '.' or '-'"
    ]


def test_event_type_spellings_in_routes_are_normalized(tmp_path):
    config = build_config(
        {
            "sinks": {"a": {"kind": "file", "path": "a"}},
            "routes": [{"when": {"event_types": ["complete_upload", "abort_upload"]}, "to": ["a"]}],
        },
        base_dir=tmp_path,
        env={},
    )
    assert config.effective_routes[0].when.event_types == [  # type: ignore[union-attr]
        "complete_multipart",
        "abort_multipart",
    ]


def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path):
    assert problems_of(["a"], tmp_path) == ["(top level): expected a mapping of sections"]


def test_default_applies_to_an_empty_variable_as_in_the_shell():
    assert interpolate({"x": "${E:-d}", "y": "${E}"}, {"E": ""}) == {"x": "d", "y": ""}


def test_every_configurable_kind_has_an_implementation_and_back():
    from relay.config import SINK_KINDS, SOURCE_KINDS
    from relay.sinks import SINKS, sink_class
    from relay.sources import SOURCES

    assert set(SINKS) == set(SINK_KINDS)
    for kind in SINKS:
        assert callable(sink_class(kind)), kind
    assert set(SOURCES) == set(SOURCE_KINDS)
