"""The console over HTTP: who gets in, what every answer carries, and that no secret
is ever on a page. Real sockets (relay's app on an aiohttp test server)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from relay.console.views import SECURITY_HEADERS
from tests.conftest import TOKEN, eventually, notifier_body, relay_config, sample

CONSOLE_TOKEN = "console-token-0123456789abcdef"
APP_SECRET = "app-bearer-secret-7d1f0c"
SLACK_PATH = "T000/B000/slacksecretpath123456"


def console_config(
    tmp_path: Path, url: str = "http://127.0.0.1:9/x", store: dict[str, Any] | None = None
) -> Any:
    return relay_config(
        tmp_path,
        **({"store": store} if store else {}),
        console={"token": CONSOLE_TOKEN},
        sinks={
            "app": {
                "kind": "http",
                "url": url,
                "headers": {"Authorization": f"Bearer {APP_SECRET}"},
                "retry": {"max_attempts": 1},
            },
            "team": {"kind": "slack", "url": f"http://127.0.0.1:9/services/{SLACK_PATH}"},
        },
        routes=[{"to": ["app"]}],
    )


def assert_secure(response: Any) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert "'unsafe-inline'" not in response.headers["Content-Security-Policy"]


async def test_without_the_token_every_page_is_a_401_with_no_hint(tmp_path, start_relay):
    client = await start_relay(console_config(tmp_path))
    for path in ("/console/", "/console/nothing-here", "/console/events/evt_1"):
        response = await client.get(path)
        assert response.status == 401, path
        page = await response.text()
        assert "Sign in" in page and "app" not in re.sub(r"<[^>]+>", "", page).split()
        assert_secure(response)
    wrong = await client.get("/console/", headers={"Authorization": "Bearer wrong-token-xxxx"})
    assert wrong.status == 401
    refused = await client.post("/console/login", data={"token": "wrong-token-xxxxxxxx"})
    assert refused.status == 401 and "not the console token" in await refused.text()


async def test_a_bearer_token_or_a_signed_in_browser_sees_the_overview(tmp_path, start_relay):
    client = await start_relay(console_config(tmp_path))
    await client.post(f"/hooks/qingstor?token={TOKEN}", json=notifier_body("a.jpg"))
    store = client.app[__import__("relay.app").app.STORE]

    async def dead() -> bool:
        return (await store.sink_stats())["app"].dead == 1

    await eventually(dead)
    response = await client.get("/console/", headers={"Authorization": f"Bearer {CONSOLE_TOKEN}"})
    assert response.status == 200
    assert_secure(response)
    page = await response.text()
    assert "Needs attention" in page and "1 dead letter" in page
    # This minute's bar of the source's chart: one event received.
    assert "<title>1 received, 0 duplicates</title>" in page

    # A person: the login form sets an HttpOnly, SameSite=Strict session cookie.
    signed_in = await client.post(
        "/console/login", data={"token": CONSOLE_TOKEN}, allow_redirects=False
    )
    assert signed_in.status == 303
    cookie = signed_in.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert CONSOLE_TOKEN not in cookie
    overview = await client.get("/console/")
    assert overview.status == 200 and "Overview" in await overview.text()


async def test_a_post_without_the_sessions_csrf_token_is_refused(tmp_path, start_relay):
    client = await start_relay(console_config(tmp_path))
    await client.post("/console/login", data={"token": CONSOLE_TOKEN})
    forged = await client.post("/console/logout", data={}, allow_redirects=False)
    assert forged.status == 403
    page = await (await client.get("/console/")).text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    out = await client.post("/console/logout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    assert (await client.get("/console/")).status == 401


async def test_no_secret_is_on_any_page(tmp_path, start_relay):
    client = await start_relay(console_config(tmp_path))
    auth = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
    pages = [
        await (await client.get(p, headers=auth)).text() for p in ("/console/", "/console/login")
    ]
    for page in pages:
        for secret in (CONSOLE_TOKEN, APP_SECRET, SLACK_PATH, TOKEN):
            assert secret not in page


async def test_the_console_is_off_unless_a_token_is_set(tmp_path, start_relay):
    client = await start_relay(relay_config(tmp_path))
    assert (await client.get("/console/")).status == 404


def test_a_short_console_token_is_a_config_error(tmp_path):
    import pytest

    from relay.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        relay_config(tmp_path, console={"token": "short"})
    assert caught.value.problems == [
        "console.token: token must be at least 16 characters (try: openssl rand -hex 24)"
    ]


async def test_a_dead_letter_is_replayed_from_its_page_after_a_confirmation(
    tmp_path, start_relay, receiver, store_section
):
    # On each backend: the console reads and acts through the store's contract.
    receiver.statuses = [400]  # dead at the first answer; fine afterwards
    client = await start_relay(console_config(tmp_path, receiver.url, store_section))
    body = notifier_body("photos/cat.jpg")
    await client.post(f"/hooks/qingstor?token={TOKEN}", json=body)
    await eventually(lambda: receiver.requests)
    await client.post("/console/login", data={"token": CONSOLE_TOKEN})

    async def listed() -> str | None:
        page = await (await client.get("/console/dead-letters")).text()
        return page if "photos/cat.jpg" in page else None

    page = await eventually(listed)
    event_id = re.search(r'name="event_id" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    event_page = await (await client.get(f"/console/events/{event_id}")).text()
    assert "dead" in event_page and "HTTP 400" in event_page and "photos/cat.jpg" in event_page

    asked = await client.post(
        "/console/dead-letters/replay", data={"csrf": csrf, "event_id": event_id}
    )
    assert "Replay 1 dead letter?" in await asked.text()
    assert len(receiver.requests) == 1  # nothing done before the confirmation
    done = await client.post(
        "/console/dead-letters/replay",
        data={"csrf": csrf, "event_id": event_id, "confirm": "1"},
        allow_redirects=False,
    )
    assert done.status == 303 and "replayed+1" in done.headers["Location"].replace("%20", "+")
    await eventually(lambda: len(receiver.requests) == 2)
    assert receiver.requests[1]["headers"]["webhook-id"] == event_id


async def test_an_unknown_event_is_a_404_page(tmp_path, start_relay):
    client = await start_relay(console_config(tmp_path))
    auth = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
    response = await client.get("/console/events/evt_nope", headers=auth)
    assert response.status == 404 and "evt_nope" in await response.text()


async def test_events_are_filtered_by_key_prefix_or_glob_and_state_and_paged(tmp_path, start_relay):

    client = await start_relay(console_config(tmp_path))
    keys = [f"photos/{i:03}.jpg" for i in range(30)] + ["docs/a.pdf", "docs/b.txt"]
    await client.post(f"/hooks/qingstor?token={TOKEN}", json=notifier_body(*keys))
    auth = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}

    def listed(page: str) -> list[str]:
        return re.findall(r"<td>max-test2/([^<]+)</td>", page)

    page = await (await client.get("/console/events?key=docs/", headers=auth)).text()
    assert sorted(listed(page)) == ["docs/a.pdf", "docs/b.txt"]
    page = await (await client.get("/console/events?key=docs/*.pdf", headers=auth)).text()
    assert listed(page) == ["docs/a.pdf"]
    url = "/console/events?key=photos/"
    page = await (await client.get(url, headers=auth)).text()
    assert len(listed(page)) == 30
    # The sink is down, one attempt each: nothing is delivered.
    delivered = await (await client.get("/console/events?state=delivered", headers=auth)).text()
    assert "No matching event" in delivered


async def test_the_search_pages_resume_where_they_stopped(tmp_path, start_relay, store_section):
    from relay.app import STORE
    from relay.console import search

    client = await start_relay(console_config(tmp_path, store=store_section))
    for start in range(0, 40, 10):  # four requests of ten: ties within each
        body = notifier_body(*(f"k/{i:02}" for i in range(start, start + 10)))
        await client.post(f"/hooks/qingstor?token={TOKEN}", json=body)
    store = client.app[STORE]
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        found = await search.find(store, search.EventFilter(key="k/"), cursor, limit=7)
        seen += [envelope["key"] for _, envelope in found.events]
        cursor = found.cursor
        if cursor is None:
            break
    assert sorted(seen) == [f"k/{i:02}" for i in range(40)]
    assert len(seen) == 40


async def test_quarantined_bodies_are_shown_and_purged_after_a_confirmation(tmp_path, start_relay):
    client = await start_relay(console_config(tmp_path))
    answer = await client.post(f"/hooks/qingstor?token={TOKEN}", json={"events": [{"x": 1}]})
    assert answer.status == 400
    await client.post("/console/login", data={"token": CONSOLE_TOKEN})

    async def kept() -> str | None:
        page = await (await client.get("/console/quarantine")).text()
        return page if "invalid_event" in page else None

    page = await eventually(kept)
    entry = re.search(r'name="id" value="(\d+)"', page).group(1)  # type: ignore[union-attr]
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    shown = await (await client.get(f"/console/quarantine?id={entry}")).text()
    assert "&#34;x&#34;: 1" in shown or '"x": 1' in shown
    asked = await client.post("/console/quarantine/purge", data={"csrf": csrf, "id": entry})
    assert "Purge 1 quarantined body?" in await asked.text()
    done = await client.post(
        "/console/quarantine/purge",
        data={"csrf": csrf, "id": entry, "confirm": "1"},
        allow_redirects=False,
    )
    assert done.status == 303
    assert "Nothing in quarantine" in await (await client.get("/console/quarantine")).text()


async def test_the_console_on_a_listener_of_its_own(tmp_path, processes):
    from aiohttp import ClientSession

    from tests.processes import free_port

    port = free_port()
    config = {
        "store": {"path": "data/relay.db"},
        "console": {"token": CONSOLE_TOKEN, "listen": f"127.0.0.1:{port}"},
        "sources": {"qingstor": {"kind": "qingstor", "token": TOKEN}},
        "sinks": {"archive": {"kind": "file", "path": "data/events.jsonl"}},
    }
    relay = await processes(tmp_path, config).start()
    auth = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
    async with ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/console/", headers=auth) as own:
            assert own.status == 200 and "Overview" in await own.text()
        async with session.get(relay.url("/console/"), headers=auth) as main:
            assert main.status == 404  # not on the port QingStor posts to


async def test_what_a_url_or_a_cookie_carries_cannot_get_past_the_sign_in(tmp_path, start_relay):
    client = await start_relay(console_config(tmp_path))
    # Routes that only end like the login's are not the login.
    for path in (
        "/console/events/login",
        "/console/events/x%2Flogin",
        "/console/dead-letters/login",
    ):
        response = await client.get(path)
        assert response.status == 401, path
        assert_secure(response)
    # A cookie in any shape is a 401, never a 500.
    for cookie in ("١٢٣.x", "99999999999999999999.x", "a.b.c", ".", "1.é"):
        response = await client.get("/console/", cookies={"relay_console": cookie})
        assert response.status == 401, cookie
    redirect = await client.get("/console", allow_redirects=False)
    assert redirect.status == 308 and redirect.headers["Location"] == "/console/"


async def test_bad_cursors_ids_and_outcomes_are_400s_or_ignored_never_500s(tmp_path, start_relay):
    client = await start_relay(console_config(tmp_path))
    auth = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
    for cursor in ("x|1", "1:99999999999999999999999|0", "|²", "|" + "9" * 4301, "abc:x|0"):
        response = await client.get("/console/events", params={"cursor": cursor}, headers=auth)
        assert response.status == 400, cursor
    assert (await client.get("/console/quarantine?id=²", headers=auth)).status == 200
    spoof = await client.get(
        "/console/dead-letters", params={"done": "Session expired, sign in at evil"}, headers=auth
    )
    assert "evil" not in await spoof.text()
    assert (await client.get("/console/nothing", headers=auth)).status == 404


async def test_the_cookie_is_secure_behind_a_trusted_https_proxy(tmp_path, start_relay):
    config = relay_config(
        tmp_path,
        console={"token": CONSOLE_TOKEN},
        server={"trusted_proxies": ["127.0.0.0/8"]},
    )
    client = await start_relay(config)
    signed = await client.post(
        "/console/login",
        data={"token": CONSOLE_TOKEN},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert "Secure" in signed.headers["Set-Cookie"]
    plain = await client.post(
        "/console/login", data={"token": CONSOLE_TOKEN}, allow_redirects=False
    )
    assert "Secure" not in plain.headers["Set-Cookie"]


def test_the_pages_and_stylesheet_ship_in_the_package():
    # An installed relay (pip install ., the image) has only what package-data names.
    import fnmatch
    import tomllib

    root = Path(__file__).parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["relay.console"]
    console = root / "relay" / "console"
    shipped = [
        p
        for p in console.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    ]
    assert shipped
    for path in shipped:
        relative = str(path.relative_to(console))
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


async def test_s3_events_are_found_by_relays_type_or_the_s3_name(tmp_path, start_relay):
    config = relay_config(
        tmp_path, console={"token": CONSOLE_TOKEN}, sources={"minio": {"kind": "s3"}}
    )
    client = await start_relay(config)
    body = sample("minio-put.json")
    assert (await client.post("/hooks/minio", json=body)).status == 200
    auth = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
    for wanted in ("create_object", "s3:ObjectCreated:Put", "s3:ObjectCreated:*", "create_*"):
        page = await (await client.get(f"/console/events?type={wanted}", headers=auth)).text()
        assert "images/myphoto.jpg" in page, wanted
    page = await (await client.get("/console/events?type=delete_object", headers=auth)).text()
    assert "images/myphoto.jpg" not in page
    [event_id] = re.findall(r"/console/events/(evt_[0-9a-f]+)", await (
        await client.get("/console/events", headers=auth)).text())  # fmt: skip
    detail = await (await client.get(f"/console/events/{event_id}", headers=auth)).text()
    assert "create_object (s3:ObjectCreated:Put)" in detail
