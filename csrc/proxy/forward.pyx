# cython: language_level=3
"""The gateway's forwarder, compiled: one state machine per request.

Sends the exchange to an instance of the chosen version and retries on
another one (never the same twice) after a connect error, a lost connection,
a 5xx or a 450, within the retry budget and the request's deadline. Driven by
the upstream connection's callbacks; resolves one Future.
"""
import asyncio

from gateway._native.deadlines cimport Deadlines
from gateway._native.httpcore cimport Response, error_response
from gateway._native.proxy_head cimport finish_request, request_head, response_headers
from gateway._native.upstream cimport UpstreamResponse

cdef int MAX_TRIES = 3


def _expire(Forwarding forwarding):
    forwarding._timed_out()


def forwarding_deadlines(loop):
    """The deadlines that Forwardings on `loop` file themselves under (one set per loop)."""
    return Deadlines(loop, _expire)


cdef class Forwarding:
    def __init__(self, ex, Deadlines deadlines, on_finish, on_retry):
        self.ex = ex
        self.on_finish = on_finish  # (ex, response) -> response, before the client gets it
        self.on_retry = on_retry    # (service, reason): each retry on another instance
        backend = self.backend = ex.backend
        self.picker = backend.picker
        loop = self.loop = deadlines.loop
        self.future = loop.create_future()
        self.future.add_done_callback(self._future_done)
        self.tried = ()
        self.tries_left = min(MAX_TRIES, len(backend.pools))
        self.index = -1
        self.conn = None
        self.pool = None
        self.failed_answer = None
        self.failed_transport = None
        request = ex.request
        target = backend.prefix + (<str>ex.subpath).encode("latin-1")
        if request.query:
            target += b"?" + (<str>request.query).encode("latin-1")
        extra = ex.extra
        extra.append((b"X-Request-Id", (<str>ex.request_id).encode("latin-1")))
        if backend.auth_header is not None:
            extra.append(backend.auth_header)
        self.head = request_head((<str>request.method).encode("latin-1"), target,
                                 request.raw_headers, extra)
        self.deadline_slot = deadlines.add(self, loop.time() + backend.timeout)

    def start(self):
        self._attempt()
        return self.future

    cdef void _attempt(self):
        cdef int index = self.picker.pick_index(self.tried) if self.tries_left > 0 else -1
        if index < 0:
            self._finish(self.failed_answer or self.failed_transport or error_response(
                503, f"service {self.backend.name!r} has no healthy instance"))
            return
        self.tries_left -= 1
        self.tried += (index,)
        self.index = index
        pool = self.pool = self.backend.pools[index]
        conn = pool.take_idle()
        if conn is not None:
            self._send(conn)
        else:
            self.loop.create_task(pool.connect()).add_done_callback(self._connected)

    def _connected(self, task):
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

    cdef void _send(self, UpstreamConnection conn):
        self.conn = conn
        conn.send(finish_request(self.head, self.pool.host_line, self.ex.request.body),
                  self._answered)

    def _answered(self, UpstreamConnection conn, UpstreamResponse upstream, error):
        self.conn = None
        if error is not None:
            self.pool.release(conn, False)
            self._failed(error)
            return
        self.pool.release(conn, upstream.keep_alive)
        cdef int status = upstream.status
        content_type, passthrough = response_headers(upstream.headers)
        response = Response(status, upstream.body, passthrough, content_type)
        if status >= 500 or status == 450:
            if status != 450:  # a full queue is momentary: retry elsewhere, no penalty
                self.picker.report_failure(self.index)
            self.on_retry(self.ex.service, str(status))
            self.failed_answer = response
            self._attempt()
            return
        self._finish(response)  # the picker restores effective weight on its own

    cdef void _failed(self, error):
        self.picker.report_failure(self.index)
        self.on_retry(self.ex.service, "connect")
        pool = self.pool
        self.failed_transport = error_response(
            502, f"upstream {pool.ip}:{pool.port} failed: {error}")
        self._attempt()

    cdef void _timed_out(self):
        if self.future.done():
            return
        if self.index >= 0:
            self.picker.report_failure(self.index)
        pool = self.pool
        where = f"upstream {pool.ip}:{pool.port}" if pool is not None else "no upstream"
        self._finish(error_response(504, f"{where} did not answer within "
                                         f"{self.backend.timeout:.1f}s"))

    cdef void _finish(self, response):
        if not self.future.done():
            self.future.set_result(self.on_finish(self.ex, response))

    def _future_done(self, future):
        # Answered, timed out, or cancelled because the client disconnected.
        self.deadline_slot.discard(self)
        conn = self.conn
        if conn is not None:  # mid-exchange: that stream cannot be reused
            self.conn = None
            self.pool.release(conn, False)
