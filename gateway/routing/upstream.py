"""Pooled keep-alive HTTP/1.1 connections to one instance.

No connect per request: idle connections are reused, at most `max_connections`
are open per instance, and callers beyond that wait for one to free up. The
exchange is callback-driven (`send(data, on_done)`): the gateway's forwarder
is a small state machine, not a coroutine per request.
"""
from __future__ import annotations

import asyncio
import collections

# The connection itself is compiled (csrc/routing/upstream.pyx).
from .._native.upstream import UpstreamConnection, UpstreamError


class InstancePool:
    """Connections to one ip:port."""

    def __init__(self, ip: str, port: int, max_connections: int = 256,
                 connect_timeout: float = 2.0):
        self.ip = ip
        self.port = port
        self.host_line = f"Host: {ip}:{port}\r\n".encode()
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle: collections.deque[UpstreamConnection] = collections.deque()
        self.open = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        # Down when active health checks fail or the registry says so.
        self.check_healthy = True
        self.registry_healthy = True
        self.health_path = "/health"  # None: a TCP connect is the health check
        self.closed = False  # the instance left the route table

    @property
    def healthy(self) -> bool:
        return self.check_healthy and self.registry_healthy

    def take_idle(self) -> UpstreamConnection | None:
        """An idle open connection, or None (then `connect()`)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self.open -= 1
        return None

    async def connect(self) -> UpstreamConnection:
        """A fresh connection, or one handed back while we waited at the limit."""
        if self.closed:
            raise UpstreamError(f"instance {self.ip}:{self.port} was removed")
        while True:
            conn = self.take_idle()
            if conn is not None:
                return conn
            if self.open < self.max_connections:
                break
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                conn = await waiter
            except _SlotFreed:
                continue
            except asyncio.CancelledError:
                # Handed a connection just as our caller gave up: give it back.
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self.release(waiter.result(), True)
                raise
            return conn
        self.open += 1
        try:
            _, conn = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                UpstreamConnection, self.ip, self.port), self.connect_timeout)
            return conn
        except (OSError, asyncio.TimeoutError) as exc:
            self.open -= 1
            raise UpstreamError(f"cannot connect to {self.ip}:{self.port}: "
                                f"{exc or 'timeout'}") from None
        except asyncio.CancelledError:
            self.open -= 1
            raise

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.on_done = None
        if reusable and not conn.closed and not self.closed:
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            self.idle.append(conn)
            return
        self.open -= 1
        if not conn.closed:
            conn.closed = True
            conn.transport.close()
        while self.waiters:  # a slot freed up: one waiter may open a connection
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_SlotFreed())
                return

    def close(self) -> None:
        """The instance left the table: close idle connections now, busy ones when done."""
        self.closed = True
        for conn in self.idle:
            conn.transport.close()
        self.idle.clear()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamError("instance removed"))
        self.waiters.clear()


class _SlotFreed(Exception):
    """Internal: a connection slot freed up; try to open one."""
