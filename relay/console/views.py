"""The console's pages, served by relay itself under /console/ (a sub-application of
the main one): a login form, and an overview of every sink and source. Server-rendered
(Jinja2, autoescaped), readable without JavaScript; no secret is ever rendered."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from jinja2 import Environment, FileSystemLoader, select_autoescape

from relay import events, status
from relay.config import StoreView
from relay.console import auth, search
from relay.logs import redact_text
from relay.runtime import Runtime
from relay.store import DeadLetter, Selection
from relay.tables import when

log = structlog.get_logger("relay.console")

HERE = Path(__file__).parent
RUNTIME = web.AppKey("console_runtime", Runtime)

# No inline script or style, nothing from elsewhere, never framed, no referrer.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:;"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_PAGES = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The routes anyone may reach: signing in, and its stylesheet.
_PUBLIC = frozenset({"login", "login_post"})
_ID = re.compile(r"[0-9]{1,15}")
_DONE = re.compile(r"(replayed|purged) [0-9]{1,9}")


def _done(request: web.Request) -> str | None:
    """The outcome an action redirected with: only what an action says, never text a
    link put there."""
    done = request.query.get("done")
    return done if done and _DONE.fullmatch(done) else None


def _over_https(request: web.Request) -> bool:
    """Whether the browser speaks HTTPS to us: directly, or to a trusted proxy that says
    so (`server.trusted_proxies`); the session cookie is `Secure` then."""
    if request.secure:
        return True
    trusted = request.app[RUNTIME].config.server.trusted_proxies
    peer = request.remote or ""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if not any(address in network for network in trusted):
        return False
    return request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _token(request: web.Request) -> str:
    console = request.app[RUNTIME].config.console
    if console is None:
        # Turned off by a reload: nothing signs in, nothing signed before counts.
        raise web.HTTPUnauthorized(text="401: the console is off")
    return console.token.get_secret_value()


def _page(name: str, status_code: int = 200, **context: Any) -> web.Response:
    html = _PAGES.get_template(name).render(**context)
    return web.Response(text=html, status=status_code, content_type="text/html", charset="utf-8")


def _signed_in(request: web.Request) -> bool:
    token = _token(request)
    if auth.token_matches(auth.bearer(request.headers.get("Authorization")), token):
        return True
    return auth.session_valid(request.cookies.get(auth.SESSION_COOKIE), token)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; a 401 (the login form, no hint of what exists)
    for anything but the login itself and the stylesheet without a valid session or
    bearer token; and a CSRF check on every POST a session (not a bearer) makes."""
    # By the route matched, never by how the path ends: `/events/x%2Flogin` is no login.
    route = request.match_info.route
    public = route.name in _PUBLIC or getattr(route.resource, "name", None) == "static"
    try:
        if not public and not _signed_in(request):
            response: web.StreamResponse = _page("login.html", 401, failed=False)
        elif request.method == "POST" and not public and not await _csrf_ok(request):
            response = web.Response(status=403, text="403: the form has expired; reload the page")
        else:
            response = await handler(request)
    except web.HTTPException as exc:
        # Answered here, not raised on: relay's error handler would build a new answer
        # without these headers.
        response = web.Response(status=exc.status, text=exc.text, headers=exc.headers)
    _secure(response)
    return response


def _secure(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def _csrf_ok(request: web.Request) -> bool:
    token = _token(request)
    if auth.token_matches(auth.bearer(request.headers.get("Authorization")), token):
        return True  # not a browser's ambient credential: no cross-site request has it
    session = request.cookies.get(auth.SESSION_COOKIE)
    form = await request.post()
    given = form.get("csrf")
    return auth.csrf_valid(given if isinstance(given, str) else None, session, token)


async def login_form(request: web.Request) -> web.Response:
    return _page("login.html", failed=False)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    given = form.get("token")
    token = _token(request)
    if not isinstance(given, str) or not auth.token_matches(given, token):
        return _page("login.html", 401, failed=True)
    response = _see_other(str(request.app.router["overview"].url_for()))
    response.set_cookie(
        auth.SESSION_COOKIE,
        auth.new_session(token),
        max_age=auth.SESSION_SECONDS,
        httponly=True,
        samesite="Strict",
        secure=_over_https(request),
        path="/console",
    )
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    response = _see_other(str(request.app.router["login"].url_for()))
    response.del_cookie(auth.SESSION_COOKIE, path="/console")
    return response


def _see_other(location: str) -> web.Response:
    # A plain response, not a raised HTTPSeeOther: a cookie set on it is kept.
    return web.Response(status=303, headers={"Location": location})


def _chart(minutes: dict[int, tuple[int, int]], now: float) -> dict[str, Any]:
    """An hour of one source's receipts as bars, one per minute, the duplicates drawn
    over them: an inline SVG's geometry (no script, no inline style)."""
    last = int(now // 60)
    series = [minutes.get(m, (0, 0)) for m in range(last - 59, last + 1)]
    top = max((r for r, _ in series), default=0) or 1
    bars = [
        {
            "x": i * 5,
            "h": round(40 * r / top, 1),
            "dh": round(40 * d / top, 1),
            "title": f"{r} received, {d} duplicates",
        }
        for i, (r, d) in enumerate(series)
    ]
    return {"bars": bars, "top": top}


async def overview(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    config = runtime.config
    now = time.time()
    report = await status.report(runtime.store, StoreView.of(config), now)
    by_minute = await runtime.store.receipts_by_minute(now - status.LOOKBACK)
    charts = {name: _chart(by_minute.get(name, {}), now) for name in report["sources"]}
    session = request.cookies.get(auth.SESSION_COOKIE) or ""
    return _page(
        "overview.html",
        report=report,
        charts=charts,
        csrf=auth.csrf_token(session, _token(request)) if session else "",
        attention=[name for name, s in report["sinks"].items() if s["dead"] or s["gone"]],
    )


def _csrf(request: web.Request) -> str:
    session = request.cookies.get(auth.SESSION_COOKIE) or ""
    return auth.csrf_token(session, _token(request)) if session else ""


_STATES = ("delivered", "pending", "dead")


async def events_page(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    q = request.query
    state = q.get("state") or None
    wanted = search.EventFilter(
        source=q.get("source") or None,
        bucket=q.get("bucket") or None,
        key=q.get("key") or None,
        type=q.get("type") or None,
        state=state if state in _STATES else None,  # type: ignore[arg-type]
    )
    cursor = q.get("cursor") or None
    if cursor is not None and not search.valid_cursor(cursor):
        return web.Response(status=400, text="400: that page cursor is not one relay made")
    try:
        found = await search.find(runtime.store, wanted, cursor)
    except (ValueError, OverflowError):
        # A cursor of the right shape that no store made (a SQLite rowid that is not
        # a number, say): the client's mistake, not the store's failure.
        return web.Response(status=400, text="400: that page cursor is not one relay made")
    rows = [
        {
            "id": event.id,
            "source": event.source,
            "type": envelope.get("type"),
            "bucket": envelope.get("bucket"),
            "key": envelope.get("key"),
            "received": when(event.received_at),
            "state": search.state_of(event),
            "sinks": event.states,
        }
        for event, envelope in found.events
    ]
    older = None
    if found.cursor is not None:
        older = request.rel_url.update_query(cursor=found.cursor)
    return _page(
        "events.html",
        rows=rows,
        wanted=wanted,
        states=_STATES,
        sources=list(runtime.config.sources),
        scanned=found.scanned,
        older=older,
        csrf=_csrf(request),
    )


async def event_page(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    event_id = request.match_info["event_id"]
    record = await runtime.store.event(event_id)
    if record is None:
        return _page("missing.html", 404, what=f"event {event_id}", csrf=_csrf(request))
    data = events.report(record, StoreView.of(runtime.config), time.time())
    return _page(
        "event.html",
        data=data,
        envelope=json.dumps(data["envelope"], indent=2, ensure_ascii=False),
        csrf=_csrf(request),
    )


def _letter_row(letter: DeadLetter) -> dict[str, Any]:
    try:
        envelope = json.loads(letter.envelope)
    except ValueError:
        envelope = {}
    return {
        "id": letter.event_id,
        "sink": letter.sink,
        "attempts": letter.attempts,
        "status": letter.last_status,
        # Receivers' answers may quote URLs; their query strings can carry secrets.
        "error": redact_text(letter.last_error or ""),
        "since": when(letter.dead_since),
        "key": envelope.get("key") if isinstance(envelope, dict) else None,
    }


async def dead_letters_page(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    sink = request.query.get("sink") or None
    selection = Selection(sink=sink) if sink else Selection(everything=True)
    letters = await runtime.store.dead_letters(selection)
    return _page(
        "dead_letters.html",
        letters=[_letter_row(letter) for letter in letters[:500]],
        total=len(letters),
        sink=sink,
        sinks=sorted({letter.sink for letter in letters} | set(runtime.config.sinks)),
        csrf=_csrf(request),
        done=_done(request),
    )


def _selection(form: Any) -> Selection | None:
    """What an action acts on: the ticked events, a sink's, or all (form fields)."""
    ids = tuple(v for v in form.getall("event_id", []) if isinstance(v, str) and v)
    sink = form.get("sink") or None
    if ids:
        return Selection(sink=sink if isinstance(sink, str) else None, event_ids=ids)
    if isinstance(sink, str):
        return Selection(sink=sink)
    if form.get("all") == "1":
        return Selection(everything=True)
    return None


async def dead_letters_action(request: web.Request) -> web.StreamResponse:
    """Replay or purge, after a confirmation page: the first POST shows what will be
    done; the second (confirm=1) does it."""
    form = await request.post()
    action = request.match_info["action"]
    selection = _selection(form)
    if selection is None:
        return web.Response(status=400, text="400: select dead letters, a sink, or all")
    store = request.app[RUNTIME].store
    if form.get("confirm") != "1":
        count = len(await store.dead_letters(selection))
        return _page(
            "confirm.html",
            action=action,
            count=count,
            selection=selection,
            csrf=_csrf(request) or str(form.get("csrf") or ""),
        )
    done = await (store.replay(selection) if action == "replay" else store.purge(selection))
    verb = "replayed" if action == "replay" else "purged"
    log.info(f"console.{action}", count=done, sink=selection.sink, events=len(selection.event_ids))
    target = request.app.router["dead_letters"].url_for().with_query(done=f"{verb} {done}")
    return _see_other(str(target))


async def quarantine_page(request: web.Request) -> web.Response:
    store = request.app[RUNTIME].store
    shown = request.query.get("id")
    entries = await store.quarantined(with_bodies=False)
    body = None
    if shown and _ID.fullmatch(shown):
        for entry in await store.quarantined([int(shown)]):
            body = entry.body.decode("utf-8", "replace")
    return _page(
        "quarantine.html",
        entries=[
            {
                "id": e.id,
                "source": e.source,
                "error": e.error,
                "reason": e.reason,
                "received": when(e.received_at),
                "repeats": e.repeats,
                "size": e.size,
            }
            for e in entries
        ],
        shown=int(shown) if shown and _ID.fullmatch(shown) else None,
        body=body,
        done=_done(request),
        csrf=_csrf(request),
    )


async def quarantine_purge(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    picked = [int(v) for v in form.getall("id", []) if isinstance(v, str) and _ID.fullmatch(v)]
    everything = form.get("all") == "1"
    if not picked and not everything:
        return web.Response(status=400, text="400: pick bodies, or all")
    store = request.app[RUNTIME].store
    if form.get("confirm") != "1":
        count = len(await store.quarantined(None if everything else picked, with_bodies=False))
        return _page(
            "confirm_quarantine.html",
            count=count,
            picked=picked,
            everything=everything,
            csrf=_csrf(request) or str(form.get("csrf") or ""),
        )
    done = await store.purge_quarantine(None if everything else picked)
    log.info("console.purge_quarantine", count=done)
    target = request.app.router["quarantine"].url_for().with_query(done=f"purged {done}")
    return _see_other(str(target))


def console_app(runtime: Runtime) -> web.Application:
    """The console, to mount at /console/ on relay's app."""
    app = web.Application(middlewares=[guard])
    app[RUNTIME] = runtime
    app.router.add_get("/", overview, name="overview")
    app.router.add_get("/login", login_form, name="login")
    app.router.add_post("/login", login, name="login_post")
    app.router.add_post("/logout", logout)
    app.router.add_get("/events", events_page, name="events")
    app.router.add_get("/events/{event_id}", event_page, name="event")
    app.router.add_get("/dead-letters", dead_letters_page, name="dead_letters")
    app.router.add_post("/dead-letters/{action:replay|purge}", dead_letters_action)
    app.router.add_get("/quarantine", quarantine_page, name="quarantine")
    app.router.add_post("/quarantine/purge", quarantine_purge)
    app.router.add_static("/static/", HERE / "static", name="static")
    return app
