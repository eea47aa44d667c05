"""The circuit breaker: the state machine, and a sink whose circuit opens and closes."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from relay.app import STORE
from relay.circuit import CircuitBreaker
from tests.conftest import TOKEN, eventually, notifier_body, relay_config

HOOK = f"/hooks/qingstor?token={TOKEN}"


def test_state_machine():
    circuit = CircuitBreaker(failures=3, cooldown=10.0)
    assert circuit.allowance(0.0) is None
    assert circuit.record(False, True, 1.0) is None
    assert circuit.record(False, True, 2.0) is None
    assert circuit.record(False, True, 3.0) == "open"
    assert circuit.allowance(12.9) == 0  # cooling down
    assert circuit.allowance(13.0) == 1  # one probe
    assert circuit.state == "half-open"
    assert circuit.record(False, True, 13.5) == "open"  # the probe failed: open again
    assert circuit.allowance(23.4) == 0
    assert circuit.allowance(23.5) == 1
    assert circuit.record(True, False, 24.0) == "closed"
    assert circuit.failures == 0 and circuit.allowance(24.0) is None


def test_permanent_refusals_and_successes_reset_nothing_or_everything():
    circuit = CircuitBreaker(failures=2, cooldown=1.0)
    circuit.record(False, True, 0.0)
    circuit.record(False, False, 0.0)  # a refused payload: the sink is up, count unchanged
    assert circuit.failures == 1 and circuit.state == "closed"
    circuit.record(True, False, 0.0)
    assert circuit.failures == 0


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
