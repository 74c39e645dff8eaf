"""A small HTTP/1.1 server on asyncio protocols and httptools.

Keep-alive, pipelining (requests on one connection are answered in order),
chunked request bodies (httptools decodes them), a body size limit (413) and a
graceful drain on shutdown. Handlers get a `Request` and return a `Response`
or an awaitable of one; they never see the socket.
"""
from __future__ import annotations

import asyncio
import socket
from typing import Awaitable, Callable, Union

# The per-connection work is compiled (csrc/httpcore.pyx); this module wires it up.
from .._native.httpcore import HttpConnection, Request, Response, error_response, json_response

Handler = Callable[[Request], Union[Response, Awaitable[Response]]]


class HttpServer:
    """Serves `handler` on host:port; `drain()` stops accepting and waits for in-flight work."""

    def __init__(self, handler: Handler, max_body_size: int = 64 << 20):
        self.handler = handler
        self.max_body_size = max_body_size
        self.connections: set[HttpConnection] = set()
        self.inflight = 0
        self.draining = False
        self._servers: list[asyncio.AbstractServer] = []

    async def listen(self, host: str, port: int, reuse_port: bool = False,
                     sock: socket.socket | None = None) -> int:
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(lambda: HttpConnection(self), sock=sock, backlog=1024)
        else:
            server = await loop.create_server(lambda: HttpConnection(self), host, port,
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
            conn.abort()
