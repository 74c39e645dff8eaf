"""The route table: compiled from the control-plane state whenever it changes.

Everything a request needs is prepared here, once per change: the token, the
compiled header rules, a smooth WRR picker over versions (traffic shares) and
one over each version's instances. The request path only looks things up.

A new table keeps every backend and route of the previous one whose inputs did
not change (a worker's heartbeat changes none of them): their pickers go on
with their smooth WRR cycles and the instances they marked down.
"""
from __future__ import annotations

import json
import logging

from .._native.picker import SmoothWeightedPicker
from ..control.callers import builtins_of
from ..rules import RuleSet
from ..serviceconfig import rpc_settings
from .upstream import InstancePool

log = logging.getLogger("infergate.routing")

# Margin over the worker's own rpc.keepalive, so the worker's 408 arrives first.
DEADLINE_MARGIN = 1.0


class Backend:
    """One version: a service's instances and how to address them."""

    __slots__ = ("name", "prefix", "pools", "picker", "timeout", "try_timeout", "auth_header",
                 "status")

    def __init__(self, name, prefix, pools, weights, timeout, token, status, try_timeout=0.0):
        self.name = name
        self.prefix = prefix
        self.pools = pools
        self.picker = SmoothWeightedPicker(pools, weights)
        for i, pool in enumerate(pools):
            self.picker.set_down(i, not pool.healthy)
        self.timeout = timeout
        self.try_timeout = try_timeout  # seconds one try may take while another is left; 0: all
        # The gateway authenticated the client; the worker gets the raw token of its service.
        self.auth_header = (b"Authorization", token.encode()) if token else None
        self.status = status


class Route:
    """An endpoint clients call: /api/predict/<name>."""

    __slots__ = ("name", "token", "ruleset", "rule_choices", "traffic", "traffic_picker",
                 "rate_limits", "record", "versions", "callers")

    def __init__(self, record, backends_by_name):
        self.name = record.name
        self.record = record
        self.token = record.token or ""
        # Identified callers: (token, the rule built-ins of its identity) (control/callers.py).
        self.callers = tuple((c["token"], builtins_of(c)) for c in record.callers)
        self.rate_limits = (record.config.get("metadata") or {}).get("rate_limits") or []
        shares = record.traffic or {record.name: 100}
        # The versions a request may name (an Open Inference Protocol model_version).
        self.versions = {t: backends_by_name[t] for t in
                         list(shares) + [r.get("target") for r in record.rules]
                         if t in backends_by_name}
        self.traffic = [(backends_by_name[t], int(w)) for t, w in shares.items()
                        if t in backends_by_name and int(w) > 0]
        # A stopped version (or one with no instances) gives its share to the others;
        # only when none can take traffic do requests get its 503.
        serving = [(b, w) for b, w in self.traffic if b.pools]
        if serving:
            self.traffic = serving
        self.traffic_picker = SmoothWeightedPicker([b for b, _ in self.traffic],
                                                   [w for _, w in self.traffic])
        self.ruleset = None
        self.rule_choices = []
        if record.rules:
            self.ruleset = RuleSet(record.rules)
            for rule in self.ruleset.rules:
                extra = ((rule["header_name"].encode("latin-1"),
                          rule["header_value"].encode("latin-1"))
                         if rule.get("header_name") else None)
                self.rule_choices.append((backends_by_name.get(rule["target"]), extra))

    def choose(self, headers: dict, builtins: dict | None = None):
        """(backend, extra header or None): the first matching rule (reading the caller's
        identity as built-ins), else the traffic shares."""
        if self.ruleset is not None:
            index = self.ruleset.match(headers, builtins)
            if index >= 0:
                backend, extra = self.rule_choices[index]
                if backend is not None:
                    return backend, extra
        return self.traffic_picker.pick(), None


def _endpoint_list(record, instances):
    """(ip, port, weight, healthy, gRPC port or None) of each instance."""
    endpoints = record.config.get("endpoints")
    if endpoints:
        return [(ep["ip"], int(ep["port"]), int(ep.get("weight", 100)), True,
                 ep.get("grpc_port")) for ep in endpoints]
    return [(i.ip, int(i.port), int(i.weight), bool(i.healthy), i.meta.get("grpc_port"))
            for i in instances]


def _health_path(config: dict):
    """GET path of the active check, or None for a TCP connect check.

    infergate workers answer /health; servers fronted by static endpoints
    (Triton, TF Serving, ...) are checked by a connect unless `health_path` says.
    """
    if "health_path" in config:
        return config["health_path"] or None
    return None if config.get("endpoints") else "/health"


def _backend_inputs(record, instances) -> tuple:
    """Everything a Backend is built from: equal inputs, equal backend."""
    return (record.status, record.token, json.dumps(record.config, sort_keys=True, default=str),
            tuple(_endpoint_list(record, instances)))


def _route_inputs(record, backends: dict) -> tuple:
    """Everything a Route is built from, its backends by identity."""
    targets = set(record.traffic or {record.name: 100}) | {r.get("target") for r in record.rules}
    return (record.token, json.dumps([record.traffic, record.rules, record.callers,
                                      (record.config.get("metadata") or {}).get("rate_limits")],
                                     sort_keys=True, default=str),
            tuple(sorted((t, id(backends.get(t))) for t in targets if isinstance(t, str))))


class RouteTable:
    def __init__(self, services: dict, instances: dict, previous: "RouteTable | None" = None,
                 max_connections: int = 256):
        """services: name -> ServiceRecord; instances: name -> [InstanceRecord].

        Instances of a name without a service record are not routed: a deleted
        service must not come back, without its token, through a worker that
        still heartbeats. `previous`, the table this one replaces, lends its
        unchanged backends and routes (pickers and all) and its connection pools,
        so that a change keeps the open upstream connections.
        """
        old_pools = previous.pools if previous is not None else {}
        old_backends = previous.backends if previous is not None else {}
        old_routes = previous.routes if previous is not None else {}
        old_inputs = previous.inputs if previous is not None else {}
        self.inputs: dict[tuple, tuple] = {}  # ("backend" | "route", name) -> its inputs
        self.pools: dict[tuple, InstancePool] = {}
        backends = {}
        for name, record in services.items():
            try:
                inputs = _backend_inputs(record, instances.get(name, []))
                old = old_backends.get(name)
                if old is not None and old_inputs.get(("backend", name)) == inputs:
                    backends[name] = old
                    for pool in old.pools:
                        self.pools[(pool.ip, pool.port)] = pool
                else:
                    backends[name] = self._backend(record, instances.get(name, []), old_pools,
                                                   max_connections)
                self.inputs[("backend", name)] = inputs
            except (ValueError, TypeError, AttributeError) as exc:
                # Config is validated on save; a bad record still never takes others down.
                log.error("service %s is not routed: %s", name, exc)
        self.backends = backends
        self.routes: dict[str, Route] = {}
        for name, record in services.items():
            if name not in backends or (record.linked_to and record.released):
                continue  # a released blue-green service is reached through the original only
            try:
                inputs = _route_inputs(record, backends)
                old = old_routes.get(name)
                if old is not None and old_inputs.get(("route", name)) == inputs:
                    old.record = record
                    self.routes[name] = old
                else:
                    self.routes[name] = Route(record, backends)
                self.inputs[("route", name)] = inputs
            except ValueError as exc:
                log.error("service %s is not routed: %s", name, exc)
        for key, pool in old_pools.items():
            if key not in self.pools:
                pool.close()

    def _backend(self, record, instances, old_pools, max_connections) -> Backend:
        name = record.name
        if record.status == "Stopped":
            return Backend(name, b"", [], [], 1.0, "", "Stopped")
        config = record.config
        members = []
        weights = []
        health_path = _health_path(config)
        for ip, port, weight, healthy, grpc_port in _endpoint_list(record, instances):
            key = (ip, port)
            pool = self.pools.get(key) or old_pools.get(key) or InstancePool(
                ip, port, max_connections)
            pool.registry_healthy = healthy
            pool.grpc_port = int(grpc_port) if grpc_port else None
            pool.health_path = health_path
            self.pools[key] = pool
            members.append(pool)
            weights.append(weight)
        settings = rpc_settings(config.get("metadata"))
        # Kept without a trailing slash: the subpath brings its own ("/" + "/v2/..." is not
        # the path a Triton behind upstream_path "/" serves).
        prefix = (config.get("upstream_path") or f"/api/predict/{name}").rstrip("/")
        return Backend(name, prefix.encode("latin-1"), members, weights,
                       settings.keepalive / 1000.0 + DEADLINE_MARGIN, record.token, record.status,
                       settings.try_timeout / 1000.0)

    def discovery(self, service: str) -> list[dict] | None:
        """The instances a direct-connect client of `service` may call, or None if unknown.

        A service's own healthy, non-draining instances: they serve its name and
        check its token, over EAS and v2 HTTP on `port` and v2 gRPC on `grpc_port` (where
        the instance has one). Traffic shares, releases and header rules are the
        gateway's to apply; direct clients bypass them, as in EAS.
        """
        backend = self.backends.get(service)
        if backend is None:
            return None
        return [{"app": service, "ip": pool.ip, "port": pool.port, "weight": weight,
                 **({"grpc_port": pool.grpc_port} if pool.grpc_port else {})}
                for pool, weight in zip(backend.pools, backend.picker.weights())
                if weight > 0 and pool.healthy]

    def tokens_of(self, service: str) -> list[str]:
        """The tokens that open `service` (its own and its identified callers'): none when
        it is open to anyone."""
        route = self.routes.get(service)
        backend = self.backends.get(service)
        own = backend.auth_header[1].decode() if backend is not None and backend.auth_header \
            else ""
        return ([own] if own else []) + [token for token, _ in (route.callers if route else ())]

    def may_eject(self, pool: InstancePool) -> bool:
        """Whether outlier detection may take `pool` out: never the last instance of a
        version that can take traffic, nor more than half of a version's instances (Envoy's
        max_ejection_percent, so that a fault shared by all cannot empty a version)."""
        for backend in self.backends.values():
            if pool in backend.pools:
                others_up = sum(1 for p in backend.pools if p is not pool and p.healthy)
                ejected = sum(1 for p in backend.pools if p.ejected) + 1
                if others_up == 0 or ejected * 2 > len(backend.pools):
                    return False
        return pool in self.pools.values()

    def mark_health(self, pool: InstancePool) -> None:
        """Apply a pool's health (active checks and registry state) to every picker."""
        for backend in self.backends.values():
            for i, member in enumerate(backend.pools):
                if member is pool:
                    backend.picker.set_down(i, not pool.healthy)
