"""A small HTTP/1.1 server on asyncio protocols and httptools.

Keep-alive, pipelining (requests on one connection are answered in order),
chunked request bodies (httptools decodes them), a body size limit (413),
timeouts counted from a request's first byte (a client that sends a byte now and
then holds no connection open: 408) and a graceful drain on shutdown. Handlers
get a `Request` and return a `Response` or an awaitable of one; they never see
the socket.

The workers serve on it; their timeouts come from the environment (seconds):
INFERGATE_WORKER_HEAD_TIMEOUT (10), INFERGATE_WORKER_READ_TIMEOUT (30, as the
gateway's) and INFERGATE_WORKER_IDLE_TIMEOUT (75).
"""
from __future__ import annotations

import asyncio
import os
import socket
from typing import Awaitable, Callable, Optional, Union

# The per-connection work is compiled (csrc/server/httpcore.pyx); this module wires it up.
from .._native.httpcore import HttpConnection, Request, Response, error_response, json_response

__all__ = ["HttpServer", "Request", "Response", "error_response", "json_response"]

Handler = Callable[[Request], Union[Response, Awaitable[Response]]]
ErrorAnswer = Callable[[BaseException], Optional[Response]]


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{name} must be a number of seconds above 0, not {text!r}")
    return seconds


class HttpServer:
    """Serves `handler` on host:port; `drain()` stops accepting and waits for in-flight work.

    A request whose head is not received within `head_timeout` seconds of its
    first byte, or the whole of it within `read_timeout`, is answered 408 and its
    connection closed; connections idle between requests for `idle_timeout` are
    closed (None: from the environment, see above).
    An exception from the handler (raised, or in the Future it returned) is answered
    by `answer_error(exc)`; where that gives None, 500 and a log line.
    """

    def __init__(self, handler: Handler, max_body_size: int = 64 << 20,
                 idle_timeout: float | None = None, read_timeout: float | None = None,
                 head_timeout: float | None = None, answer_error: ErrorAnswer | None = None):
        self.handler = handler
        self.answer_error = answer_error
        self.max_body_size = max_body_size
        self.idle_timeout = idle_timeout or _seconds_from_env("INFERGATE_WORKER_IDLE_TIMEOUT",
                                                              75.0)
        self.read_timeout = read_timeout or _seconds_from_env("INFERGATE_WORKER_READ_TIMEOUT",
                                                              30.0)
        self.head_timeout = min(self.read_timeout, head_timeout or _seconds_from_env(
            "INFERGATE_WORKER_HEAD_TIMEOUT", 10.0))
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
        interval = max(0.05, min(self.idle_timeout, self.head_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self.connections):
                conn.expire(now, self.idle_timeout, self.head_timeout, self.read_timeout)

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
