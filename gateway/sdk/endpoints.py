"""The sync client's I/O: blocking sockets to the gateway or the service's instances.

* ``HttpConnection`` / ``HostPool``: a blocking HTTP/1.1 keep-alive connection
  (sockets + the httptools response parser, no dependency beyond the package's)
  and a per-host pool of idle ones, used by the sync client and for discovery.
* ``fetch_instances`` / ``DiscoveryThread``: the discovery request
  ``GET <endpoint>/api/v1/servicediscovery/upstreams/<service>`` (the same
  request eas-prediction makes in direct mode) and the background thread that
  refreshes the table every few seconds, never on the request path.

What the bytes mean (framing, retries, discovery answers, the instance table
and its picker) is decided in ``core.py``, shared with the asyncio client; the
names are re-exported here for existing imports.
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time

from .core import (DEFAULT_WEIGHT, DISCOVERY_PATH, ENDPOINT_TYPE_DEFAULT, ENDPOINT_TYPE_DIRECT,
                   ENDPOINT_TYPE_GATEWAY, Instance, InstanceTable, ResponseReader, Target,
                   TransportError, connect_error, discovery_answer, discovery_failed,
                   discovery_head, discovery_signature, host_line, install,
                   normalize_endpoint_type, parse_discovery, parse_endpoint, refresh_failed,
                   stale_connection, tls_context)
from .errors import PredictException

log = logging.getLogger("infergate.sdk")

__all__ = [
    "ENDPOINT_TYPE_GATEWAY", "ENDPOINT_TYPE_DIRECT", "ENDPOINT_TYPE_DEFAULT", "Target",
    "TransportError", "HttpConnection", "HostPool", "Instance", "InstanceTable",
    "DiscoveryThread", "normalize_endpoint_type", "parse_endpoint", "parse_discovery",
    "fetch_instances", "DEFAULT_WEIGHT", "DISCOVERY_PATH",
]


# --- blocking HTTP/1.1 ---------------------------------------------------------------------
class HttpConnection:
    """One blocking keep-alive connection."""

    __slots__ = ("host", "port", "sock", "used")

    def __init__(self, host: str, port: int, timeout: float, tls: bool = False):
        self.host = host
        self.port = port
        self.used = False
        try:
            sock = socket.create_connection((host, port), timeout)
        except OSError as exc:
            raise connect_error(host, port, exc) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            try:
                sock = tls_context().wrap_socket(sock, server_hostname=host)
            except OSError as exc:
                sock.close()
                raise connect_error(host, port, exc) from None
        self.sock = sock

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def request(self, head: bytes, body: bytes, deadline: float) -> tuple[int, bytes, bool]:
        """Send one request, read its answer: ``(status, body, keep_alive)``."""
        self.used = True
        sock = self.sock
        where = f"{self.host}:{self.port}"
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            sock.settimeout(remaining)
            if body and len(body) > 65536:
                sock.sendall(head)
                sock.sendall(body)
            else:
                sock.sendall(head + body if body else head)
        except (socket.timeout, TimeoutError):
            raise TransportError(504, f"{where}: timed out sending the request") from None
        except OSError as exc:
            raise TransportError(502, f"{where}: sending failed: {exc}") from None
        answer = ResponseReader(where)
        while not answer.done:
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                sock.settimeout(remaining)
                data = sock.recv(262144)
            except (socket.timeout, TimeoutError):
                raise TransportError(504, f"{where}: timed out waiting for the answer",
                                     before_response=not answer.got) from None
            except OSError as exc:
                raise TransportError(502, f"{where}: connection failed: {exc}",
                                     before_response=not answer.got) from None
            if not data:
                return answer.eof()  # the answer, if the end of the connection ends it
            answer.feed(data)
        return answer.result()


class HostPool:
    """Idle keep-alive connections to one host (at most ``max_size`` kept; more may be
    open at once under load, like urllib3's non-blocking pools)."""

    def __init__(self, host: str, port: int, max_size: int = 100, tls: bool = False):
        self.host = host
        self.port = port
        self.tls = tls
        self.max_size = max(1, int(max_size))
        self.host_line = host_line(host, port)
        self.idle: collections.deque[HttpConnection] = collections.deque()
        self.closed = False

    def request(self, start: bytes, headers: bytes, body: bytes,
                timeout: float) -> tuple[int, bytes]:
        """``start`` is the request line (with CRLF), ``headers`` the header lines after
        Host (each with CRLF, not the blank line). Returns ``(status, body)``."""
        deadline = time.monotonic() + timeout
        head = b"".join((start, self.host_line, headers, b"\r\n"))
        conn = None
        while self.idle:
            try:
                conn = self.idle.pop()
                break
            except IndexError:
                conn = None
        if conn is not None:
            try:
                status, data, keep = conn.request(head, body, deadline)
            except TransportError as exc:
                conn.close()
                if not stale_connection(exc):
                    raise
                conn = None  # a stale keep-alive connection: once more on a fresh one
            else:
                self._release(conn, keep)
                return status, data
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportError(504, f"{self.host}:{self.port}: timed out")
        conn = HttpConnection(self.host, self.port, remaining, self.tls)
        try:
            status, data, keep = conn.request(head, body, deadline)
        except TransportError:
            conn.close()
            raise
        self._release(conn, keep)
        return status, data

    def _release(self, conn: HttpConnection, keep: bool) -> None:
        if keep and not self.closed and len(self.idle) < self.max_size:
            self.idle.append(conn)
            if self.closed:  # closed meanwhile
                self._drain()
        else:
            conn.close()

    def _drain(self) -> None:
        while self.idle:
            try:
                self.idle.pop().close()
            except IndexError:
                break

    def close(self) -> None:
        self.closed = True
        self._drain()


def fetch_instances(target: Target, service: str, timeout: float = 5.0,
                    headers: dict | None = None) -> list[tuple[str, int, int]]:
    """One discovery request: the instances of ``service`` that ``target`` announces."""
    head = discovery_head(target, service, headers)
    try:
        conn = HttpConnection(target.host, target.port, timeout, target.tls)
        try:
            status, body, _ = conn.request(head, b"", time.monotonic() + timeout)
        finally:
            conn.close()
    except TransportError as exc:
        raise discovery_failed(target, exc) from None
    return discovery_answer(target, service, status, body)


class DiscoveryThread(threading.Thread):
    """Refreshes an InstanceTable from the discovery answer every ``interval`` seconds."""

    def __init__(self, target: Target, service: str, table: InstanceTable, interval: float,
                 timeout: float = 5.0, token: str = ""):
        super().__init__(name=f"infergate-sdk-discovery-{service}", daemon=True)
        self.target = target
        self.service = service
        self.table = table
        self.interval = interval
        self.timeout = timeout
        self.token = token
        self.stopped = threading.Event()
        self.last_error: PredictException | None = None
        self.refreshes = 0  # successful refreshes so far

    def refresh(self) -> bool:
        items = fetch_instances(self.target, self.service, self.timeout,
                                discovery_signature(self.token, self.service))
        changed = install(self.table, self.service, items)
        self.refreshes += 1
        return changed

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # never let the refresher die
                if isinstance(exc, PredictException):
                    self.last_error = exc
                refresh_failed(exc)

    def stop(self, wait: float = 1.0) -> None:
        self.stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(wait)
