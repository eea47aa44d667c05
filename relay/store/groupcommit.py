"""Group commit: many callers' writes share one transaction and one fsync.

The store's writer thread drains the queue itself: as soon as one commit returns it
takes whatever arrived meanwhile, without a trip back through the event loop. On a
busy loop that trip cost more than the fsync did (a commit waited for the loop to
finish a round of requests before the next could start), and every caller's ack waits
for the commit before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

from relay.errors import StoreUnavailable

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

Waiting = list[tuple[Any, "asyncio.Future[Any]"]]


class GroupCommit(Generic[ItemT, ResultT]):
    """Callers submit items; whoever arrives while a commit is on disk waits for the
    next one, which takes them all (up to `limit`) in ONE transaction and ONE fsync.
    Each caller is answered only after that commit returned, or gets StoreUnavailable.

    `schedule` queues a job on the store's single writer thread; `commit` runs there.
    """

    def __init__(
        self,
        schedule: Callable[[Callable[[], None]], object],
        commit: Callable[[list[ItemT]], list[ResultT]],
        limit: int = 256,
        turns: int = 4,
    ) -> None:
        self._schedule, self._commit = schedule, commit
        # `turns` groups per job, then the job queues itself again behind whatever else
        # the writer thread has to do: a steady stream of ingests must not starve the
        # settlements or the pruning that share the thread.
        self._limit, self._turns = limit, turns
        self._lock = threading.Lock()  # _waiting and _draining are shared with the thread
        self._waiting: Waiting = []
        self._draining = False
        self._unanswered: set[asyncio.Future[ResultT]] = set()

    async def submit(self, item: ItemT) -> ResultT:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ResultT] = loop.create_future()
        self._unanswered.add(waiter)
        waiter.add_done_callback(self._unanswered.discard)
        with self._lock:
            self._waiting.append((item, waiter))
            start, self._draining = not self._draining, True
        if start:
            self._queue_drain(loop)
        # A caller that gives up (its client hung up) cancels only its own waiter: its
        # item may still be committed, unacknowledged, and a retry is then a duplicate.
        return await waiter

    async def finish(self) -> None:
        """Wait until everything submitted so far is answered."""
        if self._unanswered:
            await asyncio.wait(set(self._unanswered))

    def _queue_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._schedule(partial(self._drain, loop))
        except RuntimeError:  # the writer thread is shut down: nothing will commit these
            with self._lock:
                leftover, self._waiting, self._draining = self._waiting, [], False
            _post(loop, _fail, leftover, StoreUnavailable("the store is closed"))

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the writer thread: commit group after group while callers keep coming."""
        for _ in range(self._turns):
            with self._lock:
                # Bounded, so one group's latency stays bounded however deep the queue.
                group, self._waiting = self._waiting[: self._limit], self._waiting[self._limit :]
                if not group:
                    self._draining = False
                    return
            try:
                results = self._commit([item for item, _ in group])
                if len(results) != len(group):
                    raise RuntimeError(f"{len(results)} results for {len(group)} items")
            except Exception as exc:
                failure = (
                    exc
                    if isinstance(exc, StoreUnavailable)
                    else StoreUnavailable(f"{exc.__class__.__name__}: {exc}")
                )
                _post(loop, _fail, group, failure)
            except BaseException:
                # Not acknowledged is the safe answer: the sender retries, a duplicate
                # at worst. Nobody may wait for an answer that will not come.
                with self._lock:
                    leftover, self._waiting, self._draining = self._waiting, [], False
                _post(loop, _fail, [*group, *leftover], StoreUnavailable("the store failed"))
                raise
            else:
                _post(loop, _answer, group, results)
        self._queue_drain(loop)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to answer
        loop.call_soon_threadsafe(fn, *args)


def _answer(group: Waiting, results: Sequence[Any]) -> None:
    for (_, waiter), result in zip(group, results, strict=True):
        if not waiter.done():
            waiter.set_result(result)


def _fail(group: Waiting, error: StoreUnavailable) -> None:
    for _, waiter in group:
        if not waiter.done():
            waiter.set_exception(error)
