"""Runs inference off the event loop on rpc.worker_threads threads.

`submit()` hands a job to the threads and returns an asyncio Future of its
result: no coroutine or task per request, so a handler can return the Future
itself and the connection writes the answer when it resolves. The threads take
jobs from one queue (a C `SimpleQueue`) and hand results back with
`call_soon_threadsafe`: no concurrent.futures machinery per request, which cost
about four times the rest of the hop.

Admission control lives here: a job is refused with QueueFull (450) when
rpc.max_queue_size jobs already wait for a thread, and its Future gets
DeadlineExceeded (408) when rpc.keepalive passes before its result is ready.
A job that expires or is abandoned while queued leaves the queue's count at
once, and no thread runs it. Abandoned means its Future was cancelled: the
servers cancel it when the client goes away (connection closed, stream reset),
and the Future (`Job`) withdraws itself then, so that clients that leave cannot
hold slots that others need (Rapid Reset filled the queue with them). What
stays in the threads' queue until a thread skips it is a husk without the
request; there are at most ABANDONED_PER_SLOT of them a slot, then 450 too.
`InferenceThreads` holds all of this; the batcher (gateway/batching) runs its
jobs differently on the same base.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from .._native.deadlines import Deadlines
from ..server.limits import usable_cpus
from ..serviceconfig import RpcSettings

log = logging.getLogger("infergate.worker")


# Husks of abandoned jobs the threads' queue may hold, per rpc.max_queue_size slot (each a
# few hundred bytes; threads skip them at once, as soon as they take the next job).
ABANDONED_PER_SLOT = 256
# What a withdrawn job's entry keeps of its job: nothing (its request is let go at once).
_WITHDRAWN = (None, None)


class QueueFull(Exception):
    pass


class Job(asyncio.Future):
    """A queued job's Future: cancelled (its client went away), it withdraws its job from
    the queue at once."""

    __slots__ = ("threads",)

    def cancel(self, msg=None) -> bool:
        if not super().cancel(msg):
            return False
        self.threads.withdraw(self)
        return True


class DeadlineExceeded(Exception):
    pass


def resolve(result, slot, answer) -> None:
    """On the loop: answer a job's Future with its value or exception."""
    slot.discard(result)  # its deadline no longer matters
    if result.done():  # expired or abandoned meanwhile
        return
    if isinstance(answer, BaseException):
        result.set_exception(answer)
    else:
        result.set_result(answer)


def deliver(answers: list) -> None:
    """On the loop: resolve() each (Future, deadline slot, answer) of a round."""
    for result, slot, answer in answers:
        resolve(result, slot, answer)


class InferenceThreads:
    """Jobs for inference threads, with the admission both the runner and the batcher
    apply: a Future per job, QueueFull and DeadlineExceeded at once, deadlines on
    the loop's tick sweep, and exactly-once claiming. Subclasses run the jobs
    (`_work`, on each of `thread_count` threads, started with the first job)."""

    thread_name = "infer"

    def __init__(self, max_queue: int, thread_count: int):
        self.max_queue = max(1, int(max_queue))
        self.thread_count = max(1, int(thread_count))
        self.jobs = queue.SimpleQueue()
        # Jobs not yet taken by a thread: their Future -> their entry in `jobs`. A thread
        # claims a job, and the loop withdraws one, with dict.pop: atomic under the GIL,
        # so exactly one of them gets it.
        self.queued: dict = {}
        self.max_entries = self.max_queue * (1 + ABANDONED_PER_SLOT)
        self.threads: list[threading.Thread] = []
        self.loop = None
        self.deadlines = None  # on the app's event loop, from bind()
        self.rejected = 0          # QueueFull
        self.expired_waiting = 0   # 408 while queued
        self.expired_running = 0   # 408 while it ran

    def bind(self, loop) -> None:
        """Serve submit() on `loop` (taken once: asyncio.get_running_loop() makes a
        getpid() system call each time)."""
        if self.loop is not loop:
            if self.queued:
                raise RuntimeError("inference threads serve one event loop at a time")
            self.loop = loop
            self.deadlines = Deadlines(loop, self._expire)

    @property
    def waiting(self) -> int:
        return len(self.queued)

    def submit(self, deadline: float, *job):
        """A Future of what the threads make of `job`; raises QueueFull or
        DeadlineExceeded at once when the job cannot be taken."""
        if len(self.queued) >= self.max_queue or self.jobs.qsize() >= self.max_entries:
            self.rejected += 1
            raise QueueFull()
        now = time.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            raise DeadlineExceeded()
        if not self.threads:
            self._start_threads()
        loop = self.loop
        result = Job(loop=loop)
        result.threads = self
        entry = [result, self.deadlines.add(result, loop.time() + remaining), now, job]
        self.queued[result] = entry
        self.jobs.put(entry)
        return result

    def withdraw(self, result) -> None:
        """On the loop: a queued job's Future was cancelled; its slot, its deadline and its
        request go now (a thread that takes its entry later skips it)."""
        entry = self.queued.pop(result, None)
        if entry is not None:
            entry[1].discard(result)
            entry[3] = _WITHDRAWN

    def claim(self, result) -> bool:
        """On a thread: take a queued job; False when it expired or was abandoned
        (cancelled) while queued, and nobody waits for it."""
        return self.queued.pop(result, None) is not None and not result.cancelled()

    def post(self, fn, *args) -> None:
        """On a thread: run fn(*args) on the loop (resolve or deliver)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the worker has stopped, nobody waits
            pass

    def _expire(self, result) -> None:
        if result.done():
            return
        entry = self.queued.pop(result, None)
        if entry is not None:
            entry[3] = _WITHDRAWN
            self.expired_waiting += 1
        else:
            self.expired_running += 1
        result.set_exception(DeadlineExceeded())

    def _work(self) -> None:
        raise NotImplementedError

    def _start_threads(self) -> None:
        for i in range(self.thread_count):
            thread = threading.Thread(target=self._work, name=f"{self.thread_name}-{i}",
                                      daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        """Let the threads finish what they were given, then stop them."""
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
        self.threads.clear()


def cpu_inference_threads(worker_threads: int, intra_op_threads: int = 1) -> int:
    """Threads for a model that runs on the CPU: rpc.worker_threads, but no more than two
    per CPU the process may use (each call keeps `intra_op_threads` of them busy): one runs
    the model while another decodes and encodes. More only take turns at the GIL: on one
    CPU, bench/worker's 1-row JSON requests at 8 connections went from 12,500 req/s and a
    p99 of 1.35 ms with 2 threads to 11,100 and 1.56 ms with 5 (TF at 32: 25,900 and
    2.55 ms to 24,800 and 2.73 ms)."""
    cap = max(2, 2 * usable_cpus() // max(1, intra_op_threads))
    if worker_threads > cap:
        log.info("rpc.worker_threads %d: %d threads run the model (two per usable CPU)",
                 worker_threads, cap)
    return min(worker_threads, cap)


class ThreadedRunner(InferenceThreads):
    """Runs submit(deadline, fn, *args) as fn(*args) on an inference thread."""

    def __init__(self, settings: RpcSettings, thread_count: int | None = None):
        super().__init__(settings.max_queue_size, thread_count or settings.worker_threads)
        self.settings = settings

    def deadline(self) -> float:
        return time.monotonic() + self.settings.keepalive / 1000.0

    def _work(self) -> None:
        # claim() and post() inlined: this loop is every unbatched request's hot path.
        get, withdraw, loop = self.jobs.get, self.queued.pop, self.loop
        while True:
            item = get()
            if item is None:
                return
            result, slot, _, job = item
            if withdraw(result, None) is None or result.cancelled():
                continue  # expired or abandoned while queued: nobody waits for it
            try:
                answer = job[0](*job[1:])
            except BaseException as exc:
                answer = exc
            try:
                loop.call_soon_threadsafe(resolve, result, slot, answer)
            except RuntimeError:  # the loop is closed: the worker has stopped
                pass
