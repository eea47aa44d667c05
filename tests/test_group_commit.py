"""Group commit: many requests share one transaction, and none is answered before it
is on disk, even when the process dies between a group's writes and its commit."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import ClientError, ClientSession, ClientTimeout

from relay.store import NewEvent
from relay.store.groupcommit import GroupCommit
from relay.store.sqlite import SqliteStore
from tests.conftest import TOKEN, notifier_body


class CountingStore(SqliteStore):
    """The store, counting its acknowledging commits at the seam tests compose faults at."""

    commits = 0

    def _before_acknowledging_commit(self) -> None:
        self.commits += 1


async def test_concurrent_accepts_share_commits_and_each_gets_its_own_answer(tmp_path: Path):
    store = CountingStore(tmp_path / "r.db", dedupe_window=60)
    await store.open()
    try:

        def event(i: int) -> NewEvent:
            return NewEvent(f"evt_{i}", "q", "{}", ("a",))

        # 200 callers at once, some repeating another's event.
        results = await asyncio.gather(*(store.accept([event(i % 150)]) for i in range(200)))
        assert sum(len(r.accepted) for r in results) == 150
        assert sum(len(r.duplicates) for r in results) == 50
        assert 0 < store.commits < 200  # grouped: fewer commits than callers
        assert await store.counts() == {"events": 150, "pending": 150}
    finally:
        await store.close()


async def test_a_failed_group_commit_answers_every_caller_with_an_error(tmp_path: Path):
    from relay.errors import StoreUnavailable

    store = SqliteStore(tmp_path / "r.db", dedupe_window=60)
    await store.open()
    try:
        await store._run(lambda: store.db.execute("PRAGMA query_only = ON"))
        outcomes = await asyncio.gather(
            *(store.accept([NewEvent(f"e{i}", "q", "{}", ())]) for i in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(o, StoreUnavailable) for o in outcomes)
        await store._run(lambda: store.db.execute("PRAGMA query_only = OFF"))
        assert await store.counts() == {"events": 0}
    finally:
        await store.close()


async def test_a_crash_before_the_commit_acknowledges_nothing_it_held(tmp_path, processes):
    config = {
        "store": {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": "data/events.jsonl"}},
    }
    relay = processes(tmp_path, config)
    # relay with a store composed to die at its 4th ingest commit (tests/crashing_relay.py).
    relay.args[2] = "tests.crashing_relay"
    relay.env["PYTHONPATH"] = str(Path(__file__).parent.parent)
    relay.env["RELAY_TEST_CRASH_AT_COMMIT"] = "4"
    await relay.start()
    url = relay.url(f"/hooks/qingstor?token={TOKEN}")
    acked: list[str] = []
    failed: list[str] = []

    async def send(session: ClientSession, key: str) -> None:
        try:
            async with session.post(url, json=notifier_body(key, request_id=key)) as response:
                if response.status == 200 and (await response.json())["accepted"] == 1:
                    acked.append(key)
                else:
                    failed.append(key)
        except (TimeoutError, ClientError):
            failed.append(key)

    async with ClientSession(timeout=ClientTimeout(total=10)) as session:
        for wave in range(6):  # waves of concurrent requests: several groups
            await asyncio.gather(*(send(session, f"k{wave}-{i}") for i in range(25)))
    assert relay.wait() == 86  # the injected crash, between the writes and the commit
    assert failed, "the crash must have cut some requests off"

    db = sqlite3.connect(tmp_path / "data" / "relay.db")
    try:
        stored = {
            json.loads(envelope)["key"] for (envelope,) in db.execute("SELECT envelope FROM events")
        }
    finally:
        db.close()
    # Every acknowledged event is on disk; what was not committed was not acknowledged.
    assert set(acked) <= stored
    assert len(stored) < 150


async def test_callers_that_give_up_leave_the_others_answered_and_close_waits(tmp_path: Path):
    from relay.errors import StoreUnavailable
    from relay.store import AcceptResult

    store = SqliteStore(tmp_path / "r.db", dedupe_window=60)
    await store.open()
    callers = [
        asyncio.create_task(store.accept([NewEvent(f"e{i}", "q", "{}", ())])) for i in range(600)
    ]
    await asyncio.sleep(0)  # all queued; the writer thread is committing the first group
    for gone in callers[::3]:
        gone.cancel()  # their clients hung up
    answers = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 10)
    kept = [a for i, a in enumerate(answers) if i % 3]
    # Nobody hangs, and one caller giving up costs the others nothing.
    assert all(isinstance(a, AcceptResult) and len(a.accepted) == 1 for a in kept)
    await store.close()
    try:
        await store.accept([NewEvent("late", "q", "{}", ())])
    except StoreUnavailable:
        pass
    else:
        raise AssertionError("a closed store must refuse with StoreUnavailable")


async def test_a_steady_stream_of_commits_lets_the_other_queue_take_its_turn():
    """Ingests and settlements share the store's one writer thread: a stream of one
    must not keep the other waiting until the stream ends."""
    order: list[str] = []
    lock = threading.Lock()

    def commit_as(name: str) -> Callable[[list[int]], list[int]]:
        def commit(items: list[int]) -> list[int]:
            time.sleep(0.002)  # an fsync, roughly
            with lock:
                order.append(name)
            return items

        return commit

    writer = ThreadPoolExecutor(max_workers=1)
    try:
        # Two per group: 400 queued ingests are 200 commits in a row unless the thread
        # lets the other queue in.
        ingests: GroupCommit[int, int] = GroupCommit(
            writer.submit, commit_as("ingest"), limit=2, turns=4
        )
        settles: GroupCommit[int, int] = GroupCommit(writer.submit, commit_as("settle"), turns=4)
        stream = asyncio.gather(*(ingests.submit(i) for i in range(400)))
        await asyncio.sleep(0.01)  # the stream is under way
        assert await asyncio.wait_for(settles.submit(7), 5) == 7
        assert await stream == list(range(400))
    finally:
        writer.shutdown(wait=True)
    assert order.index("settle") < 20, "the settlement had its turn after a few groups"


async def test_a_commit_that_answers_for_fewer_items_fails_every_caller():
    from relay.errors import StoreUnavailable

    writer = ThreadPoolExecutor(max_workers=1)
    try:
        broken: GroupCommit[int, int] = GroupCommit(writer.submit, lambda items: items[:-1])
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(broken.submit(i) for i in range(5)), return_exceptions=True), 5
        )
    finally:
        writer.shutdown(wait=True)
    assert all(isinstance(o, StoreUnavailable) for o in outcomes)
