"""The aiohttp application: routes, the request middleware, and every background task.

Objects are built in `create_app` (no I/O); `cleanup_ctx` opens and starts them on
startup and closes them in reverse order on shutdown: the dispatcher stops taking work
and drains first, then the sinks close, then the store.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from relay import logs
from relay.config import RelayConfig, SqliteStoreConfig
from relay.console import console_app
from relay.dispatch import Dispatcher
from relay.errors import IngestError, ListenError, StoreNotWritable, StoreUnavailable
from relay.exposure import exposure_of, exposure_warnings, listen_url, trial_note
from relay.metrics import CONTENT_TYPE, use_multiprocess
from relay.runtime import Runtime, with_server
from relay.snapshot import ConfigSnapshot
from relay.store import Store
from relay.workers import LeaderLink, Supervisor, WorkerRole, reserve_port, worker_argv

log = structlog.get_logger("relay.app")

RUNTIME = web.AppKey("runtime", Runtime)
STORE = web.AppKey("store", Store)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
HOUSEKEEPER = web.AppKey("housekeeper", asyncio.Task[None])
WATCHER = web.AppKey("watcher", asyncio.Task[None])
LINK = web.AppKey("link", LeaderLink)  # a worker's, to its leader

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
    # Whatever is bound around the server stays off the request's line.
    structlog.contextvars.clear_contextvars()
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.match(given) else os.urandom(16).hex()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    try:
        response = await _answer(request, handler)
        response.headers["X-Request-Id"] = request_id
        _count(request, response.status, started)
        level = (
            logging.DEBUG
            if request.path in _QUIET_PATHS and response.status < 400
            else logging.INFO
        )
        if logs.enabled(level):
            _log_request(level, request, response.status, started)
        return response
    finally:
        structlog.contextvars.clear_contextvars()


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The handler's answer, or the JSON error that stands for what it raised."""
    try:
        return await handler(request)
    except IngestError as exc:
        response = error_response(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers)
        if exc.closes_connection:
            response.force_close()
        return response
    except StoreUnavailable as exc:
        # Once a spell: a full disk refuses every POST, and each has its request line.
        if request.app[RUNTIME].store_errors.new(type(exc).__name__, time.monotonic()):
            log.error("ingest.store_unavailable", error=str(exc))
        response = error_response(
            503, "store_unavailable", "relay cannot persist events right now; retry later"
        )
        response.headers["Retry-After"] = "1"
        return response
    except web.HTTPException as exc:
        code, message = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        response = error_response(exc.status, code, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("request.unhandled")
        return error_response(500, "internal_error", "relay failed; see its log")


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
    logs.request_line(
        level,
        {
            "method": request.method,
            "path": request.path,  # never the query string: tokens travel there
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            "peer": request.remote,
        },
    )


async def hook(request: web.Request) -> web.StreamResponse:
    return await request.app[RUNTIME].ingest.handle(request)


async def hook_probe(request: web.Request) -> web.StreamResponse:
    """`HEAD /hooks/{source}`: whether the URL and its credentials would be taken, with
    nothing stored. MinIO before 2023-05 probed its webhook endpoint so at start-up."""
    request.app[RUNTIME].ingest.probe(request)
    return web.Response()


async def hook_expect(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue`: answer now what the head already settles (unknown source,
    no or a wrong token, an address not allowed, a body over the limit), so the sender
    never uploads a body relay would refuse; otherwise invite the body. aiohttp calls
    this before the middleware, so a refusal goes through it here: the same JSON error,
    request id, log line and count as any other answer."""
    ingest = request.app[RUNTIME].ingest
    refusal = ingest.refusal(request)
    if refusal is None:
        structlog.contextvars.clear_contextvars()
        expect = request.headers.get("Expect", "")
        if request.version < (1, 1) or expect.lower() != "100-continue":
            return None  # nothing asked of an HTTP/1.0 sender; read the body as sent
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is no part of the answer
        return None

    async def refuse(request: web.Request) -> web.StreamResponse:
        # Judged again only to bind the source to the middleware's fresh log context;
        # nothing awaited in between, so the verdict stands.
        raise ingest.refusal(request) or refusal

    response = await request_context(request, refuse)
    # The body was not read and may still come: this connection cannot carry another.
    response.force_close()
    return response


async def _to_console(request: web.Request) -> web.Response:
    return web.Response(status=308, headers={"Location": "/console/"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    link = request.app.get(LINK)
    if link is not None and not link.up:
        return error_response(503, "not_ready", "this worker has lost its leader")
    if runtime.store_waiting is not None:
        return error_response(503, "not_ready", f"{runtime.store_waiting}; retrying")
    try:
        await asyncio.wait_for(runtime.store.ping(), timeout=2.0)
        # The leader counts as it commits; a worker asks the store (it shares the file).
        counts = (
            None
            if runtime.leader
            else await asyncio.wait_for(runtime.store.queued(runtime.backlog.limits), 2.0)
        )
    except StoreUnavailable as exc:
        # Its message names the store (a Redis URL without its password) and the cause.
        return error_response(503, "not_ready", f"store unreachable: {exc}")
    except Exception as exc:
        return error_response(503, "not_ready", f"store unreachable: {exc.__class__.__name__}")
    if problems := runtime.backlog.problems(counts):
        return error_response(503, "not_ready", "; ".join(problems))
    try:
        problem = await asyncio.wait_for(
            runtime.store.health(runtime.config.store.min_free_bytes), timeout=2.0
        )
    except Exception as exc:
        problem = f"store unreachable: {exc.__class__.__name__}"
    if problem:
        return error_response(503, "not_ready", problem)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    try:
        # Not open yet (waiting for its disk): the gauges go, without a traceback a scrape.
        stats = (
            await asyncio.wait_for(runtime.store.sink_stats(), timeout=5.0)
            if runtime.store_ready.is_set()
            else {}
        )
    except Exception:
        # Counters still tell a story when the store does not answer; the gauges go.
        log.exception("metrics.store_failed")
        stats = {}
    text = runtime.metrics.render(stats, runtime.config.sinks, time.time())
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})


# --- background work owned by the app ---------------------------------------------------


# How often a relay waiting for its store's disk tries to open the store again.
STORE_RETRY = 2.0


async def _open_store(runtime: Runtime) -> None:
    # The leader's lock keeps a second relay off the store; its workers share it.
    store = runtime.store
    await store.open(exclusive=runtime.leader)
    if runtime.leader:
        for warning in await store.warnings():
            log.warning("store.durability", message=warning)
        # Opened on a disk with too little room (after a crash nothing needed writing
        # yet): say so at once, not only when the first POST is refused.
        if low := await store.health(runtime.config.store.min_free_bytes):
            log.warning("store.disk_low", message=f"{low}; /readyz is not ready until it has room")
    runtime.store_ready.set()


async def _open_when_writable(runtime: Runtime, waiting: StoreNotWritable) -> None:
    """Try the store again until its disk takes writes; then everything that waited
    for it starts (the sinks, background work) and relay becomes ready."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(STORE_RETRY)
        try:
            await _open_store(runtime)
        except StoreNotWritable as exc:
            runtime.store_waiting = exc  # the latest free space, for /readyz
            continue
        except Exception as exc:
            # The disk has room, and the store still does not open (another relay took
            # its lock meanwhile, a newer relay's file): what would have stopped a start
            # stops relay now, as a start-up failure.
            log.error("store.open_failed", path=waiting.path, error=str(exc))
            runtime.fail(exc)
            return
        runtime.store_waiting = None
        log.info("store.writable", path=waiting.path, waited_s=round(time.monotonic() - started, 1))
        return


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    opener: asyncio.Task[None] | None = None
    try:
        await _open_store(runtime)
    except StoreNotWritable as exc:
        # A supervisor restarting relay in a loop helps nobody: listen, answer 503 (the
        # senders retry), and open the store once the disk has room again.
        runtime.store_waiting = exc
        # One line for the operator: the leader's (each worker waits as well, quietly).
        log.log(
            logging.ERROR if runtime.leader else logging.DEBUG,
            "store.not_writable",
            path=exc.path,
            free_bytes=exc.free_bytes,
            read_only=exc.read_only,
            error=exc.cause,
            retry_every_s=STORE_RETRY,
            message=f"{exc}; answering 503 until it can be written",
        )
        opener = asyncio.create_task(_open_when_writable(runtime, exc), name="relay-store-open")
    yield
    if opener is not None:
        opener.cancel()
        await asyncio.gather(opener, return_exceptions=True)
    await runtime.finish_quarantine()
    await runtime.store.close()


async def _when_store_ready(runtime: Runtime, start: Callable[[], Awaitable[None]]) -> None:
    await runtime.store_ready.wait()
    await start()


async def _sinks_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    starting = asyncio.create_task(
        _when_store_ready(runtime, runtime.start_sinks), name="relay-start-sinks"
    )
    try:
        if runtime.store_ready.is_set():
            await starting  # the usual start: sinks run before relay listens
        yield
    finally:
        if not starting.done():
            starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await runtime.stop_sinks()


async def _begin_drain(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for in-flight requests: starting the drain
    # here lets both waits overlap, so shutdown takes one drain_timeout, not two.
    # Events a late request enqueues stay pending in the store for the next start.
    app[RUNTIME].begin_drain()


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    if not runtime.leader:
        # Pruning and watching are the leader's; a worker on a shared store reads its
        # queue counts from the store (on SQLite its leader answers for it).
        if not runtime.store.shared:
            yield
            return
        counting = asyncio.create_task(
            _when_store_ready(runtime, runtime.watch_backlog), name="relay-watch-backlog"
        )
        yield
        counting.cancel()
        await asyncio.gather(counting, return_exceptions=True)
        return
    # Each waits for the store: a relay started on a full disk opens it later.
    tasks = [
        asyncio.create_task(
            _when_store_ready(runtime, partial(_housekeep, runtime)), name="relay-housekeeping"
        ),
        asyncio.create_task(
            _when_store_ready(runtime, runtime.every_second), name="relay-every-second"
        ),
        asyncio.create_task(
            _when_store_ready(runtime, partial(_watch_work, runtime)), name="relay-watch-work"
        ),
    ]
    app[HOUSEKEEPER] = tasks[0]
    if runtime.config.server.watch_config and runtime.config_path is not None:
        interval = runtime.config.server.watch_interval
        tasks.append(asyncio.create_task(runtime.watch(interval), name="relay-watch"))
        app[WATCHER] = tasks[-1]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _watch_work(runtime: Runtime) -> None:
    # Work queued by other relays, or by this relay's workers, on a shared store.
    async for sinks in runtime.store.watch_work():
        runtime.dispatcher.wake(sinks)


async def _housekeep(runtime: Runtime) -> None:
    while True:
        store_config = runtime.config.store  # read each round: a reload may change it
        try:
            deliveries, events = await runtime.store.prune(store_config.keep_done)
            if deliveries or events:
                log.info("store.pruned", deliveries=deliveries, events=events)
            if runtime.store.shared:
                # A sink another relay removed is retired once no running relay has it,
                # which may come long after that relay's reload.
                await runtime.retire_removed_sinks()
        except Exception:
            log.exception("store.prune_failed")
        await asyncio.sleep(store_config.prune_interval)


def create_app(
    config: RelayConfig,
    config_path: Path | None = None,
    server_overrides: Mapping[str, Any] | None = None,
    *,
    worker: WorkerRole | None = None,
    metrics_dir: Path | None = None,
) -> web.Application:
    runtime = Runtime(
        config, config_path, server_overrides, leader=worker is None, metrics_dir=metrics_dir
    )
    config = runtime.config
    app = web.Application(
        middlewares=[request_context], client_max_size=config.server.max_body_bytes
    )
    app[RUNTIME] = runtime
    app[STORE] = runtime.store
    app[DISPATCHER] = runtime.dispatcher
    app.router.add_post("/hooks/{source}", hook, expect_handler=hook_expect)
    app.router.add_route("HEAD", "/hooks/{source}", hook_probe)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if config.console is not None and config.console.listen is None:
        # The redirect first: the sub-app's prefix would take `/console` too.
        app.router.add_get("/console", _to_console)
        app.add_subapp("/console/", console_app(runtime))
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
    worker: WorkerRole | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain within the bound.
    SIGHUP re-reads `config_path`. With `server.workers` set this process leads that
    many workers that answer HTTP (relay.workers); `worker` makes it one of them."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []
    workers = with_server(config, server_overrides or {}).server.workers
    leads = worker is None and workers > 0
    metrics_dir = _metrics_dir(config, leads, worker)
    if metrics_dir is not None:
        use_multiprocess(metrics_dir)
    snapshot: ConfigSnapshot | None = None
    loader: Callable[[], RelayConfig] | None = None
    if leads and config_path is not None:
        assert metrics_dir is not None
        # Loaded again, from the text the workers will load: the same bytes for all.
        snapshot = ConfigSnapshot(metrics_dir / "config.yaml")
        loader = partial(snapshot.take, config_path)
        config = await asyncio.to_thread(loader)
        snapshot.commit()
    elif worker is not None and worker.snapshot is not None:
        snapshot = worker.snapshot  # loaded by the command line; reloads read it again
        loader = snapshot.load
    app = create_app(config, config_path, server_overrides, worker=worker, metrics_dir=metrics_dir)
    runtime = app[RUNTIME]
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        stop.set()

    runtime.on_fatal = on_fatal
    if loader is not None:
        runtime.loader = loader
    config = runtime.config
    link: LeaderLink | None = None
    if worker is not None:
        link = LeaderLink(worker.link_fd, on_lost=stop.set)
        await link.open()
        if not runtime.store.shared:
            # One writer per SQLite file: the leader. A shared store takes each
            # worker's writes itself, and tells the leader's lanes (watch_work).
            runtime.ingest.accept = link.accept
        app[LINK] = link

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
        keepalive_timeout=config.server.keepalive_timeout,
        max_line_size=config.server.max_header_bytes,
        max_field_size=config.server.max_header_bytes,
    )
    supervisor: Supervisor | None = None
    reserved: socket.socket | None = None
    console_runner: web.AppRunner | None = None
    try:
        await runner.setup()
        if config.console is not None and config.console.listen is not None and worker is None:
            console_runner = await _console_listener(runtime, config.console.listen)
        if leads:
            assert metrics_dir is not None
            with _listening(config.server.host, config.server.port):
                reserved = reserve_port(config.server.host, config.server.port)
            host, port = reserved.getsockname()[:2]
            addresses = [host]
            supervisor = Supervisor(
                workers,
                worker_argv(snapshot, config.server.host, port, metrics_dir),
                runtime.commit,
            )
            # Once the leader runs a new config, its snapshot is written, and then the
            # workers reload from it.
            if snapshot is not None:
                runtime.on_reloaded.append(snapshot.commit)
            runtime.on_reloaded.append(supervisor.reload)
            _remove_stale_metrics(config, keep=metrics_dir)
            await _start_workers(supervisor, stop)
        else:
            site = web.TCPSite(
                runner,
                config.server.host,
                config.server.port,
                reuse_address=True,
                # A worker shares the port with its siblings; the kernel spreads
                # connections across them.
                reuse_port=worker is not None,
            )
            with _listening(config.server.host, config.server.port):
                await site.start()
            host, port = runner.addresses[0][:2]
            # A name may resolve to several addresses, each bound.
            addresses = [str(address[0]) for address in runner.addresses]
            if link is not None:
                await link.listening()
        # Only now: a reload before the sinks have started would race their start.
        loop.add_signal_handler(signal.SIGHUP, runtime.request_reload, "SIGHUP")
        if worker is not None and snapshot is not None and snapshot.changed():
            # The leader reloaded while this worker started, and its SIGHUP came before
            # the handler: catch up now.
            runtime.request_reload("snapshot")
        _tune_gc()
        if worker is None:
            _announce(config, addresses, port, workers, embedded=config_path is None)
        else:
            log.info(
                "worker.listening", host=host, port=port, workers=workers, config=config.summary()
            )
        await stop.wait()
        log.info("relay.stopping", signal=received[0] if received else None)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        bound = config.server.drain_timeout
        for sig in (signal.SIGTERM, signal.SIGINT):
            # A second Ctrl-C while draining is answered, not obeyed: the drain is
            # bounded already, and cutting it short is what SIGKILL is for.
            loop.add_signal_handler(sig, _already_stopping, sig, bound)
        try:
            if supervisor is not None:
                # The workers drain first: what they still hold needs this store. The
                # sinks start draining meanwhile.
                runtime.begin_drain()
                await supervisor.stop(bound + 5.0)
            if console_runner is not None:
                await console_runner.cleanup()
            await runner.cleanup()
            if link is not None:
                await link.close()
            if reserved is not None:
                reserved.close()
            if leads and metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    if fatal:
        raise fatal[0]  # reported as a start-up failure would be: relay.failed, exit 1
    log.info("relay.stopped")


async def _console_listener(runtime: Runtime, listen: str) -> web.AppRunner:
    """The console on a listener of its own (`console.listen`), under /console/ there
    too, so that its links are the same wherever it is served."""
    root = web.Application()
    root.add_subapp("/console/", console_app(runtime))
    root.router.add_get("/", _to_console)
    root.router.add_get("/console", _to_console)
    runner = web.AppRunner(root, access_log=None, handle_signals=False)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    with _listening(host, int(port)):
        await web.TCPSite(runner, host, int(port), reuse_address=True).start()
    log.info("console.listening", url=listen_url(host, int(port)) + "/console/")
    return runner


def _already_stopping(sig: signal.Signals, bound: float) -> None:
    log.warning(
        "relay.already_stopping",
        signal=sig.name,
        message=f"already stopping: in-flight work drains within {bound:g} s"
        " (server.drain_timeout); SIGKILL stops at once, and what it cuts off is sent again"
        " after the next start",
    )


@contextmanager
def _listening(host: str, port: int) -> Iterator[None]:
    """A failure to bind, as the ListenError the command line words for an operator."""
    try:
        yield
    except OSError as exc:
        detail = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror):
            detail = f"cannot resolve the host name ({detail})"
        raise ListenError(host, port, exc.errno, detail) from exc


def _announce(
    config: RelayConfig,
    addresses: list[str],
    port: int,
    workers: int,
    embedded: bool,
) -> None:
    """The start-up line: where relay listens, and who can post to it."""
    host = addresses[0]
    url = listen_url(host, port)
    where, exposed = exposure_of(config, addresses, port)
    parts = [f"listening on {url}"]
    if not exposed:
        parts.append("loopback only: set server.host: 0.0.0.0 to take events from elsewhere")
    if embedded:
        parts.append("running the embedded default config (no --config, no RELAY_CONFIG)")
    note = trial_note(config, exposed)
    if note:
        parts.append(note)
    log.info(
        "relay.listening",
        message="; ".join(parts),
        url=url,
        host=host,
        port=port,
        workers=workers,
        config=config.summary(),
    )
    for warning in exposure_warnings(config, where, exposed):
        log.warning("relay.open_source", message=warning)


async def _start_workers(supervisor: Supervisor, stop: asyncio.Event) -> None:
    """Start the workers and wait until they all listen, or 30 s, or a stop signal."""
    supervisor.start()
    stopped = asyncio.ensure_future(stop.wait())
    listening = asyncio.ensure_future(supervisor.wait_listening(within=30.0))
    await asyncio.wait({stopped, listening}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not (listening.done() and listening.result()):
        listening.cancel()
        if not stop.is_set():
            log.warning("worker.slow_start", expected=supervisor.count)


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the ack path. Everything built at startup
    (modules, config, app) is frozen out of its scans, and young collections run every
    20,000 allocations rather than every 700. In A/B runs at a steady ~1,000 req/s on a
    fresh store this took the ack p99 from 10-15 ms to 7-8 ms."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


_METRICS_ROOM = 1 << 20  # a process's counters at first, on disk


def _metrics_dir(config: RelayConfig, leads: bool, worker: WorkerRole | None) -> Path | None:
    """Where this relay's processes keep their counters, or None for a single process.
    Beside an SQLite store: a read-only root filesystem still has its data volume. With
    Redis there is no local store, and the temporary folder serves."""
    if worker is not None:
        return worker.metrics_dir
    if not leads:
        return None
    prefix = _metrics_prefix(config)
    if isinstance(config.store, SqliteStoreConfig):
        path = Path(f"{prefix}{os.getpid()}")
        try:
            path.mkdir(parents=True, exist_ok=True)
            # Each process's counters take a file of 1 MiB at first (prometheus-client's
            # mmap): a disk without that much room is no place for them.
            if shutil.disk_usage(path).free >= _METRICS_ROOM * (config.server.workers + 1):
                return path
            shutil.rmtree(path, ignore_errors=True)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
        # The store's disk is full or read-only: relay starts anyway and waits for it;
        # the counters and config snapshot live in the temporary folder meanwhile.
        prefix = Path(tempfile.gettempdir()) / prefix.name
    # In the shared temporary folder: a new folder of this user's only (mode 0700), never
    # one another user could have made first under a name known in advance.
    return Path(tempfile.mkdtemp(prefix=f"{prefix.name}{os.getpid()}-", dir=prefix.parent))


def _metrics_prefix(config: RelayConfig) -> Path:
    if isinstance(config.store, SqliteStoreConfig):
        # Named after the store: another relay's store may share the folder.
        store_path = config.store.path
        return store_path.with_name(f".{store_path.name}.metrics-")
    return Path(tempfile.gettempdir()) / f"relay-{config.store.prefix}.metrics-"


def _remove_stale_metrics(config: RelayConfig, keep: Path | None) -> None:
    # Left by a leader killed with -9. Beside SQLite they are safe to remove now: this
    # process holds the store's lock, so no other relay on this store is running. In the
    # shared temporary folder only those of a process that no longer exists go.
    prefix = _metrics_prefix(config)
    sqlite = isinstance(config.store, SqliteStoreConfig)
    for stale in prefix.parent.glob(f"{prefix.name}*"):
        pid = stale.name.removeprefix(prefix.name).partition("-")[0]
        if stale != keep and (sqlite or not _process_exists(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_exists(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # someone else's
    return True


def run(
    config: RelayConfig,
    config_path: Path | None = None,
    server_overrides: Mapping[str, Any] | None = None,
    worker: WorkerRole | None = None,
) -> None:
    """Synchronous entry point over `serve`, for the command line."""
    asyncio.run(
        serve(config, config_path=config_path, server_overrides=server_overrides, worker=worker)
    )
