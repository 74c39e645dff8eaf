"""The gateway process: data plane, discovery, health, metrics, admin API mount.

The route table is rebuilt from the store's snapshot whenever the store
reports a change; requests in flight keep the table they started with.
"""
from __future__ import annotations

import asyncio
import logging
import socket

from prometheus_client import generate_latest

from ..ratelimit import RateLimitFilter
from ..routing.health import HealthChecker
from ..routing.table import RouteTable
from ..server import Request, Response, error_response, json_response
from ..server.limits import default_max_connections
from ..codec.oip import server_metadata
from .. import auth
from .._native.chain import AuthFilter, Chain, RouteFilter, VersionFilter
from .._native.dataplane import DataPlane
from . import metrics
from .access_log import AccessLog
from .filter import Filter

log = logging.getLogger("infergate.gateway")

PREDICT = "/api/predict/"
DISCOVERY = ("/api/v1/servicediscovery/upstreams/",
             "/exported/apis/eas.alibaba-inc.k8s.io/v1/upstreams/")
_OK = json_response({"status": "ok"})
# The Open Inference Protocol: /v2/models/<service>/... is a service's, like /api/predict/.
V2_MODELS = "/v2/models/"
V2_SELF = ("/v2", "/v2/", "/v2/health/live", "/v2/health/ready")
_V2_METADATA = json_response(server_metadata())
_EMPTY_OK = Response(200, b"", None, "text/plain")
# Outlier ejection: the first lasts this long, each one after it in a row twice the last.
EJECTION_SECONDS = 10.0
MAX_EJECTION_SECONDS = 300.0


class GatewayApp:
    def __init__(self, store, admin_token: str = "", max_body_size: int = 64 << 20,
                 health_interval: float = 2.0, access_log: str | None = None,
                 max_connections: int | None = None, open_discovery: bool = False,
                 max_response_size: int = 256 << 20, body_budget: int = 1 << 30,
                 read_timeout: float = 30.0, idle_timeout: float = 75.0):
        self.store = store
        self.admin_token = admin_token
        self.open_discovery = open_discovery
        self.table = RouteTable({}, {})
        self.health = HealthChecker(lambda: self.table, self._health_changed, health_interval)
        # Rate limits (gateway/ratelimit): global ones on the store's Redis when it is one.
        self.rate_limits = RateLimitFilter.for_store(store)
        # The data plane (csrc/proxy/dataplane.pyx) owns the port: it forwards what it can
        # by itself (asking the rate limits itself) and hands every other request to
        # handle(), on this loop.
        self.max_connections = max_connections or default_max_connections()
        self.read_timeout, self.idle_timeout = read_timeout, idle_timeout
        self.dataplane = DataPlane(self.handle, metrics.series, metrics.retried,
                                   self.rate_limits, max_body_size=max_body_size,
                                   max_response_size=max_response_size,
                                   idle_timeout=idle_timeout, read_timeout=read_timeout,
                                   body_budget=body_budget,
                                   max_connections=self.max_connections)
        # Filters run in order over each request's Exchange; each may answer early, or
        # pause the chain (filter.py).
        filters: list[Filter] = [RouteFilter(self), AuthFilter(auth.verify),
                                 self.rate_limits.check, VersionFilter()]
        self.chain = Chain(filters, metrics.observe, self.dataplane.forward_exchange)
        self.access_log = AccessLog(access_log) if access_log else None
        self.dataplane.access_log = self.access_log
        self.dataplane.ejected = self._eject
        self.admin = None  # the control plane mounts its handler here (/admin/...)
        self._rebuild_pending = False
        self._address = None
        self._grpc_port = None
        self.max_body_size = max_body_size
        self.grpc = None  # the gRPC port's front (grpc_front.py), when it has one
        self.port = self.grpc_port = None
        self.ready = False
        self.stopping = False

    # --- state -------------------------------------------------------------------------
    async def reload(self) -> None:
        services, instances = await self.store.snapshot()
        self.table = RouteTable(services, instances, self.table)
        self.dataplane.set_routes(self.table.routes)
        metrics.set_instances({(name, f"{pool.ip}:{pool.port}"): pool.healthy
                               for name, backend in self.table.backends.items()
                               for pool in backend.pools})

    def _changed(self, kind: str, name: str) -> None:
        # Coalesce bursts of notifications into one rebuild; none once stopping.
        if not self._rebuild_pending and not self.stopping:
            self._rebuild_pending = True
            asyncio.get_running_loop().call_soon(self._spawn_rebuild)

    def _spawn_rebuild(self):
        async def rebuild():
            self._rebuild_pending = False
            try:
                await self.reload()
            except Exception:
                log.exception("route table rebuild failed; keeping the previous table")
        asyncio.get_running_loop().create_task(rebuild())

    def _health_changed(self, pool) -> None:
        self.table.mark_health(pool)
        for name, backend in self.table.backends.items():
            if pool in backend.pools:
                metrics.instance_up(name, f"{pool.ip}:{pool.port}", pool.healthy)

    def _eject(self, ip: str, port: int, why: str) -> float:
        """Outlier detection (the data plane's) found ip:port failing or hung: out for
        EJECTION_SECONDS, doubled for each ejection in a row; 0 when it must stay."""
        pool = self.table.pools.get((ip, port))
        if pool is None or pool.ejected or not self.table.may_eject(pool):
            return 0.0
        loop = asyncio.get_running_loop()
        if loop.time() > pool.ejected_until + MAX_EJECTION_SECONDS:
            pool.ejections = 0  # long back in service: a new fault starts over
        seconds = min(MAX_EJECTION_SECONDS, EJECTION_SECONDS * 2 ** pool.ejections)
        pool.ejections += 1
        pool.ejected = True
        pool.ejected_until = loop.time() + seconds
        log.warning("instance %s:%d ejected for %.0fs: %s", ip, port, seconds, why)
        metrics.ejected(f"{ip}:{port}")
        self._health_changed(pool)
        loop.call_later(seconds, self._readmit, pool)
        return seconds

    def _readmit(self, pool) -> None:
        pool.ejected = False
        if not pool.closed:
            log.info("instance %s:%d back from ejection", pool.ip, pool.port)
            self._health_changed(pool)

    def bind(self, host: str, port: int, reuse_port: bool = False,
             grpc_port: int | None = None) -> None:
        """Where start() listens (gRPC too, unless grpc_port is None): only once the route
        table is loaded."""
        self._address = (host, port, reuse_port)
        self._grpc_port = grpc_port

    async def start(self) -> None:
        await self.store.start()
        self.store.subscribe(self._changed)
        await self.reload()
        self.dataplane.start(asyncio.get_running_loop())
        if self.access_log is not None:
            self.access_log.start(asyncio.get_running_loop())
        if self._address is not None:
            host, port, reuse_port = self._address
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=1024,
                                        reuse_port=reuse_port)
            self.dataplane.listen(sock)
            self.port = sock.getsockname()[1]
            log.info("gateway listening on http://%s:%d", host, self.port)
            if self._grpc_port is not None:
                from .grpc_front import GrpcFront

                # gRPC connections count against max_connections with the HTTP clients:
                # each side counts the other's, and the data plane may close an idle
                # gRPC connection to make room (others).
                self.grpc = GrpcFront(self, self.max_body_size)
                self.dataplane.others = self.grpc.server
                self.grpc_port = await self.grpc.listen(host, self._grpc_port, reuse_port)
                log.info("gateway listening for gRPC on %s:%d", host, self.grpc_port)
        self.health.start()
        if self.admin is not None:
            await self.admin.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self.stopping = True
        if self.grpc is not None:
            await asyncio.gather(self.dataplane.drain(), self.grpc.stop(5.0))
        else:
            await self.dataplane.drain()
        self.health.stop()
        if self.admin is not None:
            await self.admin.stop()
        self.dataplane.close()
        if self.access_log is not None:
            self.access_log.close()
        for pool in self.table.pools.values():
            pool.close()
        await self.rate_limits.close()
        await self.store.close()

    # --- requests ----------------------------------------------------------------------
    def handle(self, request: Request):
        path = request.path
        if path.startswith(PREDICT) or path.startswith(V2_MODELS):
            return self.chain.run(request)
        if path in V2_SELF:  # the gateway's own v2 liveness, readiness and metadata
            if request.method != "GET":
                return error_response(405, f"{request.method} is not allowed on {path}")
            if path == "/v2/health/ready" and not (self.ready and not self.dataplane.draining):
                return error_response(503, "not ready")
            return _V2_METADATA if path.startswith("/v2") and len(path) <= 4 else _EMPTY_OK
        for prefix in DISCOVERY:
            if path.startswith(prefix):
                return self.discovery(path[len(prefix):].split("/")[0], request)
        if path == "/health":
            return _OK
        if path == "/ready":
            return _OK if self.ready and not self.dataplane.draining else \
                error_response(503, "not ready")
        if path == "/metrics":
            return Response(200, generate_latest(), None, "text/plain; version=0.0.4")
        if path.startswith("/admin/") and self.admin is not None:
            return self.admin.handle(request)
        return error_response(404, f"no route for {path}")

    def discovery(self, service: str, request: Request) -> Response:
        """The instances of `service`, to its clients: where it has a token, a request that
        carries it (raw or signed), unless discovery is open (--open-discovery: the
        unchanged eas-prediction SDK sends no token when it discovers)."""
        items = self.table.discovery(service)
        if items is None:
            return error_response(404, f"unknown service {service!r}")
        if not self.open_discovery:
            tokens = self.table.tokens_of(service)
            if tokens and all(auth.verify(request.headers, request.method, request.path,
                                          request.body, token, service, query=request.query)
                              for token in tokens):
                return error_response(401, f"the instances of service {service!r} are listed "
                                           "to its clients: send its token")
        return json_response({"correlative": [service], "endpoints": {"items": items}})

