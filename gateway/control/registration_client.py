"""How a worker joins a registry: directly in Redis, or through a gateway's admin API.

``open_registration_client(url)``:

* ``redis://...`` (any URL the registry's ``open_store`` takes as Redis): the
  instance is written to the shared Redis store with a lease (``ttl``) that
  heartbeats extend;
* ``http://host:port`` (a gateway): the same calls go to the gateway's admin
  API (``/admin/instances/<service>...``), so a worker can join a gateway that
  keeps its state in the embedded store. The credential comes from ``token=``,
  the URL (``http://TOKEN@host:port``), ``INFERGATE_REGISTRATION_TOKEN`` (what
  launched workers get) or ``INFERGATE_ADMIN_TOKEN``.

Every client has ``register(instance, ttl)``, ``heartbeat(instance, ttl) ->
bool`` (False: unknown or lapsed, register again), ``deregister(instance)``
and ``close()``; ``instance`` is an InstanceRecord as a dict. ``register``
raises :class:`ServiceGone` when the service has no record (never created, or
deleted): instances join existing services only, so a worker that outlives
its service cannot bring it back without its token and settings.

``http_request`` is the small asyncio HTTP/1.1 client the control plane uses
for its own calls (one connection per call, ``Connection: close``).
"""
from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ..registry import InstanceRecord, ServiceNotFound, is_redis_url, open_store
from . import url_host

SERVICE_NOT_FOUND = "service_not_found"   # admin API: the reason of a refused registration


class RegistrationError(RuntimeError):
    """The registry refused the call (an HTTP error from the gateway)."""


class ServiceGone(RegistrationError):
    """The service has no record in the registry (deleted, or never created)."""


async def http_request(method: str, url: str, body=None, headers: dict | None = None,
                       timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of one request. ``body`` may be bytes or a JSON-able object."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if body is not None and not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    body = body or b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {url_host(host)}:{port}", "Connection: close",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + bytes(body)

    async def exchange() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            parts_ = status_line.split(None, 2)
            if len(parts_) < 2 or not parts_[1].isdigit():
                raise ConnectionError(f"malformed response from {host}:{port}: {status_line!r}")
            status = int(parts_[1])
            length = None
            chunked = False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                data = bytearray()
                while True:
                    size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    data += await reader.readexactly(size)
                    await reader.readline()
                payload = bytes(data)
            elif length is not None:
                payload = await reader.readexactly(length)
            else:
                payload = await reader.read()
            return status, payload
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)


def _record(instance) -> InstanceRecord:
    if isinstance(instance, InstanceRecord):
        return instance
    return InstanceRecord.from_dict(dict(instance))


class StoreRegistrationClient:
    """Registers straight into a (Redis) store."""

    def __init__(self, url: str):
        self.url = url
        self.store = open_store(url)

    async def register(self, instance, ttl: float) -> None:
        rec = _record(instance)
        try:
            await self.store.register_instance(rec, ttl, require_service=True)
        except ServiceNotFound:
            raise ServiceGone(f"service {rec.service!r} does not exist in the registry "
                              f"(deleted, or never created)") from None

    async def heartbeat(self, instance, ttl: float) -> bool:
        rec = _record(instance)
        return await self.store.heartbeat(rec.service, rec.instance_id, ttl)

    async def deregister(self, instance) -> None:
        rec = _record(instance)
        await self.store.deregister_instance(rec.service, rec.instance_id)

    async def service_token(self, service: str) -> str | None:
        """The service's token ("" for none); None when the service is gone."""
        rec = await self.store.get_service(service)
        return None if rec is None else rec.token or ""

    async def close(self) -> None:
        await self.store.close()


class GatewayRegistrationClient:
    """Registers through a gateway's admin API."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 3.0):
        parts = urlsplit(url)
        in_url = unquote(parts.password or parts.username or "")
        netloc = parts.netloc.rpartition("@")[2]
        self.base = urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
        if token is None:
            token = in_url or os.environ.get("INFERGATE_REGISTRATION_TOKEN") or \
                os.environ.get("INFERGATE_ADMIN_TOKEN", "")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout

    def _url(self, rec: InstanceRecord, suffix: str | None = None) -> str:
        """.../admin/instances/<service>, or .../<service>/<id><suffix> with a suffix."""
        url = f"{self.base}/admin/instances/{quote(rec.service, safe='')}"
        if suffix is not None:
            url += f"/{quote(rec.instance_id, safe='')}{suffix}"
        return url

    async def _call(self, method: str, url: str, body=None) -> dict:
        status, payload = await http_request(method, url, body, self.headers, self.timeout)
        try:
            data = json.loads(payload) if payload else {}
        except ValueError:
            data = {}
        if status >= 400 and status != 404:
            raise RegistrationError(f"{method} {url}: {status} "
                                    f"{data.get('message', payload[:200])}")
        data["_status"] = status
        return data

    async def register(self, instance, ttl: float) -> None:
        rec = _record(instance)
        data = await self._call("POST", self._url(rec), {"instance": rec.to_dict(), "ttl": ttl})
        if data["_status"] == 404 and data.get("reason") == SERVICE_NOT_FOUND:
            raise ServiceGone(data.get("message") or f"service {rec.service!r} does not exist")
        if data["_status"] == 404:
            raise RegistrationError(f"the gateway at {self.base} has no admin API "
                                    f"(404 on {self._url(rec)})")

    async def heartbeat(self, instance, ttl: float) -> bool:
        rec = _record(instance)
        data = await self._call("POST", self._url(rec, "/heartbeat"), {"ttl": ttl})
        return data["_status"] == 200 and bool(data.get("ok"))

    async def deregister(self, instance) -> None:
        rec = _record(instance)
        await self._call("DELETE", self._url(rec, ""))

    async def service_token(self, service: str) -> str | None:
        """The service's token ("" for none); None when the service is gone."""
        data = await self._call("GET", f"{self.base}/admin/services/{quote(service, safe='')}")
        return None if data["_status"] == 404 else data.get("token") or ""

    async def close(self) -> None:
        pass


def open_registration_client(url: str, token: str | None = None):
    """A registration client for ``url`` (``redis://...`` or ``http://gateway:port``).
    ``token``: the gateway's admin token (default: from the URL or INFERGATE_ADMIN_TOKEN)."""
    if is_redis_url(url):
        return StoreRegistrationClient(url)
    if url.startswith("http://"):
        return GatewayRegistrationClient(url, token)
    if url.startswith("https://"):
        raise ValueError("https registry URLs are not supported; use http:// on a trusted "
                         "network or redis://")
    raise ValueError(f"registry must be redis://... or http://gateway:port, got {url!r}")
