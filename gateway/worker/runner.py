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

    @property
    def waiting(self) -> int:
        return self.submitted - self.taken

    def deadline(self) -> float:
        return time.monotonic() + self.settings.keepalive / 1000.0

    def _take(self):
        self.taken = max(self.taken, next(self._taken))

    def _run(self, fn, args):
        self._take()
        return fn(*args)

    async def call(self, deadline: float, fn, *args):
        if self.waiting >= self.settings.max_queue_size:
            raise QueueFull()
        self.submitted += 1
        job = self.pool.submit(self._run, fn, args)
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(asyncio.wrap_future(job), remaining)
        except BaseException as exc:  # timeout, or the client went away (cancelled)
            if job.cancel():  # never started: it leaves the queue now
                self._take()
            if isinstance(exc, asyncio.TimeoutError):
                raise DeadlineExceeded() from None
            raise

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=False)
