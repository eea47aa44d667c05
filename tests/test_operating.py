"""Operating relay: metrics, live reload (SIGHUP, --watch), sink removal, status, drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay.app import RUNTIME, STORE, create_app
from relay.config import load_config
from relay.models import NotifierBatch, notifier_envelopes
from relay.store import EventRecord, Store
from tests.conftest import TOKEN, eventually, notifier_body, read_lines, relay_config, sample
from tests.processes import post, run_cli

HOOK = f"/hooks/qingstor?token={TOKEN}"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


async def test_metrics_count_a_known_sequence_exactly(tmp_path, start_relay, receiver):
    receiver.statuses = [400] * 10  # the app refuses everything: three dead letters
    config = relay_config(
        tmp_path,
        sinks={
            "archive": {"kind": "file", "path": "out/events.jsonl"},
            "app": {"kind": "http", "url": receiver.url},
        },
    )
    client = await start_relay(config)
    assert (await client.post(HOOK, json=sample())).status == 200  # 1 new
    assert (await client.post(HOOK, json=sample())).status == 200  # 1 duplicate
    assert (await client.post(HOOK, json=notifier_body("a", "b"))).status == 200  # 2 new
    assert (await client.post("/hooks/qingstor?token=no", json=sample())).status == 401
    assert (await client.post("/hooks/ghost", json=sample())).status == 404
    store = client.app[STORE]

    async def settled():
        counts = await store.counts()
        return counts.get("done") == 3 and counts.get("dead") == 3

    await eventually(settled)
    found = samples(await (await client.get("/metrics")).text())

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    assert value("relay_requests_total", source="qingstor", status="200") == 3
    assert value("relay_requests_total", source="qingstor", status="401") == 1
    assert value("relay_requests_total", source="-", status="404") == 1
    assert value("relay_events_received_total", source="qingstor") == 4
    assert value("relay_events_duplicate_total", source="qingstor") == 1
    assert value("relay_deliveries_total", sink="archive", outcome="done") == 3
    assert value("relay_deliveries_total", sink="app", outcome="dead") == 3
    assert ("relay_deliveries_total", (("outcome", "retry"), ("sink", "app"))) not in found
    assert value("relay_queue_depth", sink="archive") == 0
    assert value("relay_queue_depth", sink="app") == 0
    assert value("relay_dead_letters", sink="app") == 3
    assert value("relay_dead_letters", sink="archive") == 0
    assert value("relay_circuit_open", sink="app") == 0
    assert value("relay_ingest_seconds_count") == 3
    assert value("relay_delivery_seconds_count", sink="app") == 3


async def test_gauges_come_from_the_store_so_a_restart_keeps_them(tmp_path, aiohttp_client):
    # The sink's endpoint is down; retries are far apart so the queue just sits.
    sinks = {
        "app": {
            "kind": "http",
            "url": "http://127.0.0.1:9/events",
            "retry": {"initial": "1h", "max": "1h"},
        }
    }
    config = relay_config(tmp_path, sinks=sinks)
    first = await aiohttp_client(create_app(config))
    body = notifier_body("a", "b")
    await first.post(HOOK, json=body)
    await eventually(lambda: _attempted(first.app[STORE], ids_of(body), 2))
    await first.close()

    second = await aiohttp_client(create_app(config))
    found = samples(await (await second.get("/metrics")).text())
    assert found[("relay_queue_depth", (("sink", "app"),))] == 2
    assert found[("relay_oldest_pending_seconds", (("sink", "app"),))] > 0
    # Counters, by contrast, are this process's own: none yet.
    assert ("relay_events_received_total", (("source", "qingstor"),)) not in found


def ids_of(body: dict[str, Any]) -> list[str]:
    """The ids relay gives a notifier batch's events (its ack body does not list them)."""
    batch = NotifierBatch.model_validate(body)
    return [e.id for e in notifier_envelopes(body, batch, "qingstor", datetime.now(UTC))]


async def _records(store: Store, ids: list[str]) -> list[EventRecord]:
    """The events with `ids`, which must be every event the store holds."""
    assert (await store.counts())["events"] == len(ids)
    records = [await store.event(event_id) for event_id in ids]
    assert all(records), (ids, records)
    return [r for r in records if r is not None]


async def _attempted(store: Store, ids: list[str], n: int) -> bool:
    """Whether exactly `n` deliveries in the store (its events are `ids`) were tried."""
    records = await _records(store, ids)
    return sum(d.attempts > 0 for r in records for d in r.deliveries) == n


def write(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


def base(tmp_path: Path, **sinks: dict[str, Any]) -> dict[str, Any]:
    return {
        "store": {"path": str(tmp_path / "relay.db")},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": sinks,
    }


async def test_a_sink_removed_by_reload_has_its_queue_dead_lettered(tmp_path, aiohttp_client):
    path = tmp_path / "relay.yaml"
    slow = {"kind": "http", "url": "http://127.0.0.1:9/x", "retry": {"initial": "1h", "max": "1h"}}
    write(
        path, base(tmp_path, archive={"kind": "file", "path": str(tmp_path / "a.jsonl")}, app=slow)
    )
    app = create_app(load_config(path), path)
    client = await aiohttp_client(app)
    body = notifier_body("a", "b", "c")
    await client.post(HOOK, json=body)
    store = app[STORE]
    ids = ids_of(body)
    await eventually(lambda: _attempted(store, ids, 6))  # the file's 3, and the app's 3 failed

    write(path, base(tmp_path, archive={"kind": "file", "path": str(tmp_path / "a.jsonl")}))
    assert await app[RUNTIME].reload("test") is True
    rows = [
        (d.sink, d.state, d.last_error)
        for r in await _records(store, ids)
        for d in r.deliveries
        if d.sink == "app"
    ]
    assert rows == [("app", "dead", "sink removed")] * 3
    assert list(app[RUNTIME].sinks) == ["archive"]
    # The remaining sink carries on untouched.
    await client.post(HOOK, json=notifier_body("d"))
    await eventually(lambda: len(read_lines(tmp_path / "a.jsonl")) == 4)


async def test_reload_keeps_unchanged_sinks_running_and_restarts_changed_ones(
    tmp_path, aiohttp_client
):
    path = tmp_path / "relay.yaml"
    archive = {"kind": "file", "path": str(tmp_path / "a.jsonl")}
    other = {"kind": "file", "path": str(tmp_path / "b.jsonl")}
    write(path, base(tmp_path, archive=archive, other=other))
    app = create_app(load_config(path), path)
    await aiohttp_client(app)
    runtime = app[RUNTIME]
    before = dict(runtime.sinks)
    write(path, base(tmp_path, archive=archive, other={**other, "path": str(tmp_path / "c")}))
    assert await runtime.reload("test")
    assert runtime.sinks["archive"] is before["archive"]
    assert runtime.sinks["other"] is not before["other"]


async def test_port_changes_are_logged_as_needing_a_restart(tmp_path, aiohttp_client):
    from structlog.testing import capture_logs

    path = tmp_path / "relay.yaml"
    archive = {"kind": "file", "path": str(tmp_path / "a.jsonl")}
    write(path, base(tmp_path, archive=archive))
    app = create_app(load_config(path), path)
    await aiohttp_client(app)
    write(path, {**base(tmp_path, archive=archive), "server": {"port": 9999}})
    with capture_logs() as logs:
        assert await app[RUNTIME].reload("test")
    [warning] = [e for e in logs if e["event"] == "config.restart_required"]
    assert (warning["key"], warning["configured"]) == ("server.port", "9999")


async def test_sighup_applies_a_good_config_and_refuses_a_broken_one(tmp_path, processes):
    path = tmp_path / "relay.yaml"
    first = {"kind": "file", "path": str(tmp_path / "first.jsonl")}
    second = {"kind": "file", "path": str(tmp_path / "second.jsonl")}
    write(path, base(tmp_path, first=first))
    relay = processes(tmp_path, None)
    relay.args += ["--config", str(path)]
    await relay.start()
    hook = relay.url(HOOK)
    await post(hook, notifier_body("one"))
    await eventually(lambda: read_lines(tmp_path / "first.jsonl"))

    write(path, base(tmp_path, first=first, second=second))
    relay.kill(signal.SIGHUP)
    await eventually(lambda: _logged(relay, "config.reloaded"))
    await post(hook, notifier_body("two"))
    await eventually(lambda: [e["key"] for e in read_lines(tmp_path / "second.jsonl")] == ["two"])

    path.write_text("sinks:\n  third: {kind: nosuchsink}\n")
    relay.kill(signal.SIGHUP)
    failed = await eventually(lambda: _logged(relay, "config.reload_failed"))
    assert "sinks.third.kind: unknown kind 'nosuchsink'" in " ".join(failed["problems"])
    # The old config keeps serving: both sinks still get events.
    assert await post(hook, notifier_body("three")) == (200, {"accepted": 1, "duplicates": 0})
    await eventually(lambda: len(read_lines(tmp_path / "second.jsonl")) == 2)
    await eventually(lambda: len(read_lines(tmp_path / "first.jsonl")) == 3)
    assert relay.proc is not None and relay.proc.poll() is None


def _logged(relay, event: str) -> dict[str, Any] | None:
    return next((e for e in relay.logs() if e.get("event") == event), None)


async def test_watch_picks_up_a_configmap_style_symlink_swap(tmp_path, processes):
    # Kubernetes mounts a ConfigMap as relay.yaml -> ..data/relay.yaml, ..data -> ..<ts>;
    # an update writes a new ..<ts> folder and renames a new ..data link over the old.
    folder = tmp_path / "config"
    (folder / "..v1").mkdir(parents=True)
    first = {"kind": "file", "path": str(tmp_path / "first.jsonl")}
    config = {**base(tmp_path, first=first), "server": {"watch_interval": "200ms"}}
    write(folder / "..v1" / "relay.yaml", config)
    os.symlink("..v1", folder / "..data")
    os.symlink("..data/relay.yaml", folder / "relay.yaml")

    relay = processes(tmp_path, None)
    relay.args += ["--config", str(folder / "relay.yaml"), "--watch"]
    await relay.start()

    (folder / "..v2").mkdir()
    second = {"kind": "file", "path": str(tmp_path / "second.jsonl")}
    write(folder / "..v2" / "relay.yaml", {**config, "sinks": {"first": first, "second": second}})
    os.symlink("..v2", folder / "..data_tmp")
    os.replace(folder / "..data_tmp", folder / "..data")  # atomic, as kubelet does

    reloaded = await eventually(lambda: _logged(relay, "config.reloaded"))
    assert reloaded["trigger"] == "watch"
    await post(relay.url(HOOK), notifier_body("after"))
    await eventually(lambda: read_lines(tmp_path / "second.jsonl"))


async def test_status_reports_queues_dead_letters_circuits_and_traffic(tmp_path, processes):
    path = tmp_path / "relay.yaml"
    refusing = {
        "kind": "http",
        "url": "http://127.0.0.1:9/x",
        "retry": {"max_attempts": 1},
        "circuit": {"failures": 1, "cooldown": "1h"},
        "concurrency": 1,
    }
    write(
        path,
        base(tmp_path, archive={"kind": "file", "path": str(tmp_path / "a.jsonl")}, app=refusing),
    )
    relay = processes(tmp_path, None)
    relay.args += ["--config", str(path)]
    await relay.start()
    await post(relay.url(HOOK), notifier_body("a", "b"))
    await post(relay.url(HOOK), notifier_body("a", "b"))  # two duplicates

    async def report():
        result = await asyncio.to_thread(run_cli, "status", "--json", "--config", str(path))
        data = json.loads(result.stdout)
        settled = data["sinks"]["archive"]["pending"] == 0
        return data if settled and data["sinks"]["app"]["circuit"] == "open" else None

    data = await eventually(report)
    assert data["sources"]["qingstor"] == {"received_1h": 4, "duplicates_1h": 2}
    assert data["sinks"]["archive"]["pending"] == 0
    app = data["sinks"]["app"]
    # One delivery failed (dead at once: max_attempts 1) and opened the circuit; the
    # other waits behind it, unattempted.
    assert (app["dead"], app["pending"], app["circuit"]) == (1, 1, "open")
    assert app["oldest_pending_s"] > 0

    table = await asyncio.to_thread(run_cli, "status", "--config", str(path))
    assert table.returncode == 0
    assert "SINK" in table.stdout and "open" in table.stdout and "qingstor" in table.stdout


async def test_sigterm_mid_delivery_exits_0_and_nothing_is_lost_or_doubled(
    tmp_path, processes, aiohttp_server
):
    arrived: list[str] = []
    got: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        body = await request.json()
        arrived.append(body["id"])
        await asyncio.sleep(0.5)  # in flight when SIGTERM lands
        got.append(body["id"])
        return web.Response(text="ok")

    downstream = web.Application()
    downstream.router.add_post("/events", slow)
    server = await aiohttp_server(downstream)
    path = tmp_path / "relay.yaml"
    config = base(
        tmp_path, app={"kind": "http", "url": str(server.make_url("/events")), "concurrency": 4}
    )
    config["server"] = {"drain_timeout": "3s"}
    write(path, config)
    relay = processes(tmp_path, None)
    relay.args += ["--config", str(path)]
    await relay.start()
    body = notifier_body("a", "b", "c", "d")
    await post(relay.url(HOOK), body)
    await eventually(lambda: len(arrived) == 4)  # all four sends are under way
    started = time.monotonic()
    relay.kill(signal.SIGTERM)
    assert await asyncio.to_thread(relay.wait, 10) == 0
    assert time.monotonic() - started < 3 + 2  # the drain bound, plus process slack
    assert len(got) == 4  # the drain let every send in flight finish

    again = processes(tmp_path, None)
    again.args += ["--config", str(path)]
    await again.start()
    states = await _states_by_cli(path, ids_of(body))
    assert states == {"done": 4}  # all settled before the exit: nothing left to resend
    await asyncio.sleep(1.0)
    assert len(arrived) == 4 and sorted(got) == sorted(set(got))  # none sent twice


async def _states_by_cli(path: Path, ids: list[str]) -> dict[str, int]:
    """Deliveries by state, through `relay status` and `relay event`, for a store whose
    events are `ids`: each event's deliveries, and, from status, that no sink has any
    other pending or dead."""
    states: dict[str, int] = {}
    for event_id in ids:
        shown = await asyncio.to_thread(run_cli, "event", event_id, "--json", "--config", str(path))
        assert shown.returncode == 0, shown.stderr
        for delivery in json.loads(shown.stdout)["deliveries"]:
            states[delivery["state"]] = states.get(delivery["state"], 0) + 1
    status = await asyncio.to_thread(run_cli, "status", "--json", "--config", str(path))
    assert status.returncode == 0, status.stderr
    sinks = json.loads(status.stdout)["sinks"]
    assert sum(s["pending"] for s in sinks.values()) == states.get("pending", 0), sinks
    assert sum(s["dead"] for s in sinks.values()) == states.get("dead", 0), sinks
    return states


async def test_a_reload_whose_new_sink_cannot_start_changes_nothing(tmp_path, aiohttp_client):
    from structlog.testing import capture_logs

    path = tmp_path / "relay.yaml"
    archive = {"kind": "file", "path": str(tmp_path / "a.jsonl")}
    write(path, base(tmp_path, archive=archive))
    app = create_app(load_config(path), path)
    client = await aiohttp_client(app)
    runtime = app[RUNTIME]
    (tmp_path / "blocker").write_text("a file where a folder should be")
    broken = {"kind": "file", "path": str(tmp_path / "blocker" / "sub" / "b.jsonl")}
    write(path, {**base(tmp_path, archive=archive, broken=broken), "routes": [{"to": ["broken"]}]})
    with capture_logs() as logs:
        assert await runtime.reload("test") is False
    [failed] = [e for e in logs if e["event"] == "config.reload_failed"]
    assert failed["problems"][0].startswith("sinks.broken: cannot start")
    assert list(runtime.sinks) == ["archive"] and list(runtime.config.sinks) == ["archive"]
    # Still routed by the old config: every event to the archive.
    await client.post(HOOK, json=notifier_body("still"))
    await eventually(lambda: read_lines(tmp_path / "a.jsonl"))


async def test_a_new_lane_clears_the_circuit_and_gone_state_a_previous_run_left(
    tmp_path, aiohttp_client, receiver
):
    config = relay_config(tmp_path, sinks={"app": {"kind": "http", "url": receiver.url}})
    store_app = create_app(config)
    client = await aiohttp_client(store_app)
    await store_app[STORE].save_sink_state("app", "open", time.time() + 3600, True)
    await client.close()
    again = await aiohttp_client(create_app(config))
    found = samples(await (await again.get("/metrics")).text())
    assert found[("relay_circuit_open", (("sink", "app"),))] == 0
    assert found[("relay_sink_gone", (("sink", "app"),))] == 0


async def test_readyz_fails_when_the_store_disk_is_nearly_full(tmp_path, start_relay):
    config = relay_config(tmp_path, store={"path": "relay.db", "min_free_bytes": 2**62})
    client = await start_relay(config)
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["error"] == "not_ready" and "nearly full" in body["message"]


def test_a_yaml_error_never_quotes_the_offending_line(tmp_path):
    path = tmp_path / "relay.yaml"
    path.write_text("sources:\n  q: {kind: qingstor, token: hunter2-literal-secret: x}\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "invalid YAML at line 2" in result.stderr
    assert "hunter2" not in result.stderr


async def test_a_failing_reload_hook_is_logged_and_stops_the_later_ones(tmp_path, aiohttp_client):
    from structlog.testing import capture_logs

    path = tmp_path / "relay.yaml"
    write(path, base(tmp_path, archive={"kind": "file", "path": str(tmp_path / "a.jsonl")}))
    app = create_app(load_config(path), path)
    await aiohttp_client(app)
    runtime = app[RUNTIME]
    later: list[str] = []

    def broken() -> None:  # the snapshot write of server.workers, on a full disk
        raise OSError(28, "No space left on device")

    runtime.on_reloaded.extend([broken, lambda: later.append("signalled the workers")])
    with capture_logs() as logs:
        assert await runtime.reload("test") is True  # the leader runs the new config
    assert later == []  # the workers are not sent to a snapshot that was not written
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["config.reload_hook_failed"]
