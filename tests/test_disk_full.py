"""A store on a disk that fills up or goes read-only: relay starts anyway, answers 503,
waits, and becomes ready by itself; a disk that fills while settling costs no repeated
send. The store sits on a small tmpfs each test mounts (root, as under .ci/run; the tests
skip with the reason elsewhere, and fail under CI)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession
from structlog.testing import capture_logs

from relay.app import STORE
from tests.conftest import TOKEN, eventually, notifier_body, read_lines, relay_config

HOOK = f"/hooks/qingstor?token={TOKEN}"


class Disk:
    """A tmpfs of a few MiB: filled with one file, freed by deleting it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            chunk = b"\0" * 65536
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        return
                    chunk = chunk[: len(chunk) // 2]
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self, on: bool) -> None:
        options = "remount,ro" if on else "remount,rw"
        subprocess.run(["mount", "-o", options, str(self.root)], check=True)

    @property
    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize


def _cannot_mount(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run runs as root and must run these tests")
    pytest.skip(f"{reason} (these tests mount a small tmpfs; run them as root)")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    root = tmp_path / "disk"
    root.mkdir()
    if os.geteuid() != 0:
        _cannot_mount("not root: cannot mount a tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        _cannot_mount(f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    try:
        yield Disk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def config_on(disk: Disk, tmp_path: Path) -> dict[str, Any]:
    return {
        # A tmpfs of 8 MiB is "nearly full" by the 100 MiB default.
        "store": {"path": str(disk.root / "data" / "relay.db"), "min_free_bytes": 65536},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": str(tmp_path / "out" / "events.jsonl")}},
    }


async def _get(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(), dict(response.headers)


async def _post(url: str, body: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json(), dict(response.headers)


async def _ready(relay: Any) -> bool:
    status, _, _ = await _get(relay.url("/readyz"))
    return status == 200


@pytest.mark.parametrize("store", ["new", "stopped", "crashed", "new, with workers"])
async def test_a_relay_started_on_a_full_disk_waits_for_room_then_takes_events(
    tmp_path, disk, processes, store
):
    config = config_on(disk, tmp_path)
    if store.endswith("workers"):
        # The workers' counters and config snapshot cannot go beside the store either.
        config["server"] = {"workers": 2}
        store = "new"
    if store != "new":
        first = await processes(tmp_path, config).start()
        # Stopped, SQLite removes its WAL: opening needs room to write one again.
        # Killed, the WAL is left behind, and the store opens without writing.
        first.kill(signal.SIGTERM if store == "stopped" else signal.SIGKILL)
        first.wait()
    disk.fill()
    relay = await processes(tmp_path, config).start()  # it listens: no exit 1, no loop

    status, answer, headers = await _post(relay.url(HOOK), notifier_body("a.jpg"))
    assert (status, answer["error"]) == (503, "store_unavailable")
    assert headers["Retry-After"] == "1"
    status, answer, _ = await _get(relay.url("/readyz"))
    assert (status, answer["error"]) == (503, "not_ready")
    assert "bytes free" in answer["message"] and str(disk.root) in answer["message"]
    if store == "crashed":
        [line] = [e for e in relay.logs() if e["event"] == "store.disk_low"]
        assert "bytes free at" in line["message"] and str(disk.root) in line["message"]
    else:
        # One line, the leader's (workers wait too, quietly).
        [line] = [e for e in relay.logs() if e["event"] == "store.not_writable"]
        assert line["path"] == str(disk.root / "data" / "relay.db")
        assert line["free_bytes"] < 65536 and line["read_only"] is False
    status, _, _ = await _get(relay.url("/healthz"))
    assert status == 200  # alive, only not ready: no restart is called for

    disk.free()
    await eventually(lambda: _ready(relay), within=15)
    if store != "crashed":
        assert [e for e in relay.logs() if e["event"] == "store.writable"]

    async def taken() -> bool:
        # With workers, the one that answered may be ready before the leader is.
        status, _, _ = await _post(relay.url(HOOK), notifier_body("a.jpg"))
        return status == 200

    await eventually(taken, within=15)
    [event] = await eventually(lambda: read_lines(tmp_path / "out" / "events.jsonl"))
    assert event["key"] == "a.jpg"
    # The refused POSTs were each one request line; the error was logged once (a
    # process).
    refused = [e for e in relay.logs() if e["event"] == "ingest.store_unavailable"]
    assert len(refused) == len({e.get("worker") for e in refused})


async def test_a_relay_started_on_a_read_only_volume_waits_for_it_to_be_writable(
    tmp_path, disk, processes
):
    config = config_on(disk, tmp_path)
    first = await processes(tmp_path, config).start()
    first.kill()
    first.wait()
    disk.read_only(True)
    try:
        relay = await processes(tmp_path, config).start()
        status, answer, _ = await _post(relay.url(HOOK), notifier_body("b.jpg"))
        assert (status, answer["error"]) == (503, "store_unavailable")
        status, answer, _ = await _get(relay.url("/readyz"))
        assert status == 503 and "read-only" in answer["message"]
        [line] = [e for e in relay.logs() if e["event"] == "store.not_writable"]
        assert line["read_only"] is True
    finally:
        disk.read_only(False)
    await eventually(lambda: _ready(relay), within=15)
    status, answer, _ = await _post(relay.url(HOOK), notifier_body("b.jpg"))
    assert (status, answer) == (200, {"accepted": 1, "duplicates": 0})
    await eventually(lambda: read_lines(tmp_path / "out" / "events.jsonl"))


async def test_a_disk_that_fills_while_settling_loses_nothing_and_sends_nothing_twice(
    tmp_path, disk, start_relay, receiver
):
    concurrency = 4
    config = relay_config(
        tmp_path,
        store={"path": str(disk.root / "relay.db"), "min_free_bytes": 65536},
        sinks={"app": {"kind": "http", "url": receiver.url, "concurrency": concurrency}},
        routes=[{"to": ["app"]}],
    )
    client = await start_relay(config)
    receiver.hang = True  # every send waits for the test
    keys = [f"k{i:02}" for i in range(40)]
    assert (await client.post(HOOK, json=notifier_body(*keys))).status == 200
    await eventually(lambda: len(receiver.requests) == concurrency)
    with capture_logs() as logs:
        disk.fill()
        receiver.release.set()  # the four in flight are answered 200 now: on a full disk
        await eventually(lambda: [e for e in logs if e["event"] == "dispatch.settle_failed"])
        # While the disk is full their outcomes wait in memory, their claims held: no
        # send goes out again, and no new one starts (nothing could be recorded).
        await asyncio.sleep(2.0)
        assert len(receiver.requests) == concurrency
        status = (await client.get("/readyz")).status
        assert status == 503
        disk.free()

        async def all_done() -> bool:
            return (await client.app[STORE].counts()).get("done") == len(keys)

        await eventually(all_done, within=30)
    assert [e for e in logs if e["event"] == "dispatch.settle_written"]
    ids = [r["headers"]["webhook-id"] for r in receiver.requests]
    assert len(set(ids)) == len(keys)
    assert len(ids) == len(keys)  # at most the sends in flight could repeat; none did
    with contextlib.suppress(Exception):
        receiver.hang = False


async def test_a_reload_while_waiting_starts_the_new_sinks_once_the_store_opens(
    tmp_path, disk, processes
):
    config = config_on(disk, tmp_path)
    disk.fill()
    relay = await processes(tmp_path, config).start()
    config["sinks"]["copy"] = {"kind": "file", "path": str(tmp_path / "out" / "copy.jsonl")}
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(config))
    relay.kill(signal.SIGHUP)
    await eventually(lambda: [e for e in relay.logs() if e["event"] == "config.reloaded"])
    disk.free()
    await eventually(lambda: _ready(relay), within=15)
    status, answer, _ = await _post(relay.url(HOOK), notifier_body("c.jpg"))
    assert (status, answer) == (200, {"accepted": 1, "duplicates": 0})
    for name in ("events", "copy"):
        await eventually(lambda name=name: read_lines(tmp_path / "out" / f"{name}.jsonl"))
    events = [e["event"] for e in relay.logs()]
    # Nothing ran against the store before it opened, and no sink started twice.
    assert "dispatch.store_error" not in events and "dispatch.state_save_failed" not in events
    assert "sink.started" not in events
    relay.kill(signal.SIGTERM)
    assert relay.wait() == 0


async def test_a_second_relay_waiting_on_the_same_full_disk_stops_when_the_first_opens(
    tmp_path, disk, processes
):
    config = config_on(disk, tmp_path)
    disk.fill()
    first = await processes(tmp_path, config).start()
    (tmp_path / "second").mkdir()
    second = await processes(tmp_path / "second", config).start()
    disk.free()
    # One of them takes the store's lock; the other fails as a start would have.
    code = await eventually(
        lambda: next((p.proc.poll() for p in (first, second) if p.proc.poll() is not None), None),
        within=20,
    )
    loser = first if first.proc.poll() is not None else second
    winner = second if loser is first else first
    assert code == 1
    [failed] = [e for e in loser.logs() if e["event"] == "relay.failed"]
    assert "another relay process" in failed["message"]
    await eventually(lambda: _ready(winner), within=15)


async def test_a_store_path_that_cannot_be_a_file_still_fails_the_start(tmp_path, disk, processes):
    # A disk with room, and an error that only looks like a full disk's.
    (disk.root / "data" / "relay.db").mkdir(parents=True)
    relay = processes(tmp_path, config_on(disk, tmp_path))
    with pytest.raises(AssertionError, match="relay exited 1"):
        await relay.start()
    assert not [e for e in relay.logs() if e["event"] == "store.not_writable"]
