"""The store alone: events/s committed durably, one caller per commit vs groups of 32.

    python bench/store_commit.py

Shows what group commit buys: the fsync per commit is shared by every caller in it.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.models import event_id
from relay.store import NewEvent
from relay.store.sqlite import SqliteStore

# Ids as relay makes them (hashes): random keys cost SQLite more than sequential ones,
# since each lands on another index page.
ENVELOPE = '{"id":"evt","type":"create_object","data":{"qingstor":{"object":{"size":1}}}}' * 4


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "relay.db", dedupe_window=86400)
        await store.open()
        n = 0
        print(f"{'callers per commit':>20} {'ms per commit':>14} {'events/s':>10}")
        for group in (1, 8, 32, 128):
            rounds = max(20, 2000 // group)
            started = time.perf_counter()
            for _ in range(rounds):
                await asyncio.gather(
                    *(
                        store.accept(
                            [NewEvent(event_id("bench", str(n + i)), "q", ENVELOPE, ("a",))]
                        )
                        for i in range(group)
                    )
                )
                n += group
            elapsed = time.perf_counter() - started
            print(f"{group:>20} {elapsed / rounds * 1000:>14.2f} {rounds * group / elapsed:>10.0f}")
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
