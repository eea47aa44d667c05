"""The dispatcher: one worker task per sink, taking due deliveries from the store.

A worker owns one sink, so a slow or dead sink stalls nobody but itself, and ingest
never waits for any of them: it only wakes the workers of the sinks it enqueued for.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from functools import partial

import structlog

from relay.circuit import CircuitBreaker
from relay.config import RetryConfig, SinkConfig
from relay.models import Delivery
from relay.sinks import Outcome, Sink
from relay.sinks.base import backoff_ceiling
from relay.store import Settlement, SqliteStore

log = structlog.get_logger("relay.dispatch")


def backoff(attempts: int, retry: RetryConfig, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: anywhere in [0, min(max, initial * 2**(attempts-1))].

    Spreading retries over the whole interval keeps a recovering sink from being hit
    by every backlog item at the same instant.
    """
    return backoff_ceiling(attempts, retry) * rand()


def judge(delivery: Delivery, outcome: Outcome, retry: RetryConfig, now: float) -> Settlement:
    """Turn a sink's outcome into the store's next state for that delivery."""
    attempts = delivery.attempts + 1
    if outcome.result == "done":
        return Settlement(delivery.id, "done", now, outcome.status, None)
    if outcome.result == "dead" or attempts >= retry.max_attempts:
        return Settlement(delivery.id, "dead", now, outcome.status, outcome.error)
    if retry.max_age is not None and now - delivery.created_at >= retry.max_age:
        error = f"{outcome.error} (gave up: older than max_age {retry.max_age:g}s)"
        return Settlement(delivery.id, "dead", now, outcome.status, error)
    delay = max(backoff(attempts, retry), outcome.retry_after or 0.0)
    return Settlement(delivery.id, "pending", now + delay, outcome.status, outcome.error)


class Dispatcher:
    def __init__(
        self,
        store: SqliteStore,
        sinks: Mapping[str, Sink],
        configs: Mapping[str, SinkConfig],
        *,
        idle_poll: float = 1.0,
    ) -> None:
        self.store = store
        self.sinks = dict(sinks)
        self.retries = {name: config.retry for name, config in configs.items()}
        self.circuits = {
            name: CircuitBreaker(config.circuit.failures, config.circuit.cooldown)
            for name, config in configs.items()
        }
        # Sinks whose receiver answered 410 Gone, until one of their sends succeeds.
        self.gone: set[str] = set()
        # Upper bound on a worker's sleep: a safety net for wake-ups that never come
        # (another process wrote the store), not the normal way work is found.
        self.idle_poll = idle_poll
        self._wake = {name: asyncio.Event() for name in self.sinks}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """Every task the dispatcher owns: one worker per sink and the sends in flight."""
        return [*self._workers.values(), *self._sending]

    def start(self) -> None:
        for name in self.sinks:
            self._workers[name] = asyncio.create_task(self._work(name), name=f"relay-sink-{name}")

    def wake(self, sinks: Iterable[str]) -> None:
        for name in sinks:
            event = self._wake.get(name)
            if event is not None:
                event.set()

    async def stop(self, grace: float) -> None:
        """Stop taking work, let in-flight sends finish for `grace` seconds, then cancel.

        A cancelled send is not settled: its delivery stays pending in the store and is
        sent again (same event id) after the next start. Calling it again waits for the
        first call to finish.
        """
        await asyncio.shield(self.begin_stop(grace))

    def begin_stop(self, grace: float) -> asyncio.Future[None]:
        """Start `stop` without waiting for it."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain(grace))
        return self._stopping

    async def _drain(self, grace: float) -> None:
        self._stop.set()
        self.wake(self.sinks)
        deadline = time.monotonic() + grace
        # Workers first: once they are out, no new send can start, so the set of
        # sends to wait for is final.
        workers = list(self._workers.values())
        if workers:
            await asyncio.wait(workers, timeout=grace)
        sends = list(self._sending)
        unfinished: set[asyncio.Task[None]] = set()
        if sends:
            _, unfinished = await asyncio.wait(sends, timeout=max(deadline - time.monotonic(), 0.0))
        leftovers = [t for t in [*workers, *sends] if not t.done()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*workers, *sends, return_exceptions=True)
        if unfinished:
            log.warning("dispatch.drain_timeout", grace_s=grace, cancelled=len(unfinished))

    async def _work(self, name: str) -> None:
        """Keep up to `sink.concurrency` sends of up to `sink.batch_size` in flight,
        as far as the sink's circuit allows."""
        sink, wake, circuit = self.sinks[name], self._wake[name], self.circuits[name]
        in_flight: set[int] = set()
        running: set[asyncio.Task[None]] = set()

        def finished(ids: list[int], task: asyncio.Task[None]) -> None:
            running.discard(task)
            self._sending.discard(task)
            in_flight.difference_update(ids)
            wake.set()

        while not self._stop.is_set():
            # Cleared before looking, so a wake-up that lands while we look is kept.
            wake.clear()
            now = time.time()
            before = circuit.state
            allowance = circuit.allowance(now)
            if circuit.state != before:
                log.info("circuit.half_open", sink=name)
            # A half-open circuit lets exactly one delivery probe the sink.
            slots = sink.concurrency if allowance is None else allowance
            limit = sink.batch_size if allowance is None else 1
            next_at: float | None = circuit.open_until if allowance == 0 else None
            if allowance != 0 and len(running) < slots:
                try:
                    batch = await self.store.due(name, limit, exclude=in_flight)
                    if self._stop.is_set():
                        break  # taken while stopping: left pending for the next start
                    if batch:
                        ids = [d.id for d in batch]
                        in_flight.update(ids)
                        task = asyncio.create_task(self._deliver(name, sink, batch))
                        running.add(task)
                        self._sending.add(task)
                        task.add_done_callback(partial(finished, ids))
                        continue
                    next_at = await self.store.next_due_at(name, exclude=in_flight)
                except Exception:
                    log.exception("dispatch.store_error", sink=name)
            if self._stop.is_set():
                break
            pause = self.idle_poll if next_at is None else next_at - time.time()
            with suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=min(max(pause, 0.0), self.idle_poll))

    def _observe(self, name: str, outcomes: Sequence[Outcome], now: float) -> None:
        """Feed one send's result to the sink's circuit and gone flag; log changes."""
        succeeded = any(o.result == "done" for o in outcomes)
        failed = not succeeded and any(o.result == "retry" for o in outcomes)
        circuit = self.circuits[name]
        changed = circuit.record(succeeded, failed, now)
        if changed == "open":
            log.warning(
                "circuit.open",
                sink=name,
                failures=circuit.failures,
                cooldown_s=circuit.cooldown,
            )
        elif changed == "closed":
            log.info("circuit.closed", sink=name)
        if any(o.gone for o in outcomes):
            if name not in self.gone:
                log.error("sink.gone", sink=name, status=410)
            self.gone.add(name)
        elif succeeded:
            self.gone.discard(name)

    async def _deliver(self, name: str, sink: Sink, batch: Sequence[Delivery]) -> None:
        started = time.monotonic()
        try:
            outcomes = await sink.send(batch)
            if len(outcomes) != len(batch):
                raise RuntimeError(f"sink returned {len(outcomes)} outcomes for {len(batch)}")
        except Exception as exc:
            log.exception("dispatch.sink_error", sink=name)
            outcomes = [Outcome("retry", error=f"{exc.__class__.__name__}: {exc}")] * len(batch)
        now = time.time()
        self._observe(name, outcomes, now)
        retry = self.retries[name]
        settlements = [judge(d, o, retry, now) for d, o in zip(batch, outcomes, strict=True)]
        try:
            await self.store.settle(settlements, now)
        except Exception:
            # Unsettled deliveries stay pending and are sent again: at least once, never
            # lost. The pause keeps a failing store from turning that into a tight loop.
            log.exception("dispatch.settle_failed", sink=name, batch=len(batch))
            await asyncio.sleep(1.0)
            return
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        for delivery, settled in zip(batch, settlements, strict=True):
            fields = {
                "sink": name,
                "event_id": delivery.event_id,
                "attempt": delivery.attempts + 1,
                "batch": len(batch),
                "elapsed_ms": elapsed_ms,
            }
            if settled.state == "done":
                log.debug("delivery.done", **fields)
            elif settled.state == "dead":
                log.warning("delivery.dead", status=settled.status, error=settled.error, **fields)
            else:
                log.info(
                    "delivery.retry",
                    status=settled.status,
                    error=settled.error,
                    retry_in_s=round(settled.next_at - now, 3),
                    **fields,
                )
