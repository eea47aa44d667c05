"""`relay event ID`: what happened to one event, from the store: its envelope, and for
each sink it was routed to, where its delivery stands (done, pending and when next,
or dead and why). Reads the store beside a running server, like `relay status`."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from relay.config import StoreView
from relay.logs import redact_text
from relay.store import EventRecord, operator_store
from relay.tables import table, when


async def lookup(config: StoreView, event_id: str) -> EventRecord | None:
    async with operator_store(config.store, dedupe_window=config.dedupe.window) as store:
        return await store.event(event_id)


def report(record: EventRecord, config: StoreView, now: float) -> dict[str, Any]:
    envelope = json.loads(record.envelope)
    deliveries = []
    for d in record.deliveries:
        entry: dict[str, Any] = {
            "sink": d.sink,
            "state": d.state,
            "attempts": d.attempts,
            "last_status": d.last_status,
            # Receivers' answers may quote URLs; their query strings can carry secrets.
            "last_error": redact_text(d.last_error or "") or None,
            "since": when(d.updated_at),
        }
        if d.state == "pending":
            entry["next_attempt"] = when(d.next_at)
            entry["due_in_s"] = round(max(d.next_at - now, 0.0), 1)
        deliveries.append(entry)
    routed = {d.sink for d in record.deliveries}
    return {
        "id": record.id,
        "source": record.source,
        "received_at": when(record.received_at),
        "envelope": envelope,
        "deliveries": deliveries,
        # Done deliveries are pruned after store.keep_done: the sink got it, or it
        # was never routed there.
        "no_record_for": [s for s in config.sinks if s not in routed],
        "keep_done_s": config.store.keep_done,
        # Younger than keep_done, nothing can have been pruned: those were not routed.
        "pruned_possible": now - record.received_at >= config.store.keep_done,
    }


def render(data: dict[str, Any]) -> str:
    envelope = data["envelope"]
    where = envelope.get("subject") or "-"
    head = [
        f"event {data['id']}: {envelope.get('type')} {where}",
        f"source {data['source']}, received {data['received_at']}, time {envelope.get('time')}",
    ]
    rows = []
    for d in data["deliveries"]:
        if d["state"] == "pending":
            status = f"next {d['next_attempt']} (in {d['due_in_s']:g}s)"
        else:
            status = f"at {d['since']}"
        error = " ".join((d["last_error"] or "-").split())
        rows.append(
            (
                d["sink"],
                d["state"],
                str(d["attempts"]),
                str(d["last_status"] or "-"),
                error if len(error) <= 60 else error[:59] + "…",
                status,
            )
        )
    parts = ["\n".join(head)]
    if rows:
        parts.append(table(("SINK", "STATE", "ATTEMPTS", "STATUS", "LAST ERROR", "WHEN"), rows))
    if data["no_record_for"]:
        names = ", ".join(data["no_record_for"])
        hours = data["keep_done_s"] / 3600
        if data.get("pruned_possible", True):
            parts.append(
                f"no delivery record for {names}: delivered more than store.keep_done"
                f" ({hours:g}h) ago, or not routed there"
            )
        else:
            parts.append(
                f"not routed to {names} (no route sent it there when it arrived, or the"
                " sink was added since)"
            )
    return "\n\n".join(parts)


async def show(config: StoreView, event_id: str, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    record = await lookup(config, event_id)
    if record is None:
        hours = config.dedupe.window / 3600
        print(
            f"relay event: no event {event_id} in the store (never received, or pruned:"
            f" an event with nothing left to deliver is kept for dedupe.window, {hours:g}h)",
            file=sys.stderr,
        )
        return 1
    data = report(record, config, time.time())
    print(json.dumps(data, indent=2, ensure_ascii=False) if as_json else render(data), file=out)
    return 0
