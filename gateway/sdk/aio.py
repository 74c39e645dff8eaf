"""The asyncio client: ``AsyncPredictClient``, the same surface with ``await``.

    client = AsyncPredictClient("http://127.0.0.1:8080", "digits")
    client.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
    await client.init()
    resp = await client.predict(req)
    await client.destroy()            # or: async with AsyncPredictClient(...) as client

Connections are asyncio protocols parsing answers with httptools, kept alive in
a pool per host; in direct mode a task refreshes the instance list every
``discovery_interval`` seconds. Picking, retries, answer framing, discovery and
errors are those of the sync client: both run the rules of ``core.py``; this
module only does the asyncio I/O. Use one client per event loop.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

from .core import (ENDPOINT_TYPE_DIRECT, ClientSettings, InstanceTable, ResponseReader, Target,
                   TransportError, connect_error, discovery_answer, discovery_failed,
                   discovery_head, discovery_signature, host_line, install, refresh_failed,
                   stale_connection, tls_context)
from .errors import PredictException

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
        self.answer: ResponseReader | None = None  # the answer being read, if any
        self.timer = None

    # protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None:  # nothing asked: the connection is not reusable
            self.close()
            return
        try:
            answer.feed(data)
        except TransportError as exc:
            self._fail(exc)
            self.close()
            return
        if answer.done:
            self.answer = None
            self._finish(answer.result())

    def connection_lost(self, exc) -> None:
        self.closed = True
        answer, self.answer = self.answer, None
        if self.waiter is None or self.waiter.done():
            return
        reason = f": {exc}" if exc else ""
        if answer is None:
            self._fail(TransportError(502, f"{self.where}: connection closed{reason}"))
            return
        try:
            result = answer.eof(reason)  # the answer, if the end of the connection ends it
        except TransportError as error:
            self._fail(error)
        else:
            self._finish(result)

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
        got = self.answer is not None and self.answer.got
        self._fail(TransportError(504, f"{self.where}: timed out waiting for the answer",
                                  before_response=not got))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes, body: bytes, timeout: float):
        """``(status, body, keep_alive)`` of one request."""
        if self.closed:
            raise TransportError(502, f"{self.where}: connection closed")
        self.answer = ResponseReader(self.where)
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
            self.answer = None
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
        self.host_line = host_line(host, port)
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
                if not stale_connection(exc):
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


async def fetch_instances_async(target: Target, service: str, timeout: float = 5.0,
                                headers: dict | None = None) -> list[tuple[str, int, int]]:
    """One discovery request (asyncio): the instances ``target`` announces for ``service``."""
    head = discovery_head(target, service, headers)
    try:
        conn = await _connect(target.host, target.port, timeout, target.tls)
        try:
            status, body, _ = await conn.request(head, b"", timeout)
        finally:
            conn.close()
    except TransportError as exc:
        raise discovery_failed(target, exc) from None
    return discovery_answer(target, service, status, body)


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
                                            max(self.timeout / 1000.0, 1.0),
                                            discovery_signature(self.token, self.service_name))
        return install(self.table, self.service_name, items)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.discovery_interval)
            try:
                await self.refresh()
                self.last_discovery_error = None
            except Exception as exc:  # never let the refresher die
                if isinstance(exc, PredictException):
                    self.last_discovery_error = exc
                refresh_failed(exc)

    async def predict(self, req):
        table = self.table
        if table is None:
            raise PredictException(500, "await init() before predict()")
        start, body, headers = self._encode(req)
        timeout = self.timeout / 1000.0
        attempts = self._attempts(table)
        while (inst := attempts.next()) is not None:
            try:
                status, data = await inst.pool.request(start, headers, body, timeout)
            except TransportError as exc:
                attempts.transport_failed(inst, exc)
                continue
            if attempts.answered(inst, status, data):
                return req.parse_response(data)
        raise attempts.error

    def _last_discovery_error(self) -> PredictException | None:
        return self.last_discovery_error

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
