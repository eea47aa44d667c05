"""The running configuration: what is live now, and how a new config replaces it.

A reload is all or nothing: an invalid file is refused with its problems logged and
the old config keeps serving. A valid one swaps in between two requests: new sources
and routes apply to the next event; sinks whose settings did not change keep running
untouched (their queues, circuits and connections); changed sinks are drained and
restarted; a removed sink's queued deliveries are dead-lettered as `sink removed`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from relay.backlog import Backlog
from relay.clock import WallClock
from relay.config import RelayConfig, load_config
from relay.dispatch import Dispatcher
from relay.errors import ConfigError, StoreNotWritable
from relay.ingest import Ingest
from relay.logs import configure as configure_logs
from relay.metrics import Metrics
from relay.routing import Router
from relay.sinks import Sink, build_sink
from relay.sources import build_source
from relay.store import AcceptResult, NewEvent, Quarantined, Store, open_store

log = structlog.get_logger("relay.runtime")

# How often a relay on a shared store tells the others which sinks it runs; well within
# the store's REPLICA_TTL, after which a silent relay is taken for gone.
HEARTBEAT_INTERVAL = 10.0

# Quarantine writes waiting at once, per process.
_QUARANTINE_WRITES = 16

# Settings a running process cannot change: it would have to rebind or reopen.
_RESTART_ONLY = (
    "server.host",
    "server.port",
    "server.watch_config",
    "server.watch_interval",
    "server.drain_timeout",  # aiohttp's own shutdown bound is fixed at start
    "server.workers",
    "server.max_header_bytes",  # the HTTP parser's, fixed at start
    "server.keepalive_timeout",
    "store.backend",
    "store.path",
    "store.url",
    "store.prefix",
    "store.lease",
    "store.socket_timeout",
    "store.connect_timeout",
    "store.cluster",
)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the config file's current content, through any symlinks."""

    device: int
    inode: int
    mtime_ns: int
    size: int
    digest: str

    @classmethod
    def of(cls, path: Path) -> Fingerprint | None:
        try:
            # stat() follows symlinks: a ConfigMap update swaps the `..data` link, so the
            # file behind the same path changes inode without any write to it.
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
        return cls(info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size, digest)


class OncePerSpell:
    """Whether a kind of error is worth a log line: the first of a spell, or the same
    kind again after `every` seconds."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self.last: dict[str, float] = {}

    def new(self, kind: str, now: float) -> bool:
        last = self.last.get(kind)
        if last is not None and now - last < self.every:
            return False
        self.last[kind] = now
        return True


class Runtime:
    def __init__(
        self,
        config: RelayConfig,
        config_path: Path | None = None,
        server_overrides: Mapping[str, Any] | None = None,
        *,
        leader: bool = True,
        metrics_dir: Path | None = None,
    ) -> None:
        # Command-line flags (--host, --port, --watch) outrank the file, on every reload.
        self.server_overrides = dict(server_overrides or {})
        self.config = with_server(config, self.server_overrides)
        self.config_path = config_path
        # What a reload loads: the file, or for server.workers the leader's snapshot of
        # it (relay.snapshot), which the leader takes and its workers read.
        self.loader: Callable[[], RelayConfig] | None = (
            None if config_path is None else partial(load_config, config_path)
        )
        # The leader holds the store's lock and runs the sinks and background work; a
        # worker (server.workers) only ingests, and wakes the leader's lanes.
        self.leader = leader
        self.on_reloaded: list[Callable[[], None]] = []
        config = self.config
        self.metrics = Metrics(metrics_dir)
        self.store: Store = open_store(config.store, dedupe_window=config.dedupe.window)
        self.dispatcher = Dispatcher(self.store, self.metrics)
        self.sinks: dict[str, Sink] = {}
        self.ingest = Ingest(
            sources={},
            router=Router([]),
            limits=config.server,
            accept=self.commit,
            metrics=self.metrics,
            quarantine=self.quarantine,
        )
        self.backlog = Backlog({})
        self._quarantining: set[asyncio.Task[None]] = set()
        self._apply_ingest(config)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()
        self._closing = False
        # Set once the store is open. A relay started on a disk that takes no writes
        # (full, read-only) listens first and opens it when it can (relay.app); until
        # then `store_waiting` says why, and the sinks and background work wait.
        self.store_ready = asyncio.Event()
        self.store_waiting: StoreNotWritable | None = None
        self.store_errors = OncePerSpell()
        # What stops a running relay as if it had failed to start (relay.app.serve sets
        # it: stop, then exit 1 with the error).
        self.on_fatal: Callable[[BaseException], None] | None = None
        # Taken now, with the config just loaded: an edit before the watcher's first
        # look is still a change.
        self.fingerprint = None if config_path is None else Fingerprint.of(config_path)

    async def commit(self, events: Sequence[NewEvent]) -> AcceptResult:
        """Store events durably (group commit), then wake the sinks that got work.
        Raises QueueFull, storing nothing, if a new event is for a sink whose queue is
        full; a retry of one already stored is still answered as the duplicate it is."""
        if (waiting := self.store_waiting) is not None:
            # The disk takes no writes yet: 503, the sender retries. A new exception each
            # time: raising one object again would grow its traceback with every request.
            raise StoreNotWritable(
                waiting.path,
                free_bytes=waiting.free_bytes,
                read_only=waiting.read_only,
                cause=waiting.cause,
            )
        if blocked := self.backlog.blocked(events):
            seen = await self.store.seen([event.id for event in blocked])
            if any(event.id not in seen for event in blocked):
                raise self.backlog.refusal(blocked)
        result = await self.store.accept(events)
        accepted = set(result.accepted)
        queued = [sink for e in events if e.id in accepted for sink in e.sinks]
        if self.leader or not self.store.shared:
            # A worker on a shared store sees none of the deliveries that drain its
            # counts: it reads them from the store instead (watch_backlog).
            self.backlog.added(queued)
        self.dispatcher.wake(set(queued))
        return result

    def quarantine(self, entry: Quarantined) -> None:
        """Keep an unusable body within the store's bounds, in the background: the 4xx
        goes out at once, whether or not the body can be kept. At most a few writes
        wait at a time; past that a body is not kept (a sender posting bad bodies as
        fast as it can must not queue disk writes, or memory, without end)."""
        bounds = self.config.store
        size = len(entry.body)
        if not bounds.quarantine_max:
            return  # turned off
        if size > bounds.quarantine_max_bytes:
            log.info("ingest.quarantine_skipped", error=entry.error, size=size, why="too big")
            return
        if len(self._quarantining) >= _QUARANTINE_WRITES:
            log.warning("ingest.quarantine_skipped", error=entry.error, size=size, why="busy")
            return
        keep = self._keep(entry, bounds.quarantine_max, bounds.quarantine_max_bytes)
        task = asyncio.create_task(keep)
        self._quarantining.add(task)
        task.add_done_callback(self._quarantining.discard)

    async def _keep(self, entry: Quarantined, max_entries: int, max_bytes: int) -> None:
        try:
            await self.store.quarantine(entry, max_entries, max_bytes)
        except Exception:
            log.exception("ingest.quarantine_failed", error=entry.error)
            return
        self.metrics.quarantined.labels(entry.source).inc()
        log.warning("ingest.quarantined", error=entry.error, size=len(entry.body))

    async def finish_quarantine(self) -> None:
        """Wait for the bodies being kept: before the store closes."""
        await asyncio.gather(*self._quarantining, return_exceptions=True)

    async def watch_backlog(self, interval: float = 1.0) -> None:
        """A worker on a shared store: its queue counts, read from the store every
        second (the leader's every_second does this for the leader)."""
        failing = False
        while True:
            try:
                self.backlog.refresh(await self.store.queued(self.backlog.limits))
                failing = False
            except Exception:
                if not failing:
                    log.exception("runtime.look_failed")
                failing = True
            await asyncio.sleep(interval)

    async def every_second(self, clock: WallClock | None = None, interval: float = 1.0) -> None:
        """The leader's regular look at what changes without telling it: the sinks'
        queues drain, and the wall clock may step back; and on a shared store, the
        heartbeat that tells the other relays which sinks this one runs."""
        clock = clock or WallClock()
        step = 0.0  # seen, and not yet applied: kept until it is
        failing = False
        beat_at = 0.0
        while True:
            try:
                if self.store.shared and time.monotonic() >= beat_at:
                    await self.store.heartbeat(list(self.config.sinks))
                    beat_at = time.monotonic() + HEARTBEAT_INTERVAL
                step += clock.stepped_back()
                if step:
                    await self.dispatcher.clock_stepped_back(step)
                    step = 0.0
                self.backlog.refresh(await self.store.queued(self.backlog.limits))
                failing = False
            except Exception:
                if not failing:  # once per spell of failures, not every second
                    log.exception("runtime.look_failed")
                failing = True
            await asyncio.sleep(interval)

    async def retire_removed_sinks(self) -> int:
        """Dead-letter the work of sinks no running relay has (on a shared store, where
        a relay that removed a sink may not be the last to have it). Under the reload
        lock: a reload that adds a sink must not race a retirement without it."""
        async with self._lock:
            if self._closing:
                return 0
            retired = await self.store.retire_sinks(self.config.sinks)
        if retired:
            log.warning("sink.removed", deliveries_dead_lettered=retired)
        return retired

    # --- lifecycle ---------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        if self.on_fatal is not None:
            self.on_fatal(exc)

    async def start_sinks(self) -> None:
        """Start every configured sink and its lane; dead-letter work for sinks gone
        from the config since the last run."""
        if not self.leader:
            return
        async with self._lock:
            if self._closing:
                return  # the store opened as relay was stopping: nothing to start
            retired = await self.store.retire_sinks(self.config.sinks)
            if retired:
                log.warning("sink.removed", deliveries_dead_lettered=retired)
            started = await self._build(self.config, list(self.config.sinks))
            await self._run_lanes(self.config, started)

    async def stop_sinks(self) -> None:
        self._closing = True
        # A reload under way finishes first (it is bounded by the drain timeout), so no
        # lane is half retired and none is started behind the dispatcher's back.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._lock:
            await self.dispatcher.stop(self.config.server.drain_timeout)
            await self._close(list(self.sinks.values()))
            self.sinks.clear()

    def begin_drain(self) -> None:
        self._closing = True
        self.dispatcher.begin_stop(self.config.server.drain_timeout)

    # --- reloading ---------------------------------------------------------------------

    def request_reload(self, why: str) -> asyncio.Task[bool]:
        """Reload in a task of the runtime's own (from a signal handler or the watcher);
        shutdown waits for it rather than cutting it off half-way."""
        task = asyncio.create_task(self.reload(why), name="relay-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def reload(self, why: str = "request") -> bool:
        """Re-read the config file; returns whether a new config was applied. Never
        raises: a failure is logged and the running config stays."""
        if self.config_path is None or self.loader is None:
            log.warning("config.reload_skipped", reason="running the embedded default")
            return False
        async with self._lock:
            if self._closing:
                return False
            try:
                self.fingerprint = await asyncio.to_thread(Fingerprint.of, self.config_path)
                loaded = await asyncio.to_thread(self.loader)
                config = self._keep_restart_only(with_server(loaded, self.server_overrides))
                await self.apply(config)
            except ConfigError as exc:
                # The old config keeps serving; every problem names its path.
                log.error(
                    "config.reload_failed",
                    trigger=why,
                    path=str(self.config_path),
                    problems=exc.problems,
                )
                return False
            except Exception:
                log.exception("config.reload_failed", trigger=why, path=str(self.config_path))
                return False
            log.info("config.reloaded", trigger=why, config=config.summary())
            for hook in self.on_reloaded:
                try:
                    hook()
                except Exception:
                    # Later hooks depend on earlier ones (the workers reload the snapshot
                    # just written): stop here, and keep the watcher alive.
                    log.exception("config.reload_hook_failed", trigger=why)
                    break
            return True

    def _keep_restart_only(self, config: RelayConfig) -> RelayConfig:
        """The new config, but with the running value of every setting that needs a
        restart, each difference logged: the config always says what is in force."""
        old = self.config
        server: dict[str, Any] = {}
        store: dict[str, Any] = {}
        for key in _RESTART_ONLY:
            section, name = key.split(".")
            # A key of another backend reads as absent (None): a change of backend is
            # itself the difference, and the running store section stays whole.
            running = getattr(getattr(old, section), name, None)
            configured = getattr(getattr(config, section), name, None)
            if running != configured:
                log.warning(
                    "config.restart_required",
                    key=key,
                    running=str(running),
                    configured=str(configured),
                )
                (server if section == "server" else store)[name] = running
        if not (server or store):
            return config
        running_store = old.store
        if running_store.backend == config.store.backend:
            running_store = config.store.model_copy(update=store)
        else:
            # Another backend: the running one stays, with the new reloadable keys.
            reloadable = {
                name: getattr(config.store, name)
                for name in type(running_store).model_fields
                if f"store.{name}" not in _RESTART_ONLY
            }
            running_store = running_store.model_copy(update=reloadable)
        return config.model_copy(
            update={"server": config.server.model_copy(update=server), "store": running_store}
        )

    async def apply(self, config: RelayConfig) -> None:
        """Swap `config` in. The new sinks are built and started first: if one fails,
        they are closed again and nothing of the new config is in force (ConfigError)."""
        old = self.config
        if not self.store_ready.is_set():
            # Waiting for the store's disk: no sink runs yet. The new config is what they
            # start with once it opens (start_sinks reads self.config); only the ingest
            # side changes now.
            self._swap(config)
            return
        # A worker runs no sinks: for it only the ingest side changes.
        sinks = (old.sinks, config.sinks) if self.leader else ({}, {})
        removed = [n for n in sinks[0] if n not in sinks[1]]
        changed = [n for n in sinks[0] if n in sinks[1] and sinks[1][n] != sinks[0][n]]
        added = [n for n in sinks[1] if n not in sinks[0]]
        fresh = await self._build(config, [*changed, *added])
        if added and self.leader:
            try:
                # Before any event is routed to the added sinks: a relay still on the
                # old config must know they are run, or it would retire their work.
                await self.store.heartbeat([*sinks[0], *added])
            except Exception:
                await self._close(list(fresh.values()))
                raise

        # Nothing can fail from here on: swap.
        self._swap(config)
        stale = await self.dispatcher.retire([*removed, *changed], config.server.drain_timeout)
        await self._close(stale)
        for name in [*removed, *changed]:
            self.sinks.pop(name, None)
        if removed:
            count = await self.store.retire_sinks(config.sinks)
            log.warning("sink.removed", sinks=removed, deliveries_dead_lettered=count)
        await self._run_lanes(config, fresh)
        if fresh:
            log.info("sink.started", sinks=list(fresh))

    def _swap(self, config: RelayConfig) -> None:
        """Put `config` in force for everything but the sinks."""
        if config.log != self.config.log:
            configure_logs(config.log.level, config.log.format)
        self.store.dedupe_window = config.dedupe.window
        self._apply_ingest(config)
        self.config = config

    def _apply_ingest(self, config: RelayConfig) -> None:
        # Sources and router built whole, then swapped in together between two
        # requests: a request sees the old pair or the new one.
        sources = {name: build_source(name, src) for name, src in config.sources.items()}
        ordered = frozenset(n for n, sink in config.sinks.items() if sink.order == "per_key")
        self.ingest.sources = sources
        self.ingest.router = Router(config.effective_routes, ordered)
        self.ingest.limits = config.server
        self.backlog.set_limits({name: sink.max_queue for name, sink in config.sinks.items()})

    async def _build(self, config: RelayConfig, names: list[str]) -> dict[str, Sink]:
        """Build and start the sinks `names`; all of them, or (ConfigError) none."""
        started: dict[str, Sink] = {}
        for name in names:
            try:
                sink = build_sink(name, config.sinks[name])
                await sink.start()
            except Exception as exc:
                await self._close(list(started.values()))
                raise ConfigError(
                    [f"sinks.{name}: cannot start: {exc.__class__.__name__}: {exc}"]
                ) from exc
            started[name] = sink
        return started

    async def _run_lanes(self, config: RelayConfig, started: dict[str, Sink]) -> None:
        self.sinks.update(started)
        for name in started:
            # A new lane starts closed and not gone: say so, or the store keeps what an
            # earlier lane of that name last wrote (an open circuit, a 410). Only what
            # status shows: a store that refuses it must not keep the lane from starting.
            try:
                await self.store.save_sink_state(name, "closed", 0.0, False)
            except Exception:
                log.exception("dispatch.state_save_failed", sink=name)
        self.dispatcher.start(started, config.sinks)

    async def _close(self, sinks: list[Sink]) -> None:
        for sink in sinks:
            try:
                await sink.close()
            except Exception:
                log.exception("sink.close_failed", sink=sink.name)

    # --- watching ----------------------------------------------------------------------

    async def watch(self, interval: float = 1.0) -> None:
        """Reload whenever the file's content changes. Polling, because inotify misses a
        Kubernetes ConfigMap update (a symlink swap in the folder, not a write)."""
        if self.config_path is None:
            return
        path = self.config_path
        while True:
            await asyncio.sleep(interval)
            try:
                current = await asyncio.to_thread(Fingerprint.of, path)
            except Exception:
                log.exception("config.watch_failed", path=str(path))
                continue
            seen = self.fingerprint
            if current is None or current == seen:
                continue
            if seen is None or current.digest != seen.digest:
                # Shielded: shutdown cancels the watcher, never a reload half-way.
                await asyncio.shield(self.request_reload("watch"))
            self.fingerprint = current


def with_server(config: RelayConfig, overrides: Mapping[str, Any]) -> RelayConfig:
    if not overrides:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=overrides)})
