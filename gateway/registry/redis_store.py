"""Shared control-plane store on Redis (or Redis Cluster).

Layout (prefix ``infergate:`` by default; every key carries the hash tag
``{state}`` so the whole control plane lives in one cluster slot and the Lua
scripts below touch a single slot)::

    infergate:{state}:services             hash  name -> ServiceRecord JSON
    infergate:{state}:service-versions     hash  name -> ServiceRecord.version (the same
                                                 number as in the JSON; written together)
    infergate:{state}:instances:<service>  hash  instance_id -> {"rec": InstanceRecord, "ttl": s}
    infergate:{state}:deadlines            zset  "<service>\\0<instance_id>" -> lease deadline
    infergate:{state}:instance-services    set   services that have instance hashes
    infergate:{state}:generation           string  a random id, set once with the state
    infergate:{state}:tick                 string  server time of the last lease read
    infergate:changes                      pub/sub channel, messages "kind:name"
    infergate:{seen:<key>}:expiry          zset  signature -> when it expires (gateway.auth's
                                                 replay memory, one pair per service and token,
    infergate:{seen:<key>}:first           hash  signature -> when first seen   in its own slot)

Service writes are compare-and-set (``_PUT_SERVICE``): the script checks the
stored version against the one the writer read and writes the record (JSON with
the new version inside) and ``service-versions`` together; readers only read
the JSON, so a record and its version are always read as one.

Lease deadlines use the Redis server clock (``TIME`` inside the scripts), so
gateways with skewed clocks agree on what has expired. Static instances
(ttl <= 0) have no deadline.

Faults of Redis itself must not empty the routing table:

* Time Redis spent away (stopped, paused, restarted from its files) is not held
  against leases: every script that reads them first compares the server clock
  with ``tick``, and after a gap of more than TICK_GAP_S it gives every lapsed
  lease a fresh term of ``lease_grace`` seconds, so that workers can heartbeat
  before anything is deleted. A worker that died meanwhile is gone a term later.
* A Redis that comes back without its data (no persistence, a failover to an
  empty replica) has no ``generation``. A gateway that reads a state without one
  while it holds a state of its own writes that state back (services, and
  instances with fresh leases) in one script that first checks for the marker,
  so of several gateways one writes and the others read what it wrote.

Background tasks (``start()``):

* a listener subscribed to the change channel; it calls subscribers for
  changes made by other store objects (our own are announced directly and
  their echo is dropped). It is also the connection supervisor: when the
  subscription breaks the store turns *unavailable* -- reads serve the last
  snapshot, writes raise ``StoreUnavailable`` -- and it reconnects with
  exponential backoff; once back it re-subscribes, reloads the snapshot and
  notifies ``("resync", "")``.
* an expirer: every ``expiry_interval`` seconds it lists lapsed leases and
  deletes each with a conditional script (re-checked against the deadline),
  so of several gateways only the one whose delete succeeded announces it.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .records import InstanceRecord, ServiceRecord
from .store import (KIND_INSTANCES, KIND_RESYNC, KIND_SERVICE, KINDS, PRUNE_SIGNATURES,
                    ServiceNotFound, Snapshot, Store, StoreError, StoreUnavailable,
                    VersionConflict)

log = logging.getLogger("infergate.registry.redis")

DEFAULT_PREFIX = "infergate:"
SEP = "\x00"                      # between service and instance id in deadline members
TICK_GAP_S = 1.5                  # no lease read for this long: Redis was away (see above)
DEFAULT_TTL_S = 3.0               # a lease term, where no instance says its own
ECHO_WINDOW_S = 5.0               # how long we wait for the echo of our own publish
REPLAY_IN_FLIGHT = 32             # replay checks at once (redis-py's pool holds 100 connections)

_CONN_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError, rexc.TimeoutError, rexc.ClusterDownError, rexc.ClusterError,
    rexc.BusyLoadingError, OSError, asyncio.TimeoutError)

T = TypeVar("T")


def _member(service: str, instance_id: str) -> str:
    """An instance's member of the deadlines zset."""
    return service + SEP + instance_id


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean "Redis cannot be reached", not "bad request"."""
    if isinstance(exc, _CONN_ERRORS):
        return True
    # redis-py's cluster client reports an unreachable cluster this way.
    return isinstance(exc, rexc.RedisClusterException) and "cannot be connected" in str(exc)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# After _NOW, in scripts whose KEYS[1] is the deadlines zset and KEYS[2] the tick, with
# ARGV[1] the gap and ARGV[2] the term a lease gets after one (see the module docstring).
_LEASES = _NOW + """
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], string.format('%.6f', now))
if now - previous > tonumber(ARGV[1]) then
  local renewed = string.format('%.6f', now + tonumber(ARGV[2]))
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.6f', now))
  for _, m in ipairs(lapsed) do
    redis.call('ZADD', KEYS[1], renewed, m)
  end
end
"""

# KEYS: deadlines, tick; ARGV: gap, term -> server time
_TIME = _LEASES + """
return string.format('%.6f', now)
"""

# KEYS: instances hash, deadlines, instance-services, services;
# ARGV: id, payload, ttl, member, service, require ('1': the service must have a record)
# -> server time, or -1 when the service is required and has no record
_REGISTER = _NOW + """
if ARGV[6] == '1' and redis.call('HEXISTS', KEYS[4], ARGV[5]) == 0 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[5])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('ZADD', KEYS[2], string.format('%.6f', now + ttl), ARGV[4])
else
  redis.call('ZREM', KEYS[2], ARGV[4])
end
return string.format('%.6f', now)
"""

# KEYS: instances hash, deadlines; ARGV: id, member, ttl
# 1 = extended; 0 = unknown or lapsed (the caller re-registers)
_HEARTBEAT = _NOW + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local s = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not s then return 1 end
if tonumber(s) < now then return 0 end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('ZADD', KEYS[2], string.format('%.6f', now + ttl), ARGV[2])
end
return 1
"""

# KEYS: instances hash, deadlines, instance-services; ARGV: id, member, service
_DEREGISTER = """
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[3], ARGV[3]) end
return n
"""

# KEYS: deadlines, tick, instances hash; ARGV: gap, term, service, sep
# -> {now, id, payload, deadline|'', ...}
_LIST = _LEASES + """
local h = redis.call('HGETALL', KEYS[3])
local out = {string.format('%.6f', now)}
for i = 1, #h, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[3] .. ARGV[4] .. h[i])
  out[#out + 1] = h[i]
  out[#out + 1] = h[i + 1]
  out[#out + 1] = s or ''
end
return out
"""

# KEYS: deadlines, tick, generation; ARGV: gap, term, limit
# -> {generation or '', lapsed members...}
_SCAN_LAPSED = _LEASES + """
local out = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.6f', now),
                       'LIMIT', 0, tonumber(ARGV[3]))
table.insert(out, 1, redis.call('GET', KEYS[3]) or '')
return out
"""

# KEYS: generation, services, versions, deadlines, instance-services, then one instances
# hash per instance in ARGV; ARGV: generation, number of services, (name, JSON, version)
# per service, then (service, id, payload, ttl, member) per instance
# -> 1 written, 0 another gateway wrote first (the marker exists). What was written
# meanwhile (a service created again, a worker registered again) is kept.
_RESTORE = _NOW + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
local a = 3
for _ = 1, tonumber(ARGV[2]) do
  if redis.call('HSETNX', KEYS[2], ARGV[a], ARGV[a + 1]) == 1 then
    redis.call('HSET', KEYS[3], ARGV[a], ARGV[a + 2])
  end
  a = a + 3
end
local k = 6
while a <= #ARGV do
  if redis.call('HSETNX', KEYS[k], ARGV[a + 1], ARGV[a + 2]) == 1 then
    redis.call('SADD', KEYS[5], ARGV[a])
    local ttl = tonumber(ARGV[a + 3])
    if ttl > 0 then
      redis.call('ZADD', KEYS[4], string.format('%.6f', now + ttl), ARGV[a + 4])
    end
  end
  a = a + 5
  k = k + 1
end
return 1
"""

# KEYS: deadlines, instances hash, instance-services; ARGV: member, id, service
_EXPIRE_ONE = _NOW + """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) >= now then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[3]) end
return 1
"""

# KEYS: a replay key's expiry zset and first-seen hash; ARGV: now, signature, expires,
# capacity, most expired entries forgotten -> when the signature was first seen (now if it
# is new), or nil when the key holds `capacity` unexpired ones. The keys expire with the
# last entry.
_REMEMBER_SIGNATURE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[5])
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
local first = redis.call('HGET', KEYS[2], ARGV[2])
if first then return first end
if redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf') >= tonumber(ARGV[4]) then return false end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
local ttl = math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[1])) + 1
if redis.call('TTL', KEYS[1]) < ttl then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return ARGV[1]
"""

# KEYS: instances hash; ARGV: id, expected, new -> 1 set, 0 changed meanwhile, -1 gone
_CAS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return -1 end
if cur ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# The stored version of service ARGV[1] (KEYS[1] services, KEYS[2] versions): 0 when
# there is no record, 1 for a record written before records had versions.
_VERSION_OF = """
local function version_of(services, versions, name)
  local v = redis.call('HGET', versions, name)
  if v then return tonumber(v) end
  if redis.call('HEXISTS', services, name) == 1 then return 1 end
  return 0
end
"""

# KEYS: services, versions; ARGV: name, expected version, new version, payload
# -> {1, new version} written, or {0, current version} (nothing written)
_PUT_SERVICE = _VERSION_OF + """
local cur = version_of(KEYS[1], KEYS[2], ARGV[1])
if cur ~= tonumber(ARGV[2]) then return {0, cur} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return {1, tonumber(ARGV[3])}
"""

# KEYS: services, instances hash, deadlines, instance-services, versions;
# ARGV: service, sep, expected version ('' = any)
# -> {records deleted, instances deleted} or {-1, current version} on a version mismatch
_DELETE_SERVICE = _VERSION_OF + """
if ARGV[3] ~= '' then
  local cur = version_of(KEYS[1], KEYS[5], ARGV[1])
  if cur ~= tonumber(ARGV[3]) then return {-1, cur} end
end
redis.call('HDEL', KEYS[5], ARGV[1])
local n = redis.call('HDEL', KEYS[1], ARGV[1])
local ids = redis.call('HKEYS', KEYS[2])
for _, id in ipairs(ids) do redis.call('ZREM', KEYS[3], ARGV[1] .. ARGV[2] .. id) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[1])
return {n, #ids}
"""


def parse_redis_url(url: str) -> tuple[str, bool, str | None]:
    """-> (URL for redis-py, cluster?, prefix from ``?prefix=``).

    ``redis+cluster://`` / ``rediss+cluster://`` or ``?cluster=true`` select
    Redis Cluster."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    cluster = False
    if scheme.endswith("+cluster"):
        cluster, scheme = True, scheme[: -len("+cluster")]
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a redis URL: {url!r}")
    query, prefix = [], None
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k == "cluster":
            cluster = cluster or v.lower() in ("1", "true", "yes", "on")
        elif k == "prefix":
            prefix = v
        else:
            query.append((k, v))
    path = parts.path
    if cluster and scheme != "unix":
        path = ""                      # Redis Cluster has only db 0
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), "")), cluster, prefix


class RedisStore(Store):
    def __init__(self, url: str, *, prefix: str | None = None, channel: str | None = None,
                 expiry_interval: float = 0.25, reconnect_max: float = 2.0,
                 connect_timeout: float = 1.0, op_timeout: float = 3.0) -> None:
        super().__init__()
        self.url = url
        client_url, self.cluster, url_prefix = parse_redis_url(url)
        self.prefix = prefix or url_prefix or DEFAULT_PREFIX
        base = self.prefix + "{state}:"
        self._k_services = base + "services"
        self._k_versions = base + "service-versions"
        self._k_deadlines = base + "deadlines"
        self._k_isvcs = base + "instance-services"
        self._k_inst_base = base + "instances:"
        self._k_tick = base + "tick"
        self._k_generation = base + "generation"
        self._generation: str | None = None
        self._ttls: dict[tuple[str, str], float] = {}  # (service, id) -> lease term
        self.channel = channel or self.prefix + "changes"
        self.expiry_interval = expiry_interval
        self.reconnect_max = reconnect_max
        loc = urlsplit(client_url)
        self._where = f"{loc.hostname}:{loc.port or 6379}" if loc.hostname else loc.path
        self.op_timeout = op_timeout
        # No socket_timeout: redis-py applies it with asyncio.timeout() around
        # every read, and on Python 3.11 that swallows a cancellation arriving
        # as the reply lands (a cancelled caller carries on). Each operation is
        # bounded by asyncio.wait_for(op_timeout) instead (see _op); keepalive
        # catches half-open idle connections.
        common: dict[str, Any] = dict(decode_responses=True,
                                      socket_connect_timeout=connect_timeout,
                                      socket_timeout=None, socket_keepalive=True)
        self._client_url = client_url
        self._common = common
        if self.cluster:
            self._client = RedisCluster.from_url(client_url, retry=Retry(NoBackoff(), 1),
                                                 **common)
        else:
            self._client = aredis.Redis.from_url(client_url, retry=Retry(NoBackoff(), 1),
                                                 **common)
        # Pub/sub uses its own plain connection that never reconnects behind our
        # back: a broken subscription must surface so we can announce a resync.
        # (In a cluster PUBLISH reaches every node, so any node will do.)
        self._ps_client: aredis.Redis | None = None
        reg = self._client.register_script
        self._s_register = reg(_REGISTER)
        self._s_heartbeat = reg(_HEARTBEAT)
        self._s_deregister = reg(_DEREGISTER)
        self._s_list = reg(_LIST)
        self._s_scan = reg(_SCAN_LAPSED)
        self._s_expire = reg(_EXPIRE_ONE)
        self._s_cas = reg(_CAS)
        self._s_delete = reg(_DELETE_SERVICE)
        self._s_put_service = reg(_PUT_SERVICE)
        self._s_restore = reg(_RESTORE)
        self._s_remember = reg(_REMEMBER_SIGNATURE)
        self._replay_slots = asyncio.Semaphore(REPLAY_IN_FLIGHT)
        self._available = True
        self._supervised = False       # a listener task owns the connection state
        self._outage_logged = False
        self._echo: dict[str, collections.deque[float]] = {}
        self._tasks: list[asyncio.Task] = []
        self._first_attempt = asyncio.Event()
        self._closed = False

    @property
    def available(self) -> bool:
        return self._available

    def _inst_key(self, service: str) -> str:
        return self._k_inst_base + service

    # ---- error handling --------------------------------------------------
    def _lost(self, exc: BaseException) -> None:
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("redis at %s is unreachable (%s: %s); serving the last snapshot "
                        "and retrying", self._where, type(exc).__name__, exc)

    def _unavailable(self, exc: BaseException | None = None) -> StoreUnavailable:
        why = f": {type(exc).__name__}: {exc}" if exc else ""
        return StoreUnavailable(f"state store redis at {self._where} is unavailable{why}")

    async def _op(self, aw: Awaitable[T]) -> T:
        """One bounded Redis round (a hung server reads as unreachable)."""
        return await asyncio.wait_for(aw, self.op_timeout)

    async def _w(self, fn: Callable[[], Awaitable[T]]) -> T:
        """A write: fails fast while the supervisor knows Redis is down."""
        if self._closed:
            raise StoreUnavailable("registry store is closed")
        if self._supervised and not self._available:
            raise self._unavailable()
        try:
            return await self._op(fn())
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self._lost(exc)
            raise self._unavailable(exc) from exc

    async def _r(self, fn: Callable[[], Awaitable[T]], fallback: Callable[[], T]) -> T:
        """A read: the last known state while Redis is unreachable."""
        if self._closed or (self._supervised and not self._available):
            return fallback()
        try:
            return await self._op(fn())
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self._lost(exc)
            return fallback()

    async def _publish(self, kind: str, name: str) -> None:
        """Tell our subscribers now, then everyone else through the channel."""
        self._notify(kind, name)
        msg = f"{kind}:{name}"
        echo = self._echo.setdefault(msg, collections.deque()) if self._supervised else None
        if echo is not None:
            echo.append(time.monotonic())
        try:
            await self._op(self._client.publish(self.channel, msg))
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            # The change itself is stored; gateways that missed it resync when
            # their own subscription comes back.
            self._lost(exc)
            if echo:
                echo.pop()

    def _on_message(self, msg: str) -> None:
        echo = self._echo.get(msg)
        if echo:
            cutoff = time.monotonic() - ECHO_WINDOW_S
            while echo and echo[0] < cutoff:
                echo.popleft()
            if echo:
                echo.popleft()     # our own change, already announced
                return
        kind, _, name = msg.partition(":")
        if kind in KINDS:
            self._notify(kind, name)

    # ---- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        if self._tasks:
            return
        self._supervised = True
        self._tasks = [asyncio.create_task(self._listen_loop(), name="infergate-redis-listen"),
                       asyncio.create_task(self._expiry_loop(), name="infergate-redis-expiry")]
        # Wait for the first connection attempt, so nothing published after
        # start() returns is missed (or we know we are offline).
        try:
            await asyncio.wait_for(self._first_attempt.wait(), 10)
        except asyncio.TimeoutError:
            pass

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop_tasks(self._tasks)
        self._tasks = []
        await self._drop_ps_client()
        for c in (self._client,):
            if c is not None:
                try:
                    await c.aclose()
                except Exception:
                    pass

    async def _new_pubsub(self):
        await self._drop_ps_client()
        url = self._client_url
        if self.cluster:
            # Rotate through the known nodes, keeping the URL's credentials/TLS.
            await self._op(self._client.initialize())
            nodes = sorted({(n.host, n.port) for n in self._client.get_nodes()})
            if nodes:
                self._ps_node = (getattr(self, "_ps_node", -1) + 1) % len(nodes)
                host, port = nodes[self._ps_node]
                parts = urlsplit(url)
                auth = parts.netloc.rpartition("@")[0]
                netloc = (auth + "@" if auth else "") + f"{host}:{port}"
                url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        self._ps_client = aredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0),
                                                health_check_interval=10, **self._common)
        return self._ps_client.pubsub()

    async def _drop_ps_client(self) -> None:
        c, self._ps_client = self._ps_client, None
        if c is not None:
            try:
                await c.aclose()
            except Exception:
                pass

    async def _listen_loop(self) -> None:
        backoff = 0.05
        recovering = False
        while not self._closed:
            ps = None
            try:
                ps = await self._new_pubsub()
                await self._op(ps.subscribe(self.channel))
                await self._op(self._client.ping())
                self._echo.clear()
                self._available = True
                backoff = 0.05
                if recovering:
                    log.warning("redis at %s is reachable again; resyncing", self._where)
                self._outage_logged = False
                try:
                    await self.snapshot()          # warm the fallback cache
                except Exception:
                    log.exception("loading the registry snapshot failed")
                self._first_attempt.set()
                if recovering:
                    self._notify(KIND_RESYNC, "")
                while not self._closed:
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._on_message(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._available = False
                recovering = True
                self._lost(exc)
                self._first_attempt.set()
            finally:
                if ps is not None:
                    try:
                        await ps.aclose()
                    except Exception:
                        pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.reconnect_max)

    async def _expiry_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.expiry_interval)
            if not self._available or self._closed:
                continue
            try:
                await self._op(self.expire_lapsed())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_connection_error(exc):
                    self._lost(exc)
                else:
                    log.exception("instance expiry failed")

    @property
    def lease_grace(self) -> float:
        """The term a lapsed lease gets after Redis was away: the longest lease known."""
        return max((t for t in self._ttls.values() if t > 0), default=DEFAULT_TTL_S)

    def _lease_args(self) -> list[str]:
        return [repr(TICK_GAP_S), repr(self.lease_grace)]

    async def expire_lapsed(self, limit: int = 500) -> list[str]:
        """Delete instances whose lease lapsed; announce and return their services. (And
        notice a Redis that lost its data: its next snapshot writes ours back.)"""
        generation, *members = await self._s_scan(
            keys=[self._k_deadlines, self._k_tick, self._k_generation],
            args=[*self._lease_args(), limit])
        if generation != self._generation:  # new, lost (written back now), or written back
            known = self._generation
            await self.snapshot()
            if known is not None:
                self._notify(KIND_RESYNC, "")
        services: list[str] = []
        for member in members:
            service, _, iid = member.partition(SEP)
            done = await self._s_expire(keys=[self._k_deadlines, self._inst_key(service),
                                              self._k_isvcs], args=[member, iid, service])
            if done:
                self._cache_delete_instance(service, iid)
                self._ttls.pop((service, iid), None)
                if service not in services:
                    services.append(service)
        for service in services:
            await self._publish(KIND_INSTANCES, service)
        return services

    # ---- services --------------------------------------------------------
    @staticmethod
    def _svc_from_json(data: str) -> ServiceRecord:
        rec = ServiceRecord.from_dict(json.loads(data))
        rec.version = max(1, rec.version)     # written before records had versions
        return rec

    async def put_service(self, rec: ServiceRecord, *, expect_version: int | None = None) -> None:
        # The new version goes into the JSON, so the writer names it: expected + 1.
        # An unconditional put guesses the stored version and retries with the one
        # the script reports (each round is still one atomic compare-and-set).
        expected = expect_version if expect_version is not None else rec.version
        stored = rec.copy()
        for _ in range(100):
            stored.version = expected + 1
            payload = json.dumps(stored.to_dict())
            ok, current = await self._w(lambda: self._s_put_service(
                keys=[self._k_services, self._k_versions],
                args=[rec.name, expected, stored.version, payload]))
            if ok:
                break
            if expect_version is not None:
                raise VersionConflict(rec.name, expect_version, int(current))
            expected = int(current)
        else:
            raise StoreError(f"service {rec.name!r} kept changing; not written")
        rec.version = stored.version
        self._cache_put_service(rec)
        await self._publish(KIND_SERVICE, rec.name)

    async def get_service(self, name: str) -> ServiceRecord | None:
        def cached() -> ServiceRecord | None:
            rec = self._cache_services.get(name)
            return rec.copy() if rec else None

        async def fetch() -> ServiceRecord | None:
            data = await self._client.hget(self._k_services, name)
            if data is None:
                self._cache_services.pop(name, None)
                return None
            rec = self._svc_from_json(data)
            self._cache_put_service(rec)
            return rec

        return await self._r(fetch, cached)

    async def list_services(self) -> list[ServiceRecord]:
        async def fetch() -> list[ServiceRecord]:
            raw = await self._client.hgetall(self._k_services)
            recs = [self._svc_from_json(raw[n]) for n in sorted(raw)]
            self._cache_services = {r.name: r.copy() for r in recs}
            return recs

        return await self._r(fetch, lambda: list(self._cached_snapshot()[0].values()))

    async def delete_service(self, name: str, *, expect_version: int | None = None) -> bool:
        n, m = await self._w(lambda: self._s_delete(
            keys=[self._k_services, self._inst_key(name), self._k_deadlines, self._k_isvcs,
                  self._k_versions],
            args=[name, SEP, "" if expect_version is None else expect_version]))
        if n == -1:
            raise VersionConflict(name, int(expect_version), int(m))
        self._cache_delete_service(name)
        if n:
            await self._publish(KIND_SERVICE, name)
        if m:
            await self._publish(KIND_INSTANCES, name)
        return bool(n or m)

    # ---- instances -------------------------------------------------------
    @staticmethod
    def _encode_instance(inst: InstanceRecord, ttl: float) -> str:
        """An instances hash value: the record and its lease term (_decode_instance)."""
        return json.dumps({"rec": inst.to_dict(), "ttl": ttl})

    def _decode_instance(self, payload: str, deadline: float | None,
                         now: float) -> InstanceRecord | None:
        wrapped = json.loads(payload)
        inst = InstanceRecord.from_dict(wrapped["rec"])
        ttl = float(wrapped.get("ttl", 0))
        self._ttls[(inst.service, inst.instance_id)] = ttl
        if ttl > 0:
            if deadline is None or deadline < now:
                return None                  # lapsed, not yet collected
            inst.heartbeat_at = deadline - ttl
        return inst

    async def register_instance(self, inst: InstanceRecord, ttl: float, *,
                                require_service: bool = False) -> None:
        inst = inst.copy()
        inst.heartbeat_at = time.time()
        ttl = float(ttl)
        payload = self._encode_instance(inst, ttl)
        now = await self._w(lambda: self._s_register(
            keys=[self._inst_key(inst.service), self._k_deadlines, self._k_isvcs,
                  self._k_services],
            args=[inst.instance_id, payload, repr(ttl), _member(inst.service, inst.instance_id),
                  inst.service, "1" if require_service else "0"]))
        if now == -1:
            raise ServiceNotFound(inst.service)
        if ttl > 0:
            inst.heartbeat_at = float(now)
        self._ttls[(inst.service, inst.instance_id)] = ttl
        self._cache_put_instance(inst)
        await self._publish(KIND_INSTANCES, inst.service)

    async def heartbeat(self, service: str, instance_id: str, ttl: float) -> bool:
        ok = await self._w(lambda: self._s_heartbeat(
            keys=[self._inst_key(service), self._k_deadlines],
            args=[instance_id, _member(service, instance_id), repr(float(ttl))]))
        return bool(ok)

    async def deregister_instance(self, service: str, instance_id: str) -> bool:
        n = await self._w(lambda: self._s_deregister(
            keys=[self._inst_key(service), self._k_deadlines, self._k_isvcs],
            args=[instance_id, _member(service, instance_id), service]))
        self._cache_delete_instance(service, instance_id)
        if n:
            await self._publish(KIND_INSTANCES, service)
        return bool(n)

    async def _update_instance(self, service: str, instance_id: str, field: str,
                               value: Any) -> bool:
        key = self._inst_key(service)
        for _ in range(20):
            raw = await self._w(lambda: self._client.hget(key, instance_id))
            if raw is None:
                return False
            wrapped = json.loads(raw)
            if wrapped["rec"].get(field) == value:
                return True
            wrapped["rec"][field] = value
            new = json.dumps(wrapped)
            res = await self._w(lambda: self._s_cas(keys=[key], args=[instance_id, raw, new]))
            if res == -1:
                return False
            if res == 1:
                cached = self._cache_instances.get(service, {}).get(instance_id)
                if cached is not None:
                    setattr(cached, field, value)
                await self._publish(KIND_INSTANCES, service)
                return True
        raise StoreError(f"instance {service}/{instance_id} kept changing; {field} not set")

    async def set_instance_health(self, service: str, instance_id: str, healthy: bool) -> bool:
        return await self._update_instance(service, instance_id, "healthy", bool(healthy))

    async def set_instance_weight(self, service: str, instance_id: str, weight: int) -> bool:
        return await self._update_instance(service, instance_id, "weight", int(weight))

    async def list_instances(self, service: str) -> list[InstanceRecord]:
        async def fetch() -> list[InstanceRecord]:
            out = await self._s_list(keys=[self._k_deadlines, self._k_tick,
                                           self._inst_key(service)],
                                     args=[*self._lease_args(), service, SEP])
            now = float(out[0])
            insts = []
            for i in range(1, len(out), 3):
                deadline = float(out[i + 2]) if out[i + 2] != "" else None
                inst = self._decode_instance(out[i + 1], deadline, now)
                if inst is not None:
                    insts.append(inst)
            insts.sort(key=lambda x: x.instance_id)
            self._cache_set_instances(service, insts)
            return insts

        return await self._r(fetch, lambda: self._cached_instances(service))

    async def snapshot(self) -> Snapshot:
        async def fetch() -> Snapshot:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(self._k_services)
            pipe.smembers(self._k_isvcs)
            pipe.get(self._k_generation)
            raw_services, inst_services, generation = await pipe.execute()
            if generation is None and await self._without_generation(
                    bool(raw_services or inst_services)):
                return await fetch()  # our state, written back: read it as others will
            self._generation = generation or self._generation
            inst_services = sorted(inst_services)
            pipe = self._client.pipeline(transaction=False)
            # The clock leases are kept by (and the lease term after a gap):
            pipe.eval(_TIME, 2, self._k_deadlines, self._k_tick, *self._lease_args())
            pipe.zrange(self._k_deadlines, 0, -1, withscores=True)
            for s in inst_services:
                pipe.hgetall(self._inst_key(s))
            res = await pipe.execute()
            now = float(res[0])
            deadlines = dict(res[1])
            services = {n: self._svc_from_json(raw_services[n]) for n in sorted(raw_services)}
            instances: dict[str, list[InstanceRecord]] = {}
            for s, h in zip(inst_services, res[2:]):
                lst = []
                for iid in sorted(h):
                    inst = self._decode_instance(h[iid], deadlines.get(_member(s, iid)), now)
                    if inst is not None:
                        lst.append(inst)
                if lst:
                    instances[s] = lst
            snap = (services, instances)
            self._cache_set_snapshot(snap)
            return snap

        return await self._r(fetch, self._cached_snapshot)

    async def _without_generation(self, has_state: bool) -> bool:
        """Redis has no generation marker. A new Redis, or one written before markers:
        mark the state it has. A Redis that lost its data while we hold a state: write
        ours back (see the module docstring). True when a state was written back."""
        generation = uuid.uuid4().hex
        if has_state or not (self._cache_services or self._cache_instances):
            if await self._client.set(self._k_generation, generation, nx=True):
                self._generation = generation
            return False
        services, instances = self._cached_snapshot()
        keys = [self._k_generation, self._k_services, self._k_versions, self._k_deadlines,
                self._k_isvcs]
        args: list = [generation, len(services)]
        for name, rec in services.items():
            args += [name, json.dumps(rec.to_dict()), rec.version]
        count = 0
        for service, insts in instances.items():
            for inst in insts:
                ttl = self._ttls.get((service, inst.instance_id), DEFAULT_TTL_S)
                keys.append(self._inst_key(service))
                args += [service, inst.instance_id,
                         self._encode_instance(inst, ttl), repr(ttl),
                         _member(service, inst.instance_id)]
                count += 1
        if await self._s_restore(keys=keys, args=args):
            self._generation = generation
            log.warning("redis at %s came back without its data: wrote back this gateway's "
                        "%d services and %d instances", self._where, len(services), count)
        return True

    async def remember_signature(self, key: str, signature: str, now: float, expires: float,
                                 capacity: int) -> float | None:
        base = f"{self.prefix}{{seen:{key}}}:"
        try:
            async with self._replay_slots:  # a flood of signed requests must not take the pool
                first_seen = await self._w(lambda: self._s_remember(
                    keys=[base + "expiry", base + "first"],
                    args=[repr(now), signature, repr(expires), capacity, PRUNE_SIGNATURES]))
        except rexc.RedisError as exc:  # e.g. out of memory: nothing remembered, so refuse
            raise StoreUnavailable(f"redis at {self._where} refused a signature: {exc}") from exc
        return None if first_seen is None else float(first_seen)
