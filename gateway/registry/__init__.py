"""Control-plane state: services, versions, rules, tokens and instance registrations.

``open_store(spec)`` picks the backend: ``redis://``, ``rediss://``,
``redis+cluster://`` (or ``?cluster=true``) -> RedisStore; anything else is a
directory -> SqliteStore (DIR/state.db, created if missing).
"""
from __future__ import annotations

import os

from .records import (CREATING, DEFAULT_WEIGHT, FAILED, RESTARTING, RUNNING, SERVICE_STATUSES,
                      STOPPED, UPDATING, InstanceRecord, ServiceRecord)
from .records import parse_bool
from .store import (KIND_INSTANCES, KIND_RESYNC, KIND_SERVICE, KINDS, ServiceNotFound, Snapshot,
                    Store, StoreError, StoreUnavailable, Subscription, VersionConflict)

REDIS_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")


def is_redis_url(spec: str | os.PathLike) -> bool:
    return isinstance(spec, str) and spec.lower().startswith(REDIS_SCHEMES)


def open_store(spec: str | os.PathLike, **kwargs) -> Store:
    """A store for ``spec`` (not started: call ``await store.start()``)."""
    if is_redis_url(spec):
        from .redis_store import RedisStore
        return RedisStore(spec, **kwargs)
    from .sqlite_store import SqliteStore
    path = os.path.expanduser(os.fspath(spec))
    os.makedirs(path, exist_ok=True)
    return SqliteStore(path, **kwargs)


def __getattr__(name: str):
    # Lazy so that importing the package does not import redis unless needed.
    if name == "RedisStore":
        from .redis_store import RedisStore
        return RedisStore
    if name == "SqliteStore":
        from .sqlite_store import SqliteStore
        return SqliteStore
    raise AttributeError(name)


__all__ = [
    "open_store", "is_redis_url", "Store", "StoreError", "StoreUnavailable", "Subscription",
    "VersionConflict", "ServiceNotFound", "parse_bool",
    "Snapshot", "ServiceRecord", "InstanceRecord", "RedisStore", "SqliteStore",
    "KIND_SERVICE", "KIND_INSTANCES", "KIND_RESYNC", "KINDS",
    "CREATING", "RUNNING", "UPDATING", "STOPPED", "FAILED", "RESTARTING", "SERVICE_STATUSES",
    "DEFAULT_WEIGHT",
]
