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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from relay.config import RelayConfig, load_config
from relay.dispatch import Dispatcher
from relay.errors import ConfigError
from relay.ingest import Ingest
from relay.logs import configure as configure_logs
from relay.metrics import Metrics
from relay.routing import Router
from relay.sinks import Sink, build_sink
from relay.sources import build_source
from relay.store import SqliteStore

log = structlog.get_logger("relay.runtime")

# Settings a running process cannot change: it would have to rebind or reopen.
_RESTART_ONLY: dict[str, Callable[[RelayConfig], object]] = {
    "server.host": lambda c: c.server.host,
    "server.port": lambda c: c.server.port,
    "server.watch_config": lambda c: c.server.watch_config,
    "store.backend": lambda c: c.store.backend,
    "store.path": lambda c: c.store.path,
}


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


class Runtime:
    def __init__(
        self,
        config: RelayConfig,
        config_path: Path | None = None,
        server_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        # Command-line flags (--host, --port, --watch) outrank the file, on every reload.
        self.server_overrides = dict(server_overrides or {})
        self.config = with_server(config, self.server_overrides)
        self.config_path = config_path
        config = self.config
        self.metrics = Metrics()
        self.store = SqliteStore(config.store.path, dedupe_window=config.dedupe.window)
        self.dispatcher = Dispatcher(self.store, self.metrics)
        self.sinks: dict[str, Sink] = {}
        self.ingest = Ingest(
            sources={},
            router=Router([]),
            max_body_bytes=config.server.max_body_bytes,
            store=self.store,
            metrics=self.metrics,
            on_enqueued=self.dispatcher.wake,
        )
        self._apply_ingest(config)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    async def start_sinks(self) -> None:
        """Start every configured sink and its lane; dead-letter work for sinks gone
        from the config since the last run."""
        retired = await self.store.retire_sinks(self.config.sinks)
        if retired:
            log.warning("sink.removed", deliveries_dead_lettered=retired)
        await self._start(self.config, list(self.config.sinks))

    async def stop_sinks(self) -> None:
        # Reloads first, so none starts a sink behind the dispatcher's back.
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.stop(self.config.server.drain_timeout)
        await self._close(list(self.sinks.values()))
        self.sinks.clear()

    def begin_drain(self) -> None:
        self.dispatcher.begin_stop(self.config.server.drain_timeout)

    # --- reloading ---------------------------------------------------------------------

    def request_reload(self, why: str) -> None:
        """Reload in the background (from a signal handler or the watcher)."""
        task = asyncio.create_task(self.reload(why), name="relay-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, why: str = "request") -> bool:
        """Re-read the config file; returns whether a new config was applied."""
        if self.config_path is None:
            log.warning("config.reload_skipped", reason="running the embedded default")
            return False
        async with self._lock:
            try:
                loaded = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                # The old config keeps serving; every problem names its path.
                log.error(
                    "config.reload_failed",
                    trigger=why,
                    path=str(self.config_path),
                    problems=exc.problems,
                )
                return False
            config = with_server(loaded, self.server_overrides)
            await self.apply(config)
            log.info("config.reloaded", trigger=why, config=config.summary())
            return True

    async def apply(self, config: RelayConfig) -> None:
        old = self.config
        for key, read in _RESTART_ONLY.items():
            if read(config) != read(old):
                log.warning(
                    "config.restart_required",
                    key=key,
                    running=str(read(old)),
                    configured=str(read(config)),
                )
        if config.log != old.log:
            configure_logs(config.log.level, config.log.format)
        self.store.dedupe_window = config.dedupe.window

        removed = [n for n in old.sinks if n not in config.sinks]
        changed = [n for n in old.sinks if n in config.sinks and config.sinks[n] != old.sinks[n]]
        added = [n for n in config.sinks if n not in old.sinks]
        # New sources and routes first: from here on events go to the new sinks, whose
        # lanes start below and find their work in the store.
        self._apply_ingest(config)
        self.config = config
        stale = await self.dispatcher.retire([*removed, *changed], config.server.drain_timeout)
        await self._close(stale)
        for name in [*removed, *changed]:
            self.sinks.pop(name, None)
        if removed:
            count = await self.store.retire_sinks(config.sinks)
            log.warning("sink.removed", sinks=removed, deliveries_dead_lettered=count)
        await self._start(config, [*changed, *added])
        if changed or added:
            log.info("sink.started", sinks=[*changed, *added])

    def _apply_ingest(self, config: RelayConfig) -> None:
        # Built completely before being swapped in, so a request sees the old set or
        # the new one, never half of each.
        sources = {name: build_source(name, src) for name, src in config.sources.items()}
        router = Router(config.effective_routes)
        self.ingest.sources, self.ingest.router = sources, router
        self.ingest.max_body_bytes = config.server.max_body_bytes

    async def _start(self, config: RelayConfig, names: list[str]) -> None:
        started: dict[str, Sink] = {}
        for name in names:
            sink = build_sink(name, config.sinks[name])
            await sink.start()
            started[name] = sink
        self.sinks.update(started)
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
        seen = await asyncio.to_thread(Fingerprint.of, path)
        while True:
            await asyncio.sleep(interval)
            current = await asyncio.to_thread(Fingerprint.of, path)
            if current is None or current == seen:
                continue
            if seen is None or current.digest != seen.digest:
                await self.reload("watch")
            seen = current


def with_server(config: RelayConfig, overrides: Mapping[str, Any]) -> RelayConfig:
    if not overrides:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=overrides)})
