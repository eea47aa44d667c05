"""`relay dlq` against a store that a running `relay serve` is using."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import TOKEN, eventually, notifier_body
from tests.processes import post, run_cli


def write_config(tmp_path: Path, url: str, store: dict[str, Any] | None = None) -> Path:
    config = {
        "store": store or {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {
            "app": {"kind": "http", "url": url, "retry": {"max_attempts": 2, "initial": "10ms"}},
            "archive": {"kind": "file", "path": "data/events.jsonl"},
        },
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def cli(*args: str):
    return await asyncio.to_thread(run_cli, *args)


async def test_list_show_replay_and_purge_while_the_server_runs(
    tmp_path, processes, receiver, store_section
):
    receiver.statuses = [400, 400, 400]  # permanent: each delivery dead at its first answer
    path = write_config(tmp_path, receiver.url, store_section)
    relay = processes(tmp_path, None)
    relay.args += ["--config", str(path)]
    await relay.start()
    hook = relay.url(f"/hooks/qingstor?token={TOKEN}")
    keys = ["a/one.jpg", "a/two.jpg", "a/three.jpg"]
    assert await post(hook, notifier_body(*keys)) == (200, {"accepted": 3, "duplicates": 0})
    await eventually(lambda: len(receiver.requests) == 3)

    async def dead_rows():
        listed = await cli("dlq", "list", "--json", "--config", str(path))
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        return rows if len(rows) == 3 else None

    rows = await eventually(dead_rows)
    assert {r["key"] for r in rows} == set(keys)
    assert {(r["sink"], r["attempts"], r["last_status"]) for r in rows} == {("app", 1, 400)}

    table = await cli("dlq", "list", "--sink", "app", "--config", str(path))
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "EVENT",
        "ID",
        "SINK",
        "ATTEMPTS",
        "LAST",
        "ERROR",
        "DEAD",
        "SINCE",
        "OBJECT",
        "KEY",
    ]
    assert len(lines) == 4 and all("HTTP 400" in line for line in lines[1:])
    assert (
        "no dead letters"
        in (await cli("dlq", "list", "--sink", "archive", "--config", str(path))).stdout
    )

    first = rows[0]["event_id"]
    shown = await cli("dlq", "show", first, "--config", str(path))
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["envelope"]["id"] == first
    assert (await cli("dlq", "show", "evt_nope", "--config", str(path))).returncode == 1

    # The receiver is fixed; one replay by id, the rest by sink: delivered, no restart.
    replayed = await cli("dlq", "replay", first, "--config", str(path))
    assert replayed.returncode == 0 and "replayed 1" in replayed.stdout
    await eventually(lambda: len(receiver.requests) == 4)
    assert json.loads(receiver.requests[3]["body"])["id"] == first

    assert (await cli("dlq", "replay", "--config", str(path))).returncode == 2  # no selection
    replayed = await cli("dlq", "replay", "--sink", "app", "--config", str(path))
    assert "replayed 2" in replayed.stdout
    await eventually(lambda: len(receiver.requests) == 6)
    assert "no dead letters" in (await cli("dlq", "list", "--config", str(path))).stdout


async def test_purge_deletes_dead_letters(tmp_path, processes, receiver, store_section):
    receiver.statuses = [404, 404]
    path = write_config(tmp_path, receiver.url, store_section)
    relay = processes(tmp_path, None)
    relay.args += ["--config", str(path)]
    await relay.start()
    await post(relay.url(f"/hooks/qingstor?token={TOKEN}"), notifier_body("x", "y"))

    async def listed():
        out = (await cli("dlq", "list", "--json", "--config", str(path))).stdout
        return len(out.splitlines()) == 2

    await eventually(listed)
    purged = await cli("dlq", "purge", "--all", "--config", str(path))
    assert "purged 2" in purged.stdout
    assert "no dead letters" in (await cli("dlq", "list", "--config", str(path))).stdout
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 2  # purged letters are never sent again


def test_dlq_on_a_mistyped_store_path_fails_instead_of_making_an_empty_store(tmp_path):
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump({"store": {"path": "nowhere/relay.db"}}))
    result = run_cli("dlq", "list", "--config", str(config))
    assert result.returncode == 1
    assert "no store at" in result.stderr
    assert not (tmp_path / "nowhere").exists()
