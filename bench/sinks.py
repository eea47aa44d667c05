"""Sink throughput: how fast a running relay drains a queue to a file and to an HTTP app.

Fills a store with N acknowledged events (directly, through the store's own group
commit), starts `relay serve` on it, and times until every event has reached the sink.

    python bench/sinks.py [--events 20000]

The HTTP receiver is a local aiohttp app in this process (keep-alive, answers 204).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import counting_receiver, relay_serving  # noqa: E402

from relay.store import NewEvent  # noqa: E402
from relay.store.sqlite import SqliteStore  # noqa: E402

ENVELOPE = (
    '{{"id":"{id}","source":"qingstor","type":"create_object","time":"2021-08-31T06:25:46Z",'
    '"subject":"b/k{n}","bucket":"b","key":"k{n}","received_at":"2021-08-31T06:25:46Z",'
    '"data":{{"qingstor":{{"object":{{"name":"k{n}","size":1}}}}}}}}'
)


async def fill(db: Path, events: int, sink: str) -> None:
    store = SqliteStore(db, dedupe_window=86400)
    await store.open()
    for start in range(0, events, 500):
        batch = [
            NewEvent(f"evt_{n}", "qingstor", ENVELOPE.format(id=f"evt_{n}", n=n), (sink,))
            for n in range(start, min(start + 500, events))
        ]
        await store.accept(batch)
    await store.close()


def configure(workdir: Path, sink_yaml: str) -> Path:
    (workdir / "relay.yaml").write_text(
        "log: {level: warning}\nstore: {path: relay.db}\n"
        f"sources: {{qingstor: {{kind: qingstor}}}}\nsinks: {{{sink_yaml}}}\n"
    )
    return workdir


async def file_sink(events: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        await fill(workdir / "relay.db", events, "archive")
        out = workdir / "events.jsonl"
        configure(workdir, "archive: {kind: file, path: events.jsonl}")
        with relay_serving(workdir, ROOT):
            # Timed from the first line written: relay's start-up is not the sink's speed.
            while not out.exists() or out.stat().st_size == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.002)  # polling a file another process writes
            started = time.monotonic()
            first = sum(1 for _ in out.open())
            while sum(1 for _ in out.open()) < events:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            return (events - first) / (time.monotonic() - started)


async def http_sink(events: int, concurrency: int) -> float:
    async with counting_receiver(events) as seen:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            await fill(workdir / "relay.db", events, "app")
            sink = f"app: {{kind: http, url: '{seen.url}', concurrency: {concurrency}}}"
            with relay_serving(configure(workdir, sink), ROOT):
                await asyncio.wait_for(seen.done.wait(), timeout=600)
                return seen.rate(events)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32, help="HTTP sink concurrency")
    args = parser.parse_args()
    print(f"{args.events} queued events; timed from the first delivery to the last")
    print(f"file sink: {await file_sink(args.events):9.0f} events/s")
    rate = await http_sink(args.events, args.concurrency)
    print(f"http sink: {rate:9.0f} events/s (concurrency {args.concurrency})")


if __name__ == "__main__":
    asyncio.run(main())
