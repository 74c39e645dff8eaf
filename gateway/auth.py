"""Service tokens: the raw token, or the EAS request signature the SDK sends; and the
registration credential of launched workers.

Signature: `Authorization: EAS base64(HMAC-SHA1(token, msg))` with
msg = "POST\\n" + Content-MD5 + "\\n" + Content-Type + "\\n" + Date + "\\n" + resource,
stripped of surrounding whitespace as the SDK does. The body's MD5 must match
the Content-MD5 header and the Date must be within 15 minutes of our clock.

A signature is not a password: one seen on the wire must not open the service
for the next quarter hour. Each process remembers the signatures it accepted
(SeenSignatures) and takes one again only within REPEAT_S of its first use (the
SDK's Date has whole seconds, so identical requests, and its retries, within one
second carry the same signature). The query string is not signed, so a signed
request carries none.
"""
from __future__ import annotations

import base64
import collections
import email.utils
import hashlib
import hmac
import time

MAX_CLOCK_SKEW = 15 * 60.0
# eas-prediction writes its *local* time and labels it GMT. A client whose clock
# is right but whose zone is not UTC is off by its zone's offset (a multiple of
# 15 minutes, within 14 hours): accept that, give or take this much drift.
ZONE_DRIFT = 60.0
MAX_ZONE_OFFSET = 14 * 3600.0
REPEAT_S = 2.0
MAX_REMEMBERED = 100_000  # signatures; past it the oldest is forgotten (about 20 MB)


class SeenSignatures:
    """The signatures accepted in the last REMEMBER_S seconds, by when first seen."""

    REMEMBER_S = 2 * (MAX_CLOCK_SKEW + ZONE_DRIFT)  # as long as a Date stays fresh

    def __init__(self, capacity: int = MAX_REMEMBERED):
        self.capacity = capacity
        self.first_seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    def admit(self, signature: str, now: float) -> bool:
        """Whether `signature` (verified) may pass now: new, or a repeat within REPEAT_S."""
        first_seen = self.first_seen
        while first_seen:
            oldest, seen = next(iter(first_seen.items()))
            if now - seen <= self.REMEMBER_S and len(first_seen) < self.capacity:
                break
            del first_seen[oldest]
        seen = first_seen.get(signature)
        if seen is None:
            first_seen[signature] = now
            return True
        return now - seen <= REPEAT_S


_seen = SeenSignatures()


def date_is_fresh(sent: float, now: float) -> bool:
    skew = sent - now
    if abs(skew) <= MAX_CLOCK_SKEW:
        return True
    if abs(skew) > MAX_ZONE_OFFSET + ZONE_DRIFT:
        return False
    return abs(skew - round(skew / 900.0) * 900.0) <= ZONE_DRIFT


def verify(headers: dict, method: str, path: str, body: bytes, token: str, service: str,
           now: float | None = None, query: str = "") -> str | None:
    """None when the request may pass, else the reason to answer 401 with."""
    auth = headers.get("authorization")
    if not auth:
        return f"service {service!r} needs a token: send it in the Authorization header"
    if hmac.compare_digest(auth.encode("latin-1"), token.encode()):
        return None
    if not auth.startswith("EAS "):
        return "invalid token"
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
    except (TypeError, ValueError):
        return "signed requests need a valid Date header"
    if not date_is_fresh(sent, time.time() if now is None else now):
        return "the request's Date is more than 15 minutes from the server's clock"
    resource = path  # the SDK signs /api/predict/<service>[/<subpath>] as it calls it
    message = f"{method}\n{content_md5}\n{headers.get('content-type', '')}\n{date}\n{resource}".strip()
    expected = base64.b64encode(hmac.new(token.encode(), message.encode(), hashlib.sha1).digest())
    if not hmac.compare_digest(expected, auth[4:].strip().encode("latin-1")):
        return "invalid signature"
    if not _seen.admit(expected.decode(), time.monotonic()):
        return "this signature was already used: sign each request anew"
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
