"""Service tokens: the raw token, or the EAS request signature the SDK sends; and the
registration credential of launched workers.

Signature: `Authorization: EAS base64(HMAC-SHA1(token, msg))` with
msg = "POST\\n" + Content-MD5 + "\\n" + Content-Type + "\\n" + Date + "\\n" + resource,
stripped of surrounding whitespace as the SDK does. The body's MD5 must match
the Content-MD5 header and the Date must be fresh (date_is_fresh). The query
string is not signed, so a signed request carries none.

A signature is not a password: one seen on the wire must open the service once.
Its Date stays acceptable for up to REPLAY_WINDOW_S (the zone offsets that
eas-prediction's mislabelled local time needs recur every 15 minutes for 14
hours), so a signature is remembered until its Date can no longer be accepted,
and taken again only within REPEAT_S of its first use (the SDK's Date has whole
seconds, so identical requests, and its retries, within one second carry the
same signature). The memory is kept per service and token (a token holder can
fill only its own share) and, full, refuses new signatures rather than forget
old ones. A worker remembers in its process (SeenSignatures); a gateway in its
state store (StoreSignatures, shared by its processes and kept over restarts),
where a POST's check is an awaitable (while the store is unavailable, the process's
memory stands in, as routes are served from the last snapshot). Signed GETs
(discovery, a model's signature) change nothing and their callers cannot wait: they
are remembered per process. The raw token costs none of this.
"""
from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import heapq
import hmac
import time
from typing import Awaitable, Union

from .registry import StoreError

MAX_CLOCK_SKEW = 15 * 60.0
# eas-prediction writes its *local* time and labels it GMT. A client whose clock
# is right but whose zone is not UTC is off by its zone's offset (a multiple of
# 15 minutes, within 14 hours): accept that, give or take this much drift.
ZONE_DRIFT = 60.0
MAX_ZONE_OFFSET = 14 * 3600.0
REPLAY_WINDOW_S = MAX_ZONE_OFFSET + ZONE_DRIFT  # how long after its Date a signature works
REPEAT_S = 2.0
# Signatures remembered per service and token: in a process (about 250 bytes each), and
# by default in a gateway's store (--replay-memory; about 150 bytes each in SQLite's
# replay.db, 240 in Redis' memory).
LOCAL_CAPACITY = 100_000
SHARED_CAPACITY = 1_000_000
REPLAY_CHECK_TIMEOUT_S = 5.0  # a store slower than this (down, swamped): the process's memory

REPLAYED = "this signature was already used: sign each request anew"
MEMORY_FULL = ("too many signatures of this token are remembered against replays (its "
               "share of the replay memory is full until their Dates expire): send the "
               "token itself over TLS, or use another token")

Verdict = Union[str, None]


class SeenSignatures:
    """Signatures remembered by this process, per service and token, until they expire."""

    def __init__(self, capacity: int = LOCAL_CAPACITY):
        self.capacity = capacity
        self.by_key: dict[str, tuple[dict[str, float], list[tuple[float, str]]]] = {}

    def remember(self, key: str, signature: str, now: float, expires: float) -> float | None:
        """When `signature` was first remembered under `key` (now, if new); None when the
        key's share is full. Entries whose `expires` passed are forgotten first."""
        first_seen, expiry = self.by_key.setdefault(key, ({}, []))
        while expiry and expiry[0][0] < now:
            del first_seen[heapq.heappop(expiry)[1]]
        seen = first_seen.get(signature)
        if seen is not None:
            return seen
        if len(first_seen) >= self.capacity:
            return None
        first_seen[signature] = now
        heapq.heappush(expiry, (expires, signature))
        return now


class StoreSignatures:
    """Signatures remembered in a gateway's state store (SQLite in the state dir, or
    Redis): shared by its processes, and by every gateway on the same Redis."""

    def __init__(self, store, capacity: int = SHARED_CAPACITY):
        self.store = store
        self.capacity = capacity

    async def verdict(self, key: str, signature: str, now: float, expires: float) -> Verdict:
        try:
            first_seen = await asyncio.wait_for(self.store.remember_signature(
                key, signature, now, expires, self.capacity), REPLAY_CHECK_TIMEOUT_S)
        except (StoreError, asyncio.TimeoutError):
            # The store is down or swamped: the gateway serves on (as its routes do, from
            # the last snapshot), each process then checking replays on its own.
            first_seen = _local.remember(key, signature, now, expires)
        return _verdict(first_seen, now)


def _verdict(first_seen: float | None, now: float) -> Verdict:
    if first_seen is None:
        return MEMORY_FULL
    return None if now - first_seen <= REPEAT_S else REPLAYED


_local = SeenSignatures()
_shared: StoreSignatures | None = None


def remember_signatures_in(store, capacity: int = SHARED_CAPACITY) -> None:
    """Make this process (a gateway's) remember signed POSTs in `store`."""
    global _shared
    _shared = StoreSignatures(store, capacity)


def _replay_verdict(method: str, service: str, token: str, signature: str, sent: float,
                    now: float) -> Verdict | Awaitable[Verdict]:
    key = service + ":" + hashlib.sha256(token.encode()).hexdigest()[:16]
    expires = sent + REPLAY_WINDOW_S
    if _shared is not None and method != "GET":
        return _shared.verdict(key, signature, now, expires)
    return _verdict(_local.remember(key, signature, now, expires), now)


def date_is_fresh(sent: float, now: float) -> bool:
    skew = sent - now
    if abs(skew) <= MAX_CLOCK_SKEW:
        return True
    if abs(skew) > MAX_ZONE_OFFSET + ZONE_DRIFT:
        return False
    return abs(skew - round(skew / 900.0) * 900.0) <= ZONE_DRIFT


def verify(headers: dict, method: str, path: str, body: bytes, token: str, service: str,
           now: float | None = None, query: str = "") -> Verdict | Awaitable[Verdict]:
    """None when the request may pass, else the reason to answer 401 with; for a signed
    POST to a gateway (remember_signatures_in), an awaitable of either."""
    auth = headers.get("authorization")
    if not auth:
        return f"service {service!r} needs a token: send it in the Authorization header"
    if hmac.compare_digest(auth.encode("latin-1"), token.encode()):
        return None
    if not auth.startswith("EAS "):
        return _bearer_hint(auth) or "invalid token"
    if query:
        return "signed requests cannot carry a query string (it is not signed)"
    content_md5 = headers.get("content-md5", "")
    if content_md5 and hashlib.md5(body).hexdigest() != content_md5.lower():
        return "Content-MD5 does not match the request body"
    if not content_md5 and body:
        return "signed requests must carry the body's Content-MD5"
    date = headers.get("date", "")
    try:
        sent = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, OverflowError):  # a year past C's long overflows
        return "signed requests need a valid Date header"
    now = time.time() if now is None else now
    if not date_is_fresh(sent, now):
        return "the request's Date is more than 15 minutes from the server's clock"
    resource = path  # the SDK signs /api/predict/<service>[/<subpath>] as it calls it
    message = f"{method}\n{content_md5}\n{headers.get('content-type', '')}\n{date}\n{resource}".strip()
    expected = base64.b64encode(hmac.new(token.encode(), message.encode(), hashlib.sha1).digest())
    if not hmac.compare_digest(expected, auth[4:].strip().encode("latin-1")):
        return "invalid signature"
    return _replay_verdict(method, service, token, expected.decode(), sent, now)


def raw_token_refusal(given: str, tokens, service: str) -> str | None:
    """Why a call whose `authorization` is `given` carries none of `tokens` as it is (a
    gRPC call's token is raw: the HTTP body a signature would cover is not the caller's);
    None when it carries one."""
    if any(hmac.compare_digest(given.encode("latin-1"), token.encode()) for token in tokens):
        return None
    if not given:
        return f"service {service!r} needs its token in the authorization metadata"
    return _bearer_hint(given) or "the token does not match"


def _bearer_hint(given: str) -> str | None:
    """What to say to a client that sent `Bearer <token>` (as the admin API and KServe's
    clients do): EAS service tokens go as they are."""
    if given[:7].lower() == "bearer ":
        return ("invalid token: a service token goes in the Authorization header as it is, "
                "without 'Bearer '")
    return None


def sign(token: str, body: bytes, service: str, content_type: str = "application/octet-stream",
         now: float | None = None, method: str = "POST", resource: str | None = None) -> dict:
    """Headers that sign a POST to /api/predict/<service> as the EAS SDK does (or another
    request, to the path `resource`)."""
    date = email.utils.formatdate(now, usegmt=True)
    content_md5 = hashlib.md5(body).hexdigest()
    resource = resource or f"/api/predict/{service}"
    message = f"{method}\n{content_md5}\n{content_type}\n{date}\n{resource}".strip()
    signature = base64.b64encode(hmac.new(token.encode(), message.encode(), hashlib.sha1).digest())
    return {"Content-MD5": content_md5, "Date": date, "Content-Type": content_type,
            "Authorization": "EAS " + signature.decode()}


def registration_token(admin_token: str, service: str) -> str:
    """The credential launched workers of `service` register with: it opens that service's
    instance routes and its record, nothing else, so the user code a worker runs gets no
    admin rights. Derived from the admin token, so every gateway sharing it agrees."""
    return hmac.new(admin_token.encode(), b"infergate-registration\0" + service.encode(),
                    hashlib.sha256).hexdigest()
