"""Dynamic batching: concurrent requests answered together by one batched call.

A worker thread (or each of ``workers`` threads, sharing one queue) takes the first waiting
request, then gathers more for at most ``max_wait_ms`` or until ``max_batch`` are in hand
(whatever is already queued when the wait ends joins too, up to ``max_batch``), and hands the
batch to ``handle`` in one call. The torch search over a batch of users costs little more than
over one (``user_state`` and each level's ``score`` run once per batch, ``tdm.retrieval``); the
C search costs the same per user in any batch, and a batch shares the work around it (the
store read, features, one call into C). ``max_batch=1`` answers one request at a time (no
batching).

A lone client is not kept waiting: the worker waits for company only after a batch that had
company (its previous batch held more than one request); otherwise it takes what is queued and
goes. Under load batches stay full; a single client sees no added latency. Several workers
search side by side (the C search and torch's operations release the GIL), one batch each: on
a machine with more cores than one search uses, they add throughput. A worker that finds other
workers idle does not wait for company and takes its share of what is queued (the queue split
evenly between it and them), so that a burst is spread over the idle workers instead of
landing in one batch while the others wait.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Answer = TypeVar("Answer")

_STOP = object()


def share(waiting: int, idle: int, max_batch: int) -> int:
    """Requests a worker takes when ``waiting`` are queued (its first included) and ``idle``
    other workers wait for requests: an even share, at most ``max_batch``."""
    return max(1, min(max_batch, math.ceil(waiting / (1 + idle))))


class BatcherClosed(RuntimeError):
    """The batcher was closed before the request was answered."""


class DynamicBatcher(Generic[Request, Answer]):
    """Gather requests into batches for ``handle`` on ``workers`` worker threads.

    Args:
        handle: ``handle(requests) -> answers``, one answer per request in order; an answer
            that is an exception instance is raised to that request's caller alone. An
            exception raised by ``handle`` fails the whole batch.
        max_batch: requests per call at most (1: no batching).
        max_wait_ms: how long the first request of a batch waits for others.
        on_batch: ``on_batch(size, seconds)`` after each call (metrics).
        name: the worker threads' name.
        workers: threads taking batches from the one queue (``handle`` must be safe to call
            from several at once).
    """

    def __init__(
        self,
        handle: Callable[[list[Request]], Sequence[Answer | BaseException]],
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "tdm-batcher",
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.handle = handle
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._idle = 0  # workers waiting for a request
        self._idle_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads) and not self._closed

    def submit(self, request: Request) -> Future:
        """Queue ``request``; the future holds its answer."""
        if self._closed:
            raise BatcherClosed("the batcher is closed")
        future: Future = Future()
        self._queue.put((request, future))
        return future

    async def __call__(self, request: Request) -> Answer:
        """Queue ``request`` and wait for its answer without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(request))

    def close(self, timeout: float = 10.0) -> None:
        """Answer what is queued, then stop the workers."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)  # one stop mark per worker, behind every queued request
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        while True:  # fail whatever arrived after the stop marks
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(BatcherClosed("the batcher is closed"))

    def _gather(self, first: Any, last_size: int, idle: int) -> tuple[list[Any], bool]:
        """``first`` and what joins it; ``idle``: the other workers waiting for requests."""
        batch, stop = [first], False
        limit, wait = self.max_batch, self.max_wait if last_size > 1 else 0.0
        if idle:  # leave the idle workers their share of the queue, and do not wait
            limit, wait = share(1 + self._queue.qsize(), idle, limit), 0.0
        deadline = time.monotonic() + wait
        while len(batch) < limit:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        stop, last_size = False, 0
        while not stop:
            with self._idle_lock:
                self._idle += 1
            first = self._queue.get()
            with self._idle_lock:
                self._idle -= 1
                idle = self._idle
            if first is _STOP:
                break
            batch, stop = self._gather(first, last_size, idle)
            last_size = len(batch)
            live = [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.perf_counter()
            try:
                answers = list(self.handle([r for r, _ in live]))
                if len(answers) != len(live):
                    raise RuntimeError(f"handle gave {len(answers)} answers for {len(live)}")
            except BaseException as exc:  # the batch fails, the worker lives on
                log.exception("batch of %d failed", len(live))
                for _, future in live:
                    future.set_exception(exc)
                continue
            finally:
                if self.on_batch is not None:
                    self.on_batch(len(live), time.perf_counter() - start)
            for (_, future), answer in zip(live, answers, strict=True):
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
