"""The aiohttp application: routes, the request middleware, and every background task.

Objects are built in `create_app` (no I/O); `cleanup_ctx` opens and starts them on
startup and closes them in reverse order on shutdown: the dispatcher stops taking work
and drains first, then the sinks close, then the store.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress

import structlog
from aiohttp import web

from relay.config import RelayConfig
from relay.dispatch import Dispatcher
from relay.errors import IngestError, StoreUnavailable
from relay.ingest import Ingest
from relay.routing import Router
from relay.sinks import Sink, build_sink
from relay.sources import build_source
from relay.store import SqliteStore

log = structlog.get_logger("relay.app")

CONFIG = web.AppKey("config", RelayConfig)
STORE = web.AppKey("store", SqliteStore)
SINKS = web.AppKey("sinks", dict[str, Sink])
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
INGEST = web.AppKey("ingest", Ingest)
HOUSEKEEPER = web.AppKey("housekeeper", asyncio.Task[None])

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz"})
_HTTP_CODES = {
    404: ("not_found", "no such endpoint; events go to POST /hooks/{source}"),
    405: ("method_not_allowed", "this endpoint does not take that method"),
    413: ("body_too_large", "the body is over the limit"),
}


def error_response(status: int, code: str, message: str) -> web.Response:
    # Bound for the request's log line, so refusals can be counted by their reason.
    structlog.contextvars.bind_contextvars(error=code)
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def request_context(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One log line per request, a request id on it, and every error as JSON."""
    structlog.contextvars.clear_contextvars()
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except IngestError as exc:
        response = error_response(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers)
        if exc.status == 413:
            # The rest of the body was never read; the connection cannot be reused.
            response.force_close()
    except StoreUnavailable as exc:
        log.error("ingest.store_unavailable", error=str(exc))
        response = error_response(
            503, "store_unavailable", "relay cannot persist events right now; retry later"
        )
        response.headers["Retry-After"] = "1"
    except web.HTTPException as exc:
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        response = error_response(exc.status, code, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        log.exception("request.unhandled")
        response = error_response(500, "internal_error", "relay failed; see its log")
    response.headers["X-Request-Id"] = request_id
    level = "debug" if request.path in _QUIET_PATHS and response.status < 400 else "info"
    _log_request(level, request, response.status, started)
    structlog.contextvars.clear_contextvars()
    return response


def _log_request(level: str, request: web.Request, status: int, started: float) -> None:
    getattr(log, level)(
        "request",
        method=request.method,
        path=request.path,  # never the query string: tokens travel there
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        peer=request.remote,
    )


async def hook(request: web.Request) -> web.StreamResponse:
    return await request.app[INGEST].handle(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[STORE].ping(), timeout=2.0)
    except Exception as exc:
        return error_response(503, "not_ready", f"store unreachable: {exc.__class__.__name__}")
    return web.json_response({"status": "ready"})


# --- background work owned by the app ---------------------------------------------------


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[STORE].open(exclusive=True)
    yield
    await app[STORE].close()


async def _sinks_ctx(app: web.Application) -> AsyncIterator[None]:
    started: list[Sink] = []
    try:
        for sink in app[SINKS].values():
            await sink.start()
            started.append(sink)
        yield
    finally:
        for sink in reversed(started):
            try:
                await sink.close()
            except Exception:
                log.exception("sink.close_failed", sink=sink.name)


async def _dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    dispatcher = app[DISPATCHER]
    dispatcher.start()
    yield
    await dispatcher.stop(grace=app[CONFIG].server.drain_timeout)


async def _begin_drain(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for in-flight requests: starting the drain
    # here lets both waits overlap, so shutdown takes one drain_timeout, not two.
    # Events a late request enqueues stay pending in the store for the next start.
    app[DISPATCHER].begin_stop(grace=app[CONFIG].server.drain_timeout)


async def _housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_housekeep(app[STORE], app[CONFIG]), name="relay-housekeeping")
    app[HOUSEKEEPER] = task
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


async def _housekeep(store: SqliteStore, config: RelayConfig) -> None:
    while True:
        try:
            deliveries, events = await store.prune(config.store.keep_done)
            if deliveries or events:
                log.info("store.pruned", deliveries=deliveries, events=events)
        except Exception:
            log.exception("store.prune_failed")
        await asyncio.sleep(config.store.prune_interval)


def create_app(config: RelayConfig) -> web.Application:
    app = web.Application(
        middlewares=[request_context], client_max_size=config.server.max_body_bytes
    )
    store = SqliteStore(config.store.path, dedupe_window=config.dedupe.window)
    sinks = {name: build_sink(name, sink) for name, sink in config.sinks.items()}
    dispatcher = Dispatcher(store, sinks, config.sinks)
    app[CONFIG] = config
    app[STORE] = store
    app[SINKS] = sinks
    app[DISPATCHER] = dispatcher
    app[INGEST] = Ingest(
        sources={name: build_source(name, src) for name, src in config.sources.items()},
        router=Router(config.effective_routes),
        store=store,
        max_body_bytes=config.server.max_body_bytes,
        on_enqueued=dispatcher.wake,
    )
    app.router.add_post("/hooks/{source}", hook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.on_shutdown.append(_begin_drain)
    app.cleanup_ctx.extend([_store_ctx, _sinks_ctx, _dispatcher_ctx, _housekeeping_ctx])
    return app


# --- running -----------------------------------------------------------------------------


async def serve(config: RelayConfig, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain within the bound."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    runner = web.AppRunner(
        create_app(config),
        shutdown_timeout=config.server.drain_timeout,
        access_log=None,
        handle_signals=False,
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
        await site.start()
        host, port = runner.addresses[0][:2]
        log.info("relay.listening", host=host, port=port, config=config.summary())
        await stop.wait()
        log.info("relay.stopping", signal=received[0] if received else None)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("relay.stopped")


def run(config: RelayConfig) -> None:
    """Synchronous entry point over `serve`, for the command line."""
    asyncio.run(serve(config))
