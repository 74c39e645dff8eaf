"""A small HTTP/1.1 server on asyncio protocols and httptools.

Keep-alive, pipelining (requests on one connection are answered in order),
chunked request bodies (httptools decodes them), a body size limit (413) and a
graceful drain on shutdown. Handlers get a `Request` and return a `Response`
or an awaitable of one; they never see the socket.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Awaitable, Callable, Optional, Union

# The per-connection work is compiled (csrc/server/httpcore.pyx); this module wires it up.
from .._native.httpcore import HttpConnection, Request, Response, error_response, json_response

__all__ = ["HttpServer", "Request", "Response", "error_response", "json_response"]

Handler = Callable[[Request], Union[Response, Awaitable[Response]]]
ErrorAnswer = Callable[[BaseException], Optional[Response]]


class HttpServer:
    """Serves `handler` on host:port; `drain()` stops accepting and waits for in-flight work.

    Connections idle for `idle_timeout` seconds are closed; a request not fully
    received within `read_timeout` seconds is answered 408 and its connection closed.
    An exception from the handler (raised, or in the Future it returned) is answered
    by `answer_error(exc)`; where that gives None, 500 and a log line.
    """

    def __init__(self, handler: Handler, max_body_size: int = 64 << 20,
                 idle_timeout: float = 75.0, read_timeout: float = 30.0,
                 answer_error: ErrorAnswer | None = None):
        self.handler = handler
        self.answer_error = answer_error
        self.max_body_size = max_body_size
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.connections: set[HttpConnection] = set()
        self.inflight = 0
        self.draining = False
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task | None = None

    async def listen(self, host: str, port: int, reuse_port: bool = False,
                     sock: socket.socket | None = None) -> int:
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=1024)
        else:
            server = await loop.create_server(lambda: HttpConnection(self), host, port,
                                              reuse_port=reuse_port or None, backlog=1024)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        return server.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        # One timer for all connections instead of one per connection or request.
        loop = asyncio.get_running_loop()
        interval = max(0.05, min(self.idle_timeout, self.read_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.connections):
                conn.expire(now, self.idle_timeout, self.read_timeout)

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
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
