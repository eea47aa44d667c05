"""Delivery rate with `order: per_key` on and off, over 1, 100 and 10,000 objects.

Fills a store with N acknowledged events spread over K objects (each object's events
in time order), starts `relay serve` on it with one HTTP sink (concurrency 32, the
given `order`), and times from the first request the local receiver sees until it has
them all. Every configuration runs in each round, in a rotated order; the table gives
the median events/s and, per object count, the rate with order against without.

    python bench/ordering.py [--events 10000] [--rounds 2] [--keys 1 100 10000]
                             [--redis redis://127.0.0.1:6379/0]   # the Redis store instead

Figures are for comparing within one run on one machine; no test asserts them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Where relay runs from: a copy taken at start (main sets it), so edits made while the
# benchmark runs do not change the code under test halfway.
CODE = ROOT

from machine import counting_receiver, machine, relay_serving, snapshot_code  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from relay.config import StoreConfig  # noqa: E402
from relay.store import NewEvent, open_store  # noqa: E402

ENVELOPE = (
    '{{"id":"{id}","source":"qingstor","type":"create_object","time":"2021-08-31T06:25:46Z",'
    '"subject":"b/{key}","bucket":"b","key":"{key}","received_at":"2021-08-31T06:25:46Z",'
    '"data":{{"qingstor":{{"object":{{"name":"{key}","size":1}}}}}}}}'
)


def store_yaml(workdir: Path, redis: str | None) -> str:
    """The store section: SQLite in `workdir`, or a fresh prefix on `redis`."""
    if redis is None:
        return "{backend: sqlite, path: relay.db}"
    return f"{{backend: redis, url: '{redis}', prefix: 'bench-{workdir.name}'}}"


async def fill(workdir: Path, events: int, keys: int, section: str) -> None:
    """N events to sink `app` over `keys` objects; their order fields as ingest sets them
    for a sink that orders by object (the sink's `order` decides whether claims use
    them)."""
    import yaml

    config = TypeAdapter(StoreConfig).validate_python(
        yaml.safe_load(section), context={"base_dir": workdir}
    )
    store = open_store(config, dedupe_window=86400)
    await store.open()
    for start in range(0, events, 500):
        batch = []
        for n in range(start, min(start + 500, events)):
            key = f"k{n % keys}"
            envelope = ENVELOPE.format(id=f"evt_{n}", key=key)
            batch.append(NewEvent(f"evt_{n}", "qingstor", envelope, ("app",), key, n, ("app",)))
        await store.accept(batch)
    await store.close()


async def deliver(events: int, keys: int, order: str, redis: str | None) -> float:
    async with counting_receiver(events) as seen:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            section = store_yaml(workdir, redis)
            await fill(workdir, events, keys, section)
            (workdir / "relay.yaml").write_text(
                f"log: {{level: warning}}\nstore: {section}\n"
                "sources: {qingstor: {kind: qingstor}}\n"
                f"sinks: {{app: {{kind: http, url: '{seen.url}', concurrency: 32,"
                f" order: {order}}}}}\n"
            )
            with relay_serving(workdir, CODE):
                await asyncio.wait_for(seen.done.wait(), timeout=900)
                return seen.rate(events)


async def main() -> None:
    global CODE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 100, 10_000])
    parser.add_argument("--redis", help="a Redis URL: run on the Redis store, not SQLite")
    args = parser.parse_args()
    snapshot = tempfile.TemporaryDirectory(prefix="relay-ordering-")
    CODE, code = snapshot_code(Path(snapshot.name))
    print(f"machine: {machine()}\ncode: {code}")
    runs = [(keys, order) for keys in args.keys for order in ("none", "per_key")]
    rates: dict[tuple[int, str], list[float]] = {run: [] for run in runs}
    for round_ in range(args.rounds):
        turn = runs[round_ % len(runs) :] + runs[: round_ % len(runs)]
        for keys, order in turn:
            rate = await deliver(args.events, keys, order, args.redis)
            rates[keys, order].append(rate)
            print(f"  round {round_ + 1}: {keys:>6} objects, order {order:8} {rate:7.0f} ev/s")
    print(
        f"{args.events} events to one HTTP sink (concurrency 32, a local receiver answering"
        f" 204), store {'Redis' if args.redis else 'SQLite'}; medians of {args.rounds}"
        f" round(s); {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print("| objects | order: none, ev/s | order: per_key, ev/s | per_key / none |")
    print("|---|---|---|---|")
    for keys in args.keys:
        off = statistics.median(rates[keys, "none"])
        on = statistics.median(rates[keys, "per_key"])
        print(f"| {keys} | {off:.0f} | {on:.0f} | {on / off:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
