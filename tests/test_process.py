"""`relay` as a real process: signals, kill -9, restarts, the command line, its log."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import FIXTURES, SAMPLE_ID, TOKEN, eventually, read_lines, sample
from tests.processes import free_port, post, run_cli


def base_config(http_url: str) -> dict[str, Any]:
    return {
        "store": {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {
            "archive": {"kind": "file", "path": "data/events.jsonl"},
            "app": {
                "kind": "http",
                "url": http_url,
                "timeout": "2s",
                "retry": {"max_attempts": 1000, "initial": "50ms", "max": "200ms"},
            },
        },
    }


async def test_kill_9_keeps_dedupe_and_delivers_what_was_acked_after_restart(
    tmp_path: Path, processes, aiohttp_server
):
    from aiohttp import web

    port = free_port()  # the downstream app is down: nothing listens here yet
    config = base_config(f"http://127.0.0.1:{port}/events")
    hook = f"/hooks/qingstor?token={TOKEN}"

    relay = await processes(tmp_path, config).start()
    assert await post(relay.url(hook), sample()) == (200, {"accepted": 1, "duplicates": 0})
    await eventually(lambda: read_lines(tmp_path / "data/events.jsonl"))
    # Written AND recorded as done: killed between the two, the line would be written
    # again after restart (at least once), which is not what this test is about.
    await eventually(lambda: _archive_done(tmp_path / "relay.yaml", SAMPLE_ID))
    relay.kill(signal.SIGKILL)
    assert relay.wait() == -signal.SIGKILL

    got: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        got.append({"id": request.headers["webhook-id"], "body": await request.json()})
        return web.Response(text="ok")

    downstream = web.Application()
    downstream.router.add_post("/events", record)
    await aiohttp_server(downstream, port=port)

    relay = await processes(tmp_path, config).start()
    # The acknowledged event reaches the app that was down when it was acked.
    await eventually(lambda: got)
    assert got[0]["body"]["key"] == "abc/5.mp4"
    assert got[0]["id"] == got[0]["body"]["id"]
    # QingStor's retry after the crash is still a duplicate.
    assert await post(relay.url(hook), sample()) == (200, {"accepted": 0, "duplicates": 1})
    await asyncio.sleep(0.3)
    assert len(got) == 1
    assert len(read_lines(tmp_path / "data/events.jsonl")) == 1


async def _archive_done(config_path: Path, event_id: str) -> bool:
    """The store's one event (`event_id`) has one archive delivery, and it is done."""
    shown = await asyncio.to_thread(
        run_cli, "event", event_id, "--json", "--config", str(config_path)
    )
    assert shown.returncode == 0, shown.stderr
    deliveries = json.loads(shown.stdout)["deliveries"]
    return [d["state"] for d in deliveries if d["sink"] == "archive"] == ["done"]


async def test_sigterm_drains_and_exits_0(tmp_path, processes, receiver):
    config = base_config(receiver.url)
    config["server"] = {"drain_timeout": "2s"}
    config["sinks"]["app"]["timeout"] = "60s"
    receiver.hang = True  # a send is in flight when SIGTERM arrives
    relay = await processes(tmp_path, config).start()
    await post(relay.url(f"/hooks/qingstor?token={TOKEN}"), sample())
    await eventually(lambda: receiver.requests)
    started = time.monotonic()
    relay.kill(signal.SIGTERM)
    code = await asyncio.to_thread(relay.wait, 10)
    assert code == 0
    assert time.monotonic() - started < 2 + 3  # the drain bound, plus start-up slack
    events = [e["event"] for e in relay.logs()]
    assert events[-1] == "relay.stopped"
    assert "relay.stopping" in events and "dispatch.drain_timeout" in events


async def test_embedded_default_runs_with_no_config_at_all(tmp_path, processes):
    relay = await processes(tmp_path, None).start()
    assert await post(relay.url("/hooks/qingstor"), sample()) == (
        200,
        {"accepted": 1, "duplicates": 0},
    )
    [line] = await eventually(lambda: read_lines(tmp_path / "relay-data" / "events.jsonl"))
    assert line["key"] == "abc/5.mp4"
    assert (tmp_path / "relay-data" / "relay.db").exists()


async def test_log_is_json_with_one_request_line_and_no_secret(tmp_path, processes, receiver):
    secret_header = "Bearer downstream-secret-value"
    config = base_config(receiver.url + "?sig=url-secret-value")
    config["sinks"]["app"]["headers"] = {"Authorization": secret_header}
    receiver.statuses = [500]  # a failed attempt, so delivery.retry is logged too
    relay = await processes(tmp_path, config).start()
    await post(relay.url(f"/hooks/qingstor?token={TOKEN}"), sample())
    await post(relay.url("/hooks/qingstor?token=wrong-token-value"), sample())
    await eventually(lambda: len(receiver.requests) == 2)
    await eventually(lambda: len([e for e in relay.logs() if e["event"] == "request"]) == 2)
    relay.kill(signal.SIGTERM)
    await asyncio.to_thread(relay.wait, 10)

    logs = relay.logs()
    assert all(e["event"] != "<not json>" for e in logs), logs
    requests = [e for e in logs if e["event"] == "request"]
    assert [r["status"] for r in requests] == [200, 401]
    ok = requests[0]
    assert {"request_id", "method", "path", "status", "duration_ms", "source"} <= set(ok)
    assert (ok["accepted"], ok["duplicates"], ok["path"]) == (1, 0, "/hooks/qingstor")
    assert any(e["event"] == "delivery.retry" for e in logs)
    text = relay.log_path.read_text()
    for secret in (TOKEN, "wrong-token-value", "url-secret-value", "downstream-secret-value"):
        assert secret not in text


def test_check_config_accepts_a_good_file_with_a_one_line_summary(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "sources": {"qingstor": {"kind": "qingstor", "token": "${RELAY_TEST_TOKEN}"}},
                "sinks": {"archive": {"kind": "file", "path": "events.jsonl"}},
                "routes": [{"to": ["archive"]}],
            }
        )
    )
    result = run_cli("check-config", str(path), env={"RELAY_TEST_TOKEN": "x"})
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert "OK" in line and "qingstor" in line and "archive" in line


def test_check_config_names_every_bad_path_and_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        """
server: {port: 99999, colour: blue}
dedupe: {window: soon}
sources:
  qingstor: {kind: qingstor, token: "${RELAY_UNSET_TOKEN_VAR}"}
sinks:
  app: {kind: nosuchsink, url: "http://x"}
  archive: {kind: file}
"""
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    problems = result.stderr.splitlines()
    unknown = (
        "sinks.app.kind: unknown kind 'nosuchsink' (expected one of: file, http, slack,"
        " dingtalk, feishu, wecom, discord, teams)"
    )
    assert unknown in problems
    assert "server.colour: unknown key" in problems
    assert "sinks.archive.path: required" in problems
    assert "sources.qingstor.token: environment variable RELAY_UNSET_TOKEN_VAR is not set" in (
        problems
    )
    assert any(p.startswith("server.port:") for p in problems)
    assert any(p.startswith("dedupe.window: expected a duration") for p in problems)


def test_check_config_rejects_routes_to_undefined_sinks(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(
        "sources: {qingstor: {kind: qingstor, token: t}}\n"
        "sinks: {archive: {kind: file, path: e.jsonl}}\n"
        "routes: [{to: [archive, nowhere]}, {when: {sources: [ghost]}, to: [archive]}]\n"
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "routes.0.to: undefined sink 'nowhere' (defined: archive)",
        "routes.1.when.sources: undefined source 'ghost' (defined: qingstor)",
    ]


def test_check_config_on_missing_file_and_bad_yaml(tmp_path):
    missing = run_cli("check-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("sinks: [unclosed\n")
    broken = run_cli("check-config", str(bad))
    assert broken.returncode == 2 and "invalid YAML" in broken.stderr


def test_serve_with_a_bad_config_exits_2_without_starting(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sinks: {a: {kind: nosuchsink}}\n")
    result = run_cli("serve", env={"RELAY_CONFIG": str(path)})
    assert result.returncode == 2
    assert "sinks.a.kind: unknown kind 'nosuchsink'" in result.stderr


def test_usage_error_exits_2():
    assert run_cli("frobnicate").returncode == 2


def test_example_configs_are_valid():
    root = FIXTURES.parent.parent / "config"
    env = {
        "RELAY_QINGSTOR_TOKEN": "t",
        "APP_URL": "http://127.0.0.1:9000/events",
        "APP_SIGNING_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/x",
        "GITHUB_WEBHOOK_SECRET": "g",
    }
    for path in sorted(root.glob("*.yaml")):
        result = run_cli("check-config", str(path), env=env)
        assert result.returncode == 0, (path, result.stderr)
