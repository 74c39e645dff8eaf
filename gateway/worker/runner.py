"""Runs inference off the event loop in a pool of rpc.worker_threads.

Admission control lives here: a request is refused with QueueFull (450) when
rpc.max_queue_size requests already wait for a thread, and answered with
DeadlineExceeded (408) when rpc.keepalive passes before its result is ready.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time

from ..serviceconfig import RpcSettings


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


def _resolve(result: asyncio.Future, value, exc) -> None:
    if result.done():  # expired or abandoned meanwhile
        return
    if exc is not None:
        result.set_exception(exc)
    else:
        result.set_result(value)


class _Deadline:
    """Cancels the awaited result when the deadline passes, and remembers that it did."""

    __slots__ = ("future", "fired")

    def __init__(self, future: asyncio.Future):
        self.future = future
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.future.cancel()


class ThreadedRunner:
    def __init__(self, settings: RpcSettings):
        self.settings = settings
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.worker_threads,
                                                          thread_name_prefix="infer")
        self.submitted = 0
        # Threads bump this when they pick a job up; next() on a count is atomic
        # under the GIL, so the loop thread and the pool threads never race on it.
        self._taken = itertools.count(1)
        self.taken = 0
        # The app's event loop, once it has one: asyncio.get_running_loop() makes a
        # getpid() system call each time.
        self.loop = None

    @property
    def waiting(self) -> int:
        return self.submitted - self.taken

    def deadline(self) -> float:
        return time.monotonic() + self.settings.keepalive / 1000.0

    def _take(self):
        self.taken = max(self.taken, next(self._taken))

    def _run(self, fn, args, loop, result):
        self._take()
        try:
            value = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(_resolve, result, None, exc)
        else:
            loop.call_soon_threadsafe(_resolve, result, value, None)

    async def call(self, deadline: float, fn, *args):
        if self.waiting >= self.settings.max_queue_size:
            raise QueueFull()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded()
        self.submitted += 1
        loop = self.loop or asyncio.get_running_loop()
        # The thread resolves this future itself: lighter than wrap_future's chaining.
        result = loop.create_future()
        job = self.pool.submit(self._run, fn, args, loop, result)
        # One timer instead of asyncio.wait_for: its extra task costs more than the model here.
        expiry = _Deadline(result)
        timer = loop.call_later(remaining, expiry)
        try:
            return await result
        except asyncio.CancelledError:  # our deadline, or the client went away
            if job.cancel():  # never started: it leaves the queue now
                self._take()
            if expiry.fired:
                raise DeadlineExceeded() from None
            raise
        finally:
            timer.cancel()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=False)
