"""The circuit breaker: the state machine, and a sink whose circuit opens and closes."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.app import STORE
from relay.circuit import CircuitBreaker
from relay.config import CircuitConfig
from tests.conftest import TOKEN, eventually, notifier_body, relay_config

HOOK = f"/hooks/qingstor?token={TOKEN}"


def test_consecutive_failures_still_open_it_when_configured():
    # relay 0.1's rule, for configs that set `failures`: the window is too thin yet.
    circuit = CircuitBreaker(failures=3, cooldown=10.0)
    assert circuit.allowance(0.0) is None
    assert circuit.record(False, True, 1.0) is None
    assert circuit.record(False, True, 2.0) is None
    assert circuit.record(False, True, 3.0) == "open"
    assert circuit.reason == "consecutive"
    assert circuit.allowance(12.9) == 0  # cooling down
    assert circuit.allowance(13.0) == 1  # one probe
    assert circuit.state == "half-open"
    assert circuit.record(False, True, 13.5) == "open"  # the probe failed: open again,
    assert circuit.allowance(33.4) == 0  # for twice as long
    assert circuit.allowance(33.5) == 1
    assert circuit.record(True, False, 34.0) == "closed"
    assert circuit.failures == 0 and circuit.allowance(34.0) is None
    assert circuit.cooldown == 10.0  # back to the first cool-down


def test_permanent_refusals_and_throttling_count_for_nothing():
    circuit = CircuitBreaker(failures=2, cooldown=1.0, min_sends=2)
    circuit.record(False, True, 0.0)
    circuit.record(False, False, 0.0)  # a refused payload: the sink is up, count unchanged
    assert circuit.failures == 1 and circuit.state == "closed"
    assert circuit.window.totals(0.0) == (1, 1)
    circuit.record(True, False, 0.0)
    assert circuit.failures == 0 and circuit.window.totals(0.0) == (2, 1)


def run(circuit: CircuitBreaker, fails: Callable[[], bool], sends: int, per_second: float,
        start: float = 0.0) -> tuple[list[float], float]:  # fmt: skip
    """Feed `sends` results at `per_second` on the test's clock, sending only when the
    circuit allows, as the dispatcher does; returns when it opened and the clock."""
    opened: list[float] = []
    now = start
    step = 1.0 / per_second
    for _ in range(sends):
        now += step
        if circuit.allowance(now) == 0:
            continue
        failed = fails()
        if circuit.record(not failed, failed, now) == "open":
            opened.append(now)
    return opened, now


@pytest.mark.parametrize("per_second", [0.5, 5.0, 100.0])
def test_a_sink_failing_one_send_in_five_never_opens_it(per_second):
    rng = random.Random(20261202)
    circuit = CircuitBreaker.of(CircuitConfig())  # the defaults
    opened, _ = run(circuit, lambda: rng.random() < 0.2, 50_000, per_second)
    assert opened == []
    # The old rule (5 in a row) would have opened it many times over on the same luck.
    rng = random.Random(20261202)
    old_rule = CircuitBreaker(failures=5, enabled=True, min_sends=10**9)
    opened, _ = run(old_rule, lambda: rng.random() < 0.2, 50_000, per_second)
    assert len(opened) > 5


def test_a_dead_sink_opens_it_within_the_window_once_there_are_min_sends():
    circuit = CircuitBreaker(failure_rate=0.5, window=60.0, min_sends=20, cooldown=30.0)
    opened, _ = run(circuit, lambda: True, 20, per_second=2.0)
    assert opened == [pytest.approx(10.0)]  # the 20th send, at 2 a second
    assert circuit.reason == "rate" and circuit.seen == (20, 20)


def test_a_dead_sink_too_quiet_for_the_window_opens_on_ten_failures_in_a_row():
    circuit = CircuitBreaker.of(CircuitConfig())
    opened, _ = run(circuit, lambda: True, 10, per_second=1 / 30)  # one send every 30 s
    assert opened == [pytest.approx(300.0)] and circuit.reason == "consecutive"


def test_half_failing_sends_open_it_and_a_thin_window_does_not():
    circuit = CircuitBreaker(failure_rate=0.5, window=60.0, min_sends=20)
    flip = iter([True, False] * 100)
    opened, _ = run(circuit, lambda: next(flip), 200, per_second=1.0)
    assert opened and circuit.seen[1] >= 0.5 * circuit.seen[0]
    # 19 failures a minute apart never make 20 sends within one window.
    sparse = CircuitBreaker(failure_rate=0.5, window=60.0, min_sends=20)
    opened, _ = run(sparse, lambda: True, 19 * 5, per_second=1 / 61)
    assert opened == []


def test_a_sink_that_stays_dead_is_probed_ever_more_rarely_up_to_the_cap():
    circuit = CircuitBreaker(min_sends=4, cooldown=30.0, max_cooldown=300.0)
    now = 0.0
    for _ in range(4):
        now += 1
        circuit.record(False, True, now)
    assert circuit.state == "open"
    probes = []
    while len(probes) < 8:
        now = circuit.open_until
        assert circuit.allowance(now - 0.001) == 0
        assert circuit.allowance(now) == 1
        probes.append(now)
        circuit.record(False, True, now)  # still dead
    gaps = [b - a for a, b in zip([4.0, *probes], probes, strict=False)]
    assert gaps == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0, 300.0, 300.0]
    # Back: the next outage starts again from the first cool-down.
    now = circuit.open_until
    circuit.allowance(now)
    assert circuit.record(True, False, now) == "closed"
    assert circuit.cooldown == 30.0


def test_the_window_forgets_what_is_older_than_it():
    circuit = CircuitBreaker(window=10.0, min_sends=5)
    for t in range(4):
        circuit.record(False, True, float(t))
    # Twenty seconds later those failures are out of the window: one more is not five.
    assert circuit.record(False, True, 24.0) is None
    assert circuit.window.totals(24.0) == (1, 1)
    # A clock stepped back does not keep counts from "the future" in the window.
    assert circuit.window.totals(5.0) == (0, 0)


def test_sends_started_before_it_opened_count_for_nothing():
    circuit = CircuitBreaker(min_sends=4, cooldown=10.0)
    before = circuit.generation  # four sends start, and more are in flight
    for t in range(4):
        circuit.record(False, True, float(t), before)
    assert circuit.state == "open"
    # A send started before it opened succeeds a moment later: the sink is not back.
    assert circuit.record(True, False, 4.0, before) is None
    assert circuit.state == "open"
    assert circuit.allowance(14.0) == 1  # the probe
    probe = circuit.generation
    # Another old send fails while the probe is out: it is not the probe's answer.
    assert circuit.record(False, True, 14.5, before) is None
    assert (circuit.state, circuit.cooldown) == ("half-open", 10.0)
    assert circuit.record(True, False, 15.0, probe) == "closed"


def test_disabled_never_opens():
    circuit = CircuitBreaker(enabled=False, min_sends=1, failures=1)
    opened, _ = run(circuit, lambda: True, 1000, per_second=10.0)
    assert opened == [] and circuit.allowance(1000.0) is None


async def test_a_failing_sink_opens_its_circuit_waits_then_closes_on_a_probe(
    tmp_path, start_relay, receiver
):
    receiver.statuses = [500, 500, 500]
    config = relay_config(
        tmp_path,
        sinks={
            "app": {
                "kind": "http",
                "url": receiver.url,
                "retry": {"max_attempts": 50, "initial": "10ms", "max": "20ms"},
                "circuit": {"failures": 3, "cooldown": "2s"},
                "concurrency": 1,  # one at a time, so the failures are consecutive
            }
        },
    )
    client = await start_relay(config)
    with capture_logs() as logs:
        await client.post(HOOK, json=notifier_body(*[f"k{i}" for i in range(5)]))
        await eventually(lambda: [e for e in logs if e["event"] == "circuit.open"])
        opened_with = len(receiver.requests)
        # While open nothing is sent, although backoff alone would retry within 20 ms.
        await asyncio.sleep(1.0)
        assert len(receiver.requests) == opened_with
        await eventually(lambda: [e for e in logs if e["event"] == "circuit.closed"], within=10)
        store = client.app[STORE]
        counts = await eventually(lambda: _done(store, 5))
    assert counts == {"events": 5, "done": 5}
    events = [e["event"] for e in logs if e["event"].startswith("circuit.")]
    assert events == ["circuit.open", "circuit.half_open", "circuit.closed"]
    # The three failures are the only failed attempts: waiting while open costs none.
    # Every event was sent at least once, so the receiver saw each one's id.
    ids = {r["headers"]["webhook-id"] for r in receiver.requests}
    assert len(ids) == 5
    records = [await store.event(event_id) for event_id in sorted(ids)]
    assert None not in records
    assert sum(d.attempts for r in records for d in r.deliveries) == 5 + 3


async def _done(store, n):
    counts = await store.counts()
    return counts if counts.get("done") == n else None


def _sink(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "http",
        "url": url,
        "retry": {"max_attempts": 1000, "initial": "10ms", "max": "20ms"},
        **extra,
    }


async def test_a_receiver_failing_one_request_in_five_keeps_the_circuit_closed(
    tmp_path, start_relay, receiver
):
    # Seeded: the same 20% of answers fail on every run.
    rng = random.Random(5)
    receiver.statuses = [500 if rng.random() < 0.2 else 200 for _ in range(4000)]
    streak = longest = 0
    for status in receiver.statuses:
        streak = streak + 1 if status == 500 else 0
        longest = max(longest, streak)
    assert longest >= 5  # relay 0.1's breaker would have stalled the sink on this luck
    config = relay_config(
        tmp_path, sinks={"app": _sink(receiver.url, concurrency=4)}, routes=[{"to": ["app"]}]
    )
    client = await start_relay(config)
    with capture_logs() as logs:
        for start in range(0, 2500, 250):
            keys = [f"k{i}" for i in range(start, start + 250)]
            assert (await client.post(HOOK, json=notifier_body(*keys))).status == 200
        store = client.app[STORE]
        await eventually(lambda: _done(store, 2500), within=60)
    assert not [e for e in logs if e["event"].startswith("circuit.")]
    failed = sum(1 for e in logs if e["event"] == "delivery.retry")
    assert failed > 300  # it did fail one in five, all along
    assert len({r["headers"]["webhook-id"] for r in receiver.requests}) == 2500


async def test_a_dead_receiver_opens_the_circuit_within_the_window_and_is_probed_ever_more_rarely(
    tmp_path, start_relay, receiver
):
    receiver.statuses = [500] * 10_000
    circuit = {"window": "5s", "min_sends": 10, "cooldown": "200ms", "max_cooldown": "800ms"}
    sink = _sink(receiver.url, concurrency=1, circuit=circuit)
    client = await start_relay(
        relay_config(tmp_path, sinks={"app": sink}, routes=[{"to": ["app"]}])
    )
    with capture_logs() as logs:
        assert (await client.post(HOOK, json=notifier_body(*[f"k{i}" for i in range(5)]))).ok

        def opened() -> list[dict[str, Any]]:
            return [e for e in logs if e["event"] == "circuit.open"]

        await eventually(lambda: len(opened()) >= 5, within=30)
        first = opened()[0]
        # The tenth failed send, well within the window, opened it on the rate.
        assert (first["reason"], first["sends"], first["failed"]) == ("rate", 10, 10)
        assert len(receiver.requests) >= 10
        # Each failed probe doubles the wait, up to max_cooldown.
        assert [e["cooldown_s"] for e in opened()[:5]] == [0.2, 0.4, 0.8, 0.8, 0.8]
        assert [e["reason"] for e in opened()[1:5]] == ["probe"] * 4
        at = [r["at"] for r in receiver.requests[10:14]]
        gaps = [b - a for a, b in itertools.pairwise(at)]
        for gap, cooldown in zip(gaps, [0.4, 0.8, 0.8], strict=True):
            assert gap >= cooldown * 0.95  # no probe before its cool-down ran out
        # The receiver comes back: the next probe closes the circuit, and all goes out.
        receiver.statuses.clear()
        await eventually(lambda: [e for e in logs if e["event"] == "circuit.closed"], within=10)
        await eventually(lambda: _done(client.app[STORE], 5), within=10)
