"""How fast the console's event pages are on a big store: fill a store with N events
(default a million), then time the console's searches through the store contract, as
the events page runs them. SQLite by default; `--redis URL` for a Redis store (a
prefix of its own, deleted afterwards).

    python bench/console_events.py                 # SQLite, 1,000,000 events
    python bench/console_events.py --events 200000 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

from relay.config import RedisStoreConfig, SqliteStoreConfig
from relay.console import search
from relay.store import NewEvent, Store, open_store


def envelope(i: int) -> str:
    folder = ("photos", "docs", "logs", "video")[i % 4]
    return json.dumps(
        {
            "id": f"evt_{i:08d}",
            "source": "qingstor",
            "type": ("create_object", "delete_object")[i % 7 == 0],
            "bucket": "bench",
            "key": f"{folder}/{i:08d}.bin",
            "subject": f"bench/{folder}/{i:08d}.bin",
            "data": {"size": i},
        }
    )


async def fill(store: Store, count: int) -> float:
    started = time.perf_counter()
    batch = 1000
    for start in range(0, count, batch):
        events = [
            NewEvent(f"evt_{i:08d}", "qingstor", envelope(i), ("app",))
            for i in range(start, min(start + batch, count))
        ]
        # Spread over an hour of claims, a request's events sharing a time as they do.
        await store.accept(events, now=time.time() - 3600 + 3600 * start / count)
    return time.perf_counter() - started


async def timed(
    store: Store, wanted: search.EventFilter, rounds: int = 5
) -> tuple[float, int, int]:
    best = float("inf")
    found = None
    for _ in range(rounds):
        started = time.perf_counter()
        found = await search.find(store, wanted, None)
        best = min(best, time.perf_counter() - started)
    assert found is not None
    return best * 1000, len(found.events), found.scanned


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--redis", metavar="URL", help="a Redis store instead of SQLite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.redis:
            prefix = f"bench-{uuid.uuid4().hex[:8]}"
            config = RedisStoreConfig.model_validate(
                {"backend": "redis", "url": args.redis, "prefix": prefix}
            )
        else:
            config = SqliteStoreConfig.model_validate({"path": str(Path(folder) / "bench.db")})
        store = open_store(config, dedupe_window=86400.0 * 30)
        await store.open(exclusive=True)
        try:
            seconds = await fill(store, args.events)
            print(f"{config.backend}: stored {args.events:,} events in {seconds:.1f} s")
            cases = {
                "newest 50, no filter": search.EventFilter(),
                "key prefix docs/ (1 in 4)": search.EventFilter(key="docs/"),
                "key glob photos/*0.bin (1 in 40)": search.EventFilter(key="photos/*0.bin"),
                "type delete_object (1 in 7)": search.EventFilter(type="delete_object"),
                "a key no event has (reads the bound)": search.EventFilter(key="nothing/"),
                "state dead (none)": search.EventFilter(state="dead"),
            }
            print(f"{'page':42} {'best of 5 ms':>12} {'found':>6} {'read':>6}")
            for name, wanted in cases.items():
                ms, found, scanned = await timed(store, wanted)
                print(f"{name:42} {ms:12.1f} {found:6} {scanned:6}")
            started = time.perf_counter()
            await store.event(f"evt_{args.events // 2:08d}")
            ms = (time.perf_counter() - started) * 1000
            print(f"{'one event page (store.event)':42} {ms:12.1f}")
        finally:
            if args.redis:
                client = store.client  # type: ignore[attr-defined]
                async for key in client.scan_iter(match=f"{{{prefix}}}:*", count=10000):
                    await client.delete(key)
            await store.close()


if __name__ == "__main__":
    asyncio.run(main())
