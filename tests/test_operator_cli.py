"""The operator's commands as an operator types them: `check-config` in relay's own
words, `status` and `dlq` in a shell without the service's secrets, mistakes said
plainly, and output piped into `head`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import TOKEN, eventually, notifier_body, read_lines
from tests.processes import post, run_cli

LIBRARY_WORDS = ("Input should", "valid dictionary", "instance of", "pydantic", "Field required")


def check(path: Path, *more: str, env: dict[str, str] | None = None):
    return run_cli("check-config", str(path), *more, env=env)


def test_every_problem_comes_in_one_round_in_relays_words(tmp_path):
    path = tmp_path / "relay.yaml"
    path.write_text(
        """
server: {hots: 0.0.0.0, port: http}
sources:
  qingstor: {kind: qingstor, toekn: abc}
  office: {kind: generic, token: 0123}
sinks:
  archive: {kind: file, pth: e.jsonl}
  app: {kind: http, url: "http://127.0.0.1:9/x", concurrency: 2.5, retry: {max_atempts: 3}}
routes:
  - {to: [archve, app]}
  - {when: {sources: [qingstr]}, to: [nowhere]}
"""
    )
    result = check(path)
    assert result.returncode == 2
    problems = result.stderr.splitlines()
    assert problems == [
        "server.port: expected a whole number, got text",
        "server.hots: unknown key (did you mean 'host'?)",
        "sources.qingstor.toekn: unknown key (did you mean 'token'?)",
        "sources.office.token: expected text, got a number: YAML read the value as a number"
        ' or true/false; put it in quotes (key: "...") to keep it exactly as written',
        "sinks.archive.path: required",
        "sinks.archive.pth: unknown key (did you mean 'path'?)",
        "sinks.app.retry.max_atempts: unknown key (did you mean 'max_attempts'?)",
        "sinks.app.concurrency: expected a whole number, got a fraction",
        "routes.0.to: undefined sink 'archve' (did you mean 'archive'?)",
        "routes.1.to: undefined sink 'nowhere' (defined: archive, app)",
        "routes.1.when.sources: undefined source 'qingstr' (did you mean 'qingstor'?)",
    ]
    assert not any(word in result.stderr for word in LIBRARY_WORDS)
    # YAML turned 0123 into 83; neither spelling of the would-be secret is printed.
    assert "0123" not in result.stderr and "83" not in result.stderr


def test_a_config_that_can_do_nothing_is_refused(tmp_path):
    cases = {
        "": ["(top level): the config is empty"],
        "# only comments\n": ["(top level): the config is empty"],
        "sinks: {a: {kind: file, path: a}}\n": ["sources: no source is defined"],
        "sources: {q: {kind: qingstor, token: t}}\n": ["sinks: no sink is defined"],
        "sources:\nsinks:\n": ["sources: no source", "sinks: no sink"],
        (
            "sources: {q: {kind: qingstor, token: t}}\n"
            "sinks: {a: {kind: file, path: a}}\nroutes: []\n"
        ): ["routes: the list is empty, so no event would reach any sink"],
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        result = check(path)
        assert result.returncode == 2, text
        lines = result.stderr.splitlines()
        assert len(lines) == len(expected), (text, lines)
        for line, start in zip(lines, expected, strict=True):
            assert line.startswith(start), (text, line)
        served = run_cli("serve", "--config", str(path))  # the same judgement at start
        assert served.returncode == 2 and served.stderr == result.stderr


def test_check_config_finds_its_file_like_the_other_commands(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("sources: {q: {kind: qingstor, token: t}}\nsinks: {a: {kind: file, path: a}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: {}\n")
    by_flag = run_cli("check-config", "--config", str(good))
    assert by_flag.returncode == 0 and by_flag.stdout.startswith(f"{good}: OK")
    by_env = run_cli("check-config", env={"RELAY_CONFIG": str(bad)})
    assert by_env.returncode == 2 and "no source is defined" in by_env.stderr
    # The file named on the command line wins over the environment.
    both = run_cli("check-config", str(good), env={"RELAY_CONFIG": str(bad)})
    assert both.returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    embedded = subprocess.run(
        [sys.executable, "-m", "relay", "check-config"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr
    assert embedded.stdout.startswith("embedded default: OK: 1 source(s) (qingstor)")
    assert embedded.stderr == ""  # loopback: a trial, not a warning


# --- status and dlq need only the store --------------------------------------------------


SECRET_ENV = {
    "RELAY_TEST_QINGSTOR_TOKEN": TOKEN,
    "RELAY_TEST_APP_TOKEN": "app-bearer-secret-value",
    "RELAY_TEST_SLACK_URL": "http://127.0.0.1:9/services/T000/B000/secretsecret",
}


async def started_with_secrets(
    tmp_path: Path, processes, app_url: str, store: dict[str, Any] | None = None
):
    config = {
        "store": store or {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": "${RELAY_TEST_QINGSTOR_TOKEN}"}},
        "sinks": {
            "app": {
                "kind": "http",
                "url": app_url,
                "headers": {"Authorization": "Bearer ${RELAY_TEST_APP_TOKEN}"},
                "retry": {"max_attempts": 1},
            },
            "team": {
                "kind": "slack",
                "url": "${RELAY_TEST_SLACK_URL}",
                "retry": {"max_attempts": 1},
            },
        },
        "routes": [{"to": ["app"]}, {"when": {"buckets": ["nowhere"]}, "to": ["team"]}],
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    relay = processes(tmp_path, None)
    relay.args += ["--config", str(path)]
    relay.env = dict(SECRET_ENV)
    await relay.start()
    return relay, path


async def cli(*args: str):
    return await asyncio.to_thread(run_cli, *args)


async def test_status_and_dlq_work_without_the_services_secrets(
    tmp_path, processes, receiver, store_section
):
    receiver.statuses = [400, 400]  # each delivery dead at its first answer
    relay, path = await started_with_secrets(tmp_path, processes, receiver.url, store_section)
    hook = relay.url(f"/hooks/qingstor?token={TOKEN}")
    assert (await post(hook, notifier_body("one.jpg", "two.jpg")))[0] == 200
    assert not any(name in os.environ for name in SECRET_ENV)  # this shell has none

    async def dead():
        listed = await cli("dlq", "list", "--json", "--config", str(path))
        assert listed.returncode == 0, listed.stderr
        return [json.loads(line) for line in listed.stdout.splitlines()] or None

    rows = await eventually(dead)
    assert {r["key"] for r in rows} == {"one.jpg", "two.jpg"}
    status = await cli("status", "--json", "--config", str(path))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["sinks"]["app"]["dead"] == 2
    assert set(report["sinks"]) == {"app", "team"}
    assert report["sources"]["qingstor"]["received_1h"] == 2

    replayed = await cli("dlq", "replay", rows[0]["event_id"], "--config", str(path))
    assert replayed.returncode == 0, replayed.stderr
    for result in (status, replayed):
        assert not any(secret in result.stdout + result.stderr for secret in SECRET_ENV.values())

    # The store section itself still needs its own variables, and says so.
    odd = tmp_path / "odd.yaml"
    odd.write_text("store: {path: '${RELAY_TEST_STORE_PATH}'}\nsinks: {a: {url: '${NOPE}'}}\n")
    missing = await cli("status", "--config", str(odd))
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [
        "store.path: environment variable RELAY_TEST_STORE_PATH is not set"
    ]


async def test_replay_and_purge_say_what_they_could_not_find(tmp_path, processes, receiver):
    receiver.statuses = [400, 400, 400]
    relay, path = await started_with_secrets(tmp_path, processes, receiver.url)
    hook = relay.url(f"/hooks/qingstor?token={TOKEN}")
    assert (await post(hook, notifier_body("a", "b", "c")))[0] == 200

    async def dead_ids():
        listed = await cli("dlq", "list", "--json", "--config", str(path))
        ids = [json.loads(line)["event_id"] for line in listed.stdout.splitlines()]
        return ids if len(ids) == 3 else None

    ids = await eventually(dead_ids)
    config = ("--config", str(path))

    unknown_sink = await cli("dlq", "replay", "--sink", "ap", *config)
    assert unknown_sink.returncode == 1
    assert unknown_sink.stderr.strip() == "relay dlq: unknown sink 'ap' (known: app, team)"
    assert "replayed" not in unknown_sink.stdout
    # A configured sink with nothing dead is no mistake: nothing to do.
    quiet = await cli("dlq", "replay", "--sink", "team", *config)
    assert quiet.returncode == 0 and "replayed 0" in quiet.stdout

    typo = "evt_00000000000000000000000000000000"
    mixed = await cli("dlq", "purge", ids[0], typo, *config)
    assert mixed.returncode == 1
    assert "purged 1 dead letter(s)" in mixed.stdout
    assert mixed.stderr.strip() == f"relay dlq: no dead letter for event {typo}"
    again = await cli("dlq", "replay", ids[0], *config)  # purged already: not there
    assert again.returncode == 1 and f"no dead letter for event {ids[0]}" in again.stderr

    remaining = await cli("dlq", "list", "--json", *config)
    assert {json.loads(line)["event_id"] for line in remaining.stdout.splitlines()} == set(ids[1:])


async def test_output_piped_into_head_ends_quietly(tmp_path, processes, receiver):
    receiver.statuses = [400]
    config = {
        "store": {"path": "data/relay.db"},
        "server": {"max_body_bytes": 2_000_000},
        "sources": {"images": {"kind": "qingstor", "token": TOKEN, "cloudfunc": "image"}},
        "sinks": {"app": {"kind": "http", "url": receiver.url, "retry": {"max_attempts": 1}}},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    relay = processes(tmp_path, None)
    relay.args += ["--config", str(path)]
    await relay.start()
    # A dead letter far larger than a pipe's buffer: `head` leaves while relay writes.
    body = {"bucket": "b", "object": "k", "labels": ["x" * 100] * 5000}
    assert (await post(relay.url(f"/hooks/images?token={TOKEN}"), body))[0] == 200

    async def dead_id():
        listed = await cli("dlq", "list", "--json", "--config", str(path))
        return listed.stdout and json.loads(listed.stdout.splitlines()[0])["event_id"]

    event_id = await eventually(dead_id)
    shell = (
        f"{sys.executable} -m relay dlq show {event_id} --config {path} | head -n 3;"
        ' echo "status=${PIPESTATUS[0]}"'
    )
    piped = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", shell], capture_output=True, text=True, timeout=60
    )
    assert piped.stdout.splitlines()[:3] == [
        "{",
        f'  "event_id": "{event_id}",',
        '  "sink": "app",',
    ]
    assert "status=0" in piped.stdout
    assert piped.stderr == ""  # no BrokenPipeError, no "Exception ignored"


def test_shell_habits_that_would_keep_a_variable_as_text_are_errors(tmp_path):
    path = tmp_path / "relay.yaml"
    path.write_text(
        "sources:\n"
        "  qingstor: {kind: qingstor, token: $RELAY_QINGSTOR_TOKEN}\n"
        "  other: {kind: qingstor, token: '${RELAY_OTHER_TOKEN'}\n"
        "  dated: {kind: qingstor, token: 2026-12-01}\n"
        "sinks:\n"
        "  archive: {kind: file, path: 'cost$$5.jsonl'}\n"
        "  app: {kind: http, url: 'https://u:p@example.com:99999/x'}\n"
    )
    result = check(path, env={"RELAY_QINGSTOR_TOKEN": "real-token-value"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "sources.qingstor.token: $RELAY_QINGSTOR_TOKEN is not expanded: write"
        " ${RELAY_QINGSTOR_TOKEN} for the variable (or $$RELAY_QINGSTOR_TOKEN for a literal $)",
        "sources.other.token: a ${ without its closing } or with an invalid name: write"
        " ${VAR} or ${VAR:-default} (or $$ for a literal $)",
        "sources.dated.token: expected text, got a date: YAML read the value as a date;"
        ' put it in quotes (key: "...") to keep it as text',
        "sinks.app.url: url is not a valid http(s) URL (check its host and port)",
    ]
    assert "real-token-value" not in result.stderr and "u:p@" not in result.stderr


def test_file_and_a_different_config_flag_are_a_usage_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for path in (a, b):
        path.write_text(
            "sources: {q: {kind: qingstor, token: t}}\nsinks: {a: {kind: file, path: a}}\n"
        )
    result = run_cli("check-config", str(a), "--config", str(b))
    assert result.returncode == 2
    assert result.stderr.strip() == "relay check-config: give FILE or --config FILE, not both"
    assert run_cli("check-config", str(a), "--config", str(a)).returncode == 0


async def test_relay_event_shows_what_became_of_an_event_at_each_sink(
    tmp_path, processes, receiver, store_section
):
    receiver.statuses = [(503, {"Retry-After": "3600"})]  # the app asks to be left alone
    config = {
        "store": store_section,
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {
            "archive": {"kind": "file", "path": "data/events.jsonl"},
            "app": {"kind": "http", "url": receiver.url},
            "team": {"kind": "http", "url": receiver.url},
        },
        "routes": [{"to": ["archive", "app"]}, {"when": {"buckets": ["none"]}, "to": ["team"]}],
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    relay = processes(tmp_path, None)
    relay.args += ["--config", str(path)]
    await relay.start()
    hook = relay.url(f"/hooks/qingstor?token={TOKEN}")
    assert (await post(hook, notifier_body("photos/cat.jpg")))[0] == 200
    await eventually(lambda: receiver.requests)
    [line] = await eventually(lambda: read_lines(tmp_path / "data/events.jsonl"))
    event_id = line["id"]

    async def settled():
        shown = await cli("event", event_id, "--json", "--config", str(path))
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        states = {d["sink"]: d["state"] for d in data["deliveries"]}
        app = next(d for d in data["deliveries"] if d["sink"] == "app")
        return data if states.get("archive") == "done" and app["attempts"] == 1 else None

    data = await eventually(settled)
    assert data["envelope"]["key"] == "photos/cat.jpg" and data["source"] == "qingstor"
    app = next(d for d in data["deliveries"] if d["sink"] == "app")
    assert (app["state"], app["last_status"]) == ("pending", 503)
    assert 3500 < app["due_in_s"] <= 3600
    assert data["no_record_for"] == ["team"]

    table = await cli("event", event_id, "--config", str(path))
    assert table.returncode == 0
    text = table.stdout
    assert f"event {event_id}: create_object" in text and "photos/cat.jpg" in text
    assert re.search(r"app\s+pending\s+1\s+503\s+HTTP 503", text)
    assert re.search(r"archive\s+done\s+1", text)
    assert "not routed to team" in text  # received just now: nothing was pruned yet

    missing = await cli("event", "evt_" + "0" * 32, "--config", str(path))
    assert missing.returncode == 1
    assert missing.stderr.startswith("relay event: no event evt_")
