"""The asyncio client: ``AsyncPredictClient``, the same surface with ``await``.

    client = AsyncPredictClient("http://127.0.0.1:8080", "digits")
    client.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
    await client.init()
    resp = await client.predict(req)
    await client.destroy()            # or: async with AsyncPredictClient(...) as client

Connections are asyncio protocols parsing answers with httptools, kept alive in
a pool per host; in direct mode a task refreshes the instance list every
``discovery_interval`` seconds. Picking, retries and errors are those of the
sync client (``gateway.sdk.client``). Use one client per event loop.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

import httptools

from .client import ClientSettings, retryable
from .endpoints import (DISCOVERY_PATH, ENDPOINT_TYPE_DIRECT, InstanceTable, Target, TransportError,
                        _Answer, connect_error, parse_discovery, tls_context)
from .errors import PredictException, from_response

log = logging.getLogger("infergate.sdk")

__all__ = ["AsyncPredictClient", "AsyncHostPool", "fetch_instances_async"]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, where: str):
        self.loop = loop
        self.where = where
        self.transport = None
        self.closed = False
        self.waiter: asyncio.Future | None = None
        self.answer: _Answer | None = None
        self.parser = None
        self.got = False
        self.timer = None

    # protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # nothing asked: the connection is not reusable
            self.close()
            return
        self.got = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError(502, f"{self.where}: invalid HTTP answer: {exc}",
                                      before_response=False))
            self.close()
            return
        answer = self.answer
        if answer.done:
            self.parser = None
            body = answer.body
            self._finish((answer.status, body[0] if len(body) == 1 else b"".join(body),
                          answer.keep_alive))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            answer = self.answer
            if answer is not None and answer.headers_done and self.parser is not None:
                self._finish((answer.status, b"".join(answer.body), False))
            else:
                reason = f": {exc}" if exc else ""
                self._fail(TransportError(502, f"{self.where}: connection closed before a "
                                               f"complete answer{reason}",
                                          before_response=not self.got))

    # helpers
    def _finish(self, result) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def _fail(self, exc: BaseException) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _timed_out(self) -> None:
        self.timer = None
        self._fail(TransportError(504, f"{self.where}: timed out waiting for the answer",
                                  before_response=not self.got))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes, body: bytes, timeout: float):
        """``(status, body, keep_alive)`` of one request."""
        if self.closed:
            raise TransportError(502, f"{self.where}: connection closed")
        self.answer = _Answer()
        self.parser = self.answer.parser
        self.got = False
        self.waiter = waiter = self.loop.create_future()
        self.timer = self.loop.call_later(max(timeout, 0.0), self._timed_out)
        if not body:
            self.transport.write(head)
        elif len(body) > 65536:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head + body)
        try:
            return await waiter
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self.waiter = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None


async def _connect(host: str, port: int, timeout: float, tls: bool) -> _Connection:
    loop = asyncio.get_running_loop()
    where = f"{host}:{port}"
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(loop, where), host, port,
                                   ssl=tls_context() if tls else None),
            max(timeout, 0.001))
    except (asyncio.TimeoutError, OSError) as exc:
        raise connect_error(host, port, exc if isinstance(exc, OSError) else TimeoutError())
    return conn


class AsyncHostPool:
    """Idle keep-alive connections to one host."""

    def __init__(self, host: str, port: int, max_size: int = 100, tls: bool = False):
        self.host = host
        self.port = port
        self.tls = tls
        self.max_size = max(1, int(max_size))
        self.host_line = (f"Host: {host}:{port}\r\n" if ":" not in host
                          else f"Host: [{host}]:{port}\r\n").encode("latin-1")
        self.idle: collections.deque[_Connection] = collections.deque()
        self.closed = False

    async def request(self, start: bytes, headers: bytes, body: bytes,
                      timeout: float) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        head = b"".join((start, self.host_line, headers, b"\r\n"))
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                status, data, keep = await conn.request(head, body, timeout)
            except TransportError as exc:
                conn.close()
                if not exc.before_response or exc.code == 504:
                    raise
                break  # a stale keep-alive connection: once more on a fresh one
            self._release(conn, keep)
            return status, data
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportError(504, f"{self.host}:{self.port}: timed out")
        conn = await _connect(self.host, self.port, remaining, self.tls)
        try:
            status, data, keep = await conn.request(head, body, deadline - time.monotonic())
        except TransportError:
            conn.close()
            raise
        self._release(conn, keep)
        return status, data

    def _release(self, conn: _Connection, keep: bool) -> None:
        if keep and not conn.closed and not self.closed and len(self.idle) < self.max_size:
            self.idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().close()


async def fetch_instances_async(target: Target, service: str,
                                timeout: float = 5.0) -> list[tuple[str, int, int]]:
    """One discovery request (asyncio): the instances ``target`` announces for ``service``."""
    path = f"{target.prefix}{DISCOVERY_PATH}{service.split('/')[0]}"
    head = (f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            f"Accept: application/json\r\n\r\n").encode("latin-1")
    try:
        conn = await _connect(target.host, target.port, timeout, target.tls)
        try:
            status, body, _ = await conn.request(head, b"", timeout)
        finally:
            conn.close()
    except TransportError as exc:
        raise PredictException(exc.code, f"service discovery at {target!r}: {exc.message}") from None
    if status != 200:
        raise PredictException(status, f"service discovery for {service!r} at {target!r}: "
                                       f"{from_response(status, body).message}")
    try:
        return parse_discovery(body)
    except (ValueError, KeyError, TypeError) as exc:
        raise PredictException(502, f"service discovery for {service!r} at {target!r}: "
                                    f"unexpected answer ({exc!r})") from None


class AsyncPredictClient(ClientSettings):
    """asyncio client: ``await init()``, ``await predict(req)``, ``await destroy()``."""

    def __init__(self, endpoint: str = "", service_name: str = ""):
        super().__init__(endpoint, service_name)
        self.table: InstanceTable | None = None
        self._task: asyncio.Task | None = None
        self.last_discovery_error: PredictException | None = None

    async def init(self) -> "AsyncPredictClient":
        self._prepare()
        target = self.target
        size = self.max_connection_count
        self.table = InstanceTable(lambda ip, port: AsyncHostPool(ip, port, size, target.tls),
                                   down_seconds=self.down_seconds)
        if self.endpoint_type == ENDPOINT_TYPE_DIRECT:
            await self.refresh()
            self._task = asyncio.get_running_loop().create_task(self._refresher())
        else:
            self.table.update([(target.host, target.port, 1)])
        return self

    async def refresh(self) -> bool:
        """Direct mode: refresh the instance list now (True when it changed)."""
        if self.endpoint_type != ENDPOINT_TYPE_DIRECT or self.table is None:
            return False
        items = await fetch_instances_async(self.target, self.service_name,
                                            max(self.timeout / 1000.0, 1.0))
        return self.table.update(items)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.discovery_interval)
            try:
                await self.refresh()
                self.last_discovery_error = None
            except PredictException as exc:
                self.last_discovery_error = exc
                log.warning("%s (keeping the previous instance list)", exc.message)
            except Exception as exc:  # never let the refresher die
                log.exception("service discovery failed: %r", exc)

    async def predict(self, req):
        table = self.table
        if table is None:
            raise PredictException(500, "await init() before predict()")
        body, headers = self._encode(req)
        start = self.start_line
        timeout = self.timeout / 1000.0
        tried: list[str] = []
        error = None
        for _ in range(self.retry_count):
            inst = table.pick(tried)
            if inst is None:
                if error is None:
                    message = f"no instance of service {self.service_name!r} is available"
                    if self.last_discovery_error is not None:
                        message += f" (last discovery error: {self.last_discovery_error.message})"
                    error = PredictException(503, message)
                break
            tried.append(inst.key)
            try:
                status, data = await inst.pool.request(start, headers, body, timeout)
            except TransportError as exc:
                table.failed(inst, down=exc.connect)
                error = PredictException(exc.code, exc.message)
                continue
            if status == 200:
                table.succeeded(inst)
                if self.count_by_instance:
                    self._count(inst.key)
                return req.parse_response(data)
            error = from_response(status, data)
            if not retryable(status):
                raise error
            table.failed(inst)
        raise error

    def instances(self) -> list[tuple[str, int, int]]:
        return [(i.ip, i.port, i.weight) for i in self.table.instances] if self.table else []

    async def destroy(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if self.table is not None:
            self.table.close()
            self.table = None

    close = destroy

    async def __aenter__(self) -> "AsyncPredictClient":
        if self.table is None:
            await self.init()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.destroy()
