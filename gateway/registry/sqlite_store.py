"""Embedded control-plane store: one SQLite file (DIR/state.db) in WAL mode.

* Every statement runs on one dedicated thread (a single-thread executor
  owning the connection), never on the event loop.
* Writes are ``BEGIN IMMEDIATE`` transactions with ``synchronous=FULL``: a
  change is on disk before the awaited call returns.
* Instance registrations live in the db too (heartbeat time + ttl), so static
  endpoints (ttl 0) survive a gateway restart, and several gateway processes
  sharing DIR (``--processes N``) see one instance set; lapsed leases are
  pruned by whichever process notices first (an indexed query every tick).
* Service records carry a version (column ``version``, also in the JSON):
  every write bumps it, and a conditional write (``expect_version``) is an
  ``UPDATE ... WHERE version = ?`` inside the IMMEDIATE transaction, so two
  gateways (or ``--processes``) doing read-modify-write cannot lose an update.
* Every change appends a row to the ``changes`` table (kind, name, origin).
  Subscribers of the store object that made the change are called directly;
  other store objects (other processes, or another object in this process)
  notice through ``PRAGMA data_version`` polled every ``poll_interval``
  seconds and replay the rows they did not write.
* Signatures remembered against replays (gateway.auth) live in their own file,
  DIR/replay.db, on their own thread: a write per signed request must neither
  wait behind nor wake the control plane (data_version), and is not fsynced
  (WAL with synchronous=NORMAL survives a process crash). The checks that arrive
  while a transaction runs share the next one.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .records import InstanceRecord, ServiceRecord
from .store import (KIND_INSTANCES, KIND_RESYNC, KIND_SERVICE, PRUNE_SIGNATURES, ServiceNotFound,
                    Snapshot, Store, StoreUnavailable, VersionConflict)

log = logging.getLogger("infergate.registry.sqlite")

DB_NAME = "state.db"
REPLAY_DB_NAME = "replay.db"
SIGNATURES_PER_TRANSACTION = 256  # replay checks that share one transaction at most
def _private(directory: str, path: str) -> None:
    """The state holds tokens in clear: the directory 0700 and the database files 0600,
    for every local user but us; existing ones are tightened."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for name in (path, path + "-wal", path + "-shm"):
        if not os.path.exists(name):
            if name == path:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600))
            continue
        os.chmod(name, 0o600)
CHANGE_LOG_KEEP_S = 600.0      # change rows older than this are pruned
PRUNE_EVERY_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name    TEXT PRIMARY KEY,
    data    TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1     -- ServiceRecord.version: compare-and-set writes
);
CREATE TABLE IF NOT EXISTS instances (
    service      TEXT NOT NULL,
    instance_id  TEXT NOT NULL,
    data         TEXT NOT NULL,
    ttl          REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    deadline     REAL,              -- heartbeat_at + ttl; NULL when ttl <= 0 (never expires)
    PRIMARY KEY (service, instance_id)
);
CREATE INDEX IF NOT EXISTS instances_deadline ON instances(deadline) WHERE deadline IS NOT NULL;
CREATE TABLE IF NOT EXISTS changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind   TEXT NOT NULL,
    name   TEXT NOT NULL,
    origin TEXT NOT NULL,
    ts     REAL NOT NULL
);
"""

_REPLAY_SCHEMA = """
CREATE TABLE IF NOT EXISTS signatures (
    key        TEXT NOT NULL,       -- service and token fingerprint
    signature  TEXT NOT NULL,
    first_seen REAL NOT NULL,
    expires    REAL NOT NULL,
    PRIMARY KEY (key, signature)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS signatures_expiry ON signatures(key, expires);
CREATE TABLE IF NOT EXISTS signature_counts (
    key TEXT PRIMARY KEY,
    n   INTEGER NOT NULL            -- rows of signatures with this key
) WITHOUT ROWID;
"""

_LIVE = "(deadline IS NULL OR deadline >= ?)"

Event = tuple[str, str]


def _fail(checks: list[tuple], error: StoreUnavailable) -> None:
    """Answer the waiting replay checks (key, ..., future) with `error`."""
    for *_, answer in checks:
        if not answer.done():
            answer.set_exception(error)


class SqliteStore(Store):
    def __init__(self, directory: str | os.PathLike, *, poll_interval: float = 0.2) -> None:
        super().__init__()
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, DB_NAME)
        self.poll_interval = poll_interval
        self._origin = uuid.uuid4().hex
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infergate-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._last_seq = 0
        self._last_prune = 0.0
        self._task: asyncio.Task | None = None
        self._closed = False
        self._failing = False
        self._replay_executor = ThreadPoolExecutor(max_workers=1,
                                                   thread_name_prefix="infergate-replay")
        self._replay_conn: sqlite3.Connection | None = None
        self._replay_queue: list[tuple] = []   # (key, signature, now, expires, capacity, future)
        self._replay_writer: asyncio.Task | None = None

    # ---- plumbing (all on the executor thread) ---------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            _private(self.directory, self.path)
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA busy_timeout = 10000")
                conn.execute("PRAGMA journal_mode = WAL")
                _private(self.directory, self.path)  # the -wal and -shm files it made
                conn.execute("PRAGMA synchronous = FULL")
                conn.executescript(_SCHEMA)
                self._migrate(conn)
                row = conn.execute("SELECT max(seq) FROM changes").fetchone()
                self._last_seq = row[0] or 0
                self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """state.db written before records had versions: add the column (existing
        records start at version 1)."""
        cols = [r[1] for r in conn.execute("PRAGMA table_info(services)")]
        if "version" in cols:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            cols = [r[1] for r in conn.execute("PRAGMA table_info(services)")]
            if "version" not in cols:   # another process may have just done it
                conn.execute("ALTER TABLE services ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _svc_from_row(data: str, version: int) -> ServiceRecord:
        rec = ServiceRecord.from_dict(json.loads(data))
        rec.version = max(1, int(version))
        return rec

    async def _call(self, fn: Callable[..., Any], *args: Any, write: bool) -> Any:
        if self._closed:
            raise StoreUnavailable("registry store is closed")
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            if not self._failing:
                log.error("state db %s failed: %s", self.path, exc)
                self._failing = True
            if write:
                raise StoreUnavailable(f"state db {self.path}: {exc}") from exc
            raise
        self._failing = False
        return result

    def _write(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run body in one IMMEDIATE transaction (the write lock is taken up front,
        so concurrent gateway processes serialize instead of deadlocking)."""
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    def _log_change(self, conn: sqlite3.Connection, kind: str, name: str) -> None:
        conn.execute("INSERT INTO changes(kind, name, origin, ts) VALUES (?, ?, ?, ?)",
                     (kind, name, self._origin, time.time()))

    def _emit(self, events: list[Event]) -> None:
        for kind, name in events:
            self._notify(kind, name)

    @staticmethod
    def _inst_from_row(data: str, heartbeat_at: float) -> InstanceRecord:
        inst = InstanceRecord.from_dict(json.loads(data))
        inst.heartbeat_at = heartbeat_at
        return inst

    # ---- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            await self._call(self._db, write=True)
            events = await self._call(self._tick, write=True)    # prune leases lapsed while down
            self._emit(events)
            self._task = asyncio.create_task(self._poll_loop(), name="infergate-sqlite-poll")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            await self._stop_tasks([self._task])
            self._task = None

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        def shut_replay() -> None:
            if self._replay_conn is not None:
                self._replay_conn.close()
                self._replay_conn = None

        if self._replay_writer is not None:
            await self._stop_tasks([self._replay_writer])
        _fail(self._replay_queue, StoreUnavailable("registry store is closed"))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=False)
        await loop.run_in_executor(self._replay_executor, shut_replay)
        self._replay_executor.shutdown(wait=False)

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self.poll_interval)
            try:
                events = await loop.run_in_executor(self._executor, self._tick)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._failing:
                    log.error("state db %s poll failed: %s", self.path, exc)
                    self._failing = True
                continue
            self._failing = False
            if not self._closed:
                self._emit(events)

    def _tick(self) -> list[Event]:
        """Foreign changes since the last tick, then expiry of lapsed leases."""
        conn = self._db()
        events: list[Event] = []
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            rows = conn.execute("SELECT seq, kind, name, origin FROM changes WHERE seq > ? "
                                "ORDER BY seq", (self._last_seq,)).fetchall()
            if rows and rows[0][0] != self._last_seq + 1:
                events.append((KIND_RESYNC, ""))    # rows we never saw were pruned
            for seq, kind, name, origin in rows:
                self._last_seq = seq
                if origin != self._origin:
                    events.append((kind, name))
        now = time.time()
        lapsed = conn.execute("SELECT service, instance_id FROM instances "
                              "WHERE deadline IS NOT NULL AND deadline < ?", (now,)).fetchall()
        if lapsed:
            def expire(conn: sqlite3.Connection) -> list[Event]:
                services: list[str] = []
                for service, iid in lapsed:
                    cur = conn.execute("DELETE FROM instances WHERE service = ? AND instance_id = ? "
                                       "AND deadline IS NOT NULL AND deadline < ?",
                                       (service, iid, now))
                    if cur.rowcount and service not in services:
                        services.append(service)
                for service in services:
                    self._log_change(conn, KIND_INSTANCES, service)
                return [(KIND_INSTANCES, s) for s in services]
            events.extend(self._write(expire))
        if now - self._last_prune > PRUNE_EVERY_S:
            self._last_prune = now
            oldest = conn.execute("SELECT ts FROM changes ORDER BY seq LIMIT 1").fetchone()
            if oldest and oldest[0] < now - CHANGE_LOG_KEEP_S:
                self._write(lambda c: c.execute("DELETE FROM changes WHERE ts < ?",
                                                (now - CHANGE_LOG_KEEP_S,)))
        return events

    # ---- services --------------------------------------------------------
    async def put_service(self, rec: ServiceRecord, *, expect_version: int | None = None) -> None:
        stored = rec.copy()

        def body(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT version FROM services WHERE name = ?",
                               (rec.name,)).fetchone()
            current = max(1, int(row[0])) if row else 0
            if expect_version is not None and current != expect_version:
                raise VersionConflict(rec.name, expect_version, current)
            stored.version = current + 1
            data = json.dumps(stored.to_dict())
            if row is None:
                conn.execute("INSERT INTO services(name, data, version) VALUES (?, ?, ?)",
                             (rec.name, data, stored.version))
            else:
                cur = conn.execute("UPDATE services SET data = ?, version = ? "
                                   "WHERE name = ? AND version = ?",
                                   (data, stored.version, rec.name, row[0]))
                if cur.rowcount != 1:   # cannot happen under the write lock; be safe
                    raise VersionConflict(rec.name, current, -1)
            self._log_change(conn, KIND_SERVICE, rec.name)
            return stored.version

        rec.version = await self._call(self._write, body, write=True)
        self._cache_put_service(rec)
        self._notify(KIND_SERVICE, rec.name)

    async def get_service(self, name: str) -> ServiceRecord | None:
        def read() -> tuple[str, int] | None:
            return self._db().execute("SELECT data, version FROM services WHERE name = ?",
                                      (name,)).fetchone()

        try:
            row = await self._call(read, write=False)
        except sqlite3.Error:
            rec = self._cache_services.get(name)
            return rec.copy() if rec else None
        if row is None:
            self._cache_services.pop(name, None)
            return None
        rec = self._svc_from_row(*row)
        self._cache_put_service(rec)
        return rec

    async def list_services(self) -> list[ServiceRecord]:
        def read() -> list[tuple[str, int]]:
            return self._db().execute("SELECT data, version FROM services ORDER BY name").fetchall()

        try:
            rows = await self._call(read, write=False)
        except sqlite3.Error:
            return list(self._cached_snapshot()[0].values())
        recs = [self._svc_from_row(*r) for r in rows]
        self._cache_services = {r.name: r.copy() for r in recs}
        return recs

    async def delete_service(self, name: str, *, expect_version: int | None = None) -> bool:
        def body(conn: sqlite3.Connection) -> tuple[int, int]:
            if expect_version is not None:
                row = conn.execute("SELECT version FROM services WHERE name = ?",
                                   (name,)).fetchone()
                current = max(1, int(row[0])) if row else 0
                if current != expect_version:
                    raise VersionConflict(name, expect_version, current)
            n = conn.execute("DELETE FROM services WHERE name = ?", (name,)).rowcount
            m = conn.execute("DELETE FROM instances WHERE service = ?", (name,)).rowcount
            if n:
                self._log_change(conn, KIND_SERVICE, name)
            if m:
                self._log_change(conn, KIND_INSTANCES, name)
            return n, m

        n, m = await self._call(self._write, body, write=True)
        self._cache_delete_service(name)
        if n:
            self._notify(KIND_SERVICE, name)
        if m:
            self._notify(KIND_INSTANCES, name)
        return bool(n or m)

    # ---- instances -------------------------------------------------------
    async def register_instance(self, inst: InstanceRecord, ttl: float, *,
                                require_service: bool = False) -> None:
        now = time.time()
        inst = inst.copy()
        inst.heartbeat_at = now
        data = json.dumps(inst.to_dict())
        ttl = float(ttl)
        deadline = now + ttl if ttl > 0 else None

        def body(conn: sqlite3.Connection) -> None:
            if require_service and conn.execute("SELECT 1 FROM services WHERE name = ?",
                                                (inst.service,)).fetchone() is None:
                raise ServiceNotFound(inst.service)
            conn.execute("INSERT OR REPLACE INTO instances(service, instance_id, data, ttl, "
                         "heartbeat_at, deadline) VALUES (?, ?, ?, ?, ?, ?)",
                         (inst.service, inst.instance_id, data, ttl, now, deadline))
            self._log_change(conn, KIND_INSTANCES, inst.service)

        await self._call(self._write, body, write=True)
        self._cache_put_instance(inst)
        self._notify(KIND_INSTANCES, inst.service)

    async def heartbeat(self, service: str, instance_id: str, ttl: float) -> bool:
        ttl = float(ttl)

        def body(conn: sqlite3.Connection) -> bool:
            now = time.time()
            row = conn.execute("SELECT deadline FROM instances WHERE service = ? AND instance_id = ?",
                               (service, instance_id)).fetchone()
            if row is None or (row[0] is not None and row[0] < now):
                return False              # unknown, or lapsed (the expirer will announce it)
            if row[0] is None:            # static endpoint: never expires
                conn.execute("UPDATE instances SET heartbeat_at = ? WHERE service = ? AND "
                             "instance_id = ?", (now, service, instance_id))
            else:
                conn.execute("UPDATE instances SET heartbeat_at = ?, ttl = ?, deadline = ? "
                             "WHERE service = ? AND instance_id = ?",
                             (now, ttl, now + ttl if ttl > 0 else None, service, instance_id))
            return True

        # A heartbeat is not a change: no change row, no notification.
        return await self._call(self._write, body, write=True)

    async def _update_instance(self, service: str, instance_id: str, field: str,
                               value: Any) -> bool:
        def body(conn: sqlite3.Connection) -> tuple[InstanceRecord | None, bool]:
            row = conn.execute("SELECT data, heartbeat_at FROM instances WHERE service = ? AND "
                               "instance_id = ? AND " + _LIVE,
                               (service, instance_id, time.time())).fetchone()
            if row is None:
                return None, False
            inst = self._inst_from_row(*row)
            if getattr(inst, field) == value:
                return inst, False
            setattr(inst, field, value)
            conn.execute("UPDATE instances SET data = ? WHERE service = ? AND instance_id = ?",
                         (json.dumps(inst.to_dict()), service, instance_id))
            self._log_change(conn, KIND_INSTANCES, service)
            return inst, True

        inst, changed = await self._call(self._write, body, write=True)
        if inst is None:
            return False
        self._cache_put_instance(inst)
        if changed:
            self._notify(KIND_INSTANCES, service)
        return True

    async def set_instance_health(self, service: str, instance_id: str, healthy: bool) -> bool:
        return await self._update_instance(service, instance_id, "healthy", bool(healthy))

    async def set_instance_weight(self, service: str, instance_id: str, weight: int) -> bool:
        return await self._update_instance(service, instance_id, "weight", int(weight))

    async def deregister_instance(self, service: str, instance_id: str) -> bool:
        def body(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM instances WHERE service = ? AND instance_id = ?",
                             (service, instance_id)).rowcount
            if n:
                self._log_change(conn, KIND_INSTANCES, service)
            return n

        n = await self._call(self._write, body, write=True)
        self._cache_delete_instance(service, instance_id)
        if n:
            self._notify(KIND_INSTANCES, service)
        return bool(n)

    async def list_instances(self, service: str) -> list[InstanceRecord]:
        def read() -> list[tuple[str, float]]:
            return self._db().execute(
                "SELECT data, heartbeat_at FROM instances WHERE service = ? AND " + _LIVE +
                " ORDER BY instance_id", (service, time.time())).fetchall()

        try:
            rows = await self._call(read, write=False)
        except sqlite3.Error:
            return self._cached_instances(service)
        insts = [self._inst_from_row(*r) for r in rows]
        self._cache_set_instances(service, insts)
        return insts

    async def snapshot(self) -> Snapshot:
        def read() -> tuple[list[tuple[str, int]], list[tuple[str, str, float]]]:
            conn = self._db()
            conn.execute("BEGIN")            # one consistent read transaction
            try:
                services = conn.execute("SELECT data, version FROM services "
                                        "ORDER BY name").fetchall()
                instances = conn.execute(
                    "SELECT service, data, heartbeat_at FROM instances WHERE " + _LIVE +
                    " ORDER BY service, instance_id", (time.time(),)).fetchall()
            finally:
                conn.execute("COMMIT")
            return services, instances

        try:
            services, rows = await self._call(read, write=False)
        except sqlite3.Error:
            return self._cached_snapshot()
        recs = {}
        for data, version in services:
            rec = self._svc_from_row(data, version)
            recs[rec.name] = rec
        insts: dict[str, list[InstanceRecord]] = {}
        for service, data, hb in rows:
            insts.setdefault(service, []).append(self._inst_from_row(data, hb))
        snap = (recs, insts)
        self._cache_set_snapshot(snap)
        return snap

    # ---- replay memory (on its own thread and file) ------------------------------------
    async def remember_signature(self, key: str, signature: str, now: float, expires: float,
                                 capacity: int) -> float | None:
        """Queued: the checks that arrive while one transaction runs share the next (a
        commit per signed request would cost more than the checks themselves)."""
        if self._closed:
            raise StoreUnavailable("registry store is closed")
        answer = asyncio.get_running_loop().create_future()
        self._replay_queue.append((key, signature, now, expires, capacity, answer))
        if self._replay_writer is None:
            self._replay_writer = asyncio.create_task(self._write_signatures())
        return await answer

    async def _write_signatures(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._replay_queue:
                batch = self._replay_queue[:SIGNATURES_PER_TRANSACTION]
                del self._replay_queue[:SIGNATURES_PER_TRANSACTION]
                try:
                    results = await loop.run_in_executor(
                        self._replay_executor, self._remember, [item[:5] for item in batch])
                except BaseException as exc:  # (cancelled: the store is closing)
                    _fail(batch, StoreUnavailable(f"replay db in {self.directory}: {exc!r}"))
                    if isinstance(exc, sqlite3.Error):
                        continue
                    raise
                for (*_, answer), first_seen in zip(batch, results):
                    if not answer.done():  # (its request may have given up waiting)
                        answer.set_result(first_seen)
        finally:
            self._replay_writer = None

    def _replay_db(self) -> sqlite3.Connection:
        if self._replay_conn is None:
            path = os.path.join(self.directory, REPLAY_DB_NAME)
            _private(self.directory, path)
            conn = sqlite3.connect(path, timeout=5.0, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA journal_mode = WAL")
                _private(self.directory, path)
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_REPLAY_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._replay_conn = conn
        return self._replay_conn

    def _remember(self, batch: list[tuple[str, str, float, float, int]]) -> list[float | None]:
        """remember_signature for each of `batch`, in one transaction."""
        conn = self._replay_db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            counts: dict[str, int] = {}  # rows per key, as this transaction leaves them
            results: list[float | None] = []
            for key, signature, now, expires, capacity in batch:
                if key not in counts:
                    forgotten = conn.execute(
                        "DELETE FROM signatures WHERE key = ? AND signature IN (SELECT "
                        "signature FROM signatures WHERE key = ? AND expires < ? LIMIT ?)",
                        (key, key, now, PRUNE_SIGNATURES)).rowcount
                    row = conn.execute("SELECT n FROM signature_counts WHERE key = ?",
                                       (key,)).fetchone()
                    counts[key] = (row[0] if row else 0) - forgotten
                row = conn.execute("SELECT first_seen FROM signatures WHERE key = ? AND "
                                   "signature = ?", (key, signature)).fetchone()
                if row is not None:
                    results.append(row[0])
                elif counts[key] >= capacity:
                    results.append(None)
                else:
                    conn.execute("INSERT INTO signatures VALUES (?, ?, ?, ?)",
                                 (key, signature, now, expires))
                    counts[key] += 1
                    results.append(now)
            conn.executemany("INSERT OR REPLACE INTO signature_counts VALUES (?, ?)",
                             counts.items())
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return results
