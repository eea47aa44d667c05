"""`server.workers`: several processes answering ingest on one port (SO_REUSEPORT).

With `workers: N` (N > 0), `relay serve` becomes the leader of N worker processes. The
workers answer HTTP: they authenticate, parse and validate, and hand each request's
events to the leader over a socket pair. The leader is the store's only writer: it
group-commits what every worker sends in one transaction and one fsync, answers each
worker once its events are on disk, and runs the sinks and the background work.

One writer, because SQLite serialises writers anyway: processes taking turns at the
write lock each paid their own fsync, and each held the lock while winning back its own
GIL from a busy event loop. The leader answers no HTTP, so its store thread rarely waits
for the GIL.

A worker's socket pair is also its lifeline: when the leader ends, however it ends, the
worker reads EOF, answers 503 to whatever it still holds, and exits. No worker outlives
its leader to acknowledge events that nobody would store.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import structlog

from relay.errors import QueueFull, StoreUnavailable
from relay.snapshot import ConfigSnapshot
from relay.store import AcceptResult, NewEvent

log = structlog.get_logger("relay.workers")

_RESPAWN_MAX = 30.0  # seconds between restarts of a worker that keeps failing
_HEADER = struct.Struct("!I")  # every message: its length, then orjson


@dataclass(frozen=True)
class WorkerRole:
    """What makes a `relay serve` process a worker, from its hidden command-line flags."""

    number: int
    link_fd: int  # this worker's end of its socket pair with the leader
    metrics_dir: Path  # the leader's multiprocess metrics folder
    # The leader's config snapshot this worker loaded its config from (its --config);
    # None when the leader runs the embedded default.
    snapshot: ConfigSnapshot | None = None


async def _send(writer: asyncio.StreamWriter, message: Any) -> None:
    data = orjson.dumps(message)
    writer.write(_HEADER.pack(len(data)) + data)
    await writer.drain()


async def _receive(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at EOF."""
    try:
        header = await reader.readexactly(_HEADER.size)
        return orjson.loads(await reader.readexactly(_HEADER.unpack(header)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


# --- the worker's side -------------------------------------------------------------------


class LeaderLink:
    """A worker's `accept`: sends a request's events to the leader and waits for its
    answer, which comes only after the leader's commit. Raises StoreUnavailable when the
    leader cannot store them or is gone; the sender gets a 503 and retries."""

    def __init__(self, fd: int, on_lost: Callable[[], None]) -> None:
        self._fd = fd
        self._on_lost = on_lost
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[AcceptResult]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._lost = False

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=socket.socket(fileno=self._fd))
        self._reading = asyncio.create_task(self._read(reader), name="relay-leader-link")

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        self._fail(StoreUnavailable("the worker is stopping"))

    @property
    def up(self) -> bool:
        return self._writer is not None and not self._lost

    async def listening(self) -> None:
        """Tell the leader this worker takes requests now."""
        assert self._writer is not None
        await _send(self._writer, [None, "listening"])

    async def accept(self, events: Sequence[NewEvent]) -> AcceptResult:
        if not self.up:
            raise StoreUnavailable("this worker has lost its leader")
        assert self._writer is not None
        key = next(self._ids)
        answer: asyncio.Future[AcceptResult] = asyncio.get_running_loop().create_future()
        self._waiting[key] = answer
        rows = [
            (e.id, e.source, e.envelope, e.sinks, e.order_key, e.order_at, e.ordered)
            for e in events
        ]
        try:
            await _send(self._writer, [key, rows])
            return await answer
        except ConnectionError:
            raise StoreUnavailable("this worker has lost its leader") from None
        finally:
            self._waiting.pop(key, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await _receive(reader)) is not None:
                key, accepted, duplicates, error = message
                answer = self._waiting.get(key)
                if answer is None or answer.done():
                    continue
                if error is not None:
                    # [code, message]: a full queue is the sender's 503 queue_full; any
                    # other failure, the store's.
                    code, text = error
                    failure = QueueFull if code == QueueFull.code else StoreUnavailable
                    answer.set_exception(failure(str(text)))
                else:
                    answer.set_result(AcceptResult(accepted, duplicates))
        except asyncio.CancelledError:
            raise  # close(): the worker is stopping
        except Exception:
            log.exception("worker.link_broken")
        # Gone or garbled, the link is over: nobody may wait for an answer on it.
        self._lost = True
        log.warning("worker.leader_gone")
        self._fail(StoreUnavailable("this worker has lost its leader"))
        self._on_lost()

    def _fail(self, error: Exception) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(error)


# --- the leader's side -------------------------------------------------------------------

Accept = Callable[[Sequence[NewEvent]], Awaitable[AcceptResult]]


async def serve_worker(
    sock: socket.socket, accept: Accept, slot: int, on_listening: Callable[[], None]
) -> None:
    """Answer one worker's accept requests until it closes its end. Each request is
    committed in the leader's group commit with every other worker's."""
    reader, writer = await asyncio.open_connection(sock=sock)
    pending: set[asyncio.Task[None]] = set()

    async def answer(key: int, rows: list[list[Any]]) -> None:
        events = [
            NewEvent(i, source, envelope, tuple(sinks), key, at, tuple(ordered))
            for i, source, envelope, sinks, key, at, ordered in rows
        ]
        message: list[Any]
        try:
            result: AcceptResult = await accept(events)
        except QueueFull as exc:
            message = [key, None, None, [exc.code, exc.message]]
        except StoreUnavailable as exc:
            message = [key, None, None, ["store_unavailable", str(exc)]]
        except Exception as exc:  # never leave a worker waiting for an answer
            log.exception("worker.accept_failed", worker=slot)
            message = [key, None, None, ["store_unavailable", exc.__class__.__name__]]
        else:
            message = [key, result.accepted, result.duplicates, None]
        with suppress(ConnectionError):
            await _send(writer, message)

    try:
        while (message := await _receive(reader)) is not None:
            if message[0] is None:
                on_listening()
                continue
            task = asyncio.create_task(answer(*message))
            pending.add(task)
            task.add_done_callback(pending.discard)
    finally:
        # Whatever was handed over is committed (or refused) before we let go.
        await asyncio.gather(*pending, return_exceptions=True)
        writer.close()


class Supervisor:
    """Starts the workers, each with its socket pair, restarts one that dies, forwards
    signals, and stops them all within a bound."""

    def __init__(self, count: int, argv: Sequence[str], accept: Accept) -> None:
        self.count = count
        self.argv = list(argv)
        self.accept = accept
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._links: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._listening: set[int] = set()
        self._all_listening = asyncio.Event()

    async def wait_listening(self, within: float) -> bool:
        """Whether every worker listens within `within` seconds of the start."""
        try:
            await asyncio.wait_for(self._all_listening.wait(), within)
        except TimeoutError:
            return False
        return True

    def _listens(self, slot: int) -> None:
        self._listening.add(slot)
        if len(self._listening) >= self.count:
            self._all_listening.set()

    def start(self) -> None:
        for slot in range(1, self.count + 1):
            self._tasks.append(asyncio.create_task(self._keep(slot), name=f"relay-worker-{slot}"))

    async def _keep(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        delay = 1.0
        while not self._stopping.is_set():
            started = loop.time()
            ours, theirs = socket.socketpair()
            try:
                process = await asyncio.create_subprocess_exec(
                    *self.argv,
                    "--worker-link-fd",
                    str(theirs.fileno()),
                    "--worker-number",
                    str(slot),
                    stdin=asyncio.subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                )
            except OSError:
                log.exception("worker.spawn_failed", worker=slot)
                ours.close()
            else:
                link = asyncio.create_task(
                    serve_worker(ours, self.accept, slot, partial(self._listens, slot))
                )
                self._links.add(link)
                link.add_done_callback(self._links.discard)
                self.processes[slot] = process
                log.info("worker.started", worker=slot, pid=process.pid)
                if self._stopping.is_set():
                    # Spawned while stop() was signalling the others: it missed that.
                    process.terminate()
                code = await process.wait()
                if self._stopping.is_set():
                    return
                log.error("worker.exited", worker=slot, pid=process.pid, returncode=code)
            finally:
                theirs.close()
            # One that ran a while is restarted at once; one that keeps failing backs off.
            if loop.time() - started > _RESPAWN_MAX:
                delay = 1.0
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESPAWN_MAX)

    def signal(self, sig: signal.Signals) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                with suppress(ProcessLookupError):
                    process.send_signal(sig)

    def reload(self) -> None:
        """SIGHUP to the workers that listen. One still starting ignores SIGHUP until its
        handler is in; it then compares the snapshot with what it loaded and catches up."""
        for slot, process in self.processes.items():
            if slot in self._listening and process.returncode is None:
                with suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)

    async def stop(self, grace: float) -> None:
        """Ask every worker to drain (SIGTERM), wait `grace` seconds for them to exit,
        kill the rest; then finish committing what they handed over."""
        self._stopping.set()
        self.signal(signal.SIGTERM)
        running = [p for p in self.processes.values() if p.returncode is None]
        if running:
            waits = [asyncio.create_task(p.wait()) for p in running]
            await asyncio.wait(waits, timeout=grace)
            for process in running:
                if process.returncode is None:
                    log.warning("worker.killed", pid=process.pid, after_s=grace)
                    with suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*waits, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for process in self.processes.values():
            if process.returncode is None:  # a respawn that raced the stop
                with suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        # What the workers handed over is committed (or refused) before the store closes.
        if self._links:
            _, stuck = await asyncio.wait(self._links, timeout=grace)
            for link in stuck:
                link.cancel()


def worker_argv(
    snapshot: ConfigSnapshot | None, host: str, port: int, metrics_dir: Path
) -> list[str]:
    """A worker's command line; the supervisor adds its link and number. A worker loads
    the leader's snapshot of the config, never the operator's file itself."""
    argv = [sys.executable, "-m", "relay", "serve", "--host", host, "--port", str(port)]
    if snapshot is not None:
        argv += ["--config", str(snapshot.path.absolute())]
    return [*argv, "--worker-metrics-dir", str(metrics_dir.absolute())]


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) the port every worker will listen on: port 0 becomes a
    real one to hand them, and no other program takes it in between. A socket that does
    not listen is never given connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        # SO_REUSEPORT would let this relay share a port another relay's workers hold
        # (splitting the events between two stores) without a word: a bind without it
        # fails on any socket already there, as a single process's does.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
