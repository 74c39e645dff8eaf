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
A job that expires or is abandoned (its Future cancelled) while queued leaves
the queue's count at once, and no thread runs it.
"""
from __future__ import annotations

import queue
import threading
import time

from .._native.deadlines import Deadlines
from ..serviceconfig import RpcSettings


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


def _resolve(result, slot, value, exc) -> None:
    slot.discard(result)  # its deadline no longer matters
    if result.done():  # expired or abandoned meanwhile
        return
    if exc is not None:
        result.set_exception(exc)
    else:
        result.set_result(value)


class ThreadedRunner:
    def __init__(self, settings: RpcSettings):
        self.settings = settings
        self.jobs = queue.SimpleQueue()
        # Jobs not yet taken by a thread, by their result future. A thread claims a
        # job, and the loop withdraws one, with dict.pop: atomic under the GIL, so
        # exactly one of them gets it.
        self.queued: dict = {}
        self.threads: list[threading.Thread] = []
        self.loop = None
        self.deadlines = None  # on the app's event loop, from bind()

    def bind(self, loop) -> None:
        """Serve calls from `loop` (taken once: asyncio.get_running_loop() makes a
        getpid() system call each time)."""
        self.loop = loop
        self.deadlines = Deadlines(loop, self._expire)

    @property
    def waiting(self) -> int:
        return len(self.queued)

    def deadline(self) -> float:
        return time.monotonic() + self.settings.keepalive / 1000.0

    def _expire(self, result) -> None:
        self.queued.pop(result, None)
        if not result.done():
            result.set_exception(DeadlineExceeded())

    def _work(self) -> None:
        get, claim = self.jobs.get, self.queued.pop
        while True:
            job = get()
            if job is None:
                return
            result, slot, fn, args = job
            # Expired, or abandoned (cancelled) while queued: nobody waits for it.
            if claim(result, None) is None or result.cancelled():
                continue
            try:
                value = fn(*args)
            except BaseException as exc:
                self.loop.call_soon_threadsafe(_resolve, result, slot, None, exc)
            else:
                self.loop.call_soon_threadsafe(_resolve, result, slot, value, None)

    def submit(self, deadline: float, fn, *args):
        """A Future of fn(*args) run on an inference thread; raises QueueFull or
        DeadlineExceeded at once when the job cannot be taken."""
        if len(self.queued) >= self.settings.max_queue_size:
            raise QueueFull()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded()
        if not self.threads:
            self._start_threads()
        loop = self.loop
        result = loop.create_future()
        self.queued[result] = True
        self.jobs.put((result, self.deadlines.add(result, loop.time() + remaining), fn, args))
        return result

    def _start_threads(self) -> None:
        for i in range(max(1, self.settings.worker_threads)):
            thread = threading.Thread(target=self._work, name=f"infer-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        """Let the threads finish what they were given, then stop them."""
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
        self.threads.clear()
