"""Quarantine: an authenticated sender's unusable body is answered 4xx and kept."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from relay.app import RUNTIME, STORE
from tests.conftest import TOKEN, eventually, notifier_body, relay_config
from tests.processes import post, run_cli

HOOK = f"/hooks/qingstor?token={TOKEN}"
NOT_AN_EVENT = b'{"events": [{"event_type": "create_object"}]}'


async def test_unusable_bodies_from_an_authenticated_sender_are_kept_with_their_reason(
    tmp_path, start_relay
):
    client = await start_relay(
        relay_config(
            tmp_path,
            server={"max_records": 2},
            sources={
                "qingstor": {"kind": "qingstor", "token": TOKEN},
                "open": {"kind": "qingstor"},  # no token: anybody may post here
            },
        )
    )
    store = client.app[STORE]
    json_type = {"Content-Type": "application/json"}

    bad = await client.post(HOOK, data=NOT_AN_EVENT, headers=json_type)
    assert bad.status == 400 and (await bad.json())["error"] == "invalid_event"
    not_json = await client.post(HOOK, data=b"\xff\xfenot json", headers=json_type)
    assert (await not_json.json())["error"] == "invalid_json"
    too_many = await client.post(HOOK, json=notifier_body("a", "b", "c"))
    assert too_many.status == 413
    # Not kept: a sender that did not prove itself, and a source anyone may post to.
    assert (await client.post("/hooks/qingstor?token=wrong", data=NOT_AN_EVENT)).status == 401
    assert (await client.post("/hooks/open", data=NOT_AN_EVENT)).status == 400

    kept = await _kept(client)
    assert [(q.source, q.error) for q in kept] == [
        ("qingstor", "invalid_event"),
        ("qingstor", "invalid_json"),
        ("qingstor", "too_many_records"),
    ]
    assert kept[0].body == NOT_AN_EVENT and kept[0].size == len(NOT_AN_EVENT)
    assert kept[0].content_type == "application/json"
    assert kept[0].reason == (await bad.json())["message"]
    assert kept[1].body == b"\xff\xfenot json"
    assert (await store.counts())["events"] == 0  # quarantine is not the event store

    metrics = await (await client.get("/metrics")).text()
    assert 'relay_events_quarantined_total{source="qingstor"} 3.0' in metrics

    # QingStor retries what got no 200: the same body is kept once, and counted.
    for _ in range(3):
        await client.post(HOOK, data=NOT_AN_EVENT, headers=json_type)
    kept = await _kept(client)
    assert len(kept) == 3 and (kept[0].body, kept[0].repeats) == (NOT_AN_EVENT, 4)


async def test_quarantine_keeps_the_newest_within_its_count_and_byte_bounds(tmp_path, start_relay):
    client = await start_relay(
        relay_config(tmp_path, store={"path": "relay.db", "quarantine_max": 3})
    )
    for n in range(5):
        await client.post(HOOK, data=f'{{"n": {n}}}')
    kept = await _kept(client)
    assert [json.loads(q.body)["n"] for q in kept] == [2, 3, 4]

    client = await start_relay(
        relay_config(tmp_path / "b", store={"path": "relay.db", "quarantine_max_bytes": 100})
    )
    for n in range(3):
        await client.post(HOOK, data=json.dumps({"n": n, "pad": "x" * 40}))  # 60 bytes each
    await client.post(HOOK, data=json.dumps({"pad": "x" * 200}))  # over the bound alone
    kept = await _kept(client)
    assert [json.loads(q.body)["n"] for q in kept] == [2]

    client = await start_relay(
        relay_config(tmp_path / "c", store={"path": "relay.db", "quarantine_max": 0})
    )
    assert (await client.post(HOOK, data=NOT_AN_EVENT)).status == 400
    assert await _kept(client) == []


async def _kept(client: Any) -> list[Any]:
    """What the quarantine holds once the writes in the background are done."""
    await client.app[RUNTIME].finish_quarantine()
    return list(await client.app[STORE].quarantined())


async def test_dlq_lists_shows_and_purges_the_quarantine_of_a_running_relay_with_workers(
    tmp_path: Path, processes, store_section: dict[str, Any]
):
    config: dict[str, Any] = {
        "server": {"workers": 1},
        "store": store_section,
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": "data/events.jsonl"}},
    }
    relay = await processes(tmp_path, config).start()
    path = tmp_path / "relay.yaml"  # where RelayProcess wrote the config

    def cli(*args: str) -> Any:
        return run_cli("dlq", *args, "--quarantine", "--config", str(path))

    status, answer = await post(relay.url(HOOK), {"events": [{"event_type": "x"}]})
    assert (status, answer["error"]) == (400, "invalid_event")  # answered by the worker

    async def listed() -> list[dict[str, Any]]:
        # The worker keeps the body in the background, after its answer.
        out = (await asyncio.to_thread(cli, "list", "--json")).stdout
        return [json.loads(line) for line in out.splitlines()]

    (entry,) = await eventually(listed)
    assert (entry["source"], entry["error"], entry["reason"]) == (
        "qingstor",
        "invalid_event",
        answer["message"],
    )
    table = (await asyncio.to_thread(cli, "list")).stdout
    assert "invalid_event" in table and "SOURCE" in table

    shown = await asyncio.to_thread(cli, "show", str(entry["id"]))
    assert json.loads(json.loads(shown.stdout)["body"]) == {"events": [{"event_type": "x"}]}
    assert (await asyncio.to_thread(cli, "show", "999")).returncode == 1
    assert (await asyncio.to_thread(cli, "purge")).returncode == 2  # no selection
    assert (await asyncio.to_thread(cli, "purge", "--all", "1")).returncode == 2
    assert (await asyncio.to_thread(cli, "list", "--sink", "app")).returncode == 2

    purged = await asyncio.to_thread(cli, "purge", "--all")
    assert "purged 1" in purged.stdout
    assert "nothing in quarantine" in (await asyncio.to_thread(cli, "list")).stdout
