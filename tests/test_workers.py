"""`server.workers`: a leader and its worker processes, really started, on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession

from relay.errors import QueueFull, StoreUnavailable
from relay.store import AcceptResult, NewEvent
from relay.workers import LeaderLink, serve_worker
from tests.conftest import TOKEN, eventually, notifier_body, read_lines
from tests.processes import RelayProcess, post

HOOK = f"/hooks/qingstor?token={TOKEN}"


def config(**server: Any) -> dict[str, Any]:
    return {
        "server": {"workers": 2, "drain_timeout": "5s", **server},
        "log": {"level": "info"},
        "store": {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": "data/events.jsonl"}},
    }


async def start(processes, tmp_path: Path, **server: Any) -> RelayProcess:
    relay: RelayProcess = await processes(tmp_path, config(**server)).start()
    # The leader says it listens once every worker has told it so; a worker logs that a
    # moment later, and a test that kills one before then would never see its line.
    await _logged(relay, lambda _: _listening(relay) == {1, 2}, within=15)
    return relay


def _workers(relay: RelayProcess) -> dict[int, int]:
    """Worker number -> pid, as last started."""
    return {e["worker"]: e["pid"] for e in relay.logs() if e.get("event") == "worker.started"}


async def _logged(relay: RelayProcess, check: Any, within: float = 30.0) -> Any:
    """Wait until `check(relay's log)` holds; on failure, say what relay logged."""
    try:
        return await eventually(lambda: check(relay.logs()), within=within)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; relay logged: {_seen(relay)}") from None


def _seen(relay: RelayProcess) -> list[tuple[Any, ...]]:
    return [(e.get("event"), e.get("worker"), e.get("returncode")) for e in relay.logs()]


def _listening(relay: RelayProcess) -> set[int]:
    """The worker numbers whose latest start has logged that it listens."""
    listening: set[int] = set()
    for e in relay.logs():
        if e.get("event") == "worker.started":
            listening.discard(e["worker"])
        elif e.get("event") == "worker.listening":
            listening.add(e["worker"])
    return listening


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a dead leader's init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


async def _post_each(relay: RelayProcess, bodies: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    # One connection per request: the kernel spreads connections, not requests.
    return list(await asyncio.gather(*(post(relay.url(HOOK), body) for body in bodies)))


async def test_workers_share_one_port_and_each_event_is_stored_and_delivered_once(
    tmp_path: Path, processes
):
    relay = await start(processes, tmp_path)
    bodies = [notifier_body(f"w/{n}.txt", request_id=f"req-{n}") for n in range(60)]
    answers = await _post_each(relay, bodies)
    assert answers == [(200, {"accepted": 1, "duplicates": 0})] * 60

    # QingStor's retries, to whichever worker they land on, are duplicates.
    again = await _post_each(relay, bodies[:20])
    assert again == [(200, {"accepted": 0, "duplicates": 1})] * 20

    lines = await eventually(
        lambda: (found := read_lines(tmp_path / "data/events.jsonl")) and len(found) >= 60 and found
    )
    await asyncio.sleep(0.3)
    lines = read_lines(tmp_path / "data/events.jsonl")
    assert sorted(line["key"] for line in lines) == sorted(f"w/{n}.txt" for n in range(60))

    # Both workers answered hooks; the leader answered none (it has no HTTP site).
    served = {e.get("worker") for e in relay.logs() if e.get("event") == "request"}
    assert served == {1, 2}
    # Three processes wrote to one stdout, and no line ran into another.
    assert not [e for e in relay.logs() if e["event"] == "<not json>"]

    # Whichever process answers /metrics reports every process's counters.
    async with ClientSession() as session:
        for _ in range(4):
            async with session.get(relay.url("/metrics"), headers={"Connection": "close"}) as r:
                text = await r.text()
            assert 'relay_events_received_total{source="qingstor"} 80.0' in text
            assert 'relay_events_duplicate_total{source="qingstor"} 20.0' in text
            assert 'relay_deliveries_total{outcome="done",sink="archive"} 60.0' in text
            assert 'relay_queue_depth{sink="archive"} 0.0' in text


async def test_sigterm_drains_the_workers_then_the_leader_and_exits_0(tmp_path: Path, processes):
    relay = await start(processes, tmp_path)
    pids = list(_workers(relay).values())
    assert await post(relay.url(HOOK), notifier_body("a.txt")) == (
        200,
        {"accepted": 1, "duplicates": 0},
    )
    await eventually(lambda: read_lines(tmp_path / "data/events.jsonl"))
    relay.kill(signal.SIGTERM)
    assert relay.wait(within=20) == 0
    assert not any(_alive(pid) for pid in pids)
    # The leader's shared metrics folder goes with it.
    assert not list((tmp_path / "data").glob(".relay.db.metrics-*"))
    assert [e["key"] for e in read_lines(tmp_path / "data/events.jsonl")] == ["a.txt"]


async def test_a_worker_that_dies_is_replaced(tmp_path: Path, processes):
    relay = await start(processes, tmp_path)
    first = _workers(relay)[1]
    os.kill(first, signal.SIGKILL)
    # Every wait says what relay logged if it fails: this test failed twice in many runs
    # on a loaded machine, and a bare timeout could not tell which step it was.
    await _logged(relay, lambda logs: any(e.get("event") == "worker.exited" for e in logs))
    replaced = await _logged(
        relay, lambda _: (pid := _workers(relay)[1]) != first and pid, within=15
    )
    # Generous: on a loaded machine a new Python process takes a while to import.
    await _logged(relay, lambda _: _listening(relay) == {1, 2})
    assert _alive(replaced), f"the new worker is gone; relay logged: {_seen(relay)}"
    answers = await _post_each(relay, [notifier_body(f"r/{n}") for n in range(10)])
    assert {status for status, _ in answers} == {200}, f"{answers}; relay logged: {_seen(relay)}"


async def test_a_replaced_worker_runs_the_leaders_config_not_an_unreloaded_edit(
    tmp_path: Path, processes
):
    relay = await start(processes, tmp_path)
    edited = config()
    edited["sources"]["qingstor"]["token"] = "not-yet-reloaded"
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(edited))  # no SIGHUP
    first = _workers(relay)[1]
    os.kill(first, signal.SIGKILL)
    await _logged(relay, lambda _: _workers(relay)[1] != first, within=15)
    await _logged(relay, lambda _: _listening(relay) == {1, 2})
    # Many connections, so both workers answer: all of them still run the leader's config.
    answers = await _post_each(relay, [notifier_body(f"e/{n}") for n in range(20)])
    assert {status for status, _ in answers} == {200}, f"{answers}; relay logged: {_seen(relay)}"
    new_hook = "/hooks/qingstor?token=not-yet-reloaded"
    refused = await asyncio.gather(
        *(post(relay.url(new_hook), notifier_body(f"n/{n}")) for n in range(20))
    )
    assert {status for status, _ in refused} == {401}


async def test_workers_do_not_outlive_a_killed_leader(tmp_path: Path, processes):
    relay = await start(processes, tmp_path)
    pids = list(_workers(relay).values())
    relay.kill(signal.SIGKILL)
    relay.wait()
    await eventually(lambda: not any(_alive(pid) for pid in pids), within=15)


async def test_sighup_reloads_the_leader_and_then_every_worker(tmp_path: Path, processes):
    relay = await start(processes, tmp_path)
    changed = config()
    changed["sources"]["qingstor"]["token"] = "a-new-token"
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(changed))
    relay.kill(signal.SIGHUP)

    def reloaded() -> set[Any]:
        return {e.get("worker") for e in relay.logs() if e.get("event") == "config.reloaded"}

    await eventually(lambda: reloaded() == {None, 1, 2}, within=15)
    new_hook = "/hooks/qingstor?token=a-new-token"
    bodies = [notifier_body(f"h/{n}") for n in range(20)]
    answers = await asyncio.gather(*(post(relay.url(new_hook), b) for b in bodies))
    assert {status for status, _ in answers} == {200}
    old = await asyncio.gather(*(post(relay.url(HOOK), b) for b in bodies[:10]))
    assert {status for status, _ in old} == {401}


# --- the link between a worker and its leader, over a real socket pair --------------------


async def _worker_link() -> tuple[LeaderLink, socket.socket, asyncio.Event]:
    """A worker's link, opened; the leader's end of the pair; the link's lost flag."""
    ours, theirs = socket.socketpair()
    lost = asyncio.Event()
    link = LeaderLink(theirs.detach(), on_lost=lost.set)
    await link.open()
    return link, ours, lost


async def test_the_link_carries_events_answers_and_refusals():
    seen: list[list[NewEvent]] = []

    async def accept(events):
        seen.append(list(events))
        if events[0].id == "evt_broken":
            raise StoreUnavailable("disk I/O error")
        if events[0].id == "evt_backlogged":
            raise QueueFull("the queue of sink app (3 queued) is full")
        return AcceptResult([e.id for e in events], [])

    link, ours, _ = await _worker_link()
    served = asyncio.create_task(serve_worker(ours, accept, 1, lambda: None))
    event = NewEvent("evt_1", "qingstor", '{"id":"evt_1"}', ("archive", "app"))
    assert await link.accept([event]) == AcceptResult(["evt_1"], [])
    assert seen == [[event]]
    with pytest.raises(StoreUnavailable, match="disk I/O error"):
        await link.accept([NewEvent("evt_broken", "qingstor", "{}", ())])
    # A full sink queue reaches the worker as itself: a 503 queue_full, not a store failure.
    with pytest.raises(QueueFull, match=r"sink app \(3 queued\)"):
        await link.accept([NewEvent("evt_backlogged", "qingstor", "{}", ("app",))])
    await link.close()
    await asyncio.wait_for(served, 5)


@pytest.mark.parametrize(
    "leader_does",
    [
        pytest.param(socket.socket.close, id="goes away before answering"),
        pytest.param(
            lambda ours: ours.sendall(struct.pack("!I", 5) + b"nope!"), id="answers garbage"
        ),
    ],
)
async def test_a_lost_or_garbled_leader_fails_what_the_worker_waits_for_and_stops_it(
    leader_does,
):
    link, ours, lost = await _worker_link()
    waiting = asyncio.create_task(link.accept([NewEvent("evt_1", "q", "{}", ())]))
    await asyncio.sleep(0.1)
    leader_does(ours)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(waiting, 5)
    await asyncio.wait_for(lost.wait(), 5)
    assert not link.up
    with pytest.raises(StoreUnavailable):
        await link.accept([NewEvent("evt_2", "q", "{}", ())])
    await link.close()
    ours.close()
