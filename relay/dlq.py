"""`relay dlq ...`: list, show, replay and purge dead letters in the store; with
`--quarantine`, list, show and purge the unusable bodies ingest kept instead.

These open the store directly, beside a running `relay serve` if there is one (SQLite
WAL lets both in); a replayed delivery is due at once and the server's dispatcher
finds it on its next look, within about a second.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TextIO, TypeVar

from relay.config import StoreView
from relay.logs import redact_text
from relay.store import DeadLetter, Quarantined, Selection, Store, operator_store
from relay.tables import table, when

T = TypeVar("T")


def _key(letter: DeadLetter) -> str:
    try:
        key = json.loads(letter.envelope).get("key")
    except (json.JSONDecodeError, AttributeError):
        return ""
    return key if isinstance(key, str) else ""


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line per row, whatever the error said
    return text if len(text) <= width else text[: width - 1] + "…"


def _error(letter: DeadLetter) -> str:
    # Receivers' answers may quote URLs; their query strings can carry secrets.
    return redact_text(letter.last_error or "")


def format_table(letters: Sequence[DeadLetter]) -> str:
    header = ("EVENT ID", "SINK", "ATTEMPTS", "LAST ERROR", "DEAD SINCE", "OBJECT KEY")
    rows = [
        (
            letter.event_id,
            letter.sink,
            str(letter.attempts),
            _clip(_error(letter), 48),
            when(letter.dead_since),
            _clip(_key(letter), 60),
        )
        for letter in letters
    ]
    return table(header, rows)


def _record(letter: DeadLetter) -> dict[str, object]:
    return {
        "event_id": letter.event_id,
        "sink": letter.sink,
        "attempts": letter.attempts,
        "last_status": letter.last_status,
        "last_error": _error(letter),
        "dead_since": when(letter.dead_since),
        "key": _key(letter),
    }


async def list_letters(
    config: StoreView, selection: Selection, *, as_json: bool, out: TextIO = sys.stdout
) -> int:
    letters = await _change(config, lambda store: store.dead_letters(selection))
    if as_json:
        for letter in letters:
            print(json.dumps(_record(letter), ensure_ascii=False), file=out)
    elif letters:
        print(format_table(letters), file=out)
    else:
        print("no dead letters", file=out)
    return 0


async def show(config: StoreView, event_id: str, out: TextIO = sys.stdout) -> int:
    selection = Selection(event_ids=(event_id,))
    letters = await _change(config, lambda store: store.dead_letters(selection))
    if not letters:
        print(f"relay dlq: no dead letter for event {event_id}", file=sys.stderr)
        return 1
    for letter in letters:
        detail = {**_record(letter), "envelope": json.loads(letter.envelope)}
        print(json.dumps(detail, indent=2, ensure_ascii=False), file=out)
    return 0


async def replay(config: StoreView, selection: Selection, out: TextIO = sys.stdout) -> int:
    count, problems = await _act(config, selection, _replay)
    if count or not problems:
        print(f"replayed {count} dead letter(s); a running relay delivers them shortly", file=out)
    return _report(problems)


async def purge(config: StoreView, selection: Selection, out: TextIO = sys.stdout) -> int:
    count, problems = await _act(config, selection, _purge)
    if count or not problems:
        print(f"purged {count} dead letter(s)", file=out)
    return _report(problems)


def _replay(store: Store, selection: Selection) -> Awaitable[int]:
    return store.replay(selection)


def _purge(store: Store, selection: Selection) -> Awaitable[int]:
    return store.purge(selection)


async def _act(
    config: StoreView,
    selection: Selection,
    action: Callable[[Store, Selection], Awaitable[int]],
) -> tuple[int, list[str]]:
    """`action` on what of `selection` exists; how many it changed, and what was not found."""

    async def work(store: Store) -> tuple[int, list[str]]:
        existing, problems = await _existing(store, config, selection)
        return (0 if existing is None else await action(store, existing)), problems

    return await _change(config, work)


async def _existing(
    store: Store, config: StoreView, selection: Selection
) -> tuple[Selection | None, list[str]]:
    """`selection` narrowed to what exists, and a problem for each part that does not: a
    mistyped sink or event id is said, never silently "0 replayed". Like `rm a b` with b
    missing, the ids that exist are still acted on."""
    problems: list[str] = []
    if selection.sink is not None and selection.sink not in config.sinks:
        known = sorted({*config.sinks, *await store.sink_stats()})
        if selection.sink not in known:
            shown = ", ".join(known) or "none"
            return None, [f"unknown sink {selection.sink!r} (known: {shown})"]
    if not selection.event_ids:
        return selection, problems
    found = {letter.event_id for letter in await store.dead_letters(selection)}
    where = f" at sink {selection.sink}" if selection.sink else ""
    problems += [
        f"no dead letter for event {event_id}{where}"
        for event_id in dict.fromkeys(selection.event_ids)
        if event_id not in found
    ]
    if not found:
        return None, problems
    return replace(selection, event_ids=tuple(i for i in selection.event_ids if i in found)), (
        problems
    )


def _report(problems: Sequence[str]) -> int:
    for problem in problems:
        print(f"relay dlq: {problem}", file=sys.stderr)
    return 1 if problems else 0


# --- quarantine --------------------------------------------------------------------------


def _quarantine_record(entry: Quarantined, with_body: bool = False) -> dict[str, object]:
    record: dict[str, object] = {
        "id": entry.id,
        "source": entry.source,
        "received_at": when(entry.received_at),
        "error": entry.error,
        "reason": entry.reason,
        "content_type": entry.content_type,
        "size": entry.size,
        "repeats": entry.repeats,
    }
    if with_body:
        try:
            record["body"] = entry.body.decode("utf-8")
        except UnicodeDecodeError:
            record["body_base64"] = base64.b64encode(entry.body).decode("ascii")
    return record


async def list_quarantine(config: StoreView, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    entries = await _change(config, lambda store: store.quarantined(with_bodies=False))
    if as_json:
        for entry in entries:
            print(json.dumps(_quarantine_record(entry), ensure_ascii=False), file=out)
    elif entries:
        header = ("ID", "SOURCE", "ERROR", "REASON", "LAST RECEIVED", "TIMES", "BYTES")
        rows = [
            (
                str(e.id),
                e.source,
                e.error,
                _clip(e.reason, 60),
                when(e.received_at),
                str(e.repeats),
                str(e.size),
            )
            for e in entries
        ]
        print(table(header, rows), file=out)
    else:
        print("nothing in quarantine", file=out)
    return 0


async def show_quarantined(config: StoreView, entry_id: int, out: TextIO = sys.stdout) -> int:
    entries = await _change(config, lambda store: store.quarantined([entry_id]))
    if not entries:
        print(f"nothing in quarantine with id {entry_id}", file=sys.stderr)
        return 1
    detail = _quarantine_record(entries[0], with_body=True)
    print(json.dumps(detail, indent=2, ensure_ascii=False), file=out)
    return 0


async def purge_quarantine(
    config: StoreView, entry_ids: Sequence[int] | None, out: TextIO = sys.stdout
) -> int:
    """Delete these entries, or every one (`entry_ids` None)."""
    count = await _change(config, lambda store: store.purge_quarantine(entry_ids))
    print(f"purged {count} quarantined bod{'y' if count == 1 else 'ies'}", file=out)
    return 0


async def _change(config: StoreView, change: Callable[[Store], Awaitable[T]]) -> T:
    async with operator_store(config.store, dedupe_window=config.dedupe.window) as store:
        return await change(store)
