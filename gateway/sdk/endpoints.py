"""Where requests go: the gateway, or the service's instances (direct mode).

* ``HttpConnection`` / ``HostPool``: a blocking HTTP/1.1 keep-alive connection
  (sockets + the httptools response parser, no dependency beyond the package's)
  and a per-host pool of idle ones, used by the sync client and for discovery.
* ``InstanceTable``: the client's local copy of the instance list with the
  compiled smooth WRR picker (``gateway._native.picker``), one connection pool
  per instance, failure accounting (a connect failure takes an instance out of
  rotation for ``down_seconds``), and ``pick(tried)`` that never returns an
  instance the request already tried while others remain. Safe to use from
  many threads (the picker runs under the GIL; the table is swapped whole).
* ``fetch_instances`` / ``DiscoveryThread``: the discovery request
  ``GET <endpoint>/api/v1/servicediscovery/upstreams/<service>`` (the same
  request eas-prediction makes in direct mode) and the background thread that
  refreshes the table every few seconds, never on the request path.
"""
from __future__ import annotations

import collections
import json
import logging
import socket
import ssl as _ssl
import threading
import time
from urllib.parse import urlsplit

import httptools

from .._native.picker import SmoothWeightedPicker
from .errors import PredictException

log = logging.getLogger("infergate.sdk")

ENDPOINT_TYPE_GATEWAY = "GATEWAY"
ENDPOINT_TYPE_DIRECT = "DIRECT"
ENDPOINT_TYPE_DEFAULT = "DEFAULT"  # eas-prediction's name for the gateway

DISCOVERY_PATH = "/api/v1/servicediscovery/upstreams/"
DEFAULT_WEIGHT = 100

__all__ = [
    "ENDPOINT_TYPE_GATEWAY", "ENDPOINT_TYPE_DIRECT", "ENDPOINT_TYPE_DEFAULT", "Target",
    "TransportError", "HttpConnection", "HostPool", "Instance", "InstanceTable",
    "DiscoveryThread", "normalize_endpoint_type", "parse_endpoint", "parse_discovery",
    "fetch_instances",
]


def normalize_endpoint_type(kind: str | None) -> str:
    """GATEWAY or DIRECT; '' / None / 'DEFAULT' (eas-prediction's names) mean GATEWAY."""
    value = (kind or "").strip().upper()
    if value in ("", ENDPOINT_TYPE_DEFAULT, ENDPOINT_TYPE_GATEWAY):
        return ENDPOINT_TYPE_GATEWAY
    if value == ENDPOINT_TYPE_DIRECT:
        return ENDPOINT_TYPE_DIRECT
    raise PredictException(500, f"unsupported endpoint type: {kind!r} (use "
                                f"{ENDPOINT_TYPE_GATEWAY!r} or {ENDPOINT_TYPE_DIRECT!r})")


class Target:
    """A parsed endpoint: scheme, host, port and path prefix."""

    __slots__ = ("scheme", "host", "port", "prefix")

    def __init__(self, scheme: str, host: str, port: int, prefix: str):
        self.scheme, self.host, self.port, self.prefix = scheme, host, port, prefix

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def __repr__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"


def parse_endpoint(endpoint: str) -> Target:
    """``http://host:port``, ``host:port``, ``https://host`` (a path is kept as a prefix)."""
    if not endpoint:
        raise PredictException(500, "the endpoint is not set")
    text = endpoint.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise PredictException(500, f"unsupported endpoint scheme in {endpoint!r}")
    try:
        port = parts.port
    except ValueError:
        raise PredictException(500, f"invalid port in endpoint {endpoint!r}") from None
    if not parts.hostname:
        raise PredictException(500, f"no host in endpoint {endpoint!r}")
    return Target(scheme, parts.hostname, port or (443 if scheme == "https" else 80),
                  parts.path.rstrip("/"))


def parse_discovery(body: bytes) -> list[tuple[str, int, int]]:
    """``(ip, port, weight)`` of each item of a discovery answer."""
    doc = json.loads(body)
    items = doc["endpoints"]["items"] or []
    out = []
    for item in items:
        weight = item.get("weight")
        out.append((str(item["ip"]), int(item["port"]),
                    DEFAULT_WEIGHT if weight is None else int(weight)))
    return out


# --- blocking HTTP/1.1 ---------------------------------------------------------------------
class TransportError(Exception):
    """A request got no complete HTTP answer. ``code`` is what PredictException reports
    (502 reset or bad answer, 503 connect failure, 504 timeout); ``connect`` is True
    when no connection could be made; ``before_response`` when no byte of an answer
    came (a reused keep-alive connection that fails so may just have gone stale)."""

    def __init__(self, code: int, message: str, connect: bool = False,
                 before_response: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.connect = connect
        self.before_response = before_response


_tls_context = None


def tls_context():
    global _tls_context
    if _tls_context is None:
        _tls_context = _ssl.create_default_context()
    return _tls_context


def connect_error(host: str, port: int, exc: BaseException) -> TransportError:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransportError(504, f"connect to {host}:{port} timed out", connect=True)
    return TransportError(503, f"cannot connect to {host}:{port}: {exc}", connect=True)


class _Answer:
    """httptools callbacks for one response (keep-alive must be read at the end of the
    headers: after the message, llhttp no longer reports it)."""

    __slots__ = ("body", "headers_done", "done", "parser", "status", "keep_alive")

    def __init__(self):
        self.body = []
        self.headers_done = False
        self.done = False
        self.status = 0
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self):
        self.headers_done = True
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes):
        self.body.append(data)

    def on_message_complete(self):
        self.done = True
        self.parser = None  # no reference cycle left behind


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
        answer = _Answer()
        parser = answer.parser
        got = False
        while not answer.done:
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                sock.settimeout(remaining)
                data = sock.recv(262144)
            except (socket.timeout, TimeoutError):
                raise TransportError(504, f"{where}: timed out waiting for the answer",
                                     before_response=not got) from None
            except OSError as exc:
                raise TransportError(502, f"{where}: connection failed: {exc}",
                                     before_response=not got) from None
            if not data:
                if answer.headers_done:  # an answer delimited by the end of the connection
                    return answer.status, b"".join(answer.body), False
                raise TransportError(502, f"{where}: connection closed before a complete "
                                          "answer", before_response=not got)
            got = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                raise TransportError(502, f"{where}: unexpected protocol upgrade",
                                     before_response=False) from None
            except httptools.HttpParserError as exc:
                raise TransportError(502, f"{where}: invalid HTTP answer: {exc}",
                                     before_response=False) from None
        body = answer.body
        return answer.status, body[0] if len(body) == 1 else b"".join(body), answer.keep_alive


class HostPool:
    """Idle keep-alive connections to one host (at most ``max_size`` kept; more may be
    open at once under load, like urllib3's non-blocking pools)."""

    def __init__(self, host: str, port: int, max_size: int = 100, tls: bool = False):
        self.host = host
        self.port = port
        self.tls = tls
        self.max_size = max(1, int(max_size))
        self.host_line = (f"Host: {host}:{port}\r\n" if ":" not in host
                          else f"Host: [{host}]:{port}\r\n").encode("latin-1")
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
                if not exc.before_response or exc.code == 504:
                    raise
                # A stale keep-alive connection: once more on a fresh one.
                conn = None
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
    path = f"{target.prefix}{DISCOVERY_PATH}{service.split('/')[0]}"
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            f"Accept: application/json\r\n{extra}\r\n").encode("latin-1")
    try:
        conn = HttpConnection(target.host, target.port, timeout, target.tls)
        try:
            status, body, _ = conn.request(head, b"", time.monotonic() + timeout)
        finally:
            conn.close()
    except TransportError as exc:
        raise PredictException(exc.code, f"service discovery at {target!r}: {exc.message}") from None
    if status != 200:
        from .errors import from_response
        err = from_response(status, body)
        raise PredictException(status, f"service discovery for {service!r} at {target!r}: "
                                       f"{err.message}")
    try:
        return parse_discovery(body)
    except (ValueError, KeyError, TypeError) as exc:
        raise PredictException(502, f"service discovery for {service!r} at {target!r}: "
                                    f"unexpected answer ({exc!r})") from None


# --- the local instance table ----------------------------------------------------------------
class Instance:
    __slots__ = ("key", "ip", "port", "weight", "index", "pool", "picker")

    def __init__(self, ip, port, weight, index, pool, picker):
        self.key = f"{ip}:{port}"
        self.ip = ip
        self.port = port
        self.weight = weight
        self.index = index
        self.pool = pool
        self.picker = picker

    def __repr__(self) -> str:
        return f"Instance({self.key}, weight={self.weight})"


class _Snapshot:
    __slots__ = ("instances", "picker", "by_key", "items")

    def __init__(self, items, pools):
        self.items = items
        self.picker = SmoothWeightedPicker(list(range(len(items))), [w for _, _, w in items])
        self.instances = tuple(Instance(ip, port, w, i, pools[f"{ip}:{port}"], self.picker)
                               for i, (ip, port, w) in enumerate(items))
        self.by_key = {inst.key: inst for inst in self.instances}


class InstanceTable:
    """The local instance list, its picker and per-instance pools.

    ``make_pool(ip, port)`` creates a pool, ``close_pool(pool)`` disposes of one
    whose instance left (may return an awaitable: the async client's pools).
    """

    def __init__(self, make_pool, close_pool=None, down_seconds: float = 1.0):
        self.make_pool = make_pool
        self.close_pool = close_pool or (lambda pool: pool.close())
        self.down_seconds = down_seconds
        self.pools: dict[str, object] = {}
        self.snapshot = _Snapshot((), self.pools)
        self.down: dict[str, float] = {}  # key -> monotonic time it may be tried again
        self.next_up = float("inf")
        self.updated_at = 0.0
        self.lock = threading.Lock()

    @property
    def instances(self) -> tuple[Instance, ...]:
        return self.snapshot.instances

    def update(self, items) -> bool:
        """Install a new instance list (``(ip, port, weight)`` items); False if unchanged."""
        items = tuple(sorted((str(ip), int(port), max(0, int(w))) for ip, port, w in items))
        with self.lock:
            self.updated_at = time.monotonic()
            if items == self.snapshot.items:
                return False
            keys = {f"{ip}:{port}" for ip, port, _ in items}
            for ip, port, _ in items:
                key = f"{ip}:{port}"
                if key not in self.pools:
                    self.pools[key] = self.make_pool(ip, port)
            snap = _Snapshot(items, self.pools)
            for key in list(self.down):
                if key in snap.by_key:
                    snap.picker.set_down(snap.by_key[key].index, True)
                else:
                    del self.down[key]
            gone = [self.pools.pop(key) for key in list(self.pools) if key not in keys]
            self.snapshot = snap
        for pool in gone:
            try:
                self.close_pool(pool)
            except Exception:  # pragma: no cover - closing is best effort
                pass
        return True

    def pick(self, tried=None) -> Instance | None:
        """The next instance by smooth WRR, skipping those in ``tried`` (keys) while
        others remain and those marked down while others are up."""
        if self.down and time.monotonic() >= self.next_up:
            self._restore()
        snap = self.snapshot
        if not tried:
            i = snap.picker.pick_index()
            if i >= 0:
                return snap.instances[i]
            return self._fallback(snap, ())
        by_key = snap.by_key
        indexes = tuple(by_key[key].index for key in tried if key in by_key)
        i = snap.picker.pick_index(indexes)
        if i >= 0:
            return snap.instances[i]
        return self._fallback(snap, tried)

    def _fallback(self, snap: _Snapshot, tried) -> Instance | None:
        # Every untried instance is marked down (or there is none): try the untried one
        # that went down first, then, once all were tried, start over.
        live = [inst for inst in snap.instances if inst.weight > 0]
        if not live:
            return None
        untried = [inst for inst in live if inst.key not in tried]
        if untried:
            return min(untried, key=lambda inst: self.down.get(inst.key, 0.0))
        i = snap.picker.pick_index()
        if i >= 0:
            return snap.instances[i]
        return min(live, key=lambda inst: self.down.get(inst.key, 0.0))

    def failed(self, inst: Instance, down: bool = False) -> None:
        inst.picker.report_failure(inst.index)
        if down:
            until = time.monotonic() + self.down_seconds
            with self.lock:
                if self.snapshot.by_key.get(inst.key) is inst:
                    inst.picker.set_down(inst.index, True)
                self.down[inst.key] = until
                self.next_up = min(self.next_up, until)

    @staticmethod
    def succeeded(inst: Instance) -> None:
        inst.picker.report_success(inst.index)

    def _restore(self) -> None:
        now = time.monotonic()
        with self.lock:
            snap = self.snapshot
            for key, until in list(self.down.items()):
                if until <= now:
                    del self.down[key]
                    inst = snap.by_key.get(key)
                    if inst is not None:
                        snap.picker.set_down(inst.index, False)
            self.next_up = min(self.down.values(), default=float("inf"))

    def close(self) -> None:
        with self.lock:
            pools = list(self.pools.values())
            self.pools.clear()
            self.snapshot = _Snapshot((), self.pools)
        for pool in pools:
            try:
                self.close_pool(pool)
            except Exception:  # pragma: no cover
                pass


class DiscoveryThread(threading.Thread):
    """Refreshes an InstanceTable from the discovery answer every ``interval`` seconds."""

    def __init__(self, target: Target, service: str, table: InstanceTable, interval: float,
                 timeout: float = 5.0):
        super().__init__(name=f"infergate-sdk-discovery-{service}", daemon=True)
        self.target = target
        self.service = service
        self.table = table
        self.interval = interval
        self.timeout = timeout
        self.stopped = threading.Event()
        self.last_error: PredictException | None = None
        self.refreshes = 0  # successful refreshes so far

    def refresh(self) -> bool:
        items = fetch_instances(self.target, self.service, self.timeout)
        changed = self.table.update(items)
        self.refreshes += 1
        if changed:
            log.info("service %r instances: %s", self.service,
                     ", ".join(f"{ip}:{port}@{w}" for ip, port, w in sorted(items)) or "none")
        return changed

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.refresh()
                self.last_error = None
            except PredictException as exc:
                self.last_error = exc
                log.warning("%s (keeping the previous instance list)", exc.message)
            except Exception as exc:  # never let the refresher die
                log.exception("service discovery failed: %r", exc)

    def stop(self, wait: float = 1.0) -> None:
        self.stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(wait)
