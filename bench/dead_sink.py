"""Memory with a dead sink: queued work lives in the store, not in relay's memory.

Starts `relay serve` with an HTTP sink whose receiver refuses every connection (a port
nobody listens on) and a file sink, posts N unique notifications (100 records per
POST, 8 at a time), then samples relay's RSS while the dead sink's deliveries are
retried, and prints: events acknowledged, deliveries the dead sink has pending, the
file sink's lines, and the RSS after ingest and after each sampling interval.

    python bench/dead_sink.py [--events 20000] [--watch 60]

Figures are for reading, not asserting: no test depends on them.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import TOKEN, free_port, rss_mib, start_relay  # noqa: E402

BATCH = 100  # records per POST


def notification(n: int) -> dict[str, Any]:
    records = []
    for i in range(n, n + BATCH):
        records.append(
            {
                "event_type": "create_object",
                "event_time": "2026-11-25T07:00:00.000Z",
                "response_elements": {"request_id": f"req-{i}"},
                "qingstor": {
                    "notification_id": "bench",
                    "bucket": {"name": "bench"},
                    "object": {"name": f"dead/{i}.jpg", "size": 1024},
                },
            }
        )
    return {"events": records}


async def ingest(port: int, events: int) -> int:
    url = f"http://127.0.0.1:{port}/hooks/qingstor?token={TOKEN}"
    acknowledged = 0
    async with ClientSession() as session:

        async def post(n: int) -> int:
            async with session.post(url, json=notification(n)) as response:
                answer = await response.json()
                return int(answer.get("accepted", 0)) if response.status == 200 else 0

        starts = list(range(0, events, BATCH))
        for i in range(0, len(starts), 8):
            acknowledged += sum(await asyncio.gather(*(post(n) for n in starts[i : i + 8])))
    return acknowledged


def pending(db: Path, sink: str) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE sink = ? AND state = 'pending'", (sink,)
        ).fetchone()
    return int(row[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--watch", type=float, default=60.0, help="seconds to sample after")
    args = parser.parse_args()
    dead_port = free_port()  # nothing listens here: every send is refused
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        proc, port = start_relay(
            data,
            "log: {level: warning}\n"
            f"sources: {{qingstor: {{kind: qingstor, token: {TOKEN}}}}}\n"
            "sinks:\n"
            "  archive: {kind: file, path: events.jsonl}\n"
            f"  dead: {{kind: http, url: 'http://127.0.0.1:{dead_port}/events',"
            " retry: {max_attempts: 1000000, initial: 100ms, max: 2s},"
            " circuit: {enabled: false}}\n"
            "store: {path: relay.db}\n",
        )
        try:
            started = time.monotonic()
            acknowledged = asyncio.run(ingest(port, args.events))
            took = time.monotonic() - started
            print(f"acknowledged {acknowledged} events in {took:.1f} s")
            print(f"{'t (s)':>6} {'dead pending':>13} {'file lines':>11} {'RSS MiB':>8}")
            end = time.monotonic() + args.watch
            while True:
                lines = sum(1 for _ in (data / "events.jsonl").open())
                waiting = pending(data / "relay.db", "dead")
                elapsed = time.monotonic() - started
                print(f"{elapsed:6.0f} {waiting:13d} {lines:11d} {rss_mib(proc.pid):8.1f}")
                if time.monotonic() >= end:
                    break
                time.sleep(min(10.0, max(0.0, end - time.monotonic())))
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
