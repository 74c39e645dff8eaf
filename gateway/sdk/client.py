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
reset, an answer cut off before its end, timeout, 5xx, 450) is retried on
another instance, never on one it already tried while others remain;
``retry_count`` is the number of attempts in all, as in eas-prediction. Other
errors raise ``PredictException`` at once. Those rules live in ``core.py``
(shared with the asyncio client); this module and ``endpoints.py`` do the I/O.

Thread-safe: one client may be shared by many threads.
"""
from __future__ import annotations

import logging

from .core import ClientSettings, TransportError, retryable
from .endpoints import ENDPOINT_TYPE_DIRECT, DiscoveryThread, HostPool, InstanceTable
from .errors import PredictException

log = logging.getLogger("infergate.sdk")

__all__ = ["PredictClient", "ClientSettings", "retryable"]


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
                                             timeout=max(self.timeout / 1000.0, 1.0),
                                             token=self.token)
            self.discovery.refresh()
            self.discovery.start()
        else:
            self.table.update([(target.host, target.port, 1)])
        return self

    def predict(self, req):
        table = self.table
        if table is None:
            raise PredictException(500, "call init() before predict()")
        start, body, headers = self._encode(req)
        timeout = self.timeout / 1000.0
        attempts = self._attempts(table)
        while (inst := attempts.next()) is not None:
            try:
                status, data = inst.pool.request(start, headers, body, timeout)
            except TransportError as exc:
                attempts.transport_failed(inst, exc)
                continue
            if attempts.answered(inst, status, data):
                return req.parse_response(data)
        raise attempts.error

    def _last_discovery_error(self) -> PredictException | None:
        return self.discovery.last_error if self.discovery is not None else None

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
