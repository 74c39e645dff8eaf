"""The local launcher: `infergate worker` processes for the services this gateway owns.

It reconciles, a few times a second, what the store asks for with what runs:

* a service owned by this gateway (``metadata.owner``), not Stopped, with a
  model (``model_path`` or a python ``processor_entry``) gets
  ``metadata.instance`` workers on a free loopback port each, registering in
  the gateway's registry (the Redis URL, or the gateway's own admin API for
  the embedded store);
* scaling starts new processes or SIGTERMs the extra ones and leaves the rest
  alone; a changed configuration (model, processor, rpc settings, token)
  starts a new set and stops the old one once the new one is healthy;
* a worker that exits by itself is deregistered at once and restarted with
  backoff; after ``max_failures`` exits in a row without a healthy worker in
  between the service turns Failed, with the worker's last output line as the
  message, until the user modifies or starts it again;
* status: Creating/Updating -> Running once every wanted worker answers
  /health and is registered.

Workers die with the gateway: they get SIGTERM from the kernel when it dies
(``PR_SET_PDEATHSIG``), and ``stop()`` terminates them on a clean shutdown.
Of several gateway processes sharing one identity (``--processes N``) only the
one holding the launcher lock file runs workers; the others take over if it dies.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ..registry import CREATING, FAILED, RUNNING, STOPPED, UPDATING, StoreError
from ..routing.health import probe
from .services import (ServiceError, ServiceOps, desired_instances, model_spec, owner_of)

log = logging.getLogger("infergate.launcher")

TICK_S = 0.25
REFRESH_S = 2.0            # re-read the service records at least this often
TERM_GRACE_S = 15.0        # SIGTERM -> SIGKILL
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_FAILURES = int(os.environ.get("INFERGATE_WORKER_MAX_FAILURES", "3"))

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # not Linux: clean shutdowns still stop the workers
    _prctl = None


def _die_with_parent(parent_pid: int):
    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def last_line(path: str, limit: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def fingerprint(rec) -> str:
    """What a running worker depends on: everything but the instance count and the owner."""
    config = dict(rec.config)
    meta = dict(config.get("metadata") or {})
    meta.pop("instance", None)
    meta.pop("owner", None)
    config["metadata"] = meta
    blob = json.dumps({"config": config, "token": rec.token}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


class Worker:
    __slots__ = ("proc", "port", "fp", "revision", "spawned_at", "healthy", "stopping",
                 "kill_at", "log_path")

    def __init__(self, proc, port, fp, revision, log_path):
        self.proc = proc
        self.port = port
        self.fp = fp
        self.revision = revision
        self.spawned_at = time.monotonic()
        self.healthy = False
        self.stopping = False
        self.kill_at = 0.0
        self.log_path = log_path


class ServiceState:
    def __init__(self):
        self.workers: list[Worker] = []
        self.failures = 0
        self.failed = False
        self.failed_stamp = None      # updated_at of the record we marked Failed
        self.next_spawn = 0.0
        self.last_error = ""
        self.restarts = 0


class Launcher:
    def __init__(self, store, ops: ServiceOps, owner: str, registry_url: str, worker_host: str,
                 log_dir: str, admin_token: str = "", lock_path: str | None = None):
        self.store = store
        self.ops = ops
        self.owner = owner
        self.registry_url = registry_url
        self.worker_host = worker_host
        self.log_dir = log_dir
        self.admin_token = admin_token
        self.lock_path = lock_path
        self.states: dict[str, ServiceState] = {}
        self.records: dict = {}
        self.leader = False
        self._lock_fd = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._refresh = True
        self._last_refresh = 0.0
        self._adopted: set[str] = set()
        self._closing = False

    # ---- lifecycle ------------------------------------------------------------
    def _try_lock(self) -> bool:
        if self.lock_path is None:
            return True
        if self._lock_fd is None:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, str(os.getpid()).encode())
        return True

    async def start(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self.leader = self._try_lock()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def notify(self, kind: str, name: str) -> None:
        """Store subscription: re-read the records on the next tick."""
        if kind in ("service", "resync"):
            self._refresh = True
            self._wake.set()

    async def stop(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        workers = [(name, w) for name, st in self.states.items() for w in st.workers]
        for _, w in workers:
            self._terminate(w)
        deadline = time.monotonic() + 10.0
        while any(w.proc.poll() is None for _, w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for _, w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        for name, w in workers:
            await self._deregister(name, w)
            _unlink(w.log_path)
        self.states.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- the loop ---------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                if not self.leader:
                    self.leader = self._try_lock()
                    if not self.leader:
                        await asyncio.sleep(1.0)
                        continue
                    self._refresh = True
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except StoreError as exc:
                log.warning("launcher: state store unavailable (%s); retrying", exc)
            except Exception:
                log.exception("launcher reconcile failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass

    async def reconcile(self) -> None:
        now = time.monotonic()
        if self._refresh or now - self._last_refresh > REFRESH_S:
            self._refresh = False
            self._last_refresh = now
            self.records = {r.name: r for r in await self.store.list_services()}
        for name in sorted(set(self.records) | set(self.states)):
            await self._reconcile_service(name, self.records.get(name))

    def _remember(self, rec) -> None:
        if rec is not None:
            self.records[rec.name] = rec

    async def _set_status(self, rec, status: str, message: str):
        updated = await self.ops.set_status(rec.name, status, message, revision=rec.revision)
        self._remember(updated)
        return updated

    async def _reconcile_service(self, name: str, rec) -> None:
        st = self.states.get(name)
        spec = None
        wanted = False
        if rec is not None and rec.status != STOPPED:
            owner = owner_of(rec.config)
            if not owner:
                try:
                    spec = model_spec(rec.config)
                except Exception:
                    spec = None
                if spec is not None:
                    self._remember(await self.ops.claim(name))
                    rec = self.records.get(name, rec)
                    owner = owner_of(rec.config)
            if owner == self.owner:
                try:
                    spec = model_spec(rec.config)
                except Exception as exc:  # a model file that went away since create
                    if rec.status != FAILED:
                        await self._set_status(rec, FAILED, str(exc))
                    spec = None
                wanted = spec is not None
        if not wanted:
            if st is not None:
                self._reap(name, st, None)
                for w in st.workers:
                    self._terminate(w)
                    if w.proc.poll() is None and time.monotonic() > w.kill_at:
                        w.proc.kill()
                if not st.workers:
                    del self.states[name]
            return

        if st is None:
            st = self.states[name] = ServiceState()
            if name not in self._adopted and rec.status in (RUNNING, UPDATING, FAILED):
                # A service we own from before this gateway (re)started: run it again.
                self._adopted.add(name)
                n = desired_instances(rec.config)
                rec = await self._set_status(
                    rec, CREATING, f"starting {n} instance(s) after a gateway restart") or rec
        self._adopted.add(name)
        if st.failed and rec.status in (CREATING, UPDATING) and rec.updated_at != st.failed_stamp:
            st.failed, st.failures, st.next_spawn = False, 0, 0.0  # the user tries again

        fp = fingerprint(rec)
        n = desired_instances(rec.config)
        self._reap(name, st, rec)
        if self.records.get(name) is not None:
            rec = self.records[name]
        now = time.monotonic()
        for w in st.workers:
            if w.stopping and w.proc.poll() is None and now > w.kill_at:
                w.proc.kill()

        current = [w for w in st.workers if w.fp == fp and not w.stopping]
        old = [w for w in st.workers if w.fp != fp and not w.stopping]
        pending = [w for w in current if not w.healthy]
        if pending:
            results = await asyncio.gather(*(probe(self.worker_host, w.port, timeout=0.5)
                                             for w in pending))
            for w, ok in zip(pending, results):
                if ok and w.proc.poll() is None:
                    w.healthy = True
                    st.failures = 0
        if len(current) < n and not st.failed and now >= st.next_spawn:
            for _ in range(n - len(current)):
                w = self._spawn(rec, spec, fp)
                if w is not None:
                    st.workers.append(w)
                    current.append(w)
        elif len(current) > n:
            extra = sorted(current, key=lambda w: (w.healthy, w.spawned_at))[:len(current) - n]
            for w in extra:
                self._terminate(w)
                current.remove(w)
        healthy = [w for w in current if w.healthy]
        if old and len(healthy) >= n:
            for w in old:  # the new version is up: retire the old one
                self._terminate(w)
            old = []

        if st.failed:
            if rec.status != FAILED:
                updated = await self._set_status(rec, FAILED, st.last_error)
                if updated is not None:
                    st.failed_stamp = updated.updated_at
            return
        settled = not any(w.stopping for w in st.workers)  # the retired ones have exited
        if (len(current) == n and len(healthy) == n and not old and settled
                and rec.status != RUNNING):
            if n > 0:
                ids = {i.instance_id for i in await self.store.list_instances(name)}
                if not all(self._instance_id(w) in ids for w in healthy):
                    return  # registration on its way
            await self._set_status(rec, RUNNING, f"service is running: {n} instance(s)")

    # ---- processes --------------------------------------------------------------
    def _instance_id(self, w: Worker) -> str:
        return f"{self.worker_host}:{w.port}"

    def _reap(self, name: str, st: ServiceState, rec) -> None:
        """Collect exited workers; count the unexpected exits as failures."""
        for w in list(st.workers):
            code = w.proc.poll()
            if code is None:
                continue
            st.workers.remove(w)
            asyncio.get_running_loop().create_task(self._deregister(name, w))
            if w.stopping or rec is None or self._closing:
                _unlink(w.log_path)  # stopped on purpose: only crash logs are kept
                continue
            how = (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
            line = last_line(w.log_path)
            st.last_error = f"instance on port {w.port} {how}" + (f": {line}" if line else "")
            st.failures += 1
            st.restarts += 1
            log.warning("service %s: %s", name, st.last_error)
            if st.failures >= MAX_FAILURES:
                st.failed = True
                log.error("service %s: %d failures in a row; giving up until it is modified or "
                          "started again", name, st.failures)
            else:
                delay = min(BACKOFF_BASE_S * 2 ** (st.failures - 1), BACKOFF_MAX_S)
                st.next_spawn = time.monotonic() + delay

    async def _deregister(self, name: str, w: Worker) -> None:
        try:
            await self.store.deregister_instance(name, self._instance_id(w))
        except Exception as exc:
            log.debug("deregistering %s of %s: %s", self._instance_id(w), name, exc)

    def _terminate(self, w: Worker) -> None:
        if w.stopping:
            return
        w.stopping = True
        w.kill_at = time.monotonic() + TERM_GRACE_S
        if w.proc.poll() is None:
            try:
                w.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def command(self, rec, spec, port: int) -> list[str]:
        meta = dict(rec.config.get("metadata") or {})
        meta.pop("owner", None)
        args = [sys.executable, "-m", "gateway.cli.main", "worker", "--service", rec.name,
                "--processor", spec.processor, "--host", self.worker_host, "--port", str(port),
                "--registry", self.registry_url, "--metadata", json.dumps(meta)]
        if spec.model:
            args += ["--model", spec.model]
        if spec.entry:
            args += ["--processor-entry", spec.entry]
        if "workers" in meta and "rpc.worker_threads" not in meta and not isinstance(
                meta.get("rpc"), dict):
            try:
                args += ["--threads", str(max(1, int(meta["workers"])))]
            except (TypeError, ValueError):
                pass
        return args

    def _spawn(self, rec, spec, fp: str) -> Worker | None:
        try:
            port = free_port(self.worker_host)
        except OSError as exc:
            log.error("no free port on %s: %s", self.worker_host, exc)
            return None
        args = self.command(rec, spec, port)
        env = dict(os.environ, PYTHONUNBUFFERED="1", INFERGATE_SERVICE_TOKEN=rec.token or "",
                   INFERGATE_ADMIN_TOKEN=self.admin_token or "")
        log_path = os.path.join(self.log_dir, f"{rec.name}-{port}.log")
        try:
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, env=env, close_fds=True,
                                        start_new_session=True,
                                        preexec_fn=_die_with_parent(os.getpid()))
        except OSError as exc:
            log.error("cannot start a worker for %s: %s", rec.name, exc)
            return None
        log.info("service %s: started worker pid %d on %s:%d (log %s)", rec.name, proc.pid,
                 self.worker_host, port, log_path)
        return Worker(proc, port, fp, rec.revision, log_path)

    # ---- for desc ---------------------------------------------------------------
    def describe(self, name: str) -> list[dict] | None:
        """This gateway's worker processes of ``name`` (None when it runs none)."""
        st = self.states.get(name)
        if st is None:
            return None
        return [{"pid": w.proc.pid, "port": w.port, "revision": w.revision,
                 "state": "stopping" if w.stopping else "healthy" if w.healthy else "starting",
                 "log": w.log_path} for w in st.workers]

    def restarts(self, name: str) -> int:
        st = self.states.get(name)
        return st.restarts if st is not None else 0


def default_lock_path(owner: str, location: str) -> str:
    digest = hashlib.sha1(f"{owner}\0{location}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"infergate-launcher-{os.getuid()}-{digest}.lock")


__all__ = ["Launcher", "fingerprint", "last_line", "default_lock_path", "ServiceError"]
