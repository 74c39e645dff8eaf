"""A small HTTP/1.1 server on asyncio protocols and httptools.

Keep-alive, pipelining (requests on one connection are answered in order),
chunked request bodies (httptools decodes them), a body size limit (413) and a
graceful drain on shutdown. Handlers get a `Request` and return a `Response`
or an awaitable of one; they never see the socket.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
from http import HTTPStatus
from typing import Awaitable, Callable, Union

import httptools
import orjson

log = logging.getLogger("infergate.http")

# EAS-specific codes that http.HTTPStatus does not know.
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_REASONS[450] = "Queue Full"
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n".encode("latin-1")
                 for code, reason in _REASONS.items()}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode("latin-1")
    return line


class Request:
    """One parsed request. Header names are lower-cased str, values str."""

    __slots__ = ("method", "path", "query", "headers", "body", "peer", "keep_alive",
                 "version", "raw_headers")

    def __init__(self, method, path, query, headers, raw_headers, body, peer, keep_alive, version):
        self.method: str = method
        self.path: str = path
        self.query: str = query
        self.headers: dict = headers
        self.raw_headers: list = raw_headers
        self.body: bytes = body
        self.peer = peer
        self.keep_alive: bool = keep_alive
        self.version: str = version


class Response:
    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(self, status: int = 200, body: bytes = b"", headers=None,
                 content_type: str = "application/octet-stream"):
        self.status = status
        self.body = body
        self.headers = headers  # list of (name, value) str pairs, encoded header lines, or None
        self.content_type = content_type

    def head(self, keep_alive: bool) -> bytes:
        parts = [status_line(self.status),
                 b"Content-Type: ", self.content_type.encode("latin-1"),
                 b"\r\nContent-Length: ", str(len(self.body)).encode(), b"\r\n"]
        headers = self.headers
        if headers:
            if isinstance(headers, bytes):  # already "Name: value\r\n" lines (proxied)
                parts.append(headers)
            else:
                for name, value in headers:
                    parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


def json_response(obj, status: int = 200, headers=None) -> Response:
    return Response(status, orjson.dumps(obj), headers, "application/json")


def error_response(status: int, message: str, headers=None) -> Response:
    """Every error answers {"code": ..., "message": ...}."""
    return json_response({"code": status, "message": message}, status, headers)


Handler = Callable[[Request], Union[Response, Awaitable[Response]]]


class _Connection(asyncio.Protocol):
    __slots__ = ("server", "transport", "parser", "peer", "url", "headers", "raw_headers",
                 "body", "body_size", "pending", "worker", "closing", "too_large")

    def __init__(self, server: "HttpServer"):
        self.server = server
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque = collections.deque()
        self.worker: asyncio.Task | None = None
        self.closing = False
        self._reset_message()

    def _reset_message(self):
        self.url = b""
        self.headers = {}
        self.raw_headers = []
        self.body = []
        self.body_size = 0
        self.too_large = False

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.server.connections.add(self)

    def connection_lost(self, exc):
        self.closing = True
        self.server.connections.discard(self)
        if self.worker is not None and not self.worker.done():
            # The client went away: cancel its work (the gateway cancels the upstream call).
            self.worker.cancel()

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    # httptools callbacks
    def on_message_begin(self):
        self._reset_message()

    def on_url(self, url: bytes):
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        self.raw_headers.append((name, value))
        if key == "content-length":
            try:
                if int(val) > self.server.max_body_size:
                    self.too_large = True
            except ValueError:
                pass
        self.headers[key] = val

    def on_body(self, body: bytes):
        if self.too_large:
            return
        self.body_size += len(body)
        if self.body_size > self.server.max_body_size:
            self.too_large = True
            self.body = []
            return
        self.body.append(body)

    def on_message_complete(self):
        parser = self.parser
        keep_alive = parser.should_keep_alive() and not self.server.draining
        if self.too_large:
            self._enqueue(None, error_response(
                413, f"request body is larger than the limit of {self.server.max_body_size} bytes"),
                False)
            return
        url = self.url.decode("latin-1")
        path, _, query = url.partition("?")
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        request = Request(parser.get_method().decode("latin-1"), path, query, self.headers,
                          self.raw_headers, body, self.peer, keep_alive, parser.get_http_version())
        self._enqueue(request, None, keep_alive)

    def _fail(self, status: int, message: str):
        # A parse error leaves the stream out of sync: answer and close.
        self._enqueue(None, error_response(status, message), False)
        self.parser = httptools.HttpRequestParser(self)

    def _enqueue(self, request, ready_response, keep_alive):
        self.pending.append((request, ready_response, keep_alive))
        if self.worker is None:
            self._serve_next()

    def _serve_next(self):
        """Answer queued requests in order; park on the first one that is not ready.

        A handler returns a Response (written now), an asyncio Future (written
        when it resolves: no task per request) or a coroutine (run as a task).
        """
        server = self.server
        while self.pending and not self.closing:
            request, response, keep_alive = self.pending.popleft()
            if response is None:
                server.inflight += 1
                try:
                    response = server.handler(request)
                except Exception:
                    log.exception("handler failed on %s %s", request.method, request.path)
                    response = error_response(500, "internal error")
                if not isinstance(response, Response):
                    if not isinstance(response, asyncio.Future):
                        response = asyncio.get_running_loop().create_task(response)
                    self.worker = response
                    response.add_done_callback(
                        lambda done, request=request, keep_alive=keep_alive:
                        self._parked_done(done, request, keep_alive))
                    return
                server.inflight -= 1
            if not self._write(response, keep_alive):
                return
        self._idle()

    def _parked_done(self, done: asyncio.Future, request, keep_alive):
        self.worker = None
        self.server.inflight -= 1
        if done.cancelled():  # the client went away
            return
        exc = done.exception()
        if exc is not None:
            log.error("handler failed on %s %s", request.method, request.path, exc_info=exc)
            response = error_response(500, "internal error")
        else:
            response = done.result()
        if self._write(response, keep_alive):
            self._serve_next()

    def _write(self, response: Response, keep_alive: bool) -> bool:
        """Send one response; False when the connection is done with."""
        if self.closing:
            return False
        head, body = response.head(keep_alive), response.body
        if len(body) < 65536:  # one write, one syscall
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        if not keep_alive:
            self.closing = True
            self.transport.close()
            return False
        return True

    def _idle(self):
        if self.server.draining and not self.pending and not self.closing:
            self.closing = True
            self.transport.close()

    def close_if_idle(self):
        if self.worker is None and not self.pending and not self.closing:
            self.closing = True
            self.transport.close()


class HttpServer:
    """Serves `handler` on host:port; `drain()` stops accepting and waits for in-flight work."""

    def __init__(self, handler: Handler, max_body_size: int = 64 << 20):
        self.handler = handler
        self.max_body_size = max_body_size
        self.connections: set[_Connection] = set()
        self.inflight = 0
        self.draining = False
        self._servers: list[asyncio.AbstractServer] = []

    async def listen(self, host: str, port: int, reuse_port: bool = False,
                     sock: socket.socket | None = None) -> int:
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)
        else:
            server = await loop.create_server(lambda: _Connection(self), host, port,
                                              reuse_port=reuse_port or None, backlog=1024)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def drain(self, timeout: float = 30.0) -> None:
        """Stop accepting, let every accepted request finish, close idle connections."""
        self.draining = True
        for server in self._servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for conn in list(self.connections):
                conn.close_if_idle()
            if not self.connections or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.abort()
