"""What the sync and the asyncio client share: every rule of the SDK, none of its I/O.

``client.py`` + ``endpoints.py`` (blocking sockets, a discovery thread) and
``aio.py`` (asyncio protocols, a discovery task) only move bytes; what those
bytes mean is decided here, once:

* endpoints: ``parse_endpoint``, ``normalize_endpoint_type``;
* requests: ``ClientSettings`` (the setters), the request line, the header
  lines and the EAS signature of each request (``ClientSettings._encode``),
  ``host_line``;
* answers: ``ResponseReader`` parses one HTTP/1.1 answer and applies the
  framing rules (end of connection ends a body only when the answer had
  neither Content-Length nor chunked encoding; anything cut short is a
  ``TransportError``);
* retries: ``retryable`` (which statuses are worth another instance),
  ``Attempts`` (one predict call's loop: pick, never the same instance twice,
  what each outcome means, the error raised at the end), ``stale_connection``
  (when a failure on a reused keep-alive connection is retried once on a
  fresh one, outside the attempt count);
* discovery: ``discovery_head`` (the request eas-prediction makes),
  ``discovery_answer`` / ``discovery_failed`` (its outcome), ``parse_discovery``;
* ``InstanceTable``: the local instance list with the compiled smooth WRR picker.
"""
from __future__ import annotations

import json
import logging
import socket
import ssl as _ssl
import threading
import time
from urllib.parse import urlsplit

import httptools

from .. import auth
from .._native.picker import SmoothWeightedPicker
from .errors import PredictException, from_response
from .requests import DEFAULT_CONTENT_TYPE

log = logging.getLogger("infergate.sdk")

ENDPOINT_TYPE_GATEWAY = "GATEWAY"
ENDPOINT_TYPE_DIRECT = "DIRECT"
ENDPOINT_TYPE_DEFAULT = "DEFAULT"  # eas-prediction's name for the gateway

DISCOVERY_PATH = "/api/v1/servicediscovery/upstreams/"
DEFAULT_WEIGHT = 100

__all__ = [
    "ENDPOINT_TYPE_GATEWAY", "ENDPOINT_TYPE_DIRECT", "ENDPOINT_TYPE_DEFAULT", "DISCOVERY_PATH",
    "Target", "normalize_endpoint_type", "parse_endpoint", "TransportError", "connect_error",
    "tls_context", "ResponseReader", "host_line", "stale_connection", "retryable", "Attempts",
    "ClientSettings", "discovery_head", "discovery_answer", "discovery_failed",
    "parse_discovery", "install", "refresh_failed", "Instance", "InstanceTable",
]


# --- endpoints -------------------------------------------------------------------------------
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


def host_line(host: str, port: int) -> bytes:
    """The ``Host:`` header line (with CRLF) for a connection to ``host:port``."""
    return (f"Host: {host}:{port}\r\n" if ":" not in host
            else f"Host: [{host}]:{port}\r\n").encode("latin-1")


# --- transport failures ----------------------------------------------------------------------
class TransportError(Exception):
    """A request got no complete HTTP answer. ``code`` is what PredictException reports
    (502 reset, cut-off or bad answer, 503 connect failure, 504 timeout); ``connect``
    is True when no connection could be made; ``before_response`` when no byte of an
    answer came (a reused keep-alive connection that fails so may just have gone stale)."""

    def __init__(self, code: int, message: str, connect: bool = False,
                 before_response: bool = True):
        super().__init__(message)
        self.code = code
        self.message = message
        self.connect = connect
        self.before_response = before_response


_tls_context = None


def tls_context() -> _ssl.SSLContext:
    """The client's TLS context (the system's trust store), made once."""
    global _tls_context
    if _tls_context is None:
        _tls_context = _ssl.create_default_context()
    return _tls_context


def connect_error(host: str, port: int, exc: BaseException) -> TransportError:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransportError(504, f"connect to {host}:{port} timed out", connect=True)
    return TransportError(503, f"cannot connect to {host}:{port}: {exc}", connect=True)


def stale_connection(exc: TransportError) -> bool:
    """A failure on a *reused* keep-alive connection that is worth once more on a fresh
    connection to the same host, outside the attempt count: the server closed the idle
    connection before any byte of an answer came (not a timeout: that one spent the time)."""
    return exc.before_response and exc.code != 504


# --- answers: parsing and framing ------------------------------------------------------------
class ResponseReader:
    """One HTTP/1.1 answer, parsed by httptools, with the framing rules.

    ``feed(data)`` as bytes arrive (raises TransportError on a bad answer); ``done``
    once the message is complete, then ``result()``; ``eof(reason)`` when the
    connection ends first: the answer, if its body was delimited by the end of the
    connection (neither Content-Length nor chunked encoding), else TransportError 502
    (a cut-off answer is never a success). Keep-alive is read at the end of the
    headers: after the message, llhttp no longer reports it.
    """

    __slots__ = ("where", "body", "received", "headers_done", "done", "parser", "status",
                 "keep_alive", "length", "chunked", "got")

    def __init__(self, where: str = ""):
        self.where = where
        self.body: list[bytes] = []
        self.received = 0
        self.headers_done = False
        self.done = False
        self.got = False          # any byte of the answer arrived
        self.status = 0
        self.keep_alive = False
        self.length: int | None = None  # Content-Length, when the answer has one
        self.chunked = False
        self.parser = httptools.HttpResponseParser(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            try:
                self.length = int(value)
            except ValueError:  # llhttp refuses it itself; never take it for EOF framing
                self.length = -1
        elif name == b"transfer-encoding":
            # The final coding decides: chunked framing, else the body runs to the end.
            self.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self.body.append(data)
        self.received += len(data)

    def on_message_complete(self) -> None:
        self.done = True
        self.parser = None  # no reference cycle left behind

    # the client side
    def feed(self, data: bytes) -> None:
        self.got = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise TransportError(502, f"{self.where}: unexpected protocol upgrade",
                                 before_response=False) from None
        except httptools.HttpParserError as exc:
            raise TransportError(502, f"{self.where}: invalid HTTP answer: {exc}",
                                 before_response=False) from None

    def result(self) -> tuple[int, bytes, bool]:
        """``(status, body, keep_alive)`` of a complete answer."""
        body = self.body
        return self.status, body[0] if len(body) == 1 else b"".join(body), self.keep_alive

    @property
    def delimited_by_eof(self) -> bool:
        """The answer's body ends where the connection ends (no Content-Length, not chunked)."""
        return self.headers_done and self.length is None and not self.chunked

    def eof(self, reason: str = "") -> tuple[int, bytes, bool]:
        """The connection ended before ``done``: the answer, or TransportError 502."""
        if self.done:
            return self.result()
        if self.delimited_by_eof:
            status, body, _ = self.result()
            return status, body, False
        if not self.headers_done:
            what = "before a complete answer"
        elif self.length is not None and self.length >= 0:
            what = f"after {self.received} of {self.length} body bytes"
        else:
            what = f"in the middle of a chunked body ({self.received} bytes received)"
        raise TransportError(502, f"{self.where}: connection closed {what}{reason}",
                             before_response=not self.got)


# --- retries ---------------------------------------------------------------------------------
def retryable(status: int) -> bool:
    """Answers worth another instance: 450 (instance queue full) and every 5xx."""
    return status == 450 or status >= 500


class Attempts:
    """One predict call's retry loop, without its I/O; both clients run it the same way:

        attempts = Attempts(table, retry_count, no_instance_message, on_success)
        while (inst := attempts.next()) is not None:
            try:
                status, body = <one request on inst.pool>
            except TransportError as exc:
                attempts.transport_failed(inst, exc)
                continue
            if attempts.answered(inst, status, body):
                return req.parse_response(body)
        raise attempts.error

    At most ``retry_count`` attempts (eas-prediction's meaning: attempts in all),
    each on an instance this call has not tried while others remain. A transport
    failure (connect error, reset, cut-off answer, timeout), a 5xx or a 450 is
    retried; any other non-200 answer raises at once. The error raised at the end
    is the last failure's (503 when there was no instance at all).
    """

    __slots__ = ("table", "left", "tried", "error", "no_instance", "on_success")

    def __init__(self, table: "InstanceTable", retry_count: int, no_instance, on_success=None):
        self.table = table
        self.left = retry_count
        self.tried: list[str] = []
        self.error: PredictException | None = None
        self.no_instance = no_instance  # () -> message, read only when it is needed
        self.on_success = on_success    # (instance) -> None

    def next(self) -> "Instance | None":
        """The instance of the next attempt, or None when the call has failed (``error``)."""
        if self.left <= 0:
            return None
        self.left -= 1
        inst = self.table.pick(self.tried)
        if inst is None:
            if self.error is None:
                self.error = PredictException(503, self.no_instance())
            self.left = 0
            return None
        self.tried.append(inst.key)
        return inst

    def transport_failed(self, inst: "Instance", exc: TransportError) -> None:
        self.table.failed(inst, down=exc.connect)
        self.error = PredictException(exc.code, exc.message)
        log.debug("attempt on %s failed: %s", inst.key, exc.message)

    def answered(self, inst: "Instance", status: int, body: bytes) -> bool:
        """True for a success; False when the answer is worth another instance; raises
        the PredictException of an answer that is not."""
        if status == 200:
            if self.on_success is not None:
                self.on_success(inst)
            return True
        error = from_response(status, body)
        if not retryable(status):
            raise error
        self.table.failed(inst)
        self.error = error
        log.debug("attempt on %s answered %d: %s", inst.key, status, error.message)
        return False


# --- settings and request encoding -----------------------------------------------------------
class ClientSettings:
    """The setters and the request encoding shared by the sync and the asyncio client."""

    def __init__(self, endpoint: str = "", service_name: str = ""):
        self.endpoint_name = endpoint
        self.service_name = service_name
        self.token = ""
        self.endpoint_type = ENDPOINT_TYPE_GATEWAY
        self.retry_count = 5
        self.timeout = 5000
        self.max_connection_count = 100
        self.content_type = ""
        self.headers: dict[str, str] = {}
        self.discovery_interval = 3.0
        self.down_seconds = 1.0
        self.counts: dict[str, int] = {}
        self.count_by_instance = False
        self._count_lock = threading.Lock()

    def set_endpoint(self, endpoint: str) -> None:
        self.endpoint_name = endpoint

    def set_service_name(self, service_name: str) -> None:
        self.service_name = service_name

    def set_endpoint_type(self, endpoint_type: str) -> None:
        """ENDPOINT_TYPE_GATEWAY (or eas-prediction's 'DEFAULT') or ENDPOINT_TYPE_DIRECT."""
        self.endpoint_type = normalize_endpoint_type(endpoint_type)

    def set_token(self, token: str) -> None:
        self.token = token or ""

    def set_retry_count(self, count: int) -> None:
        """Attempts per request in all (eas-prediction's meaning), at least 1."""
        self.retry_count = max(1, int(count))

    def set_timeout(self, timeout: int) -> None:
        """Milliseconds per attempt."""
        self.timeout = int(timeout)

    def set_max_connection_count(self, count: int) -> None:
        """Idle keep-alive connections kept per host."""
        self.max_connection_count = max(1, int(count))

    def set_content_type(self, content_type: str) -> None:
        self.content_type = content_type

    def add_extra_headers(self, headers: dict) -> None:
        if not isinstance(headers, dict):
            raise TypeError("headers must be a dict")
        self.headers.update(headers)

    def set_discovery_interval(self, seconds: float) -> None:
        """Direct mode: seconds between refreshes of the instance list (default 3)."""
        if seconds <= 0:
            raise ValueError("the discovery interval must be positive")
        self.discovery_interval = float(seconds)

    def set_log_level(self, level) -> None:
        log.setLevel(level)

    def enable_instance_counts(self, enabled: bool = True) -> None:
        """Count successful answers by instance (``ip:port``) in ``instance_counts()``."""
        self.count_by_instance = enabled

    def instance_counts(self) -> dict[str, int]:
        return dict(self.counts)

    # --- shared request preparation ----------------------------------------------------------
    def _prepare(self) -> None:
        if not self.service_name:
            raise PredictException(500, "the service name is not set")
        self.target = parse_endpoint(self.endpoint_name)
        self.path = f"{self.target.prefix}/api/predict/{self.service_name}"
        self.start_line = f"POST {self.path} HTTP/1.1\r\n".encode("latin-1")
        self.static_headers = "".join(
            f"{k}: {v}\r\n" for k, v in self.headers.items()
            if k.lower() not in ("content-type", "content-length", "host", "authorization",
                                 "date", "content-md5")).encode("latin-1")
        self.default_content_type = (self.content_type or self.headers.get("Content-Type")
                                     or DEFAULT_CONTENT_TYPE)

    def _encode(self, req) -> tuple[bytes, bytes, bytes]:
        """The start line, the body and the header lines (after Host) of one request (a
        v2 InferRequest names its subpath and adds its own headers)."""
        body = req.to_string()
        if isinstance(body, str):
            body = body.encode("utf-8")
        elif not isinstance(body, bytes):
            body = bytes(body)
        subpath = req.subpath(self.service_name) if hasattr(req, "subpath") else ""
        start = self.start_line if not subpath else \
            f"POST {self.path}{subpath} HTTP/1.1\r\n".encode("latin-1")
        content_type = getattr(req, "content_type", None) or self.default_content_type
        if self.token:
            signed = auth.sign(self.token, body, self.service_name + subpath, content_type)
            lines = (f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     f"Content-MD5: {signed['Content-MD5']}\r\nDate: {signed['Date']}\r\n"
                     f"Authorization: {signed['Authorization']}\r\n")
        else:
            lines = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        if hasattr(req, "extra_headers"):
            lines += "".join(f"{k}: {v}\r\n" for k, v in req.extra_headers().items())
        return start, body, lines.encode("latin-1") + self.static_headers

    def _count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def _last_discovery_error(self) -> PredictException | None:
        """The error of the last background refresh, if it failed (each client says)."""
        return None

    def _no_instance_message(self) -> str:
        message = f"no instance of service {self.service_name!r} is available"
        error = self._last_discovery_error()
        if error is not None:
            message += f" (last discovery error: {error.message})"
        return message

    def _attempts(self, table: "InstanceTable") -> Attempts:
        """The retry loop of one predict call on ``table``."""
        on_success = (lambda inst: self._count(inst.key)) if self.count_by_instance else None
        return Attempts(table, self.retry_count, self._no_instance_message, on_success)


# --- discovery -------------------------------------------------------------------------------
def discovery_signature(token: str, service: str) -> dict | None:
    """Headers that sign the discovery request: the gateway lists a token-protected
    service's instances to its clients only."""
    if not token:
        return None
    return auth.sign(token, b"", service, "application/json", method="GET",
                     resource=DISCOVERY_PATH + service.split("/")[0])


def discovery_head(target: Target, service: str, headers: dict | None = None) -> bytes:
    """The discovery request (eas-prediction's, in direct mode) for ``service``."""
    path = f"{target.prefix}{DISCOVERY_PATH}{service.split('/')[0]}"
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"GET {path} HTTP/1.1\r\n".encode("latin-1") + host_line(target.host, target.port)
            + f"Accept: application/json\r\n{extra}\r\n".encode("latin-1"))


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


def discovery_failed(target: Target, exc: TransportError) -> PredictException:
    """The error of a discovery request that got no complete answer."""
    return PredictException(exc.code, f"service discovery at {target!r}: {exc.message}")


def discovery_answer(target: Target, service: str, status: int,
                     body: bytes) -> list[tuple[str, int, int]]:
    """The instances of a discovery answer, or the PredictException it amounts to."""
    if status != 200:
        raise PredictException(status, f"service discovery for {service!r} at {target!r}: "
                                       f"{from_response(status, body).message}")
    try:
        return parse_discovery(body)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PredictException(502, f"service discovery for {service!r} at {target!r}: "
                                    f"unexpected answer ({exc!r})") from None


def install(table: "InstanceTable", service: str, items) -> bool:
    """Put a discovered instance list in ``table`` (True when it changed; logged)."""
    changed = table.update(items)
    if changed:
        log.info("service %r instances: %s", service,
                 ", ".join(f"{ip}:{port}@{w}" for ip, port, w in sorted(items)) or "none")
    return changed


def refresh_failed(exc: Exception) -> None:
    """Log a background refresh that failed (the previous instance list is kept)."""
    if isinstance(exc, PredictException):
        log.warning("%s (keeping the previous instance list)", exc.message)
    else:
        log.error("service discovery failed: %r", exc, exc_info=exc)


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

    The compiled smooth WRR picker (``gateway._native.picker``), one connection
    pool per instance, failure accounting (a failure lowers the instance's
    effective weight; a connect failure also takes it out of rotation for
    ``down_seconds``), and ``pick(tried)`` that never returns an instance the
    request already tried while others remain. Safe to use from many threads (the
    picker runs under the GIL; the table is swapped whole).

    ``make_pool(ip, port)`` creates a pool, ``close_pool(pool)`` disposes of one
    whose instance left.
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
        # The picker excludes a bounded number of tried indexes (8); past that, a tried one
        # may come back: never use it while an untried one remains.
        if i >= 0 and i not in indexes:
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
