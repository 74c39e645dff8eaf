"""The batcher: merges queued requests along dimension 0 and runs the model once per batch.

Everything below runs on the event loop except `_execute`, which runs on the
batcher's thread pool (rpc.worker_threads threads).

Queueing. Each request becomes a `_Pending` in the group of its `Call.batch_key`
(model outputs, input names, dtypes and trailing shapes); only equal keys are
ever merged. A group's front batch is taken first-in first-out: requests are
added while their rows fit in rpc.max_batch_size, so a request with more rows
than that runs on its own, and nothing is reordered inside a group.

When a batch starts. At most rpc.worker_threads batches are in flight. A front
batch starts as soon as a slot is free if
  * it is complete: it holds max_batch_size rows, or the next queued request
    does not fit (it cannot grow any more), or it cannot be merged at all;
  * its window is over: rpc.max_batch_timeout has passed since its first
    request arrived; or
  * the model is idle: no batch is in flight. A lone request on an idle worker
    thus runs at once, with no window delay, and when the model frees up the
    next batch is whatever has queued meanwhile (the window has been running
    for those requests while the model was busy).
While the model is busy, partial batches wait for more rows until their window
closes. Among ready groups the one whose first request is oldest goes first.
A lone request on an idle model is dispatched from infer() itself; other arrivals
are looked at once the current loop iteration is done (call_soon), so that
requests read from the sockets together are considered together.

Admission and deadlines. `rpc.max_queue_size` bounds the requests waiting in
the queue (running ones do not count): one more raises QueueFull (450) at once.
A timer fires at each request's deadline (rpc.keepalive; one timer serves the
requests whose deadlines come in arrival order): a waiting request is taken out
of its group and gets DeadlineExceeded (408) right then; a running one gets it
too and its rows are discarded when the batch ends. A request whose
client went away (its task is cancelled) leaves the queue as well.

Safety nets. A model whose declared signature has a scalar or a fixed first
dimension is never batched. A request whose inputs do not all share the first
dimension (or that has a 0-d input) runs alone. If a merged run fails, or its
outputs do not have one row per input row, the batch is re-run request by
request so that one bad request cannot fail the others; in the second case its
key is never merged again.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time

import numpy as np

from ..worker.runner import DeadlineExceeded, QueueFull
from . import metrics

log = logging.getLogger("infergate.batching")

# Timers may fire a little early (uvloop rounds them to milliseconds): a window or a
# deadline this close to its end counts as over.
_SLACK = 0.001


class _Solo:
    """A batch key equal to nothing else: the request runs alone."""

    __slots__ = ()


class _Pending:
    __slots__ = ("call", "key", "rows", "solo", "future", "arrived", "deadline", "timer",
                 "queued")

    def __init__(self, call, key, solo, future, arrived, deadline):
        self.call = call
        self.key = key
        self.rows = call.rows
        self.solo = solo
        self.future = future  # None once its infer() has returned
        self.arrived = arrived
        self.deadline = deadline  # loop time
        self.timer = None  # its own deadline timer, only when deadlines arrive out of order
        self.queued = True


def model_mergeable(model) -> bool:
    """Whether the model's declared signature allows concatenating along dimension 0.

    Every input and output must have a dynamic first dimension; a scalar (or a shape
    onnxruntime does not know) or a fixed first dimension anywhere means requests run
    one by one.
    """
    specs = list(getattr(model, "inputs", None) or ()) + list(getattr(model, "outputs", None) or ())
    for spec in specs:
        shape = getattr(spec, "shape", None)
        if shape is None:
            continue
        if len(shape) == 0 or shape[0] != -1:
            return False
    return True


def _mergeable(call) -> bool:
    rows = call.rows
    feeds = call.feeds
    if not feeds:
        return False
    for array in feeds.values():
        if array.ndim == 0 or array.shape[0] != rows:
            return False
    return True


def _call_soon(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the worker has stopped, nobody waits
        pass


class BatchingRunner:
    def __init__(self, model, settings):
        self.model = model
        self.settings = settings
        self.max_rows = max(1, int(settings.max_batch_size))
        self.window = max(0, int(settings.max_batch_timeout)) / 1000.0
        self.max_queue = max(1, int(settings.max_queue_size))
        self.max_inflight = max(1, int(settings.worker_threads))
        self.executor = concurrent.futures.ThreadPoolExecutor(self.max_inflight,
                                                              thread_name_prefix="batch")
        self.groups: dict = {}  # batch key -> deque of _Pending, only non-empty groups
        self.waiting = 0        # requests queued, not yet in a batch
        self.inflight = 0       # batches running on the pool
        self._loop = None
        self._kick_handle = None
        self._timer = None
        self._timer_at = 0.0
        # Requests by deadline, with one timer for the first: deadlines are arrival time +
        # rpc.keepalive, so they come in order and this saves a timer per request.
        self._deadlines: collections.deque = collections.deque()
        self._deadline_timer = None
        self._deadline_timer_at = 0.0
        self._unmergeable: set = set()
        self.mergeable = model_mergeable(model)
        if not self.mergeable:
            log.warning("the model's signature has a scalar, an unknown shape or a fixed first "
                        "dimension: requests will not be merged into batches")
        # Counters, for tests and debugging (the Prometheus metrics are in .metrics).
        self.batches = 0
        self.requests = 0
        self.rows = 0
        self.merged_batches = 0      # batches of more than one request
        self.max_batch_requests = 0
        self.max_batch_rows = 0
        self.rejected = 0            # QueueFull
        self.expired_waiting = 0     # 408 while queued
        self.expired_running = 0     # 408 while its batch ran
        self.split_reruns = 0        # merged batches re-run one request at a time

    def stats(self) -> dict:
        return {name: getattr(self, name) for name in (
            "batches", "requests", "rows", "merged_batches", "max_batch_requests",
            "max_batch_rows", "rejected", "expired_waiting", "expired_running", "split_reruns",
            "waiting", "inflight")}

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    # -- requests ------------------------------------------------------------------------

    async def infer(self, call, deadline: float) -> list:
        """Outputs for `call` (one array per name in call.output_names), run in some batch."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self.waiting or self.inflight:
                raise RuntimeError("a BatchingRunner serves one event loop at a time")
            self._loop = loop
            self._kick_handle = self._timer = self._deadline_timer = None
            self._deadlines.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded()
        if self.waiting >= self.max_queue:
            self.rejected += 1
            raise QueueFull()
        key = call.batch_key
        solo = not self.mergeable or key in self._unmergeable or not _mergeable(call)
        if solo:
            key = _Solo()
        now = loop.time()
        p = _Pending(call, key, solo, loop.create_future(), now, now + remaining)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = collections.deque()
        group.append(p)
        self.waiting += 1
        deadlines = self._deadlines
        if not deadlines or deadlines[-1].deadline <= p.deadline:
            deadlines.append(p)
            if self._deadline_timer is None or self._deadline_timer_at > p.deadline:
                self._arm_deadline(p.deadline)
        else:
            p.timer = loop.call_at(p.deadline, self._expire, p)
        if self.waiting == 1 and self.inflight == 0:
            self._schedule()  # a lone request on an idle model: run it now
        elif self._kick_handle is None:
            self._kick_handle = loop.call_soon(self._schedule)
        future = p.future
        try:
            return await future
        finally:
            if p.timer is not None:
                p.timer.cancel()
            if p.queued:  # cancelled (the client went away) while it waited
                self._unqueue(p)
            p.future = p.call = None  # nothing of it stays alive in self._deadlines

    def _unqueue(self, p: _Pending) -> None:
        group = self.groups[p.key]
        group.remove(p)
        if not group:
            del self.groups[p.key]
        self.waiting -= 1
        p.queued = False

    def _expire(self, p: _Pending) -> None:
        future = p.future
        if future is None or future.done():
            return
        if p.queued:
            self._unqueue(p)
            self.expired_waiting += 1
        else:
            self.expired_running += 1
        future.set_exception(DeadlineExceeded())

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        deadlines = self._deadlines
        now = self._loop.time() + _SLACK
        while deadlines:
            p = deadlines[0]
            if p.future is not None and not p.future.done():
                if p.deadline > now:
                    break
                self._expire(p)
            deadlines.popleft()
        if deadlines:
            self._arm_deadline(deadlines[0].deadline)

    def _arm_deadline(self, when: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_timer_at = when
        self._deadline_timer = self._loop.call_at(when, self._on_deadline)

    def _drop_answered(self) -> None:
        deadlines = self._deadlines
        while deadlines and (deadlines[0].future is None or deadlines[0].future.done()):
            deadlines.popleft()

    # -- forming batches -----------------------------------------------------------------

    def _front(self, group) -> tuple[list, int, bool]:
        """The group's next batch, its rows, and whether it is complete (cannot grow)."""
        max_rows = self.max_rows
        batch = []
        rows = 0
        for p in group:
            if p.solo:
                return [p], p.rows, True
            if batch and rows + p.rows > max_rows:
                return batch, rows, True
            batch.append(p)
            rows += p.rows
            if rows >= max_rows:
                return batch, rows, True
        return batch, rows, False

    def _schedule(self) -> None:
        self._kick_handle = None
        loop = self._loop
        while self.waiting and self.inflight < self.max_inflight:
            now = loop.time()
            idle = self.inflight == 0
            best = None
            best_arrived = float("inf")
            next_close = float("inf")
            for group in self.groups.values():
                head = group[0]
                if head.arrived >= best_arrived:
                    continue  # an older ready group goes first anyway
                batch, rows, complete = self._front(group)
                close = head.arrived + self.window
                if complete or idle or now + _SLACK >= close:
                    best, best_arrived = (batch, rows), head.arrived
                elif close < next_close:
                    next_close = close
            if best is None:
                self._arm(next_close)
                return
            self._dispatch(*best)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    def _dispatch(self, batch: list, rows: int) -> None:
        key = batch[0].key
        group = self.groups[key]
        for _ in batch:
            group.popleft()
        if not group:
            del self.groups[key]
        self.waiting -= len(batch)
        for p in batch:
            p.queued = False
        # A cancelled one may not have left the queue yet.
        live = [p for p in batch if p.future is not None and not p.future.done()]
        if not live:
            return
        if len(live) != len(batch):
            rows = sum(p.rows for p in live)
        loop = self._loop
        now = loop.time()
        try:
            job = self.executor.submit(self._execute, [p.call for p in live], rows)
        except RuntimeError as exc:  # the pool is shut down: the worker is stopping
            for p in live:
                p.future.set_exception(exc)
            self._drop_answered()
            return
        self.inflight += 1
        n = len(live)
        self.batches += 1
        self.requests += n
        self.rows += rows
        if n > 1:
            self.merged_batches += 1
        self.max_batch_requests = max(self.max_batch_requests, n)
        self.max_batch_rows = max(self.max_batch_rows, rows)
        metrics.BATCH_ROWS.observe(rows)
        metrics.BATCH_REQUESTS.observe(n)
        metrics.ROWS.inc(rows)
        wait = metrics.QUEUE_WAIT.observe
        for p in live:
            wait(now - p.arrived)
        # Straight back to the loop when the thread is done (no asyncio future in between).
        job.add_done_callback(lambda done: _call_soon(loop, self._finished, live, key, done))

    # -- running and splitting -------------------------------------------------------------

    def _execute(self, calls: list, rows: int):
        """On a pool thread: ("merged", outputs) or ("each", [outputs or exception per call])."""
        run = self.model.run
        first = calls[0]
        if len(calls) == 1:
            return "merged", run(first.feeds, first.output_names), False
        feeds = {name: np.concatenate([c.feeds[name] for c in calls], axis=0)
                 for name in first.feeds}
        try:
            outputs = run(feeds, first.output_names)
        except Exception:
            log.warning("a merged batch of %d requests failed; running them one by one",
                        len(calls), exc_info=True)
            return "each", self._each(calls), False
        for out in outputs:
            if getattr(out, "ndim", 0) == 0 or out.shape[0] != rows:
                log.warning("model outputs do not have one row per input row (%s for %d rows): "
                            "requests like these will not be merged", getattr(out, "shape", None),
                            rows)
                return "each", self._each(calls), True
        return "merged", outputs, False

    def _each(self, calls: list) -> list:
        results = []
        for c in calls:
            try:
                results.append(self.model.run(c.feeds, c.output_names))
            except Exception as exc:
                results.append(exc)
        return results

    def _finished(self, batch: list, key, job) -> None:
        self.inflight -= 1
        # Futures of requests answered 408 meanwhile are done (or gone): their rows are dropped.
        futures = [p.future for p in batch]
        try:
            kind, payload, unmergeable = job.result()
        except BaseException as exc:
            for future in futures:
                if future is not None and not future.done():
                    future.set_exception(exc)
        else:
            if kind == "merged":
                if len(batch) == 1:
                    future = futures[0]
                    if future is not None and not future.done():
                        future.set_result(payload)
                else:
                    ends = np.cumsum([p.rows for p in batch]).tolist()
                    start = 0
                    for future, end in zip(futures, ends):
                        if future is not None and not future.done():
                            future.set_result([out[start:end] for out in payload])
                        start = end
            else:
                self.split_reruns += 1
                if unmergeable and not batch[0].solo:
                    self._unmergeable.add(key)
                for future, result in zip(futures, payload):
                    if future is not None and not future.done():
                        if isinstance(result, BaseException):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
        self._drop_answered()
        self._schedule()
