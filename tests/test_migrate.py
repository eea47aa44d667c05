"""`relay migrate`: a single node's queue moves from SQLite to Redis and is delivered
from there; through the command line, a real relay on each store and a real Redis."""

from __future__ import annotations

from pathlib import Path

import yaml

from relay.app import RUNTIME
from relay.config import load_config
from relay.store import Selection
from tests.conftest import TOKEN, eventually, notifier_body, relay_config
from tests.processes import free_port, run_cli
from tests.redis_server import fresh_prefix

HOOK = f"/hooks/qingstor?token={TOKEN}"
KEYS = [f"photos/{i}.jpg" for i in range(5)]


def sinks(url: str) -> dict[str, object]:
    # `app` keeps retrying; `strict` gives up at its first failure (a dead letter).
    return {
        "app": {
            "kind": "http",
            "url": url,
            "retry": {"initial": "1s", "max": "1s", "max_attempts": 100},
        },
        "strict": {"kind": "http", "url": url, "retry": {"max_attempts": 1}},
    }


async def test_a_queue_moves_from_sqlite_to_redis_and_is_delivered_from_there(
    tmp_path: Path, start_relay, receiver, redis_url: str
):
    nowhere = f"http://127.0.0.1:{free_port()}/events"  # nothing listens: every send fails
    single = await start_relay(relay_config(tmp_path, sinks=sinks(nowhere)))
    response = await single.post(HOOK, json=notifier_body(*KEYS))
    assert (response.status, (await response.json())["accepted"]) == (200, 5)
    store = single.server.app[RUNTIME].store

    async def failed_once() -> list[str]:
        # Every event's strict delivery dead; each app delivery tried and pending.
        letters = await store.dead_letters(Selection(sink="strict"))
        ids = sorted(letter.event_id for letter in letters)
        records = [await store.event(i) for i in ids]
        tried = all(r is not None and all(d.attempts >= 1 for d in r.deliveries) for r in records)
        return ids if len(ids) == 5 and tried else []

    event_ids = await eventually(failed_once)
    sqlite_path = tmp_path / "relay.db"
    env = {"RELAY_TEST_REDIS_URL": redis_url}
    prefix = fresh_prefix()
    command = [
        "migrate",
        "--from",
        f"sqlite:{sqlite_path}",
        "--to",
        "env:RELAY_TEST_REDIS_URL",
        "--prefix",
        prefix,
    ]
    # Not while a relay serves the store: it would go on sending what moves.
    busy = run_cli(*command, env=env)
    assert busy.returncode == 1
    assert "a relay is serving sqlite at" in busy.stderr and "stop it first" in busy.stderr
    await single.close()

    moved = run_cli(*command, env=env)
    assert moved.returncode == 0, moved.stderr
    assert "moved 5 events" in moved.stdout
    assert "5 pending deliveries, 5 dead letters" in moved.stdout
    assert "do not serve the SQLite store again" in moved.stdout
    again = run_cli(*command, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("moved 0 events") and "5 were there already" in again.stdout
    assert "0 pending deliveries, 0 dead letters" in again.stdout

    # The same sinks, now on Redis, and the receiver up: the moved queue is delivered.
    config_file = tmp_path / "redis.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "store": {"backend": "redis", "url": "${RELAY_TEST_REDIS_URL}", "prefix": prefix},
                "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
                "sinks": sinks(receiver.url),
            }
        )
    )
    config = load_config(config_file, env=env)
    grown = await start_relay(config)
    await eventually(lambda: len({r["headers"]["webhook-id"] for r in receiver.requests}) == 5)
    assert sorted(r["headers"]["webhook-id"] for r in receiver.requests) == event_ids
    # The dedupe claims came along: QingStor's retry of the same notification is a
    # duplicate on Redis too.
    response = await grown.post(HOOK, json=notifier_body(*KEYS))
    retried = await response.json()
    assert (response.status, retried["accepted"], retried["duplicates"]) == (200, 0, 5)
    dead = run_cli("dlq", "list", "--json", "--config", str(config_file), env=env)
    assert dead.returncode == 0, dead.stderr
    assert sorted(line.count('"strict"') for line in dead.stdout.splitlines()) == [1] * 5
    await grown.close()


def test_migrate_words_its_usage_errors_and_never_shows_a_password(tmp_path: Path):
    wrong = run_cli("migrate", "--from", "relay.db", "--to", "redis://127.0.0.1:6379/0")
    assert wrong.returncode == 2
    assert "--from takes sqlite:PATH" in wrong.stderr
    secret = "redis-password-9f2c"
    bad_url = run_cli(
        "migrate", "--from", "sqlite:relay.db", "--to", f"http://:{secret}@localhost:6379"
    )
    assert bad_url.returncode == 2 and "--to: url must start with redis://" in bad_url.stderr
    missing = run_cli(
        "migrate",
        "--from",
        f"sqlite:{tmp_path / 'none.db'}",
        "--to",
        f"redis://:{secret}@127.0.0.1:{free_port()}/0",
        cwd=tmp_path,
    )
    assert missing.returncode == 1 and "no store at" in missing.stderr
    for result in (wrong, bad_url, missing):
        assert secret not in result.stdout + result.stderr
