"""/metrics from relay as one process and with `server.workers`: one exposition, read
back with prometheus_client's parser and checked by promtool."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKEN, eventually, notifier_body
from tests.processes import RelayProcess, post

HOOK = f"/hooks/qingstor?token={TOKEN}"
MODES: dict[str, dict[str, Any]] = {"one process": {}, "workers": {"workers": 1}}


def config(**server: Any) -> dict[str, Any]:
    return {
        "server": {"drain_timeout": "5s", **server},
        "store": {"path": "data/relay.db"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": "data/events.jsonl"}},
        "routes": [{"when": {"prefixes": ["m/"]}, "to": ["archive"]}],
    }


async def get_metrics(relay: RelayProcess) -> str:
    async with ClientSession() as session, session.get(relay.url("/metrics")) as response:
        assert response.status == 200
        return await response.text()


async def scrape(processes, workdir: Path, server: dict[str, Any]) -> tuple[str, str]:
    """relay's /metrics as it starts, and once it has stored, deduplicated, left
    unrouted, quarantined, refused and delivered events: by then every counter it keeps
    has a series in either mode (multiprocess files hold only series ever touched)."""
    relay: RelayProcess = await processes(workdir, config(**server)).start()
    # Scrapes are requests too, counted under source "-": this first one makes that
    # series exist in both modes, however many polls follow.
    startup = await get_metrics(relay)
    bodies = [notifier_body(f"m/{n}.txt", request_id=f"req-{n}") for n in range(3)]
    for body in [*bodies, bodies[0], notifier_body("unrouted.txt")]:
        assert (await post(relay.url(HOOK), body))[0] == 200
    assert (await post(relay.url(HOOK), {"events": []}))[0] == 400
    assert (await post(relay.url("/hooks/qingstor?token=wrong"), bodies[0]))[0] == 401
    scraped = [startup]

    async def delivered() -> str | None:
        scraped.append(await get_metrics(relay))
        # Counted once the send returns, a moment after the line is written.
        done = 'relay_deliveries_total{outcome="done",sink="archive"} 3.0'
        return scraped[-1] if done in scraped[-1] else None

    final: str = await eventually(delivered)
    # Each scrape counts once it is answered: all but the last are in the last.
    assert f'relay_requests_total{{source="-",status="200"}} {len(scraped) - 1}.0' in final
    return startup, final


@pytest.fixture
def workdirs(tmp_path: Path) -> dict[str, Path]:
    made = {mode: tmp_path / mode.replace(" ", "-") for mode in MODES}
    for path in made.values():
        path.mkdir()
    return made


async def scrape_both(processes, workdirs: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """Per mode, relay's /metrics as it starts and after events."""
    return {mode: await scrape(processes, workdirs[mode], MODES[mode]) for mode in MODES}


@pytest.fixture
async def scrapes(workdirs: dict[str, Path], processes) -> dict[str, tuple[str, str]]:
    return await scrape_both(processes, workdirs)


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def comments(text: str, kind: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith(f"# {kind} ")}


async def test_no_created_series_and_one_exposition_in_both_modes(scrapes):
    for startup, _ in scrapes.values():
        assert "_created" not in startup
    one, workers = scrapes["one process"][1], scrapes["workers"][1]
    for text in (one, workers):
        assert "_created" not in text
        assert "relay_events_quarantined_total" in text  # the scrape saw the counters
    assert families(one).keys() == families(workers).keys()
    assert comments(one, "TYPE") == comments(workers, "TYPE")
    assert comments(one, "HELP") == comments(workers, "HELP")

    def series(text: str) -> set[tuple[str, frozenset[tuple[str, str]]]]:
        return {
            (sample.name, frozenset(sample.labels.items()))
            for family in families(text).values()
            for sample in family.samples
        }

    assert series(one) == series(workers)

    def counts(text: str) -> dict[Any, float]:
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in families(text).values()
            if family.type == "counter"
            for sample in family.samples
            if sample.labels.get("source") != "-"  # the test's own scrapes, polled
        }

    # The same requests counted the same, whichever way relay runs.
    assert counts(one) == counts(workers)
    ok = ("relay_requests_total", frozenset({("source", "qingstor"), ("status", "200")}))
    assert counts(one)[ok] == 5


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        # Under CI a missing program is a failure: a skip there would pass unseen.
        if _under_ci():
            pytest.fail("promtool is not on PATH; CI must install Debian's `prometheus` package")
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    return found


async def test_promtool_finds_no_problem_in_either_mode(workdirs, processes):
    # Looked for in the test, not a fixture: under CI its absence is then a failure of
    # this test, and no relay is started only for the test to be skipped.
    tool = promtool()
    scrapes = await scrape_both(processes, workdirs)
    found = {}
    texts = {
        (mode, moment): text
        for mode, (startup, final) in scrapes.items()
        for moment, text in (("startup", startup), ("after events", final))
    }
    for key, text in texts.items():
        checked = await asyncio.to_thread(
            subprocess.run,
            [tool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Exit 3 for lint problems, 1 for what it cannot parse; it names them on either
        # stream, so silence is the pass.
        found[key] = (checked.returncode, checked.stdout + checked.stderr)
    assert found == dict.fromkeys(texts, (0, ""))
