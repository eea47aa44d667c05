"""Backing up the store while relay serves: a consistent, self-contained copy."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from relay.config import load_config
from relay.errors import StoreUnavailable
from relay.store.backup import backup_store
from relay.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.conftest import TOKEN, eventually, notifier_body
from tests.processes import run_cli
from tests.test_store_upgrade import store_0_1_0

CONFIG: dict[str, Any] = {
    "store": {"path": "data/relay.db"},
    "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
    "sinks": {"archive": {"kind": "file", "path": "data/events.jsonl"}},
}


def keys_in(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {key for (key,) in db.execute("SELECT json_extract(envelope, '$.key') FROM events")}
    finally:
        db.close()


class Poster:
    """Posts one event per request, back to back from a few clients, and notes when
    each was acknowledged."""

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.acked: dict[str, float] = {}  # key -> when its 200 arrived
        self.failed: list[int] = []
        self.stop = asyncio.Event()

    async def run(self, clients: int = 4) -> None:
        async with ClientSession() as session:
            await asyncio.gather(*(self._client(session, n) for n in range(clients)))

    async def _client(self, session: ClientSession, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            key = f"live/{n}/{i}.jpg"
            async with session.post(self.hook, json=notifier_body(key)) as response:
                await response.read()
                if response.status == 200:
                    self.acked[key] = time.monotonic()
                else:
                    self.failed.append(response.status)
            i += 1


async def test_a_backup_taken_while_relay_ingests_holds_everything_acknowledged_before_it(
    tmp_path, processes
):
    relay = await processes(tmp_path, CONFIG).start()
    poster = Poster(relay.url(f"/hooks/qingstor?token={TOKEN}"))
    posting = asyncio.create_task(poster.run())
    await eventually(lambda: len(poster.acked) >= 50)

    before = set(poster.acked)
    result = await backup_store(load_config(tmp_path / "relay.yaml"), tmp_path / "copy.db")
    finished = time.monotonic()
    # Ingest went on during and after the backup.
    await eventually(lambda: sum(at > finished for at in poster.acked.values()) >= 20)
    poster.stop.set()
    await posting
    assert poster.failed == []

    copy = tmp_path / "copy.db"
    db = sqlite3.connect(copy)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA user_version").fetchall() == [(SCHEMA_VERSION,)]
        assert db.execute("PRAGMA journal_mode").fetchall() == [("delete",)]
    finally:
        db.close()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["copy.db", "data", "relay.yaml", relay.log_path.name]
    )
    assert os.stat(copy).st_mode & 0o777 == 0o600

    held = keys_in(copy)
    assert before <= held
    # Nothing in it but what relay acknowledged; and it is a snapshot, not the live store.
    assert held <= set(poster.acked)
    assert len(held) < len(keys_in(tmp_path / "data/relay.db"))

    assert (result.path, result.bytes) == (copy, copy.stat().st_size)
    assert result.schema_version == SCHEMA_VERSION
    assert result.events == len(held)
    assert result.pending + result.done == len(held)  # one delivery each, to the archive
    assert (result.dead, result.quarantined) == (0, 0)

    # The copy is a store relay opens as it is: this is what a restore puts in place.
    restored = SqliteStore(copy, dedupe_window=60.0)
    await restored.open(exclusive=True, create=False)
    try:
        counts = await restored.counts()
    finally:
        await restored.close()
    assert counts["events"] == result.events
    assert (counts.get("pending", 0), counts.get("done", 0)) == (result.pending, result.done)


async def test_a_backup_never_overwrites_and_needs_a_store(tmp_path):
    config = load_config(_write_config(tmp_path))
    store_0_1_0(tmp_path / "data/relay.db")
    precious = tmp_path / "precious.db"
    precious.write_bytes(b"not to be lost")

    with pytest.raises(FileExistsError):
        await backup_store(config, precious)
    assert precious.read_bytes() == b"not to be lost"
    with pytest.raises(FileNotFoundError):
        await backup_store(config, tmp_path / "no/such/folder/copy.db")

    elsewhere = load_config(_write_config(tmp_path / "empty"))
    with pytest.raises(StoreUnavailable, match="no store at"):
        await backup_store(elsewhere, tmp_path / "copy.db")
    assert not (tmp_path / "empty/data").exists()
    assert sorted(os.listdir(tmp_path)) == ["data", "empty", "precious.db", "relay.yaml"]


async def test_a_store_not_yet_upgraded_is_backed_up_as_it_is(tmp_path):
    """The backup to take before starting a new relay on an old store: it keeps the old
    schema, so the old relay can still use it."""
    config = load_config(_write_config(tmp_path))
    store_0_1_0(tmp_path / "data/relay.db")

    result = await backup_store(config, tmp_path / "before-upgrade.db")

    assert result.schema_version == 0
    assert (result.events, result.pending, result.done, result.dead) == (2, 2, 2, 2)
    assert result.quarantined == 1
    db = sqlite3.connect(tmp_path / "before-upgrade.db")
    try:
        assert db.execute("PRAGMA user_version").fetchall() == [(0,)]
    finally:
        db.close()


async def test_relay_backup_command(tmp_path, processes):
    relay = await processes(tmp_path, CONFIG).start()
    async with ClientSession() as session:
        hook = relay.url(f"/hooks/qingstor?token={TOKEN}")
        async with session.post(hook, json=notifier_body("a.jpg", "b.jpg")) as response:
            assert response.status == 200
    config = str(tmp_path / "relay.yaml")

    made = await asyncio.to_thread(run_cli, "backup", str(tmp_path / "copy.db"), "--config", config)
    assert made.returncode == 0, made.stderr
    assert keys_in(tmp_path / "copy.db") == {"a.jpg", "b.jpg"}

    again = await asyncio.to_thread(
        run_cli, "backup", str(tmp_path / "copy.db"), "--config", config
    )
    assert again.returncode == 1
    assert keys_in(tmp_path / "copy.db") == {"a.jpg", "b.jpg"}


def _write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "relay.yaml"
    path.write_text(
        "store:\n  path: data/relay.db\n"
        "sources:\n  qingstor:\n    kind: qingstor\n    token: t0ken-for-the-tests\n"
        "sinks:\n  archive:\n    kind: file\n    path: data/events.jsonl\n"
    )
    return path
