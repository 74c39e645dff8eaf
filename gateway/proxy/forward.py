"""The last step of the chain: send the exchange to an instance, retrying elsewhere.

Connect errors, lost connections, 5xx and 450 are retried on another instance
of the same version, never the same one twice, within the retry budget and
the request's deadline. Failures lower an instance's effective weight.

A Forwarding is a small state machine driven by the upstream connection's
callbacks and resolving one Future: no task or coroutine per request.
"""
from __future__ import annotations

import asyncio

from .._native.proxy_head import finish_request, request_head, response_headers
from ..routing.upstream import UpstreamError
from ..server import Response, error_response
from . import metrics

MAX_TRIES = 3


class Forwarding:
    __slots__ = ("ex", "backend", "head", "future", "tried", "tries_left", "timer", "conn",
                 "pool", "index", "failed_answer", "failed_transport", "loop", "on_finish")

    def __init__(self, ex, loop, on_finish):
        self.ex = ex
        self.on_finish = on_finish  # (ex, response) -> response, before the client gets it
        self.backend = ex.backend
        self.loop = loop
        self.future = loop.create_future()
        self.future.add_done_callback(self._future_done)
        self.tried = 0
        self.tries_left = min(MAX_TRIES, len(self.backend.pools))
        self.conn = None
        self.pool = None
        self.index = -1
        self.failed_answer = None  # an instance's own 5xx/450: more telling than a connect error
        self.failed_transport = None
        request = ex.request
        backend = self.backend
        target = backend.prefix + ex.subpath.encode("latin-1")
        if request.query:
            target += b"?" + request.query.encode("latin-1")
        extra = ex.extra
        extra.append((b"X-Request-Id", ex.request_id.encode("latin-1")))
        if backend.auth_header is not None:
            extra.append(backend.auth_header)
        self.head = request_head(request.method.encode("latin-1"), target, request.raw_headers,
                                 extra)
        self.timer = loop.call_later(backend.timeout, self._timed_out)

    def start(self) -> asyncio.Future:
        self._attempt()
        return self.future

    def _attempt(self) -> None:
        backend = self.backend
        index = backend.picker.pick_index(self.tried) if self.tries_left > 0 else -1
        if index < 0:
            self._finish(self.failed_answer or self.failed_transport or error_response(
                503, f"service {backend.name!r} has no healthy instance"))
            return
        self.tries_left -= 1
        self.tried |= 1 << index
        self.index = index
        pool = self.pool = backend.pools[index]
        conn = pool.take_idle()
        if conn is not None:
            self._send(conn)
        else:
            self.loop.create_task(pool.connect()).add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if self.future.done():  # timed out or the client left while we connected
            if error is None:
                self.pool.release(task.result(), True)
            return
        if error is not None:
            self._failed(error)
        else:
            self._send(task.result())

    def _send(self, conn) -> None:
        self.conn = conn
        conn.send(finish_request(self.head, self.pool.host_line, self.ex.request.body),
                  self._answered)

    def _answered(self, conn, upstream, error) -> None:
        self.conn = None
        if error is not None:
            self.pool.release(conn, False)
            self._failed(error)
            return
        self.pool.release(conn, upstream.keep_alive)
        status = upstream.status
        content_type, passthrough = response_headers(upstream.headers)
        response = Response(status, upstream.body, passthrough, content_type)
        picker = self.backend.picker
        if status >= 500 or status == 450:
            picker.report_failure(self.index)
            metrics.retried(self.ex.service, str(status))
            self.failed_answer = response
            self._attempt()
            return
        picker.report_success(self.index)
        self._finish(response)

    def _failed(self, error: Exception) -> None:
        self.backend.picker.report_failure(self.index)
        metrics.retried(self.ex.service, "connect")
        pool = self.pool
        self.failed_transport = error_response(
            502, f"upstream {pool.ip}:{pool.port} failed: {error}")
        self._attempt()

    def _timed_out(self) -> None:
        if self.index >= 0:
            self.backend.picker.report_failure(self.index)
        pool = self.pool
        where = f"upstream {pool.ip}:{pool.port}" if pool is not None else "no upstream"
        self._finish(error_response(504, f"{where} did not answer within "
                                         f"{self.backend.timeout:.1f}s"))

    def _finish(self, response: Response) -> None:
        if not self.future.done():
            self.future.set_result(self.on_finish(self.ex, response))

    def _future_done(self, future: asyncio.Future) -> None:
        # Answered, timed out, or cancelled because the client disconnected.
        self.timer.cancel()
        conn = self.conn
        if conn is not None:  # mid-exchange: that stream cannot be reused
            self.conn = None
            self.pool.release(conn, False)


def forward(ex, on_finish):
    """The upstream's answer as a Future, or a Response at once when nothing can take it."""
    if not ex.backend.pools:
        state = "stopped" if ex.backend.status == "Stopped" else "has no instances"
        return on_finish(ex, error_response(503, f"service {ex.backend.name!r} {state}"))
    return Forwarding(ex, asyncio.get_running_loop(), on_finish).start()
