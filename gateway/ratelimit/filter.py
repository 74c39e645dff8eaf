"""Rate limits: the configuration (`metadata.rate_limits`) and the gateway filter.

Configuration, a list in the service's `metadata`::

    "rate_limits": [
      {"key": "header:X-User", "rate": 100, "burst": 200},
      {"key": "service", "rate": 1000, "burst": 1000, "scope": "global",
       "on_redis_error": "closed"}
    ]

* ``key``: what a bucket is kept for: ``"service"`` (one bucket for the
  service), ``"ip"`` (the client address of the TCP connection; forwarding
  headers are not trusted), ``"token"`` (the credential the request
  authenticated with: the service's token; for a service without a token the
  raw ``Authorization`` header), ``"header:<Name>"`` (the value of that
  request header; requests without it share one bucket, so leaving the
  header out is no way around the limit). At most one entry per key.
* ``rate``: requests per second (> 0, fractions allowed: 0.5 = one per 2 s).
* ``burst``: bucket size, the most requests accepted at once (>= 1; default
  the rate rounded up). Over any window of t seconds at most
  ``burst + rate * t`` requests of one key pass.
* ``scope``: ``"local"`` (default; a token bucket in each gateway process, so
  N processes let N times the rate through) or ``"global"`` (one GCRA state in
  the Redis of ``--registry``, shared by every gateway on it; with the
  embedded store a global limit acts as a local one, logged once).
* ``on_redis_error`` (global only): ``"open"`` (default: while Redis is
  unreachable each gateway applies the limit with its own local bucket) or
  ``"closed"`` (answer 503 until Redis is back).

A request passes when every limit of its service lets it; a request refused
by one limit takes no token from the others (local tokens are given back; the
Redis script decides all global limits of a request at once). Refused: 429,
``Retry-After`` (whole seconds, rounded up, at least 1), ``X-RateLimit-Limit``
(the rate, requests/s) and ``X-RateLimit-Remaining: 0``; passed requests
carry ``X-RateLimit-Limit`` / ``X-RateLimit-Remaining`` of their tightest
limit (Remaining: whole requests that could be sent at once right now).

Global limits in leases. A global limit fast enough (rate * 10 ms >= 2 tokens)
is not asked of Redis per request: each gateway takes a lease of several tokens
of a key at once (one script call: up to rate * 10 ms of tokens, as many as the
GCRA state has) and hands them out locally, asking for the next lease when half
is gone, so a request waits for Redis only when its gateway's lease is empty.
A lease grows while it runs dry and shrinks when it lapses (1 s unused).
Accuracy: every token passed was taken from Redis first, so the limit is never
exceeded by more than what the leases hold (at most 1.5 * rate * 10 ms per
gateway); the tokens a gateway holds and does not use are refused to the
others, as little. Slower limits keep one decision per request, exact.

Why 503 and not 429 when Redis is down and a limit fails closed: 429 says
*the client* went over its quota, which is not known; the gateway cannot
decide, a server-side fault, and 503 (with ``Retry-After: 1``, the time the
gateway waits before asking Redis again) is what clients and dashboards
already treat as "temporarily unavailable, try again".
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass

from ..server import error_response
from ..serviceconfig import unknown_key_error
from .local import DEFAULT_MAX_KEYS, TokenBuckets, monotonic, retry_after
from .redis_limiter import GlobalLimiter, RedisUnavailable

log = logging.getLogger("infergate.ratelimit")

MAX_RATE = 1e9
MAX_KEY_CHARS = 64  # longer header values are tracked by their digest
LEASE_S = 0.01      # a lease holds at most this much of a limit's rate (rate * 10 ms) ...
LEASE_TTL_S = 1.0   # ... and lapses this long after its last grant if unused
SCOPES = ("local", "global")
ON_REDIS_ERROR = ("open", "closed")
FIELDS = ("key", "rate", "burst", "scope", "on_redis_error")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token


@dataclass(frozen=True)
class LimitSpec:
    """One validated entry of metadata.rate_limits."""

    key: str                 # "service" | "ip" | "token" | "header:<Name>" (Name as written)
    rate: float
    burst: float
    scope: str = "local"
    on_redis_error: str = "open"

    @property
    def header(self) -> str | None:
        """The lower-cased header name of a header key, else None."""
        return self.key[7:].lower() if self.key.startswith("header:") else None

    @property
    def kind(self) -> str:
        return "header" if self.key.startswith("header:") else self.key


def _number(value, where: str, field: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: field {field!r} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{where}: field {field!r} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field {field!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: field {field!r} must be finite, got {value!r}")
    return value


def _parse_entry(i: int, entry) -> LimitSpec:
    where = f"rate_limits[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be an object with 'key' and 'rate', got {entry!r}")
    key = entry.get("key")
    if isinstance(key, str):
        where = f"rate_limits[{i}] (key {key!r})"
    unknown = [field for field in entry if field not in FIELDS]
    if unknown:
        raise unknown_key_error(f"rate_limits[{i}].", unknown[0], FIELDS)
    if key is None:
        raise ValueError(f"{where}: field 'key' is required "
                         "('service', 'ip', 'token' or 'header:<Name>')")
    if not isinstance(key, str):
        raise ValueError(f"{where}: field 'key' must be a string, got {key!r}")
    if key.startswith("header:"):
        if not _HEADER_NAME.fullmatch(key[7:]):
            raise ValueError(f"{where}: field 'key' must name a header as 'header:<Name>' "
                             f"with a valid header name, got {key!r}")
    elif key not in ("service", "ip", "token"):
        raise ValueError(f"{where}: field 'key' must be 'service', 'ip', 'token' or "
                         f"'header:<Name>', got {key!r}")
    if "rate" not in entry:
        raise ValueError(f"{where}: field 'rate' is required (requests per second)")
    rate = _number(entry["rate"], where, "rate")
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"{where}: field 'rate' must be > 0 and <= {MAX_RATE:g} requests/s, "
                         f"got {entry['rate']!r}")
    if entry.get("burst") is None:
        burst = float(max(1, math.ceil(rate)))
    else:
        burst = _number(entry["burst"], where, "burst")
        if not 1 <= burst <= MAX_RATE:
            raise ValueError(f"{where}: field 'burst' must be >= 1 and <= {MAX_RATE:g}, "
                             f"got {entry['burst']!r}")
    scope = entry.get("scope", "local")
    if scope not in SCOPES:
        raise ValueError(f"{where}: field 'scope' must be 'local' or 'global', got {scope!r}")
    on_error = entry.get("on_redis_error", "open")
    if on_error not in ON_REDIS_ERROR:
        raise ValueError(f"{where}: field 'on_redis_error' must be 'open' or 'closed', "
                         f"got {on_error!r}")
    return LimitSpec(key, rate, burst, scope, on_error)


def parse_rate_limits(entries) -> list[LimitSpec]:
    """Validated specs of a metadata.rate_limits list (None or [] -> [])."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"rate_limits must be a list of limits, got {type(entries).__name__}")
    specs = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        spec = _parse_entry(i, entry)
        ident = spec.header or spec.key
        if ident in seen:
            raise ValueError(f"rate_limits[{i}] (key {spec.key!r}): field 'key' repeats "
                             f"rate_limits[{seen[ident]}]; one limit per key")
        seen[ident] = i
        specs.append(spec)
    return specs


def validate_rate_limits(entries) -> None:
    """Raise ValueError naming the entry and field when metadata.rate_limits is invalid."""
    parse_rate_limits(entries)


# --- the filter ---------------------------------------------------------------------------

def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


class Limit:
    """One limit of one service, with its bucket state (kept while the spec does not change)."""

    __slots__ = ("service", "spec", "kind", "header", "rate", "buckets", "limit_text",
                 "redis_base", "redis_args", "what", "_token", "lease_cap", "leases", "max_keys")

    def __init__(self, service: str, spec: LimitSpec, max_keys: int, redis_prefix: str | None):
        self.service = service
        self.spec = spec
        self.kind = spec.kind
        self.header = spec.header
        self.rate = spec.rate
        # Local scope: the buckets. Global scope: the fallback while Redis is unreachable
        # (or the limit itself where there is no Redis).
        self.buckets = TokenBuckets(spec.rate, spec.burst, max_keys)
        self.max_keys = max_keys
        self.limit_text = f"{spec.rate:g}"
        self.what = f"{spec.rate:g} requests/s"
        self.redis_base = None
        self.redis_args = None
        self._token = (None, "")
        self.lease_cap = 0   # the most tokens one lease takes; 0: every request asks Redis
        self.leases: dict = {}
        if redis_prefix is not None:
            tag = service.replace("{", "_").replace("}", "_")
            ident = f"header:{self.header}" if self.header else spec.key
            # One hash tag per service: the keys of one decision share a cluster slot. The
            # rate and burst are part of the key: a changed limit starts with full buckets,
            # as local ones do, and the old keys expire by themselves.
            self.redis_base = f"{redis_prefix}rl:{{{tag}}}:{spec.rate:g}:{spec.burst:g}:{ident}:"
            self.redis_args = (f"{1e6 / spec.rate:.6f}", f"{spec.burst:.6f}")
            cap = int(min(spec.rate * LEASE_S, spec.burst))
            self.lease_cap = cap if cap >= 2 else 0

    def lease_of(self, key: str) -> "Lease":
        lease = self.leases.get(key)
        if lease is None:
            if len(self.leases) >= self.max_keys:  # forget the oldest key
                del self.leases[next(iter(self.leases))]
            lease = self.leases[key] = Lease()
        return lease

    def key_of(self, ex) -> str:
        kind = self.kind
        if kind == "service":
            return ""
        if kind == "header":
            value = ex.request.headers.get(self.header, "")
            # Long values are hashed: 100k tracked keys must not mean 100k * 8 KiB.
            return value if len(value) <= MAX_KEY_CHARS else "#" + _digest(value)
        if kind == "ip":
            peer = ex.request.peer
            return peer[0] if peer else ""
        # token: the service's token when it has one (auth passed), else what was sent.
        # Kept as a digest: no secret in bucket tables, messages or Redis keys.
        token = ex.route.token
        if not token:
            return _digest(ex.request.headers.get("authorization", ""))
        if self._token[0] != token:
            self._token = (token, _digest(token))
        return self._token[1]

    def describe(self, key: str) -> str:
        kind = self.kind
        if kind == "service":
            return f"service {self.service}"
        if kind == "header":
            return f"header {self.spec.key[7:]}={key}" if key else \
                f"requests without header {self.spec.key[7:]}"
        if kind == "ip":
            return f"client {key}"
        return "this token"

    def refuse(self, key: str, wait: float) -> tuple[str, str, str]:
        """(Retry-After, limit, message) of a refusal after which one waits `wait` seconds."""
        return (str(retry_after(wait)), self.limit_text,
                f"rate limit of {self.what} for {self.describe(key)} exceeded")

    def redis_key(self, key: str) -> str:
        return self.redis_base + key


class Lease:
    """Tokens of one key of a global limit, taken from Redis ahead of the requests."""

    __slots__ = ("tokens", "expires", "want", "remaining", "refill", "wait", "error")

    def __init__(self):
        self.tokens = 0          # left to hand out, until `expires`
        self.expires = 0.0
        self.want = 1            # the size of the next ask (doubles while leases run dry)
        self.remaining = 0       # what Redis had left after the last grant
        self.refill = None       # the Task asking Redis for more, while one is out
        self.wait = 0.0          # Redis refused the last ask: seconds to its next token
        self.error = None        # RedisUnavailable from the last ask

    def refund(self, key) -> None:
        self.tokens += 1


class Compiled:
    __slots__ = ("route", "local", "remote", "leased", "direct", "closed")

    def __init__(self, route, local, remote):
        self.route = route
        self.local = local        # limits decided in this process
        self.remote = remote      # global limits, decided on Redis:
        self.leased = [lim for lim in remote if lim.lease_cap]      # from leases
        self.direct = [lim for lim in remote if not lim.lease_cap]  # one script per request
        self.closed = [lim for lim in remote if lim.spec.on_redis_error == "closed"]


def _refund(taken) -> None:
    """Give back the tokens a refused request took from other limits."""
    for holder, key in taken:
        holder.refund(key)


def _take_local(ex, limits, taken, best):
    """A token from each limit's local bucket: (429 or None, tightest (remaining, limit))."""
    for lim in limits:
        key = lim.key_of(ex)
        left = lim.buckets.take(key)
        if left < 0:
            _refund(taken)
            return _too_many(*lim.refuse(key, -left), ex), best
        taken.append((lim.buckets, key))
        if best is None or left < best[0]:
            best = (left, lim)
    return None, best


def _announce(ex, best) -> None:
    ex.response_headers.append(("X-RateLimit-Limit", best[1].limit_text))
    ex.response_headers.append(("X-RateLimit-Remaining", str(int(best[0]))))


def _too_many(retry: str, limit: str, message: str, ex):
    ex.response_headers.append(("Retry-After", retry))
    ex.response_headers.append(("X-RateLimit-Limit", limit))
    ex.response_headers.append(("X-RateLimit-Remaining", "0"))
    return error_response(429, message)


class RateLimitFilter:
    """The gateway's rate-limit filter; `check` goes into GatewayApp.filters after auth.

    Limits are compiled per route object: a config change makes a new route
    (the table is rebuilt), which is noticed on its next request; bucket state
    is kept for the limits whose spec did not change.
    """

    def __init__(self, redis_url: str | None = None, max_keys: int = DEFAULT_MAX_KEYS,
                 redis=None):
        self.max_keys = max_keys
        self.redis = redis
        if self.redis is None and redis_url:
            self.redis = GlobalLimiter(redis_url)
        self._routes: dict[str, Compiled] = {}
        self._limits: dict[str, dict[LimitSpec, Limit]] = {}
        self._no_redis_logged = False
        self._bad_logged: set = set()

    @classmethod
    def for_store(cls, store, **kwargs) -> "RateLimitFilter":
        """The filter for a gateway on `store`: global limits use its Redis, if it is one."""
        from ..registry import is_redis_url
        url = getattr(store, "url", None)
        max_keys = int(os.environ.get("INFERGATE_RATELIMIT_MAX_KEYS", DEFAULT_MAX_KEYS))
        return cls(url if is_redis_url(url) else None, max_keys=max_keys, **kwargs)

    async def close(self) -> None:
        """Close the Redis connection, if any. Never raises: the gateway's shutdown closes
        the store after this, and a limiter that cannot close cleanly must not stop it."""
        if self.redis is not None:
            try:
                await self.redis.close()
            except Exception:
                log.exception("closing the rate limiter's redis connection failed")

    # --- compiling ----------------------------------------------------------------------
    def _compile(self, route) -> Compiled:
        name = route.name
        try:
            specs = parse_rate_limits(route.rate_limits)
        except ValueError as exc:
            # Saved configs are validated; a bad one written behind the control plane's back
            # keeps the entries that are valid rather than dropping every limit.
            specs = []
            for i, entry in enumerate(route.rate_limits if isinstance(route.rate_limits, list)
                                      else []):
                try:
                    specs.append(_parse_entry(i, entry))
                except ValueError:
                    pass
            if (name, str(exc)) not in self._bad_logged:
                self._bad_logged.add((name, str(exc)))
                log.error("service %s: invalid rate_limits, ignoring the bad entries: %s",
                          name, exc)
        old = self._limits.get(name, {})
        limits: dict[LimitSpec, Limit] = {}
        local, remote = [], []
        prefix = self.redis.prefix if self.redis is not None else None
        for spec in specs:
            if spec in limits:
                continue
            lim = old.get(spec) or Limit(name, spec, self.max_keys, prefix)
            limits[spec] = lim
            if spec.scope == "global" and self.redis is not None:
                remote.append(lim)
            else:
                if spec.scope == "global" and not self._no_redis_logged:
                    self._no_redis_logged = True
                    log.warning("service %s has a global rate limit but this gateway has no "
                                "Redis (--registry redis://...): global limits act as local "
                                "ones, per gateway process", name)
                local.append(lim)
        self._limits[name] = limits
        compiled = Compiled(route, local, remote)
        self._routes[name] = compiled
        return compiled

    def headers_of(self, route) -> list[str]:
        """The (lower-cased) request headers the route's limits are keyed by."""
        compiled = self._compile(route)
        limits = compiled.local + compiled.remote
        names = [lim.header for lim in limits if lim.header]
        if any(lim.kind == "token" for lim in limits):
            names.append("authorization")  # a route without a token keys by what was sent
        return names

    # --- deciding -----------------------------------------------------------------------
    def check(self, ex):
        """None (pass on), a Response (429/503) or an awaitable of either (global limits)."""
        route = ex.route
        if not route.rate_limits:
            return None
        c = self._routes.get(route.name)
        if c is None or c.route is not route:
            c = self._compile(route)
        taken = []
        refused, best = _take_local(ex, c.local, taken, None)
        if refused is not None:
            return refused
        if c.remote:
            if not self.redis.available():
                return self._redis_down(ex, c, taken)
            short = None
            if c.leased:
                now = monotonic()
                for lim in c.leased:
                    key = lim.key_of(ex)
                    lease = lim.lease_of(key)
                    if lease.tokens > 0 and now < lease.expires:
                        lease.tokens -= 1
                        taken.append((lease, key))
                        if lease.tokens * 2 < lease.want and lease.refill is None:
                            self._ask(lim, key, lease, now)  # ahead of need
                        left = lease.remaining + lease.tokens
                        if best is None or left < best[0]:
                            best = (left, lim)
                    elif short is None:
                        short = [(lim, key, lease)]
                    else:
                        short.append((lim, key, lease))
            if short is not None or c.direct:
                return self._remote(ex, c, taken, best, short)
        if best is not None:
            _announce(ex, best)
        return None

    def _ask(self, lim: Limit, key: str, lease: Lease, now: float) -> None:
        """Ask Redis for the next lease of `key`, sized by how fast the last one went."""
        if now < lease.expires:       # ran low before it lapsed: ask for more
            lease.want = min(lim.lease_cap, lease.want * 2)
        elif lease.tokens:            # lapsed with tokens unused: ask for fewer
            lease.want = max(1, lease.want // 2)
            lease.tokens = 0
        lease.wait = 0.0
        lease.refill = asyncio.get_running_loop().create_task(self._refill(lim, key, lease))

    async def _refill(self, lim: Limit, key: str, lease: Lease) -> None:
        try:
            reply = await self.redis.lease(lim.redis_key(key), lim.redis_args, lease.want)
        except RedisUnavailable as exc:
            lease.error = exc
            return
        finally:
            lease.refill = None
        lease.error = None
        if reply[0] > 0:
            now = monotonic()
            if now >= lease.expires:
                lease.tokens = 0
            lease.tokens += reply[0]
            lease.expires = now + LEASE_TTL_S
            lease.remaining = reply[1]
        else:
            lease.wait = reply[1] / 1e6

    async def _remote(self, ex, c: Compiled, taken, best, short):
        for lim, key, lease in short or ():
            for _ in range(3):  # tokens granted to others waiting alongside: ask again
                if lease.refill is None:
                    self._ask(lim, key, lease, monotonic())
                await asyncio.shield(lease.refill)
                if lease.error is not None:
                    return self._redis_down(ex, c, taken)
                if lease.tokens > 0 and monotonic() < lease.expires:
                    lease.tokens -= 1
                    taken.append((lease, key))
                    left = lease.remaining + lease.tokens
                    if best is None or left < best[0]:
                        best = (left, lim)
                    break
                if lease.wait > 0:
                    _refund(taken)
                    return _too_many(*lim.refuse(key, lease.wait), ex)
            else:
                _refund(taken)
                return _too_many(*lim.refuse(key, 1.0 / lim.rate), ex)
        if c.direct:
            keys = [lim.key_of(ex) for lim in c.direct]
            try:
                reply = await self.redis.decide(
                    [lim.redis_key(k) for lim, k in zip(c.direct, keys)],
                    [lim.redis_args for lim in c.direct])
            except RedisUnavailable:
                return self._redis_down(ex, c, taken)
            if reply[0] != 1:
                _refund(taken)
                index = reply[1] - 1
                return _too_many(*c.direct[index].refuse(keys[index], reply[2] / 1e6), ex)
            for lim, left in zip(c.direct, reply[1:]):
                if best is None or left < best[0]:
                    best = (left, lim)
        _announce(ex, best)
        return None

    def _redis_down(self, ex, c: Compiled, taken):
        _refund(taken)  # decided again, here and now
        if c.closed:
            return error_response(
                503, f"rate limits of service {ex.service!r} cannot be checked: their Redis "
                     f"({self.redis.where}) is unreachable and the limit is set to fail closed "
                     f"(on_redis_error: closed)", [("Retry-After", "1")])
        # Fail open: each gateway applies the limits with its own buckets until Redis is back.
        refused, best = _take_local(ex, c.local + c.remote, [], None)
        if refused is not None:
            return refused
        _announce(ex, best)
        return None
