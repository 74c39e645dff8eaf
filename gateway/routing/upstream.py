"""Pooled keep-alive HTTP/1.1 connections to one instance.

No connect per request: idle connections are reused, at most `max_connections`
are open per instance, and callers beyond that wait for one to free up.
"""
from __future__ import annotations

import asyncio
import collections

import httptools


class UpstreamError(Exception):
    """Connect failure or a connection lost before a full response: retry elsewhere."""


class UpstreamResponse:
    __slots__ = ("status", "headers", "body", "keep_alive")

    def __init__(self, status, headers, body, keep_alive):
        self.status = status
        self.headers = headers  # list of (bytes name, bytes value)
        self.body = body
        self.keep_alive = keep_alive


class _UpstreamConnection(asyncio.Protocol):
    __slots__ = ("transport", "parser", "waiter", "headers", "body", "closed")

    def __init__(self):
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.headers = []
        self.body = []

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(UpstreamError(f"connection lost: {exc or 'closed by peer'}"))

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(UpstreamError(f"malformed upstream response: {exc}"))
            self.transport.close()

    def on_message_begin(self):
        self.headers = []
        self.body = []

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            waiter.set_result(UpstreamResponse(self.parser.get_status_code(), self.headers, body,
                                               self.parser.should_keep_alive()))

    def exchange(self, data: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


class InstancePool:
    """Connections to one ip:port."""

    def __init__(self, ip: str, port: int, max_connections: int = 256,
                 connect_timeout: float = 2.0):
        self.ip = ip
        self.port = port
        self.host_header = f"{ip}:{port}".encode()
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle: collections.deque[_UpstreamConnection] = collections.deque()
        self.open = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        # Down when active health checks fail or the registry says so.
        self.check_healthy = True
        self.registry_healthy = True

    @property
    def healthy(self) -> bool:
        return self.check_healthy and self.registry_healthy

    async def _acquire(self) -> _UpstreamConnection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.open -= 1
        if self.open >= self.max_connections:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                return await waiter
            except asyncio.CancelledError:
                # Handed a connection just as our caller gave up: give it back.
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._release(waiter.result(), True)
                raise
        self.open += 1
        try:
            loop = asyncio.get_running_loop()
            _, conn = await asyncio.wait_for(
                loop.create_connection(_UpstreamConnection, self.ip, self.port),
                self.connect_timeout)
            return conn
        except (OSError, asyncio.TimeoutError) as exc:
            self.open -= 1
            raise UpstreamError(f"cannot connect to {self.ip}:{self.port}: {exc or 'timeout'}") from None

    def _release(self, conn: _UpstreamConnection, reusable: bool):
        if reusable and not conn.closed:
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            self.idle.append(conn)
            return
        self.open -= 1
        if not conn.closed:
            conn.transport.close()
        # A slot freed up: let one waiter open a fresh connection.
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_Retry())
                return

    async def request(self, data: bytes) -> UpstreamResponse:
        """Send one serialized request; the answer, or UpstreamError."""
        while True:
            try:
                conn = await self._acquire()
                break
            except _Retry:
                continue
        try:
            response = await conn.exchange(data)
        except BaseException:
            # Error, timeout or cancellation mid-exchange: the stream is unusable.
            conn.waiter = None
            self._release(conn, False)
            raise
        conn.waiter = None
        self._release(conn, response.keep_alive)
        return response

    def close(self):
        for conn in self.idle:
            conn.transport.close()
        self.idle.clear()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamError("instance removed"))


class _Retry(Exception):
    """Internal: a pool slot freed up; acquire again."""
