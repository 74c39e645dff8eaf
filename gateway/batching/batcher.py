"""The batcher: merges queued requests along dimension 0 and runs the model once per batch.

The event loop only queues a request (its body, undecoded) and, later, writes
the answer; everything else happens on the batcher's threads (rpc.worker_threads
of them), so a batched request costs the loop no more than an unbatched one.

Forming batches. A thread takes the oldest queued request, then every request
queued behind it (without waiting) while the rows fit in rpc.max_batch_size,
decodes them, and groups them by `Call.batch_key` (model outputs, input names,
dtypes and trailing shapes): only equal keys are ever merged. Each group runs
first-in first-out in runs of at most max_batch_size rows; a request with more
rows than that runs on its own, and nothing is reordered inside a group.

When a batch starts. On the CPU every inference thread is a core's worth of
work, so a thread starts its batch at once with whatever has queued (waiting
for more rows would leave a core idle): under load batches grow by themselves,
and a lone request on an idle worker never waits; with nothing to merge it with
and no padding, it runs from body to answer in one call (`whole`), as without
batching. On an accelerator the threads
share one device: a thread whose batch is not full waits for more rows while
another batch runs, until the batch is full or rpc.max_batch_timeout has passed
since its first request arrived.

Padding. With batch sizes set (`rpc.batch_sizes`; by default the powers of two
up to max_batch_size when the model runs on an accelerator, none on the CPU), a
batch's rows are padded with zeros up to the next size, so the execution
provider sees a few shapes only (each compiled and warmed up once: see
worker/warmup.py; on an accelerator each size runs on a session of its own,
since cuDNN keeps only the last shape's plans: see worker/model.py). Padded rows are cut off before anything is answered. The
requests' rows are copied once, on the batch's thread, straight into the batch
buffer.

Answers. `submit(deadline, source, finish, *args)` returns a Future: of
`finish(call, outputs, *args)` (the worker encodes its response there, on the
batch's thread) or, with `finish` None, of the outputs. `source` is a request body
(decoded on the thread by the `decode` the batcher was given), a job that decodes
itself there (`source.decode()`: an Open Inference Protocol request), or a `Call`. One
`call_soon_threadsafe` hands all the answers of a thread's round back to the loop.

Admission and deadlines (gateway/worker/runner.py's InferenceThreads, as
without batching). `rpc.max_queue_size` bounds the requests waiting in
the queue (running ones do not count): one more raises QueueFull (450) at once.
A request whose deadline (rpc.keepalive) passes gets DeadlineExceeded (408)
right then, from the loop's deadline sweep: a waiting one leaves the queue and
never runs; a running one's rows are discarded when its batch ends. A request
whose Future is cancelled (its client went away) leaves the queue's count at once
and never runs.

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
import logging
import queue
import threading
import time

import numpy as np

from ..worker.runner import InferenceThreads, deliver, resolve
from . import metrics

log = logging.getLogger("infergate.batching")


class _Solo:
    """A batch key equal to nothing else: the request runs alone."""

    __slots__ = ()


class _Item:
    """One claimed, decoded request on a batch thread."""

    __slots__ = ("result", "slot", "call", "finish", "args", "arrived", "key", "rows", "solo")

    def __init__(self, result, slot, call, finish, args, arrived, key, solo):
        self.result = result
        self.slot = slot
        self.call = call
        self.finish = finish
        self.args = args
        self.arrived = arrived
        self.key = key
        self.rows = call.rows
        self.solo = solo


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


def _answer(item, outputs):
    """finish(call, outputs, *args) for one request, or its exception."""
    if item.finish is None:
        return outputs
    try:
        return item.finish(item.call, outputs, *item.args)
    except Exception as exc:
        return exc


class BatchingRunner(InferenceThreads):
    thread_name = "batch"

    def __init__(self, model, settings, decode=None, whole=None):
        super().__init__(settings.max_queue_size, settings.worker_threads)
        self.model = model
        self.settings = settings
        self.decode = decode  # request body -> Call, for submit() with a body
        self.whole = whole    # (source, *args) -> (answer, rows): a lone source run whole
        self.max_rows = max(1, int(settings.max_batch_size))
        self.window = max(0, int(settings.max_batch_timeout)) / 1000.0
        self.eager = not on_accelerator(model)
        self.pad_sizes = batch_sizes(settings, model)
        self.batch_sizes = self.pad_sizes or (1,)  # what warm-up runs
        self.mergeable = model_mergeable(model)
        if not self.mergeable:
            log.warning("the model's signature has a scalar, an unknown shape or a fixed first "
                        "dimension: requests will not be merged into batches")
            self.pad_sizes, self.batch_sizes = (), (1,)
        if self.pad_sizes and not self.eager and hasattr(model, "pin_batch_sizes"):
            model.pin_batch_sizes(self.pad_sizes)  # each size keeps its own plans
        self._unmergeable: set = set()
        self.lock = threading.Lock()  # the counters below, and the metrics, from the threads
        self.inflight = 0             # batches running on the model
        self.batches = 0
        self.requests = 0
        self.rows = 0
        self.padded_rows = 0          # zero rows added to reach a batch size
        self.merged_batches = 0       # batches of more than one request
        self.max_batch_requests = 0
        self.max_batch_rows = 0
        self.split_reruns = 0         # merged batches re-run one request at a time

    def stats(self) -> dict:
        return {name: getattr(self, name) for name in (
            "batches", "requests", "rows", "padded_rows", "merged_batches",
            "max_batch_requests", "max_batch_rows", "rejected", "expired_waiting",
            "expired_running", "split_reruns", "waiting", "inflight")}

    # -- on the loop -------------------------------------------------------------------------

    def bind(self, loop) -> None:
        if self.loop is not loop and self.inflight:
            raise RuntimeError("a BatchingRunner serves one event loop at a time")
        super().bind(loop)

    async def infer(self, call, deadline: float) -> list:
        """Outputs for `call` on the running loop; if the caller is cancelled, its
        request leaves the queue at once (as every cancelled job does)."""
        self.bind(asyncio.get_running_loop())
        return await self.submit(deadline, call, None)

    # -- on the batch threads ---------------------------------------------------------------

    def _work(self) -> None:
        get = self.jobs.get
        while True:
            job = get()
            if job is None:
                return
            if self.whole is not None and not self.pad_sizes and self.jobs.empty() and \
                    hasattr(job[3][0], "decode") and (self.eager or not self.inflight):
                self._run_whole(job)  # nothing to merge it with, nothing to pad it to
                continue
            answers = []
            items = []
            rows = self._take(job, items, answers)
            stop = self._gather(items, rows, answers)
            if items:
                self._run_groups(items, answers)
            if answers:
                self.post(deliver, answers)
            if stop:
                return

    def _run_whole(self, job) -> None:
        """A lone request run from body to answer in one call, as without batching."""
        result, slot, arrived, (body, _, *args) = job
        if not self.claim(result):
            return
        started = time.monotonic()
        with self.lock:
            self.inflight += 1
            metrics.counts["in_flight"] += 1
        try:
            answer, rows = self.whole(body, *args)
        except Exception as exc:  # a bad request (400), or a model failure: no batch ran
            answer, rows = exc, None
        with self.lock:
            self.inflight -= 1
            metrics.counts["in_flight"] -= 1
            if rows is not None:
                self._count([arrived], rows, rows, started)
        self.post(resolve, result, slot, answer)

    def _take(self, job, items: list, answers: list) -> int:
        """Claim and decode one queued request into `items`; its rows (0 if it is gone)."""
        result, slot, arrived, (source, finish, *args) = job
        if not self.claim(result):
            return 0
        try:
            call = self.decode(source) if isinstance(source, bytes) else \
                source.decode() if hasattr(source, "decode") else source
            key = call.batch_key
        except Exception as exc:  # a bad request: answered on its own
            answers.append((result, slot, exc))
            return 0
        solo = not self.mergeable or key in self._unmergeable or not _mergeable(call)
        items.append(_Item(result, slot, call, finish, args, arrived, _Solo() if solo else key,
                           solo))
        return call.rows

    def _gather(self, items: list, rows: int, answers: list) -> bool:
        """Take what queued behind the first request while its rows fit (on an accelerator,
        while another batch runs, wait for more until full or the window closes).
        True when the batcher is closing."""
        jobs = self.jobs
        window_end = None
        while rows < self.max_rows:
            try:
                if jobs.empty():  # (cheaper than get_nowait's exception)
                    raise queue.Empty
                job = jobs.get_nowait()
            except queue.Empty:
                if self.eager or not items or not self.inflight:
                    return False
                if window_end is None:
                    window_end = items[0].arrived + self.window
                remaining = window_end - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    job = jobs.get(timeout=remaining)
                except queue.Empty:
                    return False
            if job is None:
                return True
            rows += self._take(job, items, answers)
        return False

    def _run_groups(self, items: list, answers: list) -> None:
        if len(items) == 1:
            self._run_batch(items, items[0].rows, answers)
            return
        groups: dict = {}
        for item in items:
            groups.setdefault(item.key, []).append(item)
        max_rows = self.max_rows
        for group in groups.values():
            run, rows = [], 0
            for item in group:
                if run and (item.solo or rows + item.rows > max_rows):
                    self._run_batch(run, rows, answers)
                    run, rows = [], 0
                run.append(item)
                rows += item.rows
                if item.solo or rows >= max_rows:
                    self._run_batch(run, rows, answers)
                    run, rows = [], 0
            if run:
                self._run_batch(run, rows, answers)

    def _padded(self, rows: int) -> int:
        sizes = self.pad_sizes
        if not sizes or rows > sizes[-1]:
            return rows
        return sizes[bisect.bisect_left(sizes, rows)]

    def _run_batch(self, batch: list, rows: int, answers: list) -> None:
        live = [item for item in batch if not item.result.done()]  # not answered 408 meanwhile
        if not live:
            return
        if len(live) != len(batch):
            rows = sum(item.rows for item in live)
        padded = rows if live[0].solo else self._padded(rows)
        started = time.monotonic()
        with self.lock:
            self.inflight += 1
            metrics.counts["in_flight"] += 1
            self._count([item.arrived for item in live], rows, padded, started)
        try:
            results, split = self._execute(live, rows, padded)
        except BaseException as exc:  # every request of the batch gets it
            results, split = [exc] * len(live), None
        with self.lock:
            self.inflight -= 1
            metrics.counts["in_flight"] -= 1
            if split is not None:
                self.split_reruns += 1
                if split == "unsplittable" and not live[0].solo:
                    self._unmergeable.add(live[0].key)
        answers.extend((item.result, item.slot, answer) for item, answer in zip(live, results))

    def _count(self, arrivals: list, rows: int, padded: int, started: float) -> None:
        n = len(arrivals)
        self.batches += 1
        self.requests += n
        self.rows += rows
        self.padded_rows += padded - rows
        if n > 1:
            self.merged_batches += 1
        self.max_batch_requests = max(self.max_batch_requests, n)
        self.max_batch_rows = max(self.max_batch_rows, rows)
        metrics.counts["rows"] += rows
        metrics.BATCH_ROWS.observe(padded)
        metrics.BATCH_REQUESTS.observe(n)
        for arrived in arrivals:
            metrics.QUEUE_WAIT.observe(started - arrived)

    def _execute(self, live: list, rows: int, padded: int) -> tuple[list, str | None]:
        """Answers (values or exceptions), one per request, and why the batch was re-run
        request by request: None, "failed", or "unsplittable" (never merge its key again)."""
        run = self.model.run
        first = live[0].call
        if len(live) == 1 and padded == rows:
            return [_answer(live[0], run(first.feeds, first.output_names))], None
        feeds = {}
        for name, array in first.feeds.items():
            batch = np.empty((padded,) + array.shape[1:], array.dtype)
            at = 0
            for item in live:
                part = item.call.feeds[name]
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
        for item in live:
            end = start + item.rows
            if item.result.done():  # answered 408 meanwhile: its rows are dropped
                answers.append(None)
            else:
                answers.append(_answer(item, [out[start:end] for out in outputs]))
            start = end
        return answers, None

    def _each(self, live: list) -> list:
        answers = []
        for item in live:
            try:
                answers.append(_answer(item, self.model.run(item.call.feeds,
                                                             item.call.output_names)))
            except Exception as exc:
                answers.append(exc)
        return answers
