"""`store:` is a union by backend: what check-config says of each, and what a reload
may change (a store is chosen at start; only its housekeeping keys reload)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from structlog.testing import capture_logs

from relay.app import RUNTIME, create_app
from relay.config import load_config
from tests.conftest import TOKEN
from tests.processes import run_cli

SECRET = "redis-pass-4d1e"


def base(tmp_path: Path, store: dict[str, Any]) -> dict[str, Any]:
    return {
        "store": store,
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": str(tmp_path / "a.jsonl")}},
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_config_validates_each_backend_and_never_shows_the_url(tmp_path: Path):
    good = write(
        tmp_path / "redis.yaml",
        base(tmp_path, {"backend": "redis", "url": f"redis://:{SECRET}@10.0.0.5:6379/2"}),
    )
    result = run_cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    assert "store redis at redis://10.0.0.5:6379/2 (prefix 'relay')" in result.stdout
    cases = {
        "no url": ({"backend": "redis"}, "store.url: required"),
        "wrong scheme": (
            {"backend": "redis", "url": f"http://:{SECRET}@x"},
            "store.url: url must start with redis://",
        ),
        "a sqlite key": (
            {"backend": "redis", "url": "redis://h", "path": "x.db"},
            "store.path: a key of backend sqlite",
        ),
        "a typo": ({"backend": "redis", "url": "redis://h", "prefx": "a"}, "did you mean 'prefix'"),
        "no such backend": ({"backend": "postgres"}, "store.backend: unknown backend 'postgres'"),
        "braces": (
            {"backend": "redis", "url": "redis://h", "prefix": "{a}"},
            "store.prefix: prefix must not contain braces or spaces",
        ),
        "no backend": ({"url": "redis://h"}, "store.url: a key of backend redis"),
        "an unencoded @ and # in the password": (
            {"backend": "redis", "url": f"redis://:{SECRET}@x#1@10.0.0.5:6379/0"},
            "percent-encode @ : / # ? in the password",
        ),
        "an option redis-py would choke on": (
            {"backend": "redis", "url": f"redis://:{SECRET}@h:6379/0?foo=1"},
            "unknown query option 'foo'",
        ),
        "a database that is not a number": (
            {"backend": "redis", "url": "redis://h:6379/x"},
            "database that is not a number",
        ),
    }
    for name, (store, expected) in cases.items():
        bad = write(tmp_path / "bad.yaml", base(tmp_path, store))
        result = run_cli("check-config", str(bad))
        assert result.returncode == 2, name
        assert expected in result.stderr, (name, result.stderr)
        assert SECRET not in result.stdout + result.stderr, name


async def test_a_store_change_needs_a_restart_and_the_running_store_stays(
    tmp_path: Path, aiohttp_client
):
    path = write(tmp_path / "relay.yaml", base(tmp_path, {"path": str(tmp_path / "relay.db")}))
    app = create_app(load_config(path), path)
    await aiohttp_client(app)
    running = app[RUNTIME].config.store
    moved = {"backend": "redis", "url": f"redis://:{SECRET}@127.0.0.1:6379/0", "keep_done": "2h"}
    write(path, base(tmp_path, moved))
    with capture_logs() as logs:
        assert await app[RUNTIME].reload("test")
    changed = {e["key"] for e in logs if e["event"] == "config.restart_required"}
    assert {"store.backend", "store.path", "store.url"} <= changed
    assert SECRET not in repr(logs)
    store = app[RUNTIME].config.store
    # Still SQLite at its path; the reloadable key took effect.
    assert (store.backend, getattr(store, "path", None), store.keep_done) == (
        "sqlite",
        getattr(running, "path", None),
        7200.0,
    )


async def test_a_relay_on_a_redis_cluster_takes_and_delivers_events(
    tmp_path: Path, start_relay, receiver, redis_cluster_url: str
):
    from relay.config import build_config
    from tests.conftest import eventually, notifier_body
    from tests.redis_server import fresh_prefix

    store = {"backend": "redis", "url": redis_cluster_url, "cluster": True}
    data = {
        **base(tmp_path, {**store, "prefix": fresh_prefix()}),
        "sinks": {"app": {"kind": "http", "url": receiver.url}},
    }
    client = await start_relay(build_config(data, base_dir=tmp_path, env={}))
    hook = f"/hooks/qingstor?token={TOKEN}"
    first = await client.post(hook, json=notifier_body("a.jpg", "b.jpg"))
    assert (first.status, await first.json()) == (200, {"accepted": 2, "duplicates": 0})
    again = await client.post(hook, json=notifier_body("a.jpg", "b.jpg"))
    assert (await again.json())["duplicates"] == 2
    await eventually(lambda: len(receiver.requests) == 2)
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
