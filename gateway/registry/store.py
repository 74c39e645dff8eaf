"""The control-plane store interface shared by the SQLite and Redis backends.

Every data method is a coroutine. A change is durable (committed to SQLite
with ``synchronous=FULL``, or acknowledged by Redis) before the awaited call
returns. Subscribers are told *what* changed, never the new value: on
``(kind, name)`` a gateway re-reads (``snapshot()`` or the one record).

Notification kinds:

* ``"service"``   -- the service record ``name`` was created, changed or deleted;
* ``"instances"`` -- the instance set of service ``name`` changed (register,
  deregister, health, weight, expiry of a lapsed heartbeat, service deletion);
* ``"resync"``    -- (name ``""``) notifications may have been missed (the store
  lost and regained its backend); reload everything.
"""
from __future__ import annotations

import abc
import asyncio
import inspect
import logging
from typing import Awaitable, Callable, Union

from .records import InstanceRecord, ServiceRecord

log = logging.getLogger("infergate.registry")

KIND_SERVICE = "service"
KIND_INSTANCES = "instances"
KIND_RESYNC = "resync"
KINDS = (KIND_SERVICE, KIND_INSTANCES, KIND_RESYNC)
# remember_signature forgets at most this many expired signatures a call (bounds its time)
PRUNE_SIGNATURES = 500

Callback = Callable[[str, str], Union[None, Awaitable[None]]]
Snapshot = tuple[dict[str, ServiceRecord], dict[str, list[InstanceRecord]]]


class StoreError(RuntimeError):
    """Base class of the registry's errors."""


class StoreUnavailable(StoreError):
    """The backing store cannot be reached; the change was NOT made."""


class VersionConflict(StoreError):
    """A conditional write found another version of the record than the one it was
    made from (someone else wrote or deleted it meanwhile); nothing was changed.
    ``current`` is the version now stored (0: the record does not exist)."""

    def __init__(self, name: str, expected: int, current: int):
        super().__init__(f"service {name!r} changed meanwhile (version {current}, "
                         f"expected {expected})")
        self.name = name
        self.expected = expected
        self.current = current


class ServiceNotFound(StoreError):
    """``register_instance(..., require_service=True)`` for a service without a record."""

    def __init__(self, name: str):
        super().__init__(f"service {name!r} does not exist")
        self.name = name


class Subscription:
    """Returned by ``Store.subscribe``. The callback is registered as soon as
    ``subscribe`` is called, so ``store.subscribe(cb)`` and
    ``await store.subscribe(cb)`` both work. Call ``cancel()`` (or the object
    itself) to unsubscribe."""

    def __init__(self, store: "Store", callback: Callback):
        self._store = store
        self.callback = callback

    def cancel(self) -> None:
        self._store.unsubscribe(self.callback)

    __call__ = cancel

    def __await__(self):
        if False:  # pragma: no cover - makes this a generator
            yield
        return self


class Store(abc.ABC):
    """Abstract control-plane store. See the module docstring."""

    def __init__(self) -> None:
        self._subscribers: list[Callback] = []
        self._callback_tasks: set[asyncio.Task] = set()
        # Last state read from / written to the backend: served when it is unreachable.
        self._cache_services: dict[str, ServiceRecord] = {}
        self._cache_instances: dict[str, dict[str, InstanceRecord]] = {}

    # ---- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        """Start background tasks (change polling/listening, instance expiry)."""

    async def close(self) -> None:
        """Stop background tasks and release connections."""

    async def __aenter__(self) -> "Store":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @staticmethod
    async def _stop_tasks(tasks: list[asyncio.Task], timeout: float = 3.0) -> None:
        """Cancel background tasks and wait for them. Cancels repeatedly: a library
        call in flight may swallow one cancellation (seen with redis-py)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = {t for t in tasks if not t.done()}
        while pending and loop.time() < deadline:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                log.error("registry background task failed", exc_info=t.exception())
        if pending:
            log.error("registry background tasks did not stop: %s", pending)

    # ---- services --------------------------------------------------------
    @abc.abstractmethod
    async def put_service(self, rec: ServiceRecord, *, expect_version: int | None = None) -> None:
        """Create or replace the service record ``rec.name``; on success ``rec.version``
        is the new stored version (the previous one + 1, 1 for a new record).

        ``expect_version`` makes it a compare-and-set: 0 writes only if no record
        exists, N only if the stored record is at version N. Otherwise
        :class:`VersionConflict` is raised and nothing is written. ``None``
        writes unconditionally (tests, seeding tools; the control plane always
        passes the version it read)."""

    @abc.abstractmethod
    async def get_service(self, name: str) -> ServiceRecord | None: ...

    @abc.abstractmethod
    async def list_services(self) -> list[ServiceRecord]:
        """All service records, sorted by name."""

    @abc.abstractmethod
    async def delete_service(self, name: str, *, expect_version: int | None = None) -> bool:
        """Delete the record and all instances of ``name``; True if anything existed.
        With ``expect_version`` only if the record is at that version (else
        :class:`VersionConflict`, nothing deleted)."""

    # ---- instances -------------------------------------------------------
    @abc.abstractmethod
    async def register_instance(self, inst: InstanceRecord, ttl: float, *,
                                require_service: bool = False) -> None:
        """Add or replace an instance. ``ttl`` seconds without a heartbeat and it
        expires; ``ttl <= 0`` never expires (static endpoints).

        ``require_service``: refuse (:class:`ServiceNotFound`, nothing written)
        when ``inst.service`` has no record -- checked in the same transaction,
        so a worker of a service deleted meanwhile cannot bring it back."""

    @abc.abstractmethod
    async def heartbeat(self, service: str, instance_id: str, ttl: float) -> bool:
        """Extend an instance's lease to now + ttl. False when the instance is
        unknown or its lease already lapsed: the caller must re-register."""

    @abc.abstractmethod
    async def deregister_instance(self, service: str, instance_id: str) -> bool: ...

    @abc.abstractmethod
    async def set_instance_health(self, service: str, instance_id: str, healthy: bool) -> bool: ...

    @abc.abstractmethod
    async def set_instance_weight(self, service: str, instance_id: str, weight: int) -> bool: ...

    @abc.abstractmethod
    async def list_instances(self, service: str) -> list[InstanceRecord]:
        """Live instances of ``service`` (lease not lapsed), sorted by id."""

    @abc.abstractmethod
    async def snapshot(self) -> Snapshot:
        """(services by name, live instances by service name) in one call.
        Instances of services without a record (bare workers) are included."""

    # ---- replay memory (gateway.auth) ----------------------------------------
    @abc.abstractmethod
    async def remember_signature(self, key: str, signature: str, now: float, expires: float,
                                 capacity: int) -> float | None:
        """When ``signature`` was first remembered under ``key`` (``now`` if it was not,
        and is now, until ``expires``); None when ``key`` already holds ``capacity``
        unexpired signatures (nothing remembered: full refuses, it never forgets early).
        Times are wall-clock seconds, shared by every process using the backend."""

    # ---- notifications ---------------------------------------------------
    def subscribe(self, callback: Callback) -> Subscription:
        """Call ``callback(kind, name)`` on the event loop after any change made
        through any store object sharing this backend. A callback may be a plain
        function or a coroutine function (run as a task)."""
        self._subscribers.append(callback)
        return Subscription(self, callback)

    def unsubscribe(self, callback: Callback) -> None:
        try:
            self._subscribers.remove(callback)
        except ValueError:
            pass

    def _notify(self, kind: str, name: str) -> None:
        for cb in list(self._subscribers):
            try:
                res = cb(kind, name)
                if inspect.isawaitable(res):
                    task = asyncio.ensure_future(res)
                    self._callback_tasks.add(task)
                    task.add_done_callback(self._callback_done)
            except Exception:
                log.exception("registry subscriber %r failed on %s:%s", cb, kind, name)

    def _callback_done(self, task: asyncio.Task) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("registry subscriber failed", exc_info=task.exception())

    # ---- cache (last known state) ---------------------------------------
    def _cache_put_service(self, rec: ServiceRecord) -> None:
        self._cache_services[rec.name] = rec.copy()

    def _cache_delete_service(self, name: str) -> None:
        self._cache_services.pop(name, None)
        self._cache_instances.pop(name, None)

    def _cache_set_instances(self, service: str, insts: list[InstanceRecord]) -> None:
        if insts:
            self._cache_instances[service] = {i.instance_id: i.copy() for i in insts}
        else:
            self._cache_instances.pop(service, None)

    def _cache_put_instance(self, inst: InstanceRecord) -> None:
        self._cache_instances.setdefault(inst.service, {})[inst.instance_id] = inst.copy()

    def _cache_delete_instance(self, service: str, instance_id: str) -> None:
        insts = self._cache_instances.get(service)
        if insts is not None:
            insts.pop(instance_id, None)
            if not insts:
                del self._cache_instances[service]

    def _cache_set_snapshot(self, snap: Snapshot) -> None:
        services, instances = snap
        self._cache_services = {n: r.copy() for n, r in services.items()}
        self._cache_instances = {s: {i.instance_id: i.copy() for i in lst}
                                 for s, lst in instances.items() if lst}

    def _cached_snapshot(self) -> Snapshot:
        services = {n: r.copy() for n, r in sorted(self._cache_services.items())}
        instances = {s: [i.copy() for _, i in sorted(d.items())]
                     for s, d in sorted(self._cache_instances.items())}
        return services, instances

    def _cached_instances(self, service: str) -> list[InstanceRecord]:
        return [i.copy() for _, i in sorted(self._cache_instances.get(service, {}).items())]
