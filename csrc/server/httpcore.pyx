# cython: language_level=3
"""The per-connection half of the HTTP/1.1 server, compiled.

httptools parses; this class collects each request (url, headers, body),
queues pipelined requests so they are answered in order, and writes the
responses. Handlers return a Response, an asyncio Future (written when it
resolves: no task per request) or a coroutine (run as a task).
"""
import asyncio
import logging
from http import HTTPStatus

import httptools
import orjson

cdef object log = logging.getLogger("infergate.http")
cdef object _Future = asyncio.Future
cdef object _HttpParserError = httptools.HttpParserError
cdef object _HttpParserUpgrade = httptools.HttpParserUpgrade

# EAS's 450 is not in http.HTTPStatus.
cdef dict _STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1")
                           for s in HTTPStatus}
_STATUS_LINES[450] = b"HTTP/1.1 450 Queue Full\r\n"
cdef bytes _CONTENT_TYPE = b"Content-Type: "
cdef bytes _CONTENT_LENGTH = b"\r\nContent-Length: "
cdef bytes _CLOSE = b"Connection: close\r\n"
cdef bytes _CRLF = b"\r\n"
cdef Py_ssize_t _ONE_WRITE = 65536


cpdef bytes status_line(int status):
    line = _STATUS_LINES.get(status)
    if line is None:
        return f"HTTP/1.1 {status} Unknown\r\n".encode("latin-1")
    return line


cdef class Request:
    """One parsed request. Header names are lower-cased str, values str."""

    def __init__(self, method, path, query, headers, raw_headers, body, peer, keep_alive):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.raw_headers = raw_headers
        self.body = body
        self.peer = peer
        self.keep_alive = keep_alive


cdef class Response:

    def __init__(self, int status=200, bytes body=b"", headers=None,
                 str content_type="application/octet-stream"):
        self.status = status
        self.body = body
        self.headers = headers
        self.content_type = content_type

    cpdef bytes head(self, bint keep_alive):
        cdef list parts = [status_line(self.status), _CONTENT_TYPE,
                           self.content_type.encode("latin-1"), _CONTENT_LENGTH,
                           str(len(self.body)).encode(), _CRLF]
        headers = self.headers
        if headers:
            if isinstance(headers, bytes):  # already "Name: value\r\n" lines (proxied)
                parts.append(headers)
            else:
                for name, value in headers:
                    parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep_alive:
            parts.append(_CLOSE)
        parts.append(_CRLF)
        return b"".join(parts)


cpdef Response json_response(obj, int status=200, headers=None):
    return Response(status, orjson.dumps(obj), headers, "application/json")


cpdef Response error_response(int status, str message, headers=None):
    """Every error answers {"code": ..., "message": ..., "error": ...}: EAS clients read the
    first two, Open Inference Protocol clients (tritonclient) the message as "error"."""
    return json_response({"code": status, "message": message, "error": message}, status,
                         headers)


cpdef Response answer_exception(answer_error, exc, request):
    """A server's answer to a handler's exception: `answer_error(exc)`'s when it gives one,
    else 500 (and a log line) for the unexpected."""
    if answer_error is not None:
        try:
            response = answer_error(exc)
        except Exception:
            log.exception("answer_error failed on %r", exc)
            response = None
        if response is not None:
            return response
    log.error("handler failed on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal error")


cdef bytes _CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Pipelined requests queued beyond this pause reading until the queue drains.
cdef Py_ssize_t _MAX_PENDING = 32


cdef class HttpConnection:
    """An asyncio protocol for one client connection of an HttpServer."""

    cdef object server, transport, parser, peer, worker, pending, loop
    cdef bytes url
    cdef dict headers
    cdef list raw_headers, body
    cdef Py_ssize_t body_size, max_body_size
    cdef Py_ssize_t head_bytes  # bytes read since the last complete head, while in a head
    cdef Py_ssize_t heads       # heads completed on this connection
    cdef bint closing, too_large, in_message, answered, reading_paused, writing_paused
    cdef bint in_head           # the next bytes are (part of) a request head
    # Loop times: of the bytes being read, of the first byte of the message being read, and
    # since when the connection has been between messages. A request's timeouts count from
    # its first byte, not its latest one: a byte now and then keeps nothing open.
    cdef double received_at, message_started, idle_since

    def __init__(self, server):
        self.server = server
        self.max_body_size = server.max_body_size
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending = __import__("collections").deque()
        self.worker = None
        self.closing = False
        self.in_message = False
        self.reading_paused = False
        self.writing_paused = False
        self.in_head = True
        self.head_bytes = 0
        self.heads = 0
        self._reset_message()

    cdef void _reset_message(self):
        self.url = b""
        self.headers = {}
        self.raw_headers = []
        self.body = []
        self.body_size = 0
        self.too_large = False
        self.answered = False  # refused before its body arrived (413, upgrade)

    # asyncio protocol
    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.received_at = self.idle_since = self.loop.time()
        self.peer = transport.get_extra_info("peername")
        self.server.connections.add(self)

    def connection_lost(self, exc):
        self.closing = True
        self.server.connections.discard(self)
        if self.worker is not None and not self.worker.done():
            # The client went away: cancel its work (the gateway drops the upstream call).
            self.worker.cancel()

    def pause_writing(self):
        # The client does not read its answers: stop reading its requests meanwhile.
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self):
        self.writing_paused = False
        self._maybe_resume_reading()

    cdef void _pause_reading(self):
        if not self.reading_paused and not self.closing:
            self.reading_paused = True
            self.transport.pause_reading()

    cdef void _maybe_resume_reading(self):
        if (self.reading_paused and not self.writing_paused and not self.closing
                and len(self.pending) < _MAX_PENDING // 2):
            self.reading_paused = False
            self.transport.resume_reading()

    def eof_received(self):
        return None

    def data_received(self, data):
        self.received_at = self.loop.time()
        cdef Py_ssize_t heads = self.heads
        cdef bint was_in_head = self.in_head
        try:
            self.parser.feed_data(data)
            if was_in_head and self.in_head and self.heads == heads:  # all of it: one head
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD:
                    self._fail(431, f"request head is larger than {MAX_HEAD} bytes")
                    self.head_bytes = 0
        except _HttpParserUpgrade:
            if not self.answered:
                self._fail(400, "protocol upgrades are not supported")
        except _HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    # httptools callbacks
    def on_message_begin(self):  # (at its first byte: CR and LF between messages begin none)
        self._reset_message()
        self.in_message = True
        self.message_started = self.received_at

    def on_headers_complete(self):
        self.in_head = False
        self.head_bytes = 0
        self.heads += 1
        if len(self.raw_headers) > MAX_HEADERS:
            self.answered = True
            self.too_large = True  # its body is not kept either
            self._enqueue(None, error_response(
                431, f"request has more than {MAX_HEADERS} headers"), False)
        elif self.too_large:
            # Refuse now, before the body arrives, and close: its bytes are not read.
            self.answered = True
            self._enqueue(None, self._too_large(), False)
        elif self.headers.get("expect", "").lower() == "100-continue" and \
                self.worker is None and not self.pending and not self.closing:
            self.transport.write(_CONTINUE)

    def on_url(self, bytes url):
        self.url += url

    def on_header(self, bytes name, bytes value):
        cdef str key = name.decode("latin-1").lower()
        cdef str val = value.decode("latin-1")
        self.raw_headers.append((name, value))
        if key == "content-length":
            try:
                if int(val) > self.max_body_size:
                    self.too_large = True
            except ValueError:
                pass
        self.headers[key] = val

    def on_body(self, bytes body):
        if self.too_large:
            return
        self.body_size += len(body)
        if self.body_size > self.max_body_size:
            self.too_large = True
            self.body = []
            return
        self.body.append(body)

    def on_message_complete(self):
        self.in_message = False
        self.in_head = True
        self.idle_since = self.received_at
        if self.answered:
            return
        if self.too_large:  # a chunked body that outgrew the limit
            self._enqueue(None, self._too_large(), False)
            return
        parser = self.parser
        if parser.should_upgrade():
            # h2c and websockets are not spoken here; answer once and close.
            self.answered = True
            self._enqueue(None, error_response(400, "protocol upgrades are not supported"),
                          False)
            return
        cdef bint keep_alive = parser.should_keep_alive() and not self.server.draining
        cdef str url = self.url.decode("latin-1")
        path, _, query = url.partition("?")
        cdef bytes body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        # (No HTTP version: httptools formats it as a new str, and keep_alive says enough.)
        request = Request(parser.get_method().decode("latin-1"), path, query, self.headers,
                          self.raw_headers, body, self.peer, keep_alive)
        self._enqueue(request, None, keep_alive)

    cdef Response _too_large(self):
        return error_response(
            413, f"request body is larger than the limit of {self.max_body_size} bytes")

    cdef void _fail(self, int status, str message):
        # A parse error leaves the stream out of sync: answer and close.
        self._enqueue(None, error_response(status, message), False)
        self.parser = httptools.HttpRequestParser(self)

    cdef void _enqueue(self, request, ready_response, bint keep_alive):
        self.pending.append((request, ready_response, keep_alive))
        if self.worker is None:
            self._serve_next()
        elif len(self.pending) >= _MAX_PENDING:
            self._pause_reading()

    cdef void _serve_next(self):
        """Answer queued requests in order; park on the first one that is not ready."""
        server = self.server
        while self.pending and not self.closing:
            request, response, keep_alive = self.pending.popleft()
            if response is None:
                server.inflight += 1
                try:
                    response = server.handler(request)
                except Exception as exc:
                    response = self._error(exc, request)
                if not isinstance(response, Response):
                    if not isinstance(response, _Future):
                        response = self.loop.create_task(response)
                    self.worker = response
                    response.add_done_callback(_Parked(self, request, keep_alive))
                    self._maybe_resume_reading()
                    return
                server.inflight -= 1
            if not self._write(response, keep_alive):
                return
        self._maybe_resume_reading()
        if self.server.draining and not self.pending and not self.closing and \
                not self.in_message:
            self.closing = True
            self.transport.close()

    cdef void _parked_done(self, done, request, bint keep_alive):
        self.worker = None
        self.server.inflight -= 1
        if done.cancelled():  # the client went away
            return
        exc = done.exception()
        if exc is not None:
            response = self._error(exc, request)
        else:
            response = done.result()
        if self._write(response, keep_alive):
            self._serve_next()

    cdef Response _error(self, exc, request):
        return answer_exception(self.server.answer_error, exc, request)

    cdef bint _write(self, Response response, bint keep_alive):
        """Send one response; False when the connection is done with."""
        if self.closing:
            return False
        if self.server.draining and not self.pending and not self.in_message:
            keep_alive = False  # say so, rather than closing under a client that reuses it
        cdef bytes head = response.head(keep_alive)
        cdef bytes body = response.body
        if len(body) < _ONE_WRITE:  # one write, one syscall
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        if not keep_alive:
            self.closing = True
            self.transport.close()
            return False
        return True

    def close_if_idle(self):
        """Close a connection with nothing in flight (not even half a request)."""
        if self.worker is None and not self.pending and not self.closing and not self.in_message:
            self.closing = True
            self.transport.close()

    def expire(self, double now, double idle_timeout, double head_timeout,
               double read_timeout):
        """Answer 408 and close a request whose head took longer than `head_timeout`, or
        the whole of it longer than `read_timeout`, from its first byte; close a connection
        between requests for longer than `idle_timeout`."""
        if self.closing or self.worker is not None or self.pending:
            return
        if self.in_message:
            if self.in_head and now - self.message_started > head_timeout:
                self._time_out(f"the request head was not received within {head_timeout:g}s")
            elif now - self.message_started > read_timeout:
                self._time_out(f"the request was not received within {read_timeout:g}s")
        elif now - self.idle_since > idle_timeout:
            self.closing = True
            self.transport.close()

    cdef void _time_out(self, str message):
        self.answered = True
        self._enqueue(None, error_response(408, message), False)

    def abort(self):
        self.transport.abort()


cdef class _Parked:
    """Done-callback of a parked request: writes its answer, then serves the next."""

    cdef HttpConnection conn
    cdef object request
    cdef bint keep_alive

    def __init__(self, HttpConnection conn, request, bint keep_alive):
        self.conn = conn
        self.request = request
        self.keep_alive = keep_alive

    def __call__(self, done):
        self.conn._parked_done(done, self.request, self.keep_alive)
