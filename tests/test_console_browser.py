"""The console in a real headless Chromium (Debian's `chromium`, driven by Playwright):
sign in, see a sink with a dead letter, replay it from the page and watch it delivered
at a local receiver, filter events by key. It also takes the docs' screenshots.

Without Chromium or Playwright these tests skip, visibly; with RELAY_REQUIRE_BROWSER=1
(.ci/run) they fail instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOKEN, eventually, notifier_body, relay_config

CONSOLE_TOKEN = "console-token-0123456789abcdef"
DOCS_IMAGES = Path(__file__).parent.parent / "docs" / "images"


def _missing(reason: str) -> None:
    if os.environ.get("RELAY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and RELAY_REQUIRE_BROWSER=1 requires it")
    pytest.skip(reason)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _missing("chromium is not installed (Debian: apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            await launched.close()


def _screenshot_path(tmp_path: Path, name: str) -> Path:
    # The docs' images are refreshed on request; every run still takes them.
    if os.environ.get("RELAY_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        return DOCS_IMAGES / name
    return tmp_path / name


async def test_an_operator_replays_a_dead_letter_from_the_browser(
    tmp_path: Path, start_relay, receiver, browser
):
    receiver.statuses = [400, 400]  # two dead letters; fine once replayed
    config = relay_config(
        tmp_path,
        console={"token": CONSOLE_TOKEN},
        sinks={
            "app": {"kind": "http", "url": receiver.url, "retry": {"max_attempts": 1}},
            "archive": {"kind": "file", "path": "out/events.jsonl"},
        },
    )
    client = await start_relay(config)
    body = notifier_body("photos/cat.jpg", "docs/report.pdf")
    assert (await client.post(f"/hooks/qingstor?token={TOKEN}", json=body)).status == 200
    await eventually(lambda: len(receiver.requests) == 2)
    base = str(client.make_url("/console/"))

    page = await browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text))  # CSP violations land here
    await page.goto(base)
    # Signed out: the login form, and nothing else.
    assert await page.locator("h1").inner_text() == "Sign in"
    await page.fill("#token", "not-the-token-at-all")
    await page.click("button[type=submit]")
    assert "not the console token" in await page.locator(".error").inner_text()
    await page.fill("#token", CONSOLE_TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_selector("text=Needs attention")
    assert "2 dead letters" in await page.locator(".attention").inner_text()
    await page.screenshot(path=str(_screenshot_path(tmp_path, "console-overview.png")))

    # Filter events by key.
    await page.click("nav >> text=Events")
    await page.fill("input[name=key]", "photos/")
    await page.click("text=Filter")
    rows = page.locator("tbody tr")
    assert await rows.count() == 1
    assert "photos/cat.jpg" in await rows.first.inner_text()

    # The event's page, then replay its dead letter with a confirmation.
    await rows.first.locator("a").click()
    await page.wait_for_selector("text=Deliveries")
    assert "HTTP 400" in await page.content()
    await page.screenshot(path=str(_screenshot_path(tmp_path, "console-event.png")), full_page=True)
    event_url = page.url
    await page.click("text=Replay its dead letters")
    await page.wait_for_selector("text=Replay 1 dead letter?")
    await page.click("button:has-text('Replay 1')")
    await page.wait_for_selector("text=replayed 1")
    await eventually(lambda: len(receiver.requests) == 3)
    assert "photos/cat.jpg" in receiver.requests[2]["body"].decode()

    async def app_done() -> bool:
        await page.goto(event_url)
        row = page.locator("tbody tr", has=page.locator("th", has_text="app"))
        return bool(await row.locator("td").first.inner_text() == "done")

    await eventually(app_done)
    # No resource the page asked for was refused (CSP), and no script failed.
    assert [e for e in errors if "Refused" in e or "Uncaught" in e or "404" in e] == []
