"""The batcher: merges queued requests along dimension 0 and runs the model once per batch.

Everything below runs on the event loop except `_execute`, which runs on the
batcher's threads (rpc.worker_threads of them).

Queueing. Each request becomes a `_Pending` in the group of its `Call.batch_key`
(model outputs, input names, dtypes and trailing shapes); only equal keys are
ever merged. A group's front batch is taken first-in first-out: requests are
added while their rows fit in rpc.max_batch_size, so a request with more rows
than that runs on its own, and nothing is reordered inside a group.

Padding. With batch sizes set (`rpc.batch_sizes`; by default the powers of two
up to max_batch_size when the model runs on an accelerator, none on the CPU), a
batch's rows are padded with zeros up to the next size, so the execution
provider sees a few shapes only (each compiled and warmed up once: see
worker/warmup.py). Padded rows are cut off before anything is answered. The
requests' rows are copied once, on the batch's thread, straight into the batch
buffer.

When a batch starts. At most rpc.worker_threads batches are in flight. A front
batch starts as soon as a thread is free if
  * it is complete: it holds max_batch_size rows, or the next queued request
    does not fit (it cannot grow any more), or it cannot be merged at all;
  * its window is over: rpc.max_batch_timeout has passed since its first
    request arrived; or
  * the model has capacity to spare: on the CPU every inference thread is a
    core's worth of work, so a batch starts whenever a thread is free (waiting
    for more rows would leave a core idle); on an accelerator the threads share
    one device, so only when no batch is in flight. A lone request on an idle
    worker thus runs at once, with no window delay, and under load batches grow
    by themselves with whatever queued while the model was busy.
Among ready groups the one whose first request is oldest goes first. A lone
request on an idle model is dispatched from submit() itself; other arrivals are
looked at once the current loop iteration is done (call_soon), so that
requests read from the sockets together are considered together.

Answers. `submit(call, deadline, finish, *args)` returns a Future: of
`finish(call, outputs, *args)` (the worker encodes its response there, on the
batch's thread, off the loop) or, without `finish`, of the outputs. One
`call_soon_threadsafe` hands a whole batch's answers back to the loop.

Admission and deadlines. `rpc.max_queue_size` bounds the requests waiting in
the queue (running ones do not count): one more raises QueueFull (450) at once.
A timer fires at each request's deadline (rpc.keepalive; one timer serves the
requests whose deadlines come in arrival order): a waiting request is taken out
of its group and gets DeadlineExceeded (408) right then; a running one gets it
too and its rows are discarded when the batch ends. A request whose Future is
cancelled (its client went away) never runs; through `infer()`, it also leaves
the queue at once.

Safety nets. A model whose declared signature has a scalar or a fixed first
dimension is never batched. A request whose inputs do not all share the first
dimension (or that has a 0-d input) runs alone. If a merged run fails, or its
outputs do not have one row per input row, the batch is re-run request by
request so that one bad request cannot fail the others; in the second case its
key is never merged again.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import queue
import threading
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
                 "queued", "finish", "args")

    def __init__(self, call, key, solo, future, arrived, deadline, finish, args, rows):
        self.call = call  # None for a request run whole (submit_whole)
        self.key = key
        self.rows = rows
        self.solo = solo
        self.future = future  # None once it is answered and gone
        self.arrived = arrived
        self.deadline = deadline  # loop time
        self.timer = None  # its own deadline timer, only when deadlines arrive out of order
        self.queued = True
        self.finish = finish
        self.args = args


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


def on_accelerator(model) -> bool:
    return getattr(model, "provider", "CPUExecutionProvider") != "CPUExecutionProvider"


def batch_sizes(settings, model) -> tuple:
    """The sizes batches are padded to (empty: no padding), always ending at max_batch_size."""
    max_rows = max(1, int(settings.max_batch_size))
    sizes = settings.batch_sizes
    if sizes is None:  # not configured: pad where shapes are costly
        if not on_accelerator(model):
            return ()
        sizes = [1 << i for i in range(max_rows.bit_length()) if 1 << i <= max_rows]
    if not sizes:
        return ()
    return tuple(sorted({s for s in sizes if s < max_rows} | {max_rows}))


def _mergeable(call) -> bool:
    rows = call.rows
    feeds = call.feeds
    if not feeds:
        return False
    for array in feeds.values():
        if array.ndim == 0 or array.shape[0] != rows:
            return False
    return True


def _whole(pending):
    """(value, rows) of a request run whole, or its exception (on a batch thread)."""
    try:
        return pending.finish(*pending.args)
    except Exception as exc:
        return exc


def _answer(pending, outputs):
    """finish(call, outputs, *args) for one request, or its exception (on a batch thread)."""
    if pending.finish is None:
        return outputs
    try:
        return pending.finish(pending.call, outputs, *pending.args)
    except Exception as exc:
        return exc


class BatchingRunner:
    def __init__(self, model, settings):
        self.model = model
        self.settings = settings
        self.max_rows = max(1, int(settings.max_batch_size))
        self.window = max(0, int(settings.max_batch_timeout)) / 1000.0
        self.max_queue = max(1, int(settings.max_queue_size))
        self.max_inflight = max(1, int(settings.worker_threads))
        # Batches that may start without waiting for rows: every thread on the CPU,
        # one on an accelerator (its threads share the device).
        self.eager_inflight = 1 if on_accelerator(model) else self.max_inflight
        self.pad_sizes = batch_sizes(settings, model)
        self.batch_sizes = self.pad_sizes or (1,)  # what warm-up runs
        self.jobs = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                        for i in range(self.max_inflight)]
        for thread in self.threads:
            thread.start()
        self.groups: dict = {}  # batch key -> deque of _Pending, only non-empty groups
        self.waiting = 0        # requests queued, not yet in a batch
        self.inflight = 0       # batches running on the threads
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
            self.pad_sizes, self.batch_sizes = (), (1,)
        # Counters, for tests and debugging (the Prometheus metrics are in .metrics).
        self.batches = 0
        self.requests = 0
        self.rows = 0
        self.padded_rows = 0         # zero rows added to reach a batch size
        self.merged_batches = 0      # batches of more than one request
        self.max_batch_requests = 0
        self.max_batch_rows = 0
        self.rejected = 0            # QueueFull
        self.expired_waiting = 0     # 408 while queued
        self.expired_running = 0     # 408 while its batch ran
        self.split_reruns = 0        # merged batches re-run one request at a time

    def stats(self) -> dict:
        return {name: getattr(self, name) for name in (
            "batches", "requests", "rows", "padded_rows", "merged_batches",
            "max_batch_requests", "max_batch_rows", "rejected", "expired_waiting",
            "expired_running", "split_reruns", "waiting", "inflight")}

    def close(self) -> None:
        """Let the threads finish the batches they were given, then stop them."""
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()

    # -- requests ------------------------------------------------------------------------

    def bind(self, loop) -> None:
        """Serve submit() on `loop` (taken once: asyncio.get_running_loop() makes a
        getpid() system call each time)."""
        if self._loop is not loop:
            if self.waiting or self.inflight:
                raise RuntimeError("a BatchingRunner serves one event loop at a time")
            self._loop = loop
            self._kick_handle = self._timer = self._deadline_timer = None
            self._deadlines.clear()

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return not self.waiting and not self.inflight

    def submit_whole(self, deadline: float, job, *args):
        """A Future of job(*args), run on a batch thread as a batch of its own.

        For a request on an idle model, which has nothing to merge with: the whole of
        it (decode, run, encode) goes to the thread, as without batching, instead of
        being decoded and queued on the loop. `job` returns (value, rows it ran); the
        rows are counted when it is done.
        """
        loop = self._loop
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded()
        now = loop.time()
        p = _Pending(None, _Solo(), True, loop.create_future(), now, now + remaining, job, args, 1)
        self._track_deadline(p)
        p.queued = False
        self._start([p], 1)
        return p.future

    def submit(self, call, deadline: float, finish=None, *args):
        """A Future of finish(call, outputs, *args) (of the outputs without `finish`),
        run in some batch; raises QueueFull or DeadlineExceeded when it cannot queue."""
        return self._enqueue(call, deadline, finish, args).future

    async def infer(self, call, deadline: float) -> list:
        """Outputs for `call` on the running loop; if the caller is cancelled, its
        request leaves the queue at once."""
        self.bind(asyncio.get_running_loop())
        p = self._enqueue(call, deadline, None, ())
        try:
            return await p.future
        finally:
            if p.queued and p.future is not None and p.future.cancelled():
                self._unqueue(p)

    def _enqueue(self, call, deadline: float, finish, args) -> _Pending:
        loop = self._loop
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
        p = _Pending(call, key, solo, loop.create_future(), now, now + remaining, finish, args,
                     call.rows)
        self._track_deadline(p)
        if not self.waiting and not self.inflight:
            p.queued = False  # a lone request on an idle model: run it now
            self._start([p], p.rows)
            return p
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = collections.deque()
        group.append(p)
        self.waiting += 1
        if self._kick_handle is None:
            self._kick_handle = loop.call_soon(self._schedule)
        return p

    def _track_deadline(self, p: _Pending) -> None:
        deadlines = self._deadlines
        if not deadlines or deadlines[-1].deadline <= p.deadline:
            deadlines.append(p)
            if self._deadline_timer is None or self._deadline_timer_at > p.deadline:
                self._arm_deadline(p.deadline)
        else:
            p.timer = self._loop.call_at(p.deadline, self._expire, p)

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
            eager = self.inflight < self.eager_inflight
            best = None
            best_arrived = float("inf")
            next_close = float("inf")
            for group in self.groups.values():
                head = group[0]
                if head.arrived >= best_arrived:
                    continue  # an older ready group goes first anyway
                batch, rows, complete = self._front(group)
                close = head.arrived + self.window
                if complete or eager or now + _SLACK >= close:
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

    def _padded(self, rows: int) -> int:
        sizes = self.pad_sizes
        if not sizes or rows > sizes[-1]:
            return rows
        return sizes[bisect.bisect_left(sizes, rows)]

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
        # A cancelled or expired one may not have left the queue yet.
        live = [p for p in batch if p.future is not None and not p.future.done()]
        if not live:
            return
        if len(live) != len(batch):
            rows = sum(p.rows for p in live)
        self._start(live, rows)

    def _start(self, live: list, rows: int) -> None:
        key = live[0].key
        padded = rows if live[0].solo else self._padded(rows)
        self.jobs.put((live, rows, padded, key))
        self.inflight += 1
        n = len(live)
        self.batches += 1
        self.requests += n
        if n > 1:
            self.merged_batches += 1
        self.max_batch_requests = max(self.max_batch_requests, n)
        metrics.counts["in_flight"] += 1
        metrics.BATCH_REQUESTS.observe(n)
        if live[0].call is not None:  # a request run whole counts its rows when done
            self._count_rows(rows, padded)
        now = self._loop.time()
        wait = metrics.QUEUE_WAIT.observe
        for p in live:
            wait(now - p.arrived)

    def _count_rows(self, rows: int, padded: int) -> None:
        self.rows += rows
        self.padded_rows += padded - rows
        self.max_batch_rows = max(self.max_batch_rows, rows)
        metrics.counts["rows"] += rows
        metrics.BATCH_ROWS.observe(padded)

    # -- on the batch threads ---------------------------------------------------------------

    def _work(self) -> None:
        get = self.jobs.get
        while True:
            job = get()
            if job is None:
                return
            live, rows, padded, key = job
            try:
                answers, split = self._execute(live, rows, padded)
            except BaseException as exc:  # every request of the batch gets it
                answers, split = [exc] * len(live), None
            try:
                self._loop.call_soon_threadsafe(self._finished, live, answers, key, split)
            except RuntimeError:  # the loop is closed: the worker has stopped, nobody waits
                pass

    def _execute(self, live: list, rows: int, padded: int) -> tuple[list, str | None]:
        """Answers (values or exceptions), one per request, and why the batch was re-run
        request by request: None, "failed", or "unsplittable" (never merge its key again)."""
        run = self.model.run
        first = live[0].call
        if first is None:
            return [_whole(live[0])], None
        if len(live) == 1 and padded == rows:
            return [_answer(live[0], run(first.feeds, first.output_names))], None
        feeds = {}
        for name, array in first.feeds.items():
            batch = np.empty((padded,) + array.shape[1:], array.dtype)
            at = 0
            for p in live:
                part = p.call.feeds[name]
                batch[at:at + part.shape[0]] = part
                at += part.shape[0]
            if padded > at:
                batch[at:] = 0
            feeds[name] = batch
        try:
            outputs = run(feeds, first.output_names)
        except Exception:
            log.warning("a merged batch of %d requests failed; running them one by one",
                        len(live), exc_info=True)
            return self._each(live), "failed"
        for out in outputs:
            if getattr(out, "ndim", 0) == 0 or out.shape[0] != padded:
                log.warning("model outputs do not have one row per input row (%s for %d rows): "
                            "requests like these will not be merged", getattr(out, "shape", None),
                            padded)
                return self._each(live), "unsplittable"
        answers = []
        start = 0
        for p in live:
            end = start + p.rows
            if p.future.done():  # answered 408 meanwhile: its rows are dropped
                answers.append(None)
            else:
                answers.append(_answer(p, [out[start:end] for out in outputs]))
            start = end
        return answers, None

    def _each(self, live: list) -> list:
        answers = []
        for p in live:
            try:
                answers.append(_answer(p, self.model.run(p.call.feeds, p.call.output_names)))
            except Exception as exc:
                answers.append(exc)
        return answers

    # -- back on the loop ---------------------------------------------------------------------

    def _finished(self, live: list, answers: list, key, split: str | None) -> None:
        self.inflight -= 1
        metrics.counts["in_flight"] -= 1
        if split is not None:
            self.split_reruns += 1
            if split == "unsplittable" and not live[0].solo:
                self._unmergeable.add(key)
        if live[0].call is None:  # run whole: (value, rows), or an exception
            answer = answers[0]
            if not isinstance(answer, BaseException):
                answers = [answer[0]]
                self._count_rows(answer[1], answer[1])
        for p, answer in zip(live, answers):
            if p.timer is not None:
                p.timer.cancel()
            future = p.future
            if future is not None and not future.done():
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
            p.future = p.call = p.args = None  # nothing of it stays alive in self._deadlines
        self._drop_answered()
        self._schedule()
