"""The aiohttp application: routes, the request middleware, and every background task.

Objects are built in `create_app` (no I/O); `cleanup_ctx` opens and starts them on
startup and closes them in reverse order on shutdown: the dispatcher stops taking work
and drains first, then the sinks close, then the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from relay import logs
from relay.config import RelayConfig
from relay.dispatch import Dispatcher
from relay.errors import IngestError, StoreUnavailable
from relay.metrics import CONTENT_TYPE
from relay.runtime import Runtime
from relay.store import SqliteStore

log = structlog.get_logger("relay.app")

RUNTIME = web.AppKey("runtime", Runtime)
STORE = web.AppKey("store", SqliteStore)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
HOUSEKEEPER = web.AppKey("housekeeper", asyncio.Task[None])
WATCHER = web.AppKey("watcher", asyncio.Task[None])

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
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
    request_id = given if _REQUEST_ID.match(given) else os.urandom(16).hex()
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
    _count(request, response.status, started)
    level = (
        logging.DEBUG if request.path in _QUIET_PATHS and response.status < 400 else logging.INFO
    )
    if logs.enabled(level):
        _log_request(level, request, response.status, started)
    structlog.contextvars.clear_contextvars()
    return response


def _count(request: web.Request, status: int, started: float) -> None:
    runtime = request.app[RUNTIME]
    name = request.match_info.get("source", "")
    # Only configured names become labels: a scanner must not mint a time series per
    # path it tries.
    source = name if name in runtime.ingest.sources else "-"
    runtime.metrics.request_counter(source, status).inc()
    if status == 200 and source != "-":
        runtime.metrics.ingest_seconds.observe(time.perf_counter() - started)


def _log_request(level: int, request: web.Request, status: int, started: float) -> None:
    log.log(
        level,
        "request",
        method=request.method,
        path=request.path,  # never the query string: tokens travel there
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        peer=request.remote,
    )


async def hook(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].ingest.handle(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        await asyncio.wait_for(runtime.store.ping(), timeout=2.0)
    except Exception as exc:
        return error_response(503, "not_ready", f"store unreachable: {exc.__class__.__name__}")
    free = await asyncio.to_thread(_free_bytes, runtime.store.path)
    if free is not None and free < runtime.config.store.min_free_bytes:
        return error_response(
            503, "not_ready", f"the store's disk is nearly full ({free} bytes free)"
        )
    return web.json_response({"status": "ready"})


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path.parent).free
    except OSError:
        return None


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        stats = await asyncio.wait_for(runtime.store.sink_stats(), timeout=5.0)
    except Exception:
        # Counters still tell a story when the store does not answer; the gauges go.
        log.exception("metrics.store_failed")
        stats = {}
    text = runtime.metrics.render(stats, runtime.config.sinks, time.time())
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})


# --- background work owned by the app ---------------------------------------------------


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[STORE].open(exclusive=True)
    yield
    await app[STORE].close()


async def _sinks_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    try:
        await runtime.start_sinks()
        yield
    finally:
        await runtime.stop_sinks()


async def _begin_drain(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for in-flight requests: starting the drain
    # here lets both waits overlap, so shutdown takes one drain_timeout, not two.
    # Events a late request enqueues stay pending in the store for the next start.
    app[RUNTIME].begin_drain()


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    tasks = [asyncio.create_task(_housekeep(runtime), name="relay-housekeeping")]
    app[HOUSEKEEPER] = tasks[0]
    if runtime.config.server.watch_config and runtime.config_path is not None:
        interval = runtime.config.server.watch_interval
        tasks.append(asyncio.create_task(runtime.watch(interval), name="relay-watch"))
        app[WATCHER] = tasks[1]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _housekeep(runtime: Runtime) -> None:
    while True:
        store_config = runtime.config.store  # read each round: a reload may change it
        try:
            deliveries, events = await runtime.store.prune(store_config.keep_done)
            if deliveries or events:
                log.info("store.pruned", deliveries=deliveries, events=events)
        except Exception:
            log.exception("store.prune_failed")
        await asyncio.sleep(store_config.prune_interval)


def create_app(
    config: RelayConfig,
    config_path: Path | None = None,
    server_overrides: Mapping[str, Any] | None = None,
) -> web.Application:
    runtime = Runtime(config, config_path, server_overrides)
    config = runtime.config
    app = web.Application(
        middlewares=[request_context], client_max_size=config.server.max_body_bytes
    )
    app[RUNTIME] = runtime
    app[STORE] = runtime.store
    app[DISPATCHER] = runtime.dispatcher
    app.router.add_post("/hooks/{source}", hook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(_begin_drain)
    # Entered in order, left in reverse: background tasks stop first, then the sinks
    # drain and close, then the store closes.
    app.cleanup_ctx.extend([_store_ctx, _sinks_ctx, _background_ctx])
    return app


# --- running -----------------------------------------------------------------------------


async def serve(
    config: RelayConfig,
    *,
    config_path: Path | None = None,
    server_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain within the bound.
    SIGHUP re-reads `config_path`."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []
    app = create_app(config, config_path, server_overrides)
    config = app[RUNTIME].config

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    runner = web.AppRunner(
        app,
        shutdown_timeout=config.server.drain_timeout,
        access_log=None,
        handle_signals=False,
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
        await site.start()
        host, port = runner.addresses[0][:2]
        # Only now: a reload before the sinks have started would race their start.
        loop.add_signal_handler(signal.SIGHUP, app[RUNTIME].request_reload, "SIGHUP")
        log.info("relay.listening", host=host, port=port, config=config.summary())
        await stop.wait()
        log.info("relay.stopping", signal=received[0] if received else None)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("relay.stopped")


def run(
    config: RelayConfig,
    config_path: Path | None = None,
    server_overrides: Mapping[str, Any] | None = None,
) -> None:
    """Synchronous entry point over `serve`, for the command line."""
    asyncio.run(serve(config, config_path=config_path, server_overrides=server_overrides))
