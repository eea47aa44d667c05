"""The dispatcher: one worker task per sink, taking due deliveries from the store.

A worker owns one sink, so a slow or dead sink stalls nobody but itself, and ingest
never waits for any of them: it only wakes the workers of the sinks it enqueued for.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import replace
from typing import Literal

import structlog

from relay import logs
from relay.circuit import CircuitBreaker
from relay.config import RetryConfig, SinkConfig
from relay.errors import StoreUnavailable
from relay.metrics import Metrics
from relay.models import Delivery, mark_late
from relay.sinks import Outcome, Sink
from relay.sinks.base import backoff_ceiling
from relay.store import Deliveries, Ordering, Settlement

log = structlog.get_logger("relay.dispatch")

# A lane renews the claims of its sends in flight this often, as a share of the store's
# lease: two renewals may fail (a Redis failover) before another relay takes them over.
RENEW_SHARE = 1 / 3
# Writing an outcome the store refused is tried again after 0.5 s, then twice as long
# each time, up to 5 s: a full disk is back within a poll of getting room.
SETTLE_RETRY_FIRST, SETTLE_RETRY_MAX = 0.5, 5.0
SETTLE_REPORT_EVERY = 60.0  # a kept outcome is logged again this often while it waits


class _Unsettled(Exception):
    """A settlement failed for a reason other than the store being unable to write."""


def backoff(attempts: int, retry: RetryConfig, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: anywhere in [0, min(max, initial * 2**(attempts-1))].

    Spreading retries over the whole interval keeps a recovering sink from being hit
    by every backlog item at the same instant.
    """
    return backoff_ceiling(attempts, retry) * rand()


def judge(delivery: Delivery, outcome: Outcome, retry: RetryConfig, now: float) -> Settlement:
    """Turn a sink's outcome into the store's next state for that delivery."""
    return replace(_judge(delivery, outcome, retry, now), attempts_before=delivery.attempts)


def _judge(delivery: Delivery, outcome: Outcome, retry: RetryConfig, now: float) -> Settlement:
    if outcome.result == "defer":
        wait = outcome.retry_after or 0.0
        return Settlement(delivery.id, "pending", now + wait, None, None, attempted=False)
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


class Lane:
    """One sink's runtime: its worker, its sends in flight, its circuit."""

    def __init__(self, name: str, sink: Sink, config: SinkConfig) -> None:
        self.name = name
        self.sink = sink
        self.retry = config.retry
        # order: per_key: claims take only the head of each object's events.
        self.order = (
            Ordering(config.order_timeout, config.coalesce) if config.order == "per_key" else None
        )
        self.circuit = CircuitBreaker.of(config.circuit)
        self.gone = False  # the receiver answered 410 Gone, until a send succeeds
        self.wake = asyncio.Event()
        self.stop = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None
        # The sends in flight, each with the claims it holds until settled (renewed on a
        # shared store).
        self.sending: dict[asyncio.Task[None], list[int]] = {}
        self.renew_at = 0.0  # monotonic
        self.caught_up = True  # the last look found less than it could take
        self.store_failing = False  # the last look at the store failed

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return [*([self.worker] if self.worker else []), *self.sending]


class Dispatcher:
    """Runs one Lane per sink. Lanes come and go with `start` and `retire`, so a config
    reload replaces the sinks that changed and leaves the others undisturbed."""

    def __init__(
        self,
        store: Deliveries,
        metrics: Metrics | None = None,
        *,
        idle_poll: float = 1.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        # Upper bound on a worker's sleep: a safety net for wake-ups that never come
        # (another process wrote the store), not the normal way work is found.
        self.idle_poll = idle_poll
        self.lanes: dict[str, Lane] = {}
        self._stopping: asyncio.Future[None] | None = None

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """Every task the dispatcher owns: one worker per sink and the sends in flight."""
        return [task for lane in self.lanes.values() for task in lane.tasks]

    def start(self, sinks: Mapping[str, Sink], configs: Mapping[str, SinkConfig]) -> None:
        if self._stopping is not None:
            return  # shutting down: their work waits in the store for the next start
        for name, sink in sinks.items():
            lane = Lane(name, sink, configs[name])
            if self.metrics is not None:
                # At zero from the start, so that rate() sees the first one; and the same
                # series whether one process or several (server.workers) answer.
                self.metrics.order_late(name)
                self.metrics.order_released(name, "timeout")
                self.metrics.order_released(name, "dead")
            lane.worker = asyncio.create_task(self._work(lane), name=f"relay-sink-{name}")
            self.lanes[name] = lane

    async def clock_stepped_back(self, seconds: float) -> None:
        """Move every retry and open circuit back by the wall clock's step (relay.clock),
        then let the lanes look again."""
        moved = await self.store.move_schedule_back(seconds)
        now = time.time()
        # A copy: a reload may add or retire lanes while a state is being saved.
        for lane in list(self.lanes.values()):
            if lane.circuit.open_until > now:
                lane.circuit.open_until = max(lane.circuit.open_until - seconds, now)
                await self._save_state(lane)
        log.warning("clock.stepped_back", seconds=round(seconds, 3), deliveries=moved)
        self.wake(self.lanes)

    def wake(self, sinks: Iterable[str]) -> None:
        for name in sinks:
            lane = self.lanes.get(name)
            if lane is not None:
                lane.wake.set()

    async def retire(self, names: Iterable[str], grace: float) -> list[Sink]:
        """Stop the lanes of `names` (bounded like shutdown); returns their sinks, for
        the caller to close. Their unsent deliveries stay pending in the store."""
        lanes = [self.lanes.pop(name) for name in names if name in self.lanes]
        await self._drain(lanes, grace)
        return [lane.sink for lane in lanes]

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
            self._stopping = asyncio.ensure_future(self._drain(list(self.lanes.values()), grace))
        return self._stopping

    def _in_order(self, name: str, delivery: Delivery) -> Delivery:
        """What an ordered claim decided about `delivery`, told and counted; a late one
        goes out marked late."""
        for event_id, held in delivery.overtakes:
            # An object held longer than order_timeout: its later events go on without
            # the event that held it, which keeps its retries and will come late.
            log.warning(
                "order.released",
                sink=name,
                reason="timeout",
                event_id=event_id,
                held_for_s=held,
                next_event_id=delivery.event_id,
            )
            if self.metrics is not None:
                self.metrics.order_released(name, "timeout").inc()
        if delivery.supersedes:
            log.info(
                "order.coalesced",
                sink=name,
                event_id=delivery.event_id,
                coalesced=len(delivery.supersedes),
            )
            if self.metrics is not None:
                self.metrics.delivery_counter(name, "coalesced").inc(len(delivery.supersedes))
        if not delivery.late:
            return delivery
        log.info("order.late", sink=name, event_id=delivery.event_id)
        if self.metrics is not None:
            self.metrics.order_late(name).inc()
        return mark_late(delivery)

    async def _work(self, lane: Lane) -> None:
        """Keep up to `sink.concurrency` sends of up to `sink.batch_size` in flight,
        as far as the sink's circuit allows."""
        sink, circuit, name = lane.sink, lane.circuit, lane.name

        store = self.store
        renew_every = store.lease * RENEW_SHARE
        lane.renew_at = time.monotonic() + renew_every

        def finished(task: asyncio.Task[None]) -> None:
            # What the send still holds: nothing once settled (settle() released them,
            # and _deliver emptied its entry). Releasing the claim's ids instead would
            # free a claim taken since on the same delivery (a retry due at once), and
            # it would be sent twice.
            unsettled = lane.sending.pop(task, [])
            # Not settled (cancelled by a drain, or the settlement failed): due again
            # now, as before the claim.
            self.store.release(unsettled)
            lane.wake.set()

        while not lane.stop.is_set():
            # Cleared before looking, so a wake-up that lands while we look is kept.
            lane.wake.clear()
            now = time.time()
            before = circuit.state
            allowance = circuit.allowance(now)
            if circuit.state != before:
                log.info("circuit.half_open", sink=name)
                await self._save_state(lane)
            if lane.gone:
                # The receiver said 410 Gone: its endpoint is disabled. Sending the rest
                # would only dead-letter them one by one, so they wait in the store until
                # the sink's config changes (a reload) or relay restarts.
                allowance = 0
            # A half-open circuit lets exactly one delivery probe the sink.
            slots = sink.concurrency if allowance is None else allowance
            limit = sink.batch_size if allowance is None else 1
            next_at: float | None = None
            if allowance == 0:
                next_at = time.time() + self.idle_poll if lane.gone else circuit.open_until
            if store.shared and time.monotonic() >= lane.renew_at:
                await self._renew(lane)
                lane.renew_at = time.monotonic() + renew_every
            free = slots - len(lane.sending)
            if allowance != 0 and free > 0:
                try:
                    # Enough for every free slot in one look: a sink of single sends
                    # (HTTP) fills its connections without a query per delivery.
                    due = await store.claim(
                        name,
                        limit * free,
                        lease=store.lease,
                        exclusive=sink.paced,
                        order=lane.order,
                    )
                    if lane.order is not None:
                        due = [self._in_order(name, d) for d in due]
                    if lane.store_failing:
                        lane.store_failing = False
                        log.info("dispatch.store_recovered", sink=name)
                    if lane.stop.is_set():
                        # Taken while stopping: left pending for the next start.
                        self.store.release([d.id for d in due])
                        break
                    lane.caught_up = len(due) < limit * free
                    if due:
                        for start in range(0, len(due), limit):
                            batch = due[start : start + limit]
                            ids = [d.id for d in batch]
                            task = asyncio.create_task(self._deliver(lane, batch))
                            lane.sending[task] = ids
                            task.add_done_callback(finished)
                        continue
                    next_at = await store.next_due_at(name)
                    if next_at is not None and next_at <= time.time():
                        # Due, yet none for us: another relay is this paced sink's one
                        # consumer, or holds the rest. Look again at the next poll.
                        next_at = None
                except Exception:
                    # Once per spell: a store away for a minute is one line, not sixty.
                    if not lane.store_failing:
                        log.exception("dispatch.store_error", sink=name)
                    lane.store_failing = True
            if lane.stop.is_set():
                break
            pause = self.idle_poll if next_at is None else next_at - time.time()
            if store.shared and lane.sending:
                pause = min(pause, lane.renew_at - time.monotonic())
            with suppress(TimeoutError):
                await asyncio.wait_for(
                    lane.wake.wait(), timeout=min(max(pause, 0.0), self.idle_poll)
                )
            if sink.linger and lane.caught_up and not lane.stop.is_set():
                await asyncio.sleep(sink.linger)

    async def _drain(self, lanes: Sequence[Lane], grace: float) -> None:
        if self.store.shared:
            await _drain(lanes, grace, self._renew, self.store.lease * RENEW_SHARE)
        else:
            await _drain(lanes, grace)

    async def _renew(self, lane: Lane) -> None:
        """Keep the claims of the sends in flight: on a shared store a claim runs out
        after the lease, and another relay would send the delivery a second time."""
        ids = [i for held in lane.sending.values() for i in held]
        paused = lane.gone or lane.circuit.state == "open"
        if not ids and (not lane.sink.paced or paused):
            # Nothing held. A paced sink keeps its consumer hold while it sends; a paused
            # one (410, open circuit) lets it go, so another relay can send meanwhile.
            return
        try:
            lost = await self.store.renew(lane.name, ids, self.store.lease)
        except Exception as exc:
            if not lane.store_failing:  # once per spell, as for claims
                log.error("dispatch.renew_failed", sink=lane.name, claims=len(ids), error=str(exc))
            lane.store_failing = True
            return
        if lost:
            # Their lease ran out before a renewal (a stalled process, a Redis outage):
            # another relay may send them too. At least once, never lost.
            log.warning("dispatch.claims_lost", sink=lane.name, deliveries=len(lost))

    async def _observe(
        self, lane: Lane, outcomes: Sequence[Outcome], now: float, generation: int
    ) -> None:
        """Feed one send's result to the sink's circuit and gone flag; log changes."""
        name, circuit = lane.name, lane.circuit
        succeeded = any(o.result == "done" for o in outcomes)
        # Throttling (429, or any Retry-After) is the sink pacing us, not failing: it is
        # honoured through Retry-After, and must not open the circuit on top of that.
        failed = not succeeded and any(
            o.failure
            if o.failure is not None
            else o.result == "retry" and o.status != 429 and o.retry_after is None
            for o in outcomes
        )
        changed = circuit.record(succeeded, failed, now, generation)
        if changed == "open":
            sends, failures = circuit.seen
            log.warning(
                "circuit.open",
                sink=name,
                reason=circuit.reason,  # rate, consecutive, or probe (a failed probe)
                sends=sends,  # within the window, when it opened on the rate
                failed=failures,
                consecutive=circuit.failures,
                cooldown_s=circuit.cooldown,
            )
        elif changed == "closed":
            log.info("circuit.closed", sink=name)
        was_gone = lane.gone
        if any(o.gone for o in outcomes):
            if not lane.gone:
                status = next((o.status for o in outcomes if o.gone), None)
                log.error("sink.gone", sink=name, status=status, paused=True)
            lane.gone = True
        elif succeeded:
            lane.gone = False
        if changed is not None or was_gone != lane.gone:
            await self._save_state(lane)

    async def _save_state(self, lane: Lane) -> None:
        # For `relay status` and the metrics of other processes; losing it loses no event.
        try:
            await self.store.save_sink_state(
                lane.name, lane.circuit.state, lane.circuit.open_until, lane.gone
            )
        except Exception:
            log.exception("dispatch.state_save_failed", sink=lane.name)

    async def _settle(self, lane: Lane, settlements: Sequence[Settlement], now: float) -> None:
        """Record what became of a send; while the store cannot write (a full disk, a
        Redis away), keep the outcomes and write them once it can. The send keeps its
        claims meanwhile, so its deliveries are not sent again: only a drain's deadline
        or a crash gives them back, to be sent again (at least once, never lost)."""
        pause, waiting_since, said = SETTLE_RETRY_FIRST, 0.0, 0.0
        while True:
            settling = asyncio.ensure_future(self.store.settle(settlements, now))
            try:
                try:
                    await asyncio.shield(settling)
                except asyncio.CancelledError:
                    # A drain cancelled us mid-settle: the write goes on in the store's
                    # thread; the claims may go back only once it is done.
                    await asyncio.wait({settling})
                    raise
            except StoreUnavailable as exc:
                # The store cannot write now (a full disk, Redis away): it will.
                if time.monotonic() - said >= SETTLE_REPORT_EVERY:
                    said = time.monotonic()
                    waiting_since = waiting_since or said
                    log.error(
                        "dispatch.settle_failed",
                        sink=lane.name,
                        deliveries=len(settlements),
                        error=f"{exc.__class__.__name__}: {exc}",
                        kept=True,  # written once the store can, not sent again
                        waited_s=round(said - waiting_since, 1),
                    )
                await asyncio.sleep(pause)
                pause = min(pause * 2, SETTLE_RETRY_MAX)
                continue
            except Exception:
                # Anything else may never write: the claims go back and the deliveries
                # are sent again (at least once, never lost). The pause keeps a failing
                # store from turning that into a tight loop.
                log.exception("dispatch.settle_failed", sink=lane.name, deliveries=len(settlements))
                await asyncio.sleep(1.0)
                raise _Unsettled() from None
            if waiting_since:
                log.info(
                    "dispatch.settle_written",
                    sink=lane.name,
                    deliveries=len(settlements),
                    waited_s=round(time.monotonic() - waiting_since, 3),
                )
            return

    async def _deliver(self, lane: Lane, batch: Sequence[Delivery]) -> None:
        name, sink = lane.name, lane.sink
        started = time.monotonic()
        generation = lane.circuit.generation  # what the circuit was when this send began
        try:
            outcomes = await sink.send(batch)
            if len(outcomes) != len(batch):
                raise RuntimeError(f"sink returned {len(outcomes)} outcomes for {len(batch)}")
        except Exception as exc:
            log.exception("dispatch.sink_error", sink=name)
            outcomes = [Outcome("retry", error=f"{exc.__class__.__name__}: {exc}")] * len(batch)
        elapsed = time.monotonic() - started
        now = time.time()
        settlements = [judge(d, o, lane.retry, now) for d, o in zip(batch, outcomes, strict=True)]
        try:
            await self._settle(lane, settlements, now)
        except _Unsettled:
            return  # the claims go back as the task ends (see finished() in _work)
        # Settled: nothing of this send is held any more, nothing to renew.
        current = asyncio.current_task()
        if current in lane.sending:
            lane.sending[current] = []
        await self._observe(lane, outcomes, now, generation)
        if self.metrics is not None:
            self.metrics.delivery_timer(name).observe(elapsed)
        elapsed_ms = round(elapsed * 1000, 1)
        counted: dict[Literal["retry", "done", "dead"], int] = {}
        for delivery, settled in zip(batch, settlements, strict=True):
            if not settled.attempted:
                continue  # held back by the sink: not an attempt, nothing to count or log
            kind: Literal["retry", "done", "dead"] = (
                "retry" if settled.state == "pending" else settled.state
            )
            counted[kind] = counted.get(kind, 0) + 1
            if settled.state == "done":
                continue  # counted, and logged below as one line for the whole batch
            fields = {
                "sink": name,
                "event_id": delivery.event_id,
                "attempt": delivery.attempts + 1,
                "batch": len(batch),
                "elapsed_ms": elapsed_ms,
            }
            if settled.state == "dead":
                log.warning("delivery.dead", status=settled.status, error=settled.error, **fields)
                if lane.order is not None and delivery.keyed and delivery.attempts:
                    # It failed before and so held its object through a retry (one
                    # refused at its first attempt held nothing up for long).
                    # Its object's later events, held up behind it, go on now.
                    log.warning(
                        "order.released",
                        sink=name,
                        reason="dead",
                        event_id=delivery.event_id,
                        held_for_s=round(now - delivery.created_at, 3),
                    )
                    if self.metrics is not None:
                        self.metrics.order_released(name, "dead").inc()
            else:
                log.info(
                    "delivery.retry",
                    status=settled.status,
                    error=settled.error,
                    retry_in_s=round(settled.next_at - now, 3),
                    **fields,
                )
        if counted.get("done") and logs.enabled(logging.DEBUG):
            done = [
                d.event_id for d, s in zip(batch, settlements, strict=True) if s.state == "done"
            ]
            log.debug("delivery.done", sink=name, event_ids=done, elapsed_ms=elapsed_ms)
        if self.metrics is not None:
            for outcome_kind, count in counted.items():
                self.metrics.delivery_counter(name, outcome_kind).inc(count)


async def _drain(
    lanes: Sequence[Lane],
    grace: float,
    renew: Callable[[Lane], Awaitable[None]] | None = None,
    every: float = math.inf,
) -> None:
    """Stop `lanes`: no new sends, in-flight ones get `grace` seconds, then cancel. On a
    shared store the claims of the sends still running are renewed meanwhile (`renew`
    every `every` seconds): a drain longer than a lease must not let another relay send
    them a second time."""
    for lane in lanes:
        lane.stop.set()
        lane.wake.set()
    deadline = time.monotonic() + grace
    # Workers first: once they are out, no new send can start, so the set of sends to
    # wait for is final.
    workers = [lane.worker for lane in lanes if lane.worker is not None]
    if workers:
        await asyncio.wait(workers, timeout=grace)
    sends = [task for lane in lanes for task in lane.sending]
    unfinished: set[asyncio.Task[None]] = set(sends)
    while unfinished:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, unfinished = await asyncio.wait(unfinished, timeout=min(left, every))
        if unfinished and renew is not None:
            for lane in lanes:
                if lane.sending:
                    await renew(lane)
    leftovers = [t for t in [*workers, *sends] if not t.done()]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*workers, *sends, return_exceptions=True)
    if unfinished:
        log.warning("dispatch.drain_timeout", grace_s=grace, cancelled=len(unfinished))
