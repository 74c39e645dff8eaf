"""The admin API (``/admin/...``) of a gateway: services, versions, traffic, instances.

Every call needs the gateway's admin token (``Authorization: Bearer <token>``
or the raw token) when the gateway has one -- the instance calls too: a
service token is what the service's *clients* hold, and must not let them add
instances. Bodies are JSON; errors are ``{"code", "message"}`` with one line
naming the field.

Services
  GET    /admin/services                         list
  POST   /admin/services[?linked=true]           create (body: service.json; linked = create -r)
  GET    /admin/services/<name>                  desc
  PATCH  /admin/services/<name>                  modify with a partial service.json
  POST   /admin/services/<name>/modify           {"patch": {...}, "set": {"metadata.instance": 3}}
  DELETE /admin/services/<name>                  delete
  POST   /admin/services/<name>/stop | /start
  POST   /admin/services/<name>/version          {"version": N}
  POST   /admin/services/<name>/release          {"weight": N}  (a create -r service)
  GET|PUT /admin/services/<name>/traffic         {"<service>": share, ...} (sum 100)
  GET|PUT /admin/services/<name>/rules           [{"condition", "target", "header_name",
                                                   "header_value"}, ...]
  GET    /admin/services/<name>/instances
Instances (workers joining through the gateway)
  GET    /admin/instances/<service>
  POST   /admin/instances/<service>              {"instance": {ip, port, ...}, "ttl": s}
                                                 (404 with "reason": "service_not_found"
                                                 when the service has no record)
  POST   /admin/instances/<service>/<id>/heartbeat  {"ttl": s} -> {"ok": bool}
  PATCH  /admin/instances/<service>/<id>         {"weight": N, "healthy": bool}
  DELETE /admin/instances/<service>/<id>
Gateway
  GET    /admin/info
"""
from __future__ import annotations

import hmac
import logging
import time
from urllib.parse import parse_qs, unquote

import orjson

from ..auth import registration_token
from ..registry import InstanceRecord, ServiceNotFound, StoreError, StoreUnavailable
from ..server import Request, Response, error_response, json_response
from ..serviceconfig import ignored_keys
from . import packages
from .logs import read_logs
from .services import (ServiceError, ServiceOps, cached_model_spec, desired_instances,
                       effective_traffic, is_entry_only, owner_of)

log = logging.getLogger("infergate.admin")

PREFIX = "/admin/"
MAX_TTL = 3600.0
SERVICE_NOT_FOUND = "service_not_found"   # the "reason" of a refused instance registration


def _json(request: Request):
    if not request.body:
        return None
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise ServiceError(400, f"request body is not valid JSON: {exc}") from None


def _kind(rec) -> str:
    config = rec.config
    if is_entry_only(config):
        return "entry"
    if config.get("endpoints"):
        return "endpoints"
    try:
        return "local" if cached_model_spec(rec) is not None else "registered"
    except Exception:
        return "local"


_LOCAL_NAMES = frozenset(("localhost", "127.0.0.1", "::1", "ip6-localhost"))


class AdminApi:
    """Routes /admin/... to the service operations; the control plane's HTTP face."""

    def __init__(self, app, ops: ServiceOps, launcher, public_url: str, store_kind: str,
                 owner: str):
        self.app = app
        self.store = app.store
        self.ops = ops
        self.launcher = launcher
        self.public_url = public_url.rstrip("/")
        self.store_kind = store_kind
        self.owner = owner
        self.admin_token = app.admin_token or ""

    # ---- auth -------------------------------------------------------------------
    @staticmethod
    def _presented(request: Request) -> str:
        auth = request.headers.get("authorization", "").strip()
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return auth

    def _is_admin(self, request: Request) -> bool:
        if not self.admin_token:
            return True
        return hmac.compare_digest(self._presented(request).encode(), self.admin_token.encode())

    def _is_registration(self, request: Request, parts: list[str]) -> bool:
        """A launched worker's registration credential, on what it may do: its service's
        instance routes, and reading its service."""
        if not self.admin_token or len(parts) < 2 or not (
                parts[0] == "instances" or
                parts[0] == "services" and len(parts) == 2 and request.method == "GET"):
            return False
        return hmac.compare_digest(self._presented(request).encode(),
                                   registration_token(self.admin_token, parts[1]).encode())

    def _from_a_browser(self, request: Request) -> str | None:
        """Why a request looks like a web page's doing (None: it does not).

        A page the user visits may send requests to a gateway on loopback: a form's
        text/plain POST, or, through DNS rebinding (its own name resolving to
        127.0.0.1), reads. The admin API takes no request that names a foreign Origin;
        without an admin token (which a page cannot send), only JSON bodies (a page
        cannot send those across origins without the gateway's consent) and only Host
        names of this machine's loopback or of the gateway itself."""
        headers = request.headers
        origin = headers.get("origin")
        host = headers.get("host", "")
        if origin is not None and origin.rstrip("/") not in (f"http://{host}",
                                                              self.public_url):
            return f"cross-origin admin requests are refused (Origin {origin})"
        if self.admin_token:
            return None  # a page cannot send the token (nor any Authorization) cross-origin
        if request.method in ("POST", "PUT", "PATCH") and request.body and \
                headers.get("content-type", "").split(";")[0].strip().lower() \
                != "application/json":
            return "admin requests with a body must be application/json"
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]").lower() not in _LOCAL_NAMES and f"http://{host}" != self.public_url:
            return (f"Host {host!r} is not this gateway: without an admin token the admin API "
                    "answers only requests for its own loopback address")
        return None

    # ---- dispatch ---------------------------------------------------------------
    def handle(self, request: Request):
        return self._handle_and_apply(request)

    async def _handle_and_apply(self, request: Request) -> Response:
        response = await self._handle(request)
        if request.method != "GET" and response.status < 400:
            # Acknowledge a change only once this gateway routes by it: the next
            # request through it sees the new traffic, rules or release.
            await self.app.reload()
        return response

    async def _handle(self, request: Request) -> Response:
        parts = [unquote(p) for p in request.path[len(PREFIX):].split("/")]
        while parts and parts[-1] == "":
            parts.pop()
        method = request.method
        try:
            refused = self._from_a_browser(request)
            if refused is not None:
                return error_response(403, refused)
            if not self._is_admin(request) and not self._is_registration(request, parts):
                return self._unauthorized()
            if parts and parts[0] == "instances" and len(parts) >= 2:
                return await self._instances(method, parts[1:], request)
            if parts == ["info"] and method == "GET":
                return json_response(self._info())
            if parts and parts[0] == "services":
                return await self._services(method, parts[1:], request)
            return error_response(404, f"no admin route for {method} {request.path}")
        except ServiceError as exc:
            return error_response(exc.status, exc.message)
        except StoreUnavailable as exc:
            return error_response(503, f"the state store is unavailable, nothing was changed: "
                                       f"{exc}")
        except StoreError as exc:
            return error_response(503, f"state store error: {exc}")

    @staticmethod
    def _unauthorized() -> Response:
        return error_response(401, "the admin API needs the gateway's admin token "
                                   "(Authorization: Bearer <token>); the one sent is missing or "
                                   "wrong: check --admin-token / INFERGATE_ADMIN_TOKEN")

    def _info(self) -> dict:
        return {"gateway": self.owner, "store": self.store_kind, "public_url": self.public_url,
                "launcher": bool(self.launcher is not None and self.launcher.leader)}

    def _base_url(self, request: Request) -> str:
        host = request.headers.get("host")
        return f"http://{host}" if host else self.public_url

    @staticmethod
    def _not_allowed(method: str, path: str) -> Response:
        return error_response(405, f"{method} is not allowed on {path}")

    async def _services(self, method: str, parts: list[str], request: Request) -> Response:
        path = request.path
        if not parts:
            if method == "GET":
                return json_response(await self._list(request))
            if method == "POST":
                query = parse_qs(request.query)
                linked = query.get("linked", ["false"])[-1].lower() in ("1", "true", "yes")
                body = _json(request)
                if body is None:
                    raise ServiceError(400, "the request body must be the service.json")
                rec = await self.ops.create(body, linked=linked)
                return json_response(await self._view(rec, request), 201)
            return self._not_allowed(method, path)
        name = parts[0]
        action = parts[1] if len(parts) > 1 else ""
        if len(parts) > 2:
            return error_response(404, f"no admin route for {method} {path}")
        body = _json(request) if method in ("POST", "PUT", "PATCH") else None
        if action == "":
            if method == "GET":
                return json_response(await self._view(await self.ops.get(name), request))
            if method in ("PATCH", "PUT"):
                rec = await self.ops.modify(name, patch=body)
                return json_response(await self._view(rec, request))
            if method == "DELETE":
                return json_response(await self.ops.delete(name))
            return self._not_allowed(method, path)
        if action == "modify" and method == "POST":
            body = body or {}
            if not isinstance(body, dict):
                raise ServiceError(400, "modify takes {\"patch\": {...}, \"set\": {...}}")
            rec = await self.ops.modify(name, patch=body.get("patch"), sets=body.get("set"))
            return json_response(await self._view(rec, request))
        if action in ("stop", "start") and method == "POST":
            rec = await getattr(self.ops, action)(name)
            return json_response(await self._view(rec, request))
        if action == "version" and method == "POST":
            body = body if isinstance(body, dict) else {}
            rec = await self.ops.version(name, body.get("version", body.get("revision")))
            return json_response(await self._view(rec, request))
        if action == "release" and method == "POST":
            if not isinstance(body, dict) or "weight" not in body:
                raise ServiceError(400, "release takes {\"weight\": N} with N from 0 to 100")
            await self.ops.release(name, body["weight"])
            return json_response(await self._view(await self.ops.get(name), request))
        if action == "traffic":
            if method == "GET":
                return json_response(effective_traffic(await self.ops.get(name)))
            if method in ("PUT", "POST"):
                if isinstance(body, dict) and isinstance(body.get("traffic"), dict):
                    body = body["traffic"]
                rec = await self.ops.set_traffic(name, body)
                return json_response(effective_traffic(rec))
            return self._not_allowed(method, path)
        if action == "rules":
            if method == "GET":
                return json_response((await self.ops.get(name)).rules)
            if method in ("PUT", "POST"):
                rec = await self.ops.set_rules(name, body)
                return json_response(rec.rules)
            return self._not_allowed(method, path)
        if action == "callers":
            if method == "GET":
                return json_response((await self.ops.get(name)).callers)
            if method == "POST":
                return json_response(await self.ops.add_caller(name, body), 201)
            if method == "DELETE":
                who = parse_qs(request.query).get("caller", [""])[-1]
                if not who:
                    raise ServiceError(400, "name the caller to remove: ?caller=TOKEN_OR_USER")
                await self.ops.remove_caller(name, who)
                return json_response((await self.ops.get(name)).callers)
            return self._not_allowed(method, path)
        if action == "logs" and method == "GET":
            await self.ops.get(name)  # 404 for an unknown service
            if self.launcher is None:
                raise ServiceError(404, "this gateway launches no workers: read the logs "
                                        "where the workers run")
            query = parse_qs(request.query)
            try:
                since = float(query["since"][-1]) if "since" in query else None
                cursor = orjson.loads(query["cursor"][-1]) if "cursor" in query else None
            except (ValueError, orjson.JSONDecodeError):
                raise ServiceError(400, "since must be a time in seconds and cursor the JSON "
                                        "a previous answer gave") from None
            return json_response(read_logs(self.launcher.log_paths(name),
                                           query.get("instance", [None])[-1], since, cursor))
        if action == "instances" and method == "GET":
            rec = await self.ops.get(name)
            return json_response(await self._instance_views(rec))
        return error_response(404, f"no admin route for {method} {path}")

    # ---- instances ----------------------------------------------------------------
    async def _instances(self, method: str, parts: list[str], request: Request) -> Response:
        service = parts[0]
        body = _json(request) if method in ("POST", "PUT", "PATCH") else None
        if len(parts) == 1:
            if method == "GET":
                return json_response([i.to_dict() for i in
                                      await self.store.list_instances(service)])
            if method == "POST":
                if not isinstance(body, dict) or not isinstance(body.get("instance"), dict):
                    raise ServiceError(400, "register takes {\"instance\": {...}, \"ttl\": s}")
                inst = self._instance(service, body["instance"])
                try:
                    # Only for a service that exists, checked in the store's own
                    # transaction: a worker of a deleted service cannot bring it back.
                    await self.store.register_instance(inst, self._ttl(body),
                                                       require_service=True)
                except ServiceNotFound:
                    return json_response({
                        "code": 404, "reason": SERVICE_NOT_FOUND,
                        "message": f"service {service!r} does not exist (deleted, or never "
                                   "created): create it before its instances register"}, 404)
                return json_response(inst.to_dict(), 201)
            return self._not_allowed(method, request.path)
        instance_id = parts[1]
        action = parts[2] if len(parts) > 2 else ""
        if action == "heartbeat" and method == "POST":
            ok = await self.store.heartbeat(service, instance_id,
                                            self._ttl(body if isinstance(body, dict) else {}))
            return json_response({"ok": ok})
        if action == "" and method == "DELETE":
            return json_response({"ok": await self.store.deregister_instance(service, instance_id)})
        if action == "" and method in ("PATCH", "PUT"):
            if not isinstance(body, dict):
                raise ServiceError(400, "takes {\"weight\": N} and/or {\"healthy\": bool}")
            found = True
            if "weight" in body:
                weight = body["weight"]
                if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                    raise ServiceError(400, "weight must be an integer >= 0 (0 drains)")
                found = await self.store.set_instance_weight(service, instance_id, weight)
            if "healthy" in body:
                if not isinstance(body["healthy"], bool):
                    raise ServiceError(400, "healthy must be true or false")
                found = await self.store.set_instance_health(service, instance_id,
                                                             body["healthy"]) and found
            if not found:
                raise ServiceError(404, f"service {service!r} has no instance {instance_id!r}")
            return json_response({"ok": True})
        return error_response(404, f"no admin route for {method} {request.path}")

    @staticmethod
    def _ttl(body: dict) -> float:
        ttl = body.get("ttl", 3.0)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl > MAX_TTL:
            raise ServiceError(400, f"ttl must be a number of seconds up to {int(MAX_TTL)} "
                                    "(<= 0: never expires)")
        return float(ttl)

    @staticmethod
    def _instance(service: str, data: dict) -> InstanceRecord:
        if data.get("service", service) != service:
            raise ServiceError(400, f"instance.service {data.get('service')!r} does not match "
                                    f"the URL's {service!r}")
        if not isinstance(data.get("ip"), str) or not data["ip"]:
            raise ServiceError(400, "instance.ip is required and must be a string")
        port = data.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ServiceError(400, "instance.port must be an integer from 1 to 65535")
        weight = data.get("weight", 100)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ServiceError(400, "instance.weight must be an integer >= 0")
        if "healthy" in data and not isinstance(data["healthy"], bool):
            raise ServiceError(400, f"instance.healthy must be true or false, got "
                                    f"{data['healthy']!r}")
        if "meta" in data and not isinstance(data["meta"], dict):
            raise ServiceError(400, "instance.meta must be an object")
        try:
            return InstanceRecord.from_dict({**data, "service": service,
                                             "heartbeat_at": time.time()})
        except (TypeError, ValueError) as exc:
            raise ServiceError(400, f"instance: {exc}") from None

    # ---- views ----------------------------------------------------------------------
    def _pool_health(self, ip: str, port: int, registry_healthy: bool) -> bool:
        pool = self.app.table.pools.get((ip, int(port)))
        if pool is None:
            return bool(registry_healthy)
        return bool(registry_healthy) and pool.check_healthy

    async def _instance_views(self, rec, instances=None) -> list[dict]:
        endpoints = rec.config.get("endpoints")
        now = time.time()
        if endpoints:
            return [{"id": f"{ep['ip']}:{ep['port']}", "ip": ep["ip"], "port": int(ep["port"]),
                     "weight": int(ep.get("weight", 100)), "static": True,
                     "healthy": self._pool_health(ep["ip"], ep["port"], True)}
                    for ep in endpoints]
        if instances is None:
            instances = await self.store.list_instances(rec.name)
        return [{"id": i.instance_id, "ip": i.ip, "port": i.port, "weight": i.weight,
                 "healthy": self._pool_health(i.ip, i.port, i.healthy),
                 "heartbeat_age_s": round(max(0.0, now - i.heartbeat_at), 1)}
                for i in instances]

    async def _view(self, rec, request: Request, instances=None, records=None,
                    brief: bool = False) -> dict:
        if records is None:
            records = {r.name: r for r in await self.store.list_services()}
        base = self._base_url(request)
        entry = rec.linked_to if (rec.linked_to and rec.released) else rec.name
        insts = await self._instance_views(rec, instances)
        kind = _kind(rec)
        total = (desired_instances(rec.config) if kind == "local"
                 else 0 if kind == "entry" else len(insts))
        latest = max([h.get("revision", 0) for h in rec.history] + [rec.revision])
        view = {
            "name": rec.name,
            "status": rec.status,
            "message": rec.message,
            "endpoint": f"{base}/api/predict/{entry}",
            "token": rec.token,
            "kind": kind,
            "owner": owner_of(rec.config),
            "revision": rec.revision,
            "latest_revision": latest,
            "total_instances": total,
            "running_instances": sum(1 for i in insts if i["healthy"]),
            "instances": insts,
            "traffic": effective_traffic(rec),
            "share": None,
            "rules": rec.rules,
            "linked_to": rec.linked_to,
            "released": rec.released,
            "linked_services": sorted(n for n, r in records.items() if r.linked_to == rec.name),
            "created_at": rec.created_at,
            "updated_at": rec.updated_at,
        }
        if rec.linked_to and rec.linked_to in records:
            # A blue-green service's share of its original's traffic.
            view["share"] = records[rec.linked_to].traffic.get(rec.name, 0)
        if brief:
            return view
        view["config"] = rec.config
        # EAS/ModelArts keys that were accepted but do nothing here
        view["ignored"] = ignored_keys(rec.config)
        view["warnings"] = global_limits_without_redis(rec.config,
                                                       self.app.rate_limits.redis is not None)
        view["versions"] = [{"revision": h.get("revision"), "created_at": h.get("created_at")}
                            for h in rec.history]
        if self.launcher is not None:
            workers = self.launcher.describe(rec.name)
            if workers is not None:
                view["workers"] = workers
                view["restarts"] = self.launcher.restarts(rec.name)
            crash_logs = self.launcher.crash_log_paths(rec.name)
            if crash_logs:
                view["crash_logs"] = crash_logs
        return view

    async def _list(self, request: Request) -> list[dict]:
        services, instances = await self.store.snapshot()
        return [await self._view(rec, request, instances.get(name, []), services, brief=True)
                for name, rec in sorted(services.items())]


class ControlPlane:
    """What ``attach_control_plane`` mounts on a GatewayApp: the admin API and the launcher."""

    def __init__(self, app, location: str, public_url: str, owner: str, launcher_enabled=True):
        import os

        from ..registry import is_redis_url
        from . import http_url, normalize_url, split_url
        from .launcher import Launcher, default_lock_path, private_dir

        self.app = app
        location = os.fspath(location)
        redis = is_redis_url(location)
        store_kind = "redis" if redis else "embedded"
        self.ops = ServiceOps(app.store, owner)
        public_url = normalize_url(public_url)
        _, gw_host, gw_port, _ = split_url(public_url)
        gw_host = gw_host or "0.0.0.0"
        wildcard = gw_host in ("0.0.0.0", "::", "")
        worker_host = os.environ.get("INFERGATE_WORKER_HOST") or (
            "127.0.0.1" if wildcard or gw_host == "localhost" else gw_host)
        self.launcher = None
        if redis:
            registry_url = location
        else:
            # Workers reach this gateway's admin API on loopback when it listens on
            # every address ("::" listens on IPv6 only: use ::1 there).
            local = ("::1" if gw_host == "::" else "127.0.0.1") if wildcard else gw_host
            registry_url = http_url(local, gw_port)
        if launcher_enabled:
            log_dir = os.environ.get("INFERGATE_LOG_DIR")
            if not log_dir:
                if redis:
                    # No state directory: a per-user directory only we can write to
                    # (never a predictable name in /tmp that someone else may own).
                    log_dir = os.path.join(private_dir("state"), "logs")
                else:
                    log_dir = os.path.join(os.path.abspath(os.path.expanduser(location)),
                                           "logs")
            # Packages fetched by URL, beside the logs (the state directory, or ours).
            packages.configure(os.environ.get("INFERGATE_PACKAGE_DIR") or os.path.join(
                os.path.dirname(os.path.abspath(log_dir)), "packages"))
            self.launcher = Launcher(app.store, self.ops, owner, registry_url, worker_host,
                                     log_dir, app.admin_token or "",
                                     default_lock_path(owner, location))
        self.api = AdminApi(app, self.ops, self.launcher, public_url, store_kind, owner)
        self._subscription = None

    def handle(self, request: Request):
        return self.api.handle(request)

    async def start(self) -> None:
        if self.launcher is not None:
            self._subscription = self.app.store.subscribe(self.launcher.notify)
            await self.launcher.start()

    async def stop(self) -> None:
        if self.launcher is not None:
            await self.launcher.stop()
        if self._subscription is not None:
            self._subscription.cancel()


def global_limits_without_redis(config: dict, has_redis: bool) -> list[str]:
    """What a service asks for that this gateway's store cannot give: a "global" rate limit
    needs Redis; on the embedded store each gateway process counts it alone."""
    if has_redis:
        return []
    limits = (config.get("metadata") or {}).get("rate_limits") or []
    return [f"metadata.rate_limits[{i}] has scope 'global', which needs a Redis store "
            f"(infergate gateway --registry redis://...): on this gateway's embedded store "
            f"each gateway process counts it alone"
            for i, limit in enumerate(limits)
            if isinstance(limit, dict) and limit.get("scope") == "global"]
