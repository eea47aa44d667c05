"""A store written by an older relay: migrated when the server opens it, with nothing
lost; refused by the operator commands until then; a newer relay's store refused."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.errors import StoreNeedsUpgrade, StoreTooNew, StoreUnavailable
from relay.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.conftest import FIXTURES, TOKEN, eventually, notifier_body, read_lines
from tests.processes import free_port, post, run_cli

# In the fixture: events old/one.jpg and old/two.jpg, each done at `archive`, pending
# (never attempted) at `app` and dead at `hooks`; one quarantined body.
OLD_EVENTS = {
    "evt_54aacce7989e96076aeb5ccd5e12f68b": "old/one.jpg",
    "evt_a2ff144ae61149d9eb157e8d2f419da9": "old/two.jpg",
}


def store_0_1_0(path: Path) -> Path:
    """A store as relay 0.1.0 left it, in WAL mode as it ran it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        db.executescript((FIXTURES / "store-0.1.0.sql").read_text())
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    return path


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def dump(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def schema(path: Path) -> set[tuple[str, str, str, str]]:
    db = sqlite3.connect(path)
    try:
        return set(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        db.close()


def config(receiver_url: str) -> dict[str, Any]:
    return {
        "store": {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {
            "archive": {"kind": "file", "path": "data/events.jsonl"},
            "app": {"kind": "http", "url": receiver_url},
            "hooks": {
                "kind": "http",
                "url": f"http://127.0.0.1:{free_port()}/events",
                "retry": {"max_attempts": 1},
            },
        },
    }


async def cli(*args: str):
    return await asyncio.to_thread(run_cli, *args)


async def test_relay_serve_upgrades_a_0_1_0_store_and_keeps_its_work(tmp_path, processes, receiver):
    path = store_0_1_0(tmp_path / "data/relay.db")
    assert user_version(path) == 0

    relay = await processes(tmp_path, config(receiver.url)).start()

    [migrated] = [e for e in relay.logs() if e["event"] == "store.migrated"]
    assert (migrated["from_version"], migrated["to_version"]) == (0, SCHEMA_VERSION)
    assert user_version(path) == SCHEMA_VERSION
    # QingStor retrying an event the old relay acknowledged: still a duplicate.
    hook = relay.url(f"/hooks/qingstor?token={TOKEN}")
    assert await post(hook, notifier_body("old/one.jpg")) == (200, {"accepted": 0, "duplicates": 1})
    # The delivery the old relay left pending is made, once each.
    await eventually(lambda: len(receiver.requests) == 2)
    assert {body["id"]: body["key"] for body in receiver.bodies()} == OLD_EVENTS
    # ... and what it had finished is not made again.
    assert read_lines(tmp_path / "data/events.jsonl") == []

    config_file = str(tmp_path / "relay.yaml")
    listed = await cli("dlq", "list", "--json", "--config", config_file)
    assert listed.returncode == 0, listed.stderr
    dead = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {(d["event_id"], d["sink"], d["key"]) for d in dead} == {
        (event_id, "hooks", key) for event_id, key in OLD_EVENTS.items()
    }
    kept = await cli("dlq", "list", "--quarantine", "--json", "--config", config_file)
    assert [json.loads(line)["error"] for line in kept.stdout.splitlines()] == ["invalid_event"]
    await asyncio.sleep(0.2)
    assert len(receiver.requests) == 2


async def test_a_migrated_store_has_the_schema_a_new_store_gets(tmp_path):
    """Whoever changes SCHEMA without a migration (or the reverse) is told here."""
    old = store_0_1_0(tmp_path / "old.db")
    for path in (old, tmp_path / "new.db"):
        store = SqliteStore(path, dedupe_window=60.0)
        await store.open(exclusive=True)
        await store.close()
    assert user_version(old) == user_version(tmp_path / "new.db") == SCHEMA_VERSION
    assert schema(old) == schema(tmp_path / "new.db")


async def test_a_new_store_is_made_at_the_current_version_with_temp_files_in_memory(tmp_path):
    store = SqliteStore(tmp_path / "fresh/relay.db", dedupe_window=60.0)
    await store.open()
    try:
        assert user_version(store.path) == SCHEMA_VERSION
        # 2 is MEMORY: on both connections, the writer's and the dispatcher's reader's.
        assert await store._run(lambda: store.db.execute("PRAGMA temp_store").fetchall()) == [(2,)]
        assert await store._read(lambda db: db.execute("PRAGMA temp_store").fetchall()) == [(2,)]
    finally:
        await store.close()
    # Opened again, it is current: nothing to migrate, by any process.
    again = SqliteStore(store.path, dedupe_window=60.0)
    await again.open(create=False)
    await again.close()


async def test_only_the_server_migrates_the_operator_commands_refuse_an_old_store(tmp_path):
    path = store_0_1_0(tmp_path / "data/relay.db")
    before = dump(path)

    store = SqliteStore(path, dedupe_window=60.0)
    with pytest.raises(StoreNeedsUpgrade, match="start `relay serve` on it once"):
        await store.open(create=False)
    await store.close()
    assert user_version(path) == 0
    assert dump(path) == before

    (tmp_path / "relay.yaml").write_text("store:\n  path: data/relay.db\n")
    listed = await cli("dlq", "list", "--config", str(tmp_path / "relay.yaml"))
    assert listed.returncode == 1
    assert "relay serve" in listed.stderr
    assert user_version(path) == 0


async def test_a_store_from_a_newer_relay_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "relay.db"
    store = SqliteStore(path, dedupe_window=60.0)
    await store.open()
    await store.close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 6}")
    db.close()
    before = dump(path)

    for exclusive in (True, False, True):  # the failed open let go of the lock
        store = SqliteStore(path, dedupe_window=60.0)
        with pytest.raises(StoreTooNew) as refused:
            await store.open(exclusive=exclusive, create=False)
        await store.close()
        message = str(refused.value)
        assert f"schema version {SCHEMA_VERSION + 6}" in message
        assert f"knows up to {SCHEMA_VERSION}" in message
        assert "newer relay" in message
        assert str(path) in message
    assert user_version(path) == SCHEMA_VERSION + 6
    assert dump(path) == before


def test_relay_serve_exits_1_on_a_store_from_a_newer_relay(tmp_path):
    (tmp_path / "data").mkdir()
    db = sqlite3.connect(tmp_path / "data/relay.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.execute("CREATE TABLE future (x)")
    db.close()
    unused = f"http://127.0.0.1:{free_port()}/events"
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(config(unused)))

    result = run_cli(
        "serve",
        *("--host", "127.0.0.1", "--port", "0"),
        *("--config", str(tmp_path / "relay.yaml")),
        cwd=tmp_path,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    failed = [line for line in lines if line.get("event") == "relay.failed"]
    assert failed, result.stdout + result.stderr
    assert "newer relay" in json.dumps(failed[0])
    assert user_version(tmp_path / "data/relay.db") == SCHEMA_VERSION + 1


@pytest.mark.parametrize(
    "damage",
    ["ALTER TABLE deliveries DROP COLUMN last_error", "ALTER TABLE events DROP COLUMN source"],
)
async def test_a_store_that_is_not_as_0_1_0_left_it_is_not_stamped(tmp_path, damage):
    path = store_0_1_0(tmp_path / "relay.db")
    db = sqlite3.connect(path)
    db.execute(damage)
    db.close()
    before = dump(path)

    store = SqliteStore(path, dedupe_window=60.0)
    with pytest.raises(StoreUnavailable, match="from schema version 0 to 1") as refused:
        await store.open(exclusive=True)
    await store.close()
    assert not isinstance(refused.value, StoreNeedsUpgrade | StoreTooNew)
    assert "lacks column" in str(refused.value)
    # The migration's transaction was rolled back: still version 0, unchanged.
    assert user_version(path) == 0
    assert dump(path) == before


async def test_a_0_1_0_store_cut_short_while_being_created_is_completed(tmp_path):
    # relay 0.1.0 created its tables one statement at a time: a crash could leave the
    # later ones missing. Its next start would have made them; the migration does too.
    path = store_0_1_0(tmp_path / "relay.db")
    db = sqlite3.connect(path)
    db.execute("DROP TABLE sink_state")
    db.execute("DROP TABLE quarantine")
    db.close()

    store = SqliteStore(path, dedupe_window=60.0)
    await store.open(exclusive=True)
    try:
        assert (await store.counts())["events"] == 2
        assert await store.quarantined() == []
    finally:
        await store.close()
    assert user_version(path) == SCHEMA_VERSION


async def test_another_applications_database_is_not_taken_for_a_store(tmp_path):
    path = tmp_path / "notes.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (body TEXT)")
    db.close()

    store = SqliteStore(path, dedupe_window=60.0)
    with pytest.raises(StoreUnavailable, match="no table events: not a relay store"):
        await store.open(exclusive=True)
    await store.close()
    assert schema(path) == {("table", "notes", "notes", "CREATE TABLE notes (body TEXT)")}
    assert user_version(path) == 0
