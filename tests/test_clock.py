"""The wall clock stepping back: retries and open circuits are not held the longer."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from relay.app import RUNTIME, STORE
from relay.clock import WallClock
from tests.conftest import TOKEN, eventually, notifier_body, relay_config

HOOK = f"/hooks/qingstor?token={TOKEN}"


class Clocks:
    """A wall clock the test can step, beside a monotonic one that only runs."""

    def __init__(self) -> None:
        self.wall, self.monotonic = 1_000_000.0, 50.0

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds


def test_only_a_step_back_beyond_the_tolerance_counts():
    clocks = Clocks()
    clock = WallClock(1.0, wall=lambda: clocks.wall, monotonic=lambda: clocks.monotonic)
    clocks.run(10)
    assert clock.stepped_back() == 0.0
    clocks.wall -= 0.5  # slewing, noise
    assert clock.stepped_back() == 0.0
    clocks.wall += 7200  # forward: retries come early, which costs nothing
    assert clock.stepped_back() == 0.0
    clocks.run(3)
    clocks.wall -= 3600
    assert clock.stepped_back() == 3600.0
    assert clock.stepped_back() == 0.0  # seen once


# The store's side of a step back is in the contract suite (tests/test_store_contract.py).


async def test_an_open_circuit_is_not_held_open_by_a_step_back(tmp_path, start_relay, receiver):
    # A circuit opened for a 1 h cool-down looks, to relay, just like one opened for
    # seconds before the wall clock stepped back an hour.
    receiver.statuses = [503]
    sink = {
        "kind": "http",
        "url": receiver.url,
        "retry": {"initial": "10ms", "max": "10ms"},
        "circuit": {"failures": 1, "cooldown": "1h"},
    }
    client = await start_relay(relay_config(tmp_path, sinks={"app": sink}))
    assert (await client.post(HOOK, json=notifier_body("c/1"))).status == 200
    await eventually(lambda: len(receiver.requests) == 1)
    await asyncio.sleep(0.3)
    assert len(receiver.requests) == 1  # held by the open circuit

    clocks = Clocks()
    clock = WallClock(1.0, wall=lambda: clocks.wall, monotonic=lambda: clocks.monotonic)
    clocks.wall -= 3599.5  # the circuit had half a second to go
    with capture_logs() as logs:
        looking = asyncio.create_task(client.app[RUNTIME].every_second(clock, interval=0.05))
        try:
            await eventually(lambda: len(receiver.requests) == 2, within=5)
        finally:
            looking.cancel()
    [step] = [e for e in logs if e["event"] == "clock.stepped_back"]
    assert step["seconds"] == 3599.5
    assert receiver.requests[0]["body"] == receiver.requests[1]["body"]


async def test_a_step_that_cannot_be_applied_yet_is_kept_until_it_can(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    store = client.app[STORE]
    clocks = Clocks()
    clock = WallClock(1.0, wall=lambda: clocks.wall, monotonic=lambda: clocks.monotonic)
    await store._run(lambda: store.db.execute("PRAGMA query_only=ON"))  # writes fail
    with capture_logs() as logs:
        looking = asyncio.create_task(client.app[RUNTIME].every_second(clock, interval=0.05))
        try:
            clocks.wall += 600  # forward: nothing to move
            clocks.run(1)
            await asyncio.sleep(0.2)
            clocks.wall -= 120
            await eventually(lambda: any(e["event"] == "runtime.look_failed" for e in logs))
            await store._run(lambda: store.db.execute("PRAGMA query_only=OFF"))
            await eventually(lambda: any(e["event"] == "clock.stepped_back" for e in logs))
        finally:
            looking.cancel()
    [step] = [e for e in logs if e["event"] == "clock.stepped_back"]
    assert step["seconds"] == 120  # the forward step was never counted against it
    assert sum(e["event"] == "runtime.look_failed" for e in logs) == 1  # once, not a flood
