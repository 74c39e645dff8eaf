"""The synchronous client: ``PredictClient``, the surface of eas-prediction's.

    client = PredictClient("http://127.0.0.1:8080", "digits")
    client.set_token("...")
    client.set_endpoint_type(ENDPOINT_TYPE_DIRECT)   # or ENDPOINT_TYPE_GATEWAY (default)
    client.init()
    resp = client.predict(TFRequest("predict_images").add_feed(...))
    client.destroy()

Gateway mode sends every request to the endpoint. Direct mode asks the endpoint
(a gateway) for the service's instances at ``init()``, refreshes that list in a
background thread every ``discovery_interval`` seconds, and sends each request
straight to an instance picked by smooth weighted round robin from the local
copy, over a keep-alive pool per instance. A request that fails (connect error,
reset, timeout, 5xx, 450) is retried on another instance, never on one it
already tried while others remain; ``retry_count`` is the number of attempts in
all, as in eas-prediction. Other errors raise ``PredictException`` at once.

Thread-safe: one client may be shared by many threads.
"""
from __future__ import annotations

import logging
import threading

from .. import auth
from .endpoints import (ENDPOINT_TYPE_DIRECT, ENDPOINT_TYPE_GATEWAY, DiscoveryThread, HostPool,
                        InstanceTable, TransportError, normalize_endpoint_type, parse_endpoint)
from .errors import PredictException, from_response
from .requests import DEFAULT_CONTENT_TYPE

log = logging.getLogger("infergate.sdk")

__all__ = ["PredictClient", "ClientSettings"]


def retryable(status: int) -> bool:
    """Answers worth another instance: 450 (instance queue full) and every 5xx."""
    return status == 450 or status >= 500


class ClientSettings:
    """The setters shared by the sync and the asyncio client."""

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
    def _prepare(self):
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

    def _encode(self, req) -> tuple[bytes, bytes]:
        """The body and the header lines (after Host) of one request."""
        body = req.to_string()
        if isinstance(body, str):
            body = body.encode("utf-8")
        elif not isinstance(body, bytes):
            body = bytes(body)
        content_type = getattr(req, "content_type", None) or self.default_content_type
        if self.token:
            signed = auth.sign(self.token, body, self.service_name, content_type)
            lines = (f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     f"Content-MD5: {signed['Content-MD5']}\r\nDate: {signed['Date']}\r\n"
                     f"Authorization: {signed['Authorization']}\r\n")
        else:
            lines = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        return body, lines.encode("latin-1") + self.static_headers

    def _count(self, key: str) -> None:
        with self._count_lock:
            self.counts[key] = self.counts.get(key, 0) + 1


class PredictClient(ClientSettings):
    """Synchronous client (see the module docstring)."""

    def __init__(self, endpoint: str = "", service_name: str = ""):
        super().__init__(endpoint, service_name)
        self.table: InstanceTable | None = None
        self.discovery: DiscoveryThread | None = None

    def init(self) -> "PredictClient":
        """Set up connections (and, in direct mode, fetch the instance list and start
        its refresher); call after the setters."""
        self._prepare()
        target = self.target
        size = self.max_connection_count
        self.table = InstanceTable(lambda ip, port: HostPool(ip, port, size, target.tls),
                                   down_seconds=self.down_seconds)
        if self.endpoint_type == ENDPOINT_TYPE_DIRECT:
            self.discovery = DiscoveryThread(target, self.service_name, self.table,
                                             self.discovery_interval,
                                             timeout=max(self.timeout / 1000.0, 1.0))
            self.discovery.refresh()
            self.discovery.start()
        else:
            self.table.update([(target.host, target.port, 1)])
        return self

    def predict(self, req):
        table = self.table
        if table is None:
            raise PredictException(500, "call init() before predict()")
        body, headers = self._encode(req)
        start = self.start_line
        timeout = self.timeout / 1000.0
        tried: list[str] = []
        error = None
        for _ in range(self.retry_count):
            inst = table.pick(tried)
            if inst is None:
                if error is None:
                    error = PredictException(503, self._no_instance())
                break
            tried.append(inst.key)
            try:
                status, data = inst.pool.request(start, headers, body, timeout)
            except TransportError as exc:
                table.failed(inst, down=exc.connect)
                error = PredictException(exc.code, exc.message)
                log.debug("attempt on %s failed: %s", inst.key, exc.message)
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
            log.debug("attempt on %s answered %d: %s", inst.key, status, error.message)
        raise error

    def _no_instance(self) -> str:
        message = f"no instance of service {self.service_name!r} is available"
        if self.discovery is not None and self.discovery.last_error is not None:
            message += f" (last discovery error: {self.discovery.last_error.message})"
        return message

    def instances(self) -> list[tuple[str, int, int]]:
        """The local instance list: ``(ip, port, weight)``."""
        return [(i.ip, i.port, i.weight) for i in self.table.instances] if self.table else []

    def refresh(self) -> bool:
        """Direct mode: refresh the instance list now (True when it changed)."""
        return self.discovery.refresh() if self.discovery is not None else False

    def destroy(self) -> None:
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
        if self.table is not None:
            self.table.close()
            self.table = None

    close = destroy

    def __enter__(self) -> "PredictClient":
        if self.table is None:
            self.init()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()
