"""sinks.<name>.max_queue: a sink that cannot keep up stops taking work, nothing else."""

from __future__ import annotations

from structlog.testing import capture_logs

from relay.app import STORE
from tests.conftest import TOKEN, eventually, notifier_body, relay_config

HOOK = f"/hooks/qingstor?token={TOKEN}"
FAST = {"max_attempts": 5, "initial": "10ms", "max": "50ms"}


async def test_a_full_queue_refuses_its_events_with_503_and_recovers_as_it_drains(
    tmp_path, start_relay, receiver
):
    receiver.hang = True  # the downstream app stops answering: its deliveries pile up
    config = relay_config(
        tmp_path,
        sinks={
            "app": {"kind": "http", "url": receiver.url, "retry": FAST, "max_queue": 3},
            "archive": {"kind": "file", "path": "out/events.jsonl"},
        },
        routes=[
            {"when": {"keys": ["slow/*"]}, "to": ["app"]},
            {"when": {"keys": ["fast/*"]}, "to": ["archive"]},
        ],
    )
    client = await start_relay(config)
    store = client.app[STORE]

    async def post(key: str):
        return await client.post(HOOK, json=notifier_body(key))

    with capture_logs() as logs:
        for n in range(3):
            assert (await post(f"slow/{n}")).status == 200
        # Said at once, or (when the once-a-second count from the store was read just
        # before the last commit and landed just after it) at the next count.
        await eventually(lambda: any(e["event"] == "sink.queue_full" for e in logs))
    assert [e["sink"] for e in logs if e["event"] == "sink.queue_full"] == ["app"]

    refused = await post("slow/3")
    assert refused.status == 503 and refused.headers["Retry-After"] == "5"
    answer = await refused.json()
    assert answer["error"] == "queue_full" and "app" in answer["message"]
    # A retry of an event already stored is still its duplicate, not a refusal.
    assert await (await post("slow/0")).json() == {"accepted": 0, "duplicates": 1}
    # Isolation: events for other sinks still go through.
    assert await (await post("fast/0")).json() == {"accepted": 1, "duplicates": 0}
    assert (await store.counts())["events"] == 4  # the refused one was never stored

    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "sink app has 3 deliveries queued" in (await ready.json())["message"]

    receiver.hang = False
    receiver.release.set()
    await eventually(lambda: len(receiver.requests) >= 3)

    async def ready_again() -> bool:
        return (await client.get("/readyz")).status == 200

    await eventually(ready_again, within=10)
    assert await (await post("slow/3")).json() == {"accepted": 1, "duplicates": 0}
