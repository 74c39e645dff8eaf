"""Identified callers of a service: ModelArts' caller identities, for header rules.

A service may hold several caller tokens besides its own, each with the
identity attributes ModelArts rules read as built-ins: `#USER_NAME`,
`#USER_ID`, `#DOMAIN_NAME`, `#DOMAIN_ID`, `#PROJECT_NAME`, `#PROJECT_ID`. A
request whose token (raw or EAS-signed) is a caller's is that caller's: the
rules see its attributes. A request with the service's own token has no
caller identity, so a rule on a built-in never holds for it; a service with
no callers at all refuses such rules when they are saved (they could never
hold). `infergate callers` manages them.
"""
from __future__ import annotations

import secrets

FIELDS = ("user_name", "user_id", "domain_name", "domain_id", "project_name", "project_id")
MAX_CALLERS = 100
MAX_VALUE = 128


class CallerError(ValueError):
    pass


def checked(data, existing: list) -> dict:
    """A new caller from `data` ({"token"?, "user_name", ...}); its token is generated
    when not given, and must differ from the other callers'."""
    if not isinstance(data, dict):
        raise CallerError("a caller is an object of " + ", ".join(FIELDS) + " and token")
    unknown = set(data) - set(FIELDS) - {"token"}
    if unknown:
        raise CallerError(f"unknown caller field(s) {', '.join(sorted(unknown))}; a caller has "
                          + ", ".join(FIELDS) + " and token")
    caller = {}
    for key in FIELDS:
        value = data.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or len(value) > MAX_VALUE or "\n" in value:
            raise CallerError(f"caller {key} must be a string of at most {MAX_VALUE} "
                              f"characters, got {value!r}")
        caller[key] = value
    if not caller:
        raise CallerError("a caller needs at least one of " + ", ".join(FIELDS))
    token = data.get("token") or secrets.token_urlsafe(24)
    if not isinstance(token, str) or len(token) < 8 or any(c.isspace() for c in token):
        raise CallerError("a caller token must be a string of 8 or more characters, no spaces")
    if any(c["token"] == token for c in existing):
        raise CallerError("another caller of this service has that token")
    if len(existing) >= MAX_CALLERS:
        raise CallerError(f"a service holds at most {MAX_CALLERS} callers")
    caller["token"] = token
    return caller


def builtins_of(caller: dict) -> dict:
    """The rule built-ins of a caller: {"USER_NAME": ..., ...}."""
    return {key.upper(): caller[key] for key in FIELDS if key in caller}
