"""`relay status`: what the store says about each sink and source, for an operator.

Reads the store beside a running server (or after it stopped): queues, dead letters
and circuits are rows, not the server's memory.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from relay.config import StoreView, store_description
from relay.store import Observations, SinkStats, operator_store
from relay.tables import table

LOOKBACK = 3600.0  # the "last hour" of per-source figures


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


async def gather(config: StoreView, now: float | None = None) -> dict[str, Any]:
    async with operator_store(config.store, dedupe_window=config.dedupe.window) as store:
        return await report(store, config, now)


async def report(
    store: Observations, config: StoreView, now: float | None = None
) -> dict[str, Any]:
    """What `relay status` shows (and the console's overview), from an open store."""
    at = time.time() if now is None else now
    stats = await store.sink_stats(at)
    receipts = await store.receipts_since(at - LOOKBACK)
    sinks = {}
    for name in [*config.sinks, *sorted(set(stats) - set(config.sinks))]:
        current = stats.get(name, SinkStats())
        circuit = current.circuit
        if circuit == "open" and current.open_until <= at:
            circuit = "half-open"  # the cool-down is over; the next send probes
        sinks[name] = {
            "configured": name in config.sinks,
            "pending": current.pending,
            "oldest_pending_s": round(current.oldest_pending_s, 1),
            "dead": current.dead,
            "coalesced": current.coalesced,
            "circuit": circuit,
            "gone": current.gone,
        }
    sources = {}
    for name in [*config.sources, *sorted(set(receipts) - set(config.sources))]:
        received, duplicates = receipts.get(name, (0, 0))
        sources[name] = {"received_1h": received, "duplicates_1h": duplicates}
    return {"store": store_description(config.store), "sinks": sinks, "sources": sources}


def render(report: dict[str, Any]) -> str:
    sink_rows = [
        (
            name + ("" if s["configured"] else " (not configured)"),
            str(s["pending"]),
            _age(s["oldest_pending_s"]),
            str(s["dead"]),
            str(s["coalesced"]),
            s["circuit"] + (", gone" if s["gone"] else ""),
        )
        for name, s in report["sinks"].items()
    ]
    source_rows = [
        (name, str(s["received_1h"]), str(s["duplicates_1h"]))
        for name, s in report["sources"].items()
    ]
    return "\n\n".join(
        [
            f"store: {report['store']}",
            table(("SINK", "PENDING", "OLDEST", "DEAD", "COALESCED", "CIRCUIT"), sink_rows),
            table(("SOURCE", "RECEIVED (1H)", "DUPLICATES (1H)"), source_rows),
        ]
    )


async def show(config: StoreView, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    report = await gather(config)
    print(json.dumps(report, indent=2) if as_json else render(report), file=out)
    return 0
