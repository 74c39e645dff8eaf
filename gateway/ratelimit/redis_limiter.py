"""Global rate limits: one atomic Lua script on Redis decides each request.

The script is GCRA (the generic cell rate algorithm: one number per key, the
"theoretical arrival time"), which accepts exactly what a token bucket of the
same rate and burst accepts; time is Redis's own clock (``TIME``), so gateways
with skewed clocks agree. Every global limit of a request is decided by one
EVALSHA, all or nothing: a request refused by one limit takes nothing from
the others. A limit fast enough to be worth it is taken from Redis in leases
instead (``lease``: several tokens of one key at once, see filter.py), so
most requests never wait for Redis. The scripts are loaded with a pipelined
SCRIPT LOAD when a connection opens (EVAL if Redis lost them meanwhile).

Keys: ``<prefix>rl:{<service>}:<rate>:<burst>:<key kind>:<value>`` (prefix
``infergate:`` or the registry URL's ``?prefix=``); the hash tag keeps one
request's keys in one Redis Cluster slot. Keys expire when their bucket would
be full again.

Client: by default one TCP connection per gateway process on which every
decision is pipelined (commands written in one batch per event-loop turn,
replies matched in order, RESP parsed in C: ``gateway._native.ratelimit``),
because redis-py costs ~100 us of CPU per command, more than the gateway's
whole request; Redis Cluster URLs use redis.asyncio's cluster client
(``INFERGATE_RATELIMIT_REDIS_CLIENT=redis-py`` selects it everywhere). Both
run on the event loop and never block it.

Failures: a reply missing for ``timeout`` (100 ms) or a failed connect
(``connect_timeout``, 100 ms) marks Redis unreachable for ``circuit_s`` (1 s):
decisions skip Redis meanwhile (fail open or closed, per limit; see
filter.py), then the next request tries again, so a dead Redis costs at most
one short timeout per second. The outage and the recovery are logged once.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import ssl
import time

from .._native.ratelimit import ReplyError, parse_replies

log = logging.getLogger("infergate.ratelimit")

DEFAULT_PREFIX = "infergate:"
TIMEOUT_S = 0.1
CONNECT_TIMEOUT_S = 0.1
CIRCUIT_S = 1.0

# KEYS[i]: state of limit i (theoretical arrival time, microseconds of Redis's clock)
# ARGV[2i-1]: emission interval (1e6 / rate, microseconds); ARGV[2i]: burst
# -> {1, remaining_1, ..., remaining_n} | {0, i, wait_us} (i: the limit that waits longest)
SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local tats = {}
local worst, worst_wait = 0, 0
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  tats[i] = tat + interval
  local wait = tats[i] - burst * interval - now
  if wait > 0.001 and wait > worst_wait then worst, worst_wait = i, wait end
end
if worst > 0 then return {0, worst, math.ceil(worst_wait)} end
local out = {1}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local ahead = tats[i] - now
  redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(ahead / 1000) + 1)
  out[i + 1] = math.floor(burst - ahead / interval + 1e-6)
end
return out
"""
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

# A lease: up to ARGV[3] tokens of one limit at once (as many as it has, at least one).
# KEYS[1], ARGV[1], ARGV[2] as above -> {granted, remaining} | {0, wait_us}
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local room = math.floor((now + burst * interval - tat + 0.001) / interval)
if room < 1 then return {0, math.ceil(tat + interval - burst * interval - now)} end
local n = math.min(tonumber(ARGV[3]), room)
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
return {n, math.floor(burst - (tat - now) / interval + 1e-6)}
"""
LEASE_SHA = hashlib.sha1(LEASE_SCRIPT.encode()).hexdigest()
_SOURCES = {SHA: SCRIPT, LEASE_SHA: LEASE_SCRIPT}


class RedisUnavailable(Exception):
    """Redis could not decide (down, slow, refusing): apply on_redis_error."""


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def command(*parts) -> bytes:
    """One RESP command (str or bytes parts)."""
    enc = [p if isinstance(p, bytes) else str(p).encode() for p in parts]
    return b"*%d\r\n" % len(enc) + b"".join(_bulk(p) for p in enc)


class GlobalLimiter:
    """Decides global limits on Redis, with a circuit breaker and once-per-outage logging."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S, circuit_s: float = CIRCUIT_S,
                 client: str | None = None):
        from ..registry.redis_store import parse_redis_url
        from redis.asyncio.connection import parse_url

        client_url, cluster, prefix = parse_redis_url(url)
        self.prefix = prefix or DEFAULT_PREFIX
        params = parse_url(client_url)
        self.where = params.get("path") or f"{params.get('host')}:{params.get('port', 6379)}"
        self.circuit_s = circuit_s
        kind = client or os.environ.get("INFERGATE_RATELIMIT_REDIS_CLIENT") or (
            "redis-py" if cluster else "pipelined")
        if kind == "pipelined" and not cluster:
            self._backend = PipelinedRedis(params, timeout, connect_timeout)
        else:
            self._backend = RedisPyBackend(client_url, cluster, timeout, connect_timeout)
        self.client = "pipelined" if isinstance(self._backend, PipelinedRedis) else "redis-py"
        self._down_until = 0.0
        self._outage = False

    def available(self) -> bool:
        """False while the circuit is open (Redis failed less than circuit_s ago)."""
        return not self._down_until or time.monotonic() >= self._down_until

    async def decide(self, keys: list[str], args: list[tuple[str, str]]) -> list[int]:
        """The script's reply for these keys and (interval_us, burst) pairs."""
        return await self._eval(SHA, keys, args)

    async def lease(self, key: str, args: tuple[str, str], want: int) -> list[int]:
        """Up to `want` tokens of one limit: [granted, remaining] or [0, wait_us]."""
        return await self._eval(LEASE_SHA, [key], [args + (str(want),)])

    async def _eval(self, sha: str, keys: list[str], args: list[tuple]) -> list[int]:
        try:
            reply = await self._backend.evalsha(keys, args, sha)
        except RedisUnavailable as exc:
            self._failed(exc)
            raise
        if self._outage:
            self._outage = False
            self._down_until = 0.0
            log.warning("redis at %s is reachable again: global rate limits are shared again",
                        self.where)
        return reply

    def _failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + self.circuit_s
        if not self._outage:
            self._outage = True
            log.warning("redis at %s is unreachable for global rate limits (%s): limits with "
                        "on_redis_error=open use each gateway's local buckets, those with "
                        "closed answer 503; retrying every %gs", self.where, exc, self.circuit_s)

    async def close(self) -> None:
        await self._backend.close()


# --- the pipelined connection -------------------------------------------------------------

class _Protocol(asyncio.Protocol):
    __slots__ = ("owner", "transport", "buf")

    def __init__(self, owner: "PipelinedRedis"):
        self.owner = owner
        self.transport = None
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.buf:
            data = self.buf + data
        try:
            replies, pos = parse_replies(data)
        except ValueError as exc:
            self.owner._drop(self, f"bad reply: {exc}")
            return
        self.buf = data[pos:] if pos < len(data) else b""
        if replies:
            self.owner._dispatch(self, replies)

    def connection_lost(self, exc):
        self.owner._drop(self, f"connection lost: {exc}" if exc else "connection closed by redis")


class PipelinedRedis:
    """One connection; commands are written in one batch per loop turn, replies come in order."""

    def __init__(self, params: dict, timeout: float = TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.host = params.get("host", "127.0.0.1")
        self.port = int(params.get("port", 6379))
        self.path = params.get("path")
        self.ssl = None
        cls = params.get("connection_class")
        if cls is not None and cls.__name__ == "SSLConnection":
            self.ssl = ssl.create_default_context()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        handshake = []
        if params.get("password"):
            user = params.get("username")
            handshake.append(command("AUTH", *([user] if user else []), params["password"]))
        if int(params.get("db") or 0):
            handshake.append(command("SELECT", int(params["db"])))
        handshake.append(command("SCRIPT", "LOAD", SCRIPT))
        handshake.append(command("SCRIPT", "LOAD", LEASE_SCRIPT))
        self._handshake = handshake
        self._heads: dict[tuple, bytes] = {}
        self._args: dict[tuple, bytes] = {}
        self._proto: _Protocol | None = None
        self._opening: asyncio.Future | None = None
        self._pending: collections.deque = collections.deque()  # (future, deadline)
        self._out: list[bytes] = []
        self._flush_handle = None
        self._timer = None
        self._suspect = None
        self._loop = None
        self._closed = False

    # --- requests -----------------------------------------------------------------------
    def _encode(self, keys, args, sha) -> bytes:
        n = len(keys)
        head = self._heads.get((sha, n))
        if head is None:
            width = 3 + n + sum(len(pair) for pair in args)
            head = self._heads[(sha, n)] = (b"*%d\r\n" % width + _bulk(b"EVALSHA") +
                                            _bulk(sha.encode()) + _bulk(str(n).encode()))
        parts = [head]
        for key in keys:
            kb = key.encode("utf-8", "surrogateescape")
            parts.append(b"$%d\r\n%s\r\n" % (len(kb), kb))
        for pair in args:
            blob = self._args.get(pair)
            if blob is None:
                blob = self._args[pair] = b"".join(_bulk(a.encode()) for a in pair)
            parts.append(blob)
        return b"".join(parts)

    async def evalsha(self, keys, args, sha=SHA):
        if self._proto is None:
            if self._closed:
                raise RedisUnavailable("the limiter is closed")
            await self._open()
            if self._proto is None:
                raise RedisUnavailable("connection setup failed")
        reply = await self._send(self._encode(keys, args, sha))
        if type(reply) is list:
            return reply
        if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
            # Redis lost the script (restart behind a proxy, SCRIPT FLUSH): EVAL loads it again.
            if self._proto is None:
                raise RedisUnavailable("connection lost")
            flat = [a for pair in args for a in pair]
            reply = await self._send(command("EVAL", _SOURCES[sha], len(keys), *keys, *flat))
            if type(reply) is list:
                return reply
        why = f"redis answered {reply!r}"
        self._drop(self._proto, why)
        raise RedisUnavailable(why)

    async def _open(self) -> None:
        if self._opening is None:
            self._loop = asyncio.get_running_loop()
            self._opening = self._loop.create_task(self._connect())
        await asyncio.shield(self._opening)

    async def _connect(self) -> None:
        loop = self._loop
        try:
            if self.path:
                coro = loop.create_unix_connection(lambda: _Protocol(self), self.path)
            else:
                coro = loop.create_connection(lambda: _Protocol(self), self.host, self.port,
                                              ssl=self.ssl)
            _, proto = await asyncio.wait_for(coro, self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise RedisUnavailable(f"cannot connect: {exc or type(exc).__name__}") from None
        finally:
            self._opening = None
        if self._closed:
            proto.transport.abort()
            raise RedisUnavailable("the limiter is closed")
        self._proto = proto
        for cmd in self._handshake:
            self._send(cmd).add_done_callback(self._handshake_done)

    def _handshake_done(self, fut) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        if isinstance(fut.result(), ReplyError):
            self._drop(self._proto, f"connection setup refused: {fut.result()}")

    def _send(self, payload: bytes) -> asyncio.Future:
        loop = self._loop
        fut = loop.create_future()
        self._pending.append((fut, loop.time() + self.timeout))
        self._out.append(payload)
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = loop.call_at(self._pending[0][1], self._check)
        return fut

    def _flush(self) -> None:
        self._flush_handle = None
        if self._out and self._proto is not None:
            self._proto.transport.write(b"".join(self._out))
        self._out.clear()

    def _dispatch(self, proto, replies) -> None:
        if proto is not self._proto:
            return
        pending = self._pending
        for reply in replies:
            if not pending:
                self._drop(proto, "a reply nobody asked for")
                return
            fut, _ = pending.popleft()
            if not fut.done():
                fut.set_result(reply)

    def _check(self) -> None:
        """The reply timeout: one timer for the oldest command in flight."""
        self._timer = None
        if not self._pending:
            return
        fut, deadline = self._pending[0]
        now = self._loop.time()
        if now < deadline:
            self._suspect = None
            self._timer = self._loop.call_at(deadline, self._check)
            return
        if self._suspect is not fut:
            # Past due, but the loop itself may have stalled with the reply unread: let it
            # poll the socket once more before calling Redis dead.
            self._suspect = fut
            self._timer = self._loop.call_later(0.001, self._check)
            return
        self._suspect = None
        self._drop(self._proto, f"no reply within {self.timeout * 1000:g} ms")

    def _drop(self, proto, why: str) -> None:
        """Close the connection and fail what is in flight on it."""
        if proto is None or proto is not self._proto:
            return  # no connection (never opened, or already dropped), or an older one's news
        self._proto = None
        self._fail_pending(why)
        if proto.transport is not None:
            proto.transport.abort()

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, collections.deque()
        self._out.clear()
        for fut, _ in pending:
            if not fut.done():
                fut.set_exception(RedisUnavailable(why))

    async def close(self) -> None:
        """Close the connection, if any; safe when none was ever opened, when Redis is
        down or a connect is under way, and when called twice."""
        self._closed = True
        opening = self._opening
        if opening is not None:
            # A connect under way ends within connect_timeout; let it, then drop what it made.
            await asyncio.wait((opening,))
            if not opening.cancelled():
                opening.exception()  # retrieved: a failed connect is no news at shutdown
        proto = self._proto
        if proto is not None:
            self._drop(proto, "closing")
        self._fail_pending("closing")
        for name in ("_timer", "_flush_handle"):
            handle = getattr(self, name)
            if handle is not None:
                handle.cancel()
                setattr(self, name, None)


# --- redis.asyncio (Redis Cluster, or on request) --------------------------------------------

class RedisPyBackend:
    def __init__(self, url: str, cluster: bool, timeout: float = TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        import redis.asyncio as aredis
        import redis.exceptions as rexc
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._errors = (rexc.RedisError, OSError, asyncio.TimeoutError)
        self._noscript = rexc.NoScriptError
        common = dict(socket_timeout=timeout, socket_connect_timeout=connect_timeout)
        if cluster:
            from redis.asyncio.cluster import RedisCluster
            self.client = RedisCluster.from_url(url, **common)
        else:
            self.client = aredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **common)

    async def evalsha(self, keys, args, sha=SHA):
        flat = [a for pair in args for a in pair]
        try:
            try:
                return await self.client.evalsha(sha, len(keys), *keys, *flat)
            except self._noscript:
                return await self.client.eval(_SOURCES[sha], len(keys), *keys, *flat)
        except self._errors as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:
            pass
