# cython: language_level=3
"""One keep-alive HTTP/1.1 connection to an instance, compiled.

The exchange is callback-driven: `send(data, on_done)` writes a request and
`on_done(conn, response, error)` runs when the response is complete or the
connection fails. Pools of these live in gateway/routing/upstream.py.
"""
import httptools

cdef object _HttpParserError = httptools.HttpParserError


class UpstreamError(Exception):
    """Connect failure or a connection lost before a full response: retry elsewhere."""


cdef class UpstreamResponse:

    def __init__(self, int status, list headers, bytes body, bint keep_alive):
        self.status = status
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


cdef class UpstreamConnection:

    def __init__(self):
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.on_done = None
        self.closed = False
        self.headers = []
        self.body = []
        self.headers_done = False
        self.framed = False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.on_done is not None and self.headers_done and not self.framed and exc is None:
            # An HTTP/1.0-style answer without a length ends where the connection does.
            self._deliver(False)
            return
        self._fail(UpstreamError(f"connection lost: {exc or 'closed by peer'}"))

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    def eof_received(self):
        return None

    cdef void _fail(self, error):
        on_done = self.on_done
        self.on_done = None
        if on_done is not None:
            on_done(self, None, error)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except _HttpParserError as exc:
            self._fail(UpstreamError(f"malformed upstream response: {exc}"))
            self.transport.close()

    def on_message_begin(self):
        self.headers = []
        self.body = []
        self.headers_done = False
        self.framed = False

    def on_header(self, bytes name, bytes value):
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or lower == b"transfer-encoding":
            self.framed = True

    def on_headers_complete(self):
        self.headers_done = True

    def on_body(self, bytes body):
        self.body.append(body)

    def on_message_complete(self):
        self._deliver(self.parser.should_keep_alive())

    cdef void _deliver(self, bint keep_alive):
        on_done = self.on_done
        self.on_done = None
        if on_done is not None:
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            on_done(self, UpstreamResponse(self.parser.get_status_code(), self.headers, body,
                                           keep_alive), None)

    cpdef void send(self, bytes data, on_done):
        self.on_done = on_done
        self.transport.write(data)
