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
  a backoff that doubles with every crash (0.5 s, 1 s, 2 s, ... 30 s); a
  Running service shows Restarting meanwhile. The crash count goes back to 0
  only once the workers have stayed up ``STABLE_S`` (30 s) -- passing /health
  is not enough: a worker that dies a second after it came up would otherwise
  restart forever. After ``MAX_FAILURES`` crashes in a row the service turns
  Failed, with the worker's last output line as the message, until the user
  modifies or starts it again. The logs of the last ``MAX_CRASH_LOGS`` crashed
  workers of a service are kept (``desc`` lists them), and of the last
  ``MAX_KEPT_LOGS`` that stopped normally; older ones are deleted, and so is
  every log of a deleted service. A log rotates past ``MAX_LOG_BYTES`` (copied
  to ``.log.1``, then truncated: the worker appends). ``infergate logs`` reads
  them (`read_logs`);
* status: Creating/Updating/Restarting -> Running once every wanted worker
  answers /health and is registered.

Workers get the registry URL (which may hold a Redis password) and the tokens
through their environment (``INFERGATE_REGISTRY``, ``INFERGATE_SERVICE_TOKEN``,
``INFERGATE_REGISTRATION_TOKEN``), never on their command line, which every local
user can read. They never get the admin token: their registration credential
(auth.registration_token) opens their own service's instance routes only, as
the user code they run should have no admin rights. Lock and log files live in
the state directory or in a per-user directory (``private_dir``), never under a
predictable name in /tmp, and are opened without following symlinks.

GPUs: each new worker gets ``CUDA_VISIBLE_DEVICES``, handed out round robin
over the devices this gateway sees (its own ``CUDA_VISIBLE_DEVICES``, else what
NVML counts): ``metadata.gpu`` devices per instance (one when the key is
absent), and none at all for ``gpu: 0``, which keeps a service on the CPU. On a
machine without GPUs the environment is left as it is and workers run on the CPU.

Workers die with the gateway: they get SIGTERM from the kernel when it dies
(``PR_SET_PDEATHSIG``), and ``stop()`` terminates them on a clean shutdown.
Of several gateway processes sharing one identity (``--processes N``) only the
one holding the launcher lock file runs workers; the others take over if it dies.
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

from ..auth import registration_token
from ..registry import CREATING, FAILED, RESTARTING, RUNNING, STOPPED, UPDATING, StoreError
from ..routing.health import probe
from ..serviceconfig import gpus_per_instance
from . import packages
from .services import (FETCHING, ServiceError, ServiceOps, cached_model_spec, desired_instances,
                       owner_of)

log = logging.getLogger("infergate.launcher")

TICK_S = 0.25
REFRESH_S = 2.0            # re-read the service records at least this often
TERM_GRACE_S = 15.0        # SIGTERM -> SIGKILL
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_FAILURES = int(os.environ.get("INFERGATE_WORKER_MAX_FAILURES", "3"))
STABLE_S = float(os.environ.get("INFERGATE_WORKER_STABLE_S", "30"))  # up this long: not a crash loop
MAX_CRASH_LOGS = 5         # crashed workers' logs kept per service
MAX_KEPT_LOGS = 8          # logs of workers that stopped normally, kept per service
MAX_LOG_BYTES = 8 << 20    # a worker's log rotates (to NAME.log.1) past this size

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


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _keep(logs: collections.deque, path: str, limit: int) -> None:
    """Keep `path` among the last `limit` logs; delete the oldest (rotated part too)."""
    logs.append(path)
    while len(logs) > limit:
        old = logs.popleft()
        _unlink(old)
        _unlink(old + ".1")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---- private files -----------------------------------------------------------------
def ensure_private_dir(path: str) -> str:
    """Create ``path`` (0700) or check an existing one: a real directory (not a
    symlink) owned by this user, whose group/other permission bits are then
    cleared. OSError when it is not ours."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a directory (a symlink?); refusing to use it")
    if st.st_uid != os.getuid():
        raise OSError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}); "
                      "refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def private_dir(kind: str = "state") -> str:
    """A per-user directory for infergate's own files, 0700 and checked by
    ``ensure_private_dir``: ``kind="runtime"`` (lock files) prefers
    ``$XDG_RUNTIME_DIR/infergate``; both kinds then try
    ``$XDG_STATE_HOME/infergate`` (``~/.local/state/infergate``) and last
    ``<tmp>/infergate-<uid>`` -- used only if it is ours and private."""
    candidates = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if kind == "runtime" and runtime and os.path.isabs(runtime):
        candidates.append(os.path.join(runtime, "infergate"))
    state_home = os.environ.get("XDG_STATE_HOME")
    if not (state_home and os.path.isabs(state_home)):
        home = os.path.expanduser("~")
        state_home = os.path.join(home, ".local", "state") if os.path.isabs(home) else ""
    if state_home:
        candidates.append(os.path.join(state_home, "infergate"))
    candidates.append(os.path.join(tempfile.gettempdir(), f"infergate-{os.getuid()}"))
    errors = []
    for path in candidates:
        try:
            return ensure_private_dir(path)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    raise OSError("no private directory for infergate's files: " + "; ".join(errors))


def open_private(path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """os.open with mode 0600 that never follows a symlink at ``path``."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                   0o600)


# Metadata only the gateway reads: changing it must not replace running workers.
GATEWAY_ONLY_METADATA = ("instance", "owner", "rate_limits")


def fingerprint(rec) -> str:
    """What a running worker depends on: everything but gateway-only metadata."""
    config = dict(rec.config)
    meta = dict(config.get("metadata") or {})
    for key in GATEWAY_ONLY_METADATA:
        meta.pop(key, None)
    config["metadata"] = meta
    blob = json.dumps({"config": config, "token": rec.token}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


class Worker:
    __slots__ = ("proc", "port", "fp", "revision", "spawned_at", "healthy", "healthy_at",
                 "stopping", "kill_at", "log_path")

    def __init__(self, proc, port, fp, revision, log_path):
        self.proc = proc
        self.port = port
        self.fp = fp
        self.revision = revision
        self.spawned_at = time.monotonic()
        self.healthy = False
        self.healthy_at = 0.0         # monotonic time of its first good /health
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
        self.crash_note = ""          # a crash the service status has not shown yet


def visible_gpus(environ=os.environ) -> list[str]:
    """The GPUs this gateway may hand to workers: its CUDA_VISIBLE_DEVICES when set,
    else the devices NVML counts (nvidia-ml-py, in the gpu extra), else none."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return []


class DeviceAssigner:
    """Round robin of the visible GPUs over the workers, in the order they start."""

    def __init__(self, gpus: list[str]):
        self.gpus = gpus
        self.next = 0
        self._warned: set[str] = set()

    def assign(self, name: str, metadata: dict) -> str | None:
        """CUDA_VISIBLE_DEVICES for the next worker of service `name` ("" hides every
        device; None leaves the environment as it is)."""
        wanted = gpus_per_instance(metadata)
        count = 1 if wanted is None else wanted
        if count == 0:
            return ""
        if not self.gpus:
            if wanted is not None and name not in self._warned:
                self._warned.add(name)
                log.warning("service %s asks for %d GPU(s) per instance but this gateway sees "
                            "none: its workers run on the CPU", name, count)
            return None
        picked = [self.gpus[(self.next + i) % len(self.gpus)]
                  for i in range(min(count, len(self.gpus)))]
        self.next = (self.next + count) % len(self.gpus)
        return ",".join(picked)


class Launcher:
    def __init__(self, store, ops: ServiceOps, owner: str, registry_url: str, worker_host: str,
                 log_dir: str, admin_token: str = "", lock_path: str | None = None):
        self.store = store
        self.devices = DeviceAssigner(visible_gpus())
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
        self._lock_error_logged = False
        self._fp_cache: dict[str, tuple] = {}   # name -> ((created_at, version), fingerprint)
        self.crash_logs: dict[str, collections.deque] = {}
        self.kept_logs: dict[str, collections.deque] = {}  # of normally stopped workers

    # ---- lifecycle ------------------------------------------------------------
    def _try_lock(self) -> bool:
        if self.lock_path is None:
            return True
        if self._lock_fd is None:
            try:
                self._lock_fd = open_private(self.lock_path, os.O_RDWR | os.O_CREAT)
            except OSError as exc:  # e.g. ELOOP: someone put a symlink there
                if not self._lock_error_logged:
                    self._lock_error_logged = True
                    log.error("launcher lock file %s cannot be opened safely (%s); this gateway "
                              "runs no workers", self.lock_path, exc.strerror or exc)
                return False
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, str(os.getpid()).encode())
        return True

    async def start(self) -> None:
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        self._prune_old_logs()
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
            await self._deregister(name, w)  # its log stays (pruned at the next start)
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
        self._rotate_logs()

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
                    spec = cached_model_spec(rec)
                except packages.NotFetched:
                    spec = FETCHING  # something to run, once fetched
                except Exception:
                    spec = None
                if spec is not None:
                    self._remember(await self.ops.claim(name))
                    rec = self.records.get(name, rec)
                    owner = owner_of(rec.config)
            if owner == self.owner:
                try:
                    spec = cached_model_spec(rec)   # once per record version, not per tick
                except packages.NotFetched as missing:
                    await self._fetching(rec, missing)
                    return  # its workers stay as they are until the package is here
                except Exception as exc:  # a model file that went away since create
                    if rec.status != FAILED:
                        await self._set_status(rec, FAILED, str(exc))
                    spec = None
                wanted = spec is not None
        if not wanted:
            if rec is None:
                self._fp_cache.pop(name, None)
                for path in [*self.crash_logs.pop(name, ()), *self.kept_logs.pop(name, ())]:
                    _unlink(path)  # the service is gone
                    _unlink(path + ".1")
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
            if name not in self._adopted and rec.status in (RUNNING, UPDATING, FAILED,
                                                                   RESTARTING):
                # A service we own from before this gateway (re)started: run it again.
                self._adopted.add(name)
                n = desired_instances(rec.config)
                rec = await self._set_status(
                    rec, CREATING, f"starting {n} instance(s) after a gateway restart") or rec
        self._adopted.add(name)
        if st.failed and rec.status in (CREATING, UPDATING) and rec.updated_at != st.failed_stamp:
            st.failed, st.failures, st.next_spawn = False, 0, 0.0  # the user tries again

        fp = self._fingerprint(rec)
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
                    w.healthy = True      # not yet proof that it works: see STABLE_S
                    w.healthy_at = now
        if st.failures and current and all(w.healthy and now - w.healthy_at >= STABLE_S
                                           for w in current):
            st.failures = 0               # up long enough: earlier crashes are forgiven
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
        if st.crash_note:
            note, st.crash_note = st.crash_note, ""
            if rec.status in (RUNNING, RESTARTING):
                rec = await self._set_status(rec, RESTARTING, note) or rec
            elif rec.status in (CREATING, UPDATING):
                rec = await self._set_status(rec, rec.status, note) or rec
        settled = not any(w.stopping for w in st.workers)  # the retired ones have exited
        if (len(current) == n and len(healthy) == n and not old and settled
                and rec.status != RUNNING):
            if n > 0:
                ids = {i.instance_id for i in await self.store.list_instances(name)}
                if not all(self._instance_id(w) in ids for w in healthy):
                    return  # registration on its way
            await self._set_status(rec, RUNNING, f"service is running: {n} instance(s)")

    # ---- processes --------------------------------------------------------------
    async def _fetching(self, rec, missing: packages.NotFetched) -> None:
        """Fetch a service's package in a thread (once), and show how it goes in its
        status: Creating (or Updating) with the bytes so far, Failed with the reason."""
        cache = packages.current()
        url = missing.url
        if cache.should_fetch(url):
            done = asyncio.get_running_loop().run_in_executor(None, cache.fetch, url)
            done.add_done_callback(lambda _: self._wake.set())  # reconcile at once
        state = cache.state(url) or f"fetching {url}"
        failed = " failed: " in state
        status = FAILED if failed else UPDATING if rec.status in (RUNNING, UPDATING) \
            else CREATING
        message = f"{missing.field}: {state}"
        if (rec.status, rec.message) != (status, message):
            await self._set_status(rec, status, message)

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
                self._keep_log(name, w.log_path)  # stopped on purpose: kept, a few
                continue
            now = time.monotonic()
            how = (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
            line = last_line(w.log_path)
            st.last_error = f"instance on port {w.port} {how}" + (f": {line}" if line else "")
            if w.healthy and now - w.healthy_at >= STABLE_S:
                st.failures = 0   # it ran fine for a while: a fresh crash, not a crash loop
            st.failures += 1
            st.restarts += 1
            self._keep_crash_log(name, w.log_path)
            log.warning("service %s: %s (log %s)", name, st.last_error, w.log_path)
            if st.failures >= MAX_FAILURES:
                st.failed = True
                log.error("service %s: %d crashes in a row; giving up until it is modified or "
                          "started again", name, st.failures)
            else:
                # Doubles with every crash; only STABLE_S of uptime brings it back down.
                delay = min(BACKOFF_BASE_S * 2 ** (st.failures - 1), BACKOFF_MAX_S)
                st.next_spawn = now + delay
                st.crash_note = (f"{st.last_error}; restarting in {delay:g}s (crash "
                                 f"{st.failures} of {MAX_FAILURES} in a row)")

    def _fingerprint(self, rec) -> str:
        key = (rec.created_at, rec.version)
        hit = self._fp_cache.get(rec.name)
        if hit is None or hit[0] != key or not rec.version:
            hit = self._fp_cache[rec.name] = (key, fingerprint(rec))
        return hit[1]

    def _keep_crash_log(self, name: str, path: str) -> None:
        _keep(self.crash_logs.setdefault(name, collections.deque()), path, MAX_CRASH_LOGS)

    def _keep_log(self, name: str, path: str) -> None:
        _keep(self.kept_logs.setdefault(name, collections.deque()), path, MAX_KEPT_LOGS)

    def _rotate_logs(self) -> None:
        """Copy a running worker's log past MAX_LOG_BYTES to .log.1 and truncate it (the
        worker writes with O_APPEND, so it goes on at the new end)."""
        for st in self.states.values():
            for w in st.workers:
                try:
                    if os.path.getsize(w.log_path) <= MAX_LOG_BYTES:
                        continue
                    with open(w.log_path, "rb") as src, \
                            os.fdopen(open_private(w.log_path + ".1"), "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.truncate(w.log_path, 0)
                except OSError as exc:
                    log.warning("rotating %s: %s", w.log_path, exc)

    def _prune_old_logs(self) -> None:
        """Logs left by earlier runs: keep the newest MAX_KEPT_LOGS per service."""
        try:
            entries = [e for e in os.scandir(self.log_dir)
                       if e.name.endswith(".log") and e.is_file(follow_symlinks=False)]
        except OSError:
            return
        by_service: dict[str, list] = {}
        for e in entries:
            service, dash, port = e.name[:-4].rpartition("-")
            if dash and port.isdigit():
                try:
                    by_service.setdefault(service, []).append((e.stat().st_mtime, e.path))
                except OSError:
                    pass
        for files in by_service.values():
            files.sort(reverse=True)
            for _, path in files[MAX_KEPT_LOGS:]:
                _unlink(path)
                _unlink(path + ".1")

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
        # No --registry: the URL may carry a password; it goes in INFERGATE_REGISTRY.
        args = [sys.executable, "-m", "gateway.cli.main", "worker", "--service", rec.name,
                "--processor", spec.processor, "--host", self.worker_host, "--port", str(port),
                "--metadata", json.dumps(meta)]
        if spec.model:
            args += ["--model", spec.model]
        if spec.processor != "python":  # v2 over gRPC too, on a port the registry lists
            args += ["--grpc-port", "0"]
        model_config = rec.config.get("model_config")
        if model_config is not None:
            args += ["--model-config", model_config if isinstance(model_config, str)
                     else json.dumps(model_config)]
        if spec.entry:
            args += ["--processor-entry", spec.entry]
        if "workers" in meta and "rpc.worker_threads" not in meta and not isinstance(
                meta.get("rpc"), dict):
            try:
                args += ["--threads", str(max(1, int(meta["workers"])))]
            except (TypeError, ValueError):
                pass
        return args

    def worker_env(self, rec) -> dict:
        """A worker's environment: the service.json's `env`, then where to register and the
        secrets, which must not appear on its command line (``ps`` shows that to every local
        user), and its GPUs."""
        env = dict(os.environ)
        env.update(rec.config.get("env") or {})  # the service.json's own, under ours
        env.pop("INFERGATE_ADMIN_TOKEN", None)
        env.update(PYTHONUNBUFFERED="1", INFERGATE_REGISTRY=self.registry_url,
                   INFERGATE_SERVICE_TOKEN=rec.token or "",
                   INFERGATE_REGISTRATION_TOKEN=registration_token(self.admin_token, rec.name)
                   if self.admin_token else "")
        devices = self.devices.assign(rec.name, rec.config.get("metadata") or {})
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        return env

    def _spawn(self, rec, spec, fp: str) -> Worker | None:
        try:
            port = free_port(self.worker_host)
        except OSError as exc:
            log.error("no free port on %s: %s", self.worker_host, exc)
            return None
        args = self.command(rec, spec, port)
        env = self.worker_env(rec)
        log_path = os.path.join(self.log_dir, f"{rec.name}-{port}.log")
        try:
            with os.fdopen(open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                                        os.O_APPEND), "wb") as out:
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

    def crash_log_paths(self, name: str) -> list[str]:
        """Logs of the service's last crashed workers (oldest first)."""
        return list(self.crash_logs.get(name, ()))

    def log_paths(self, name: str) -> dict[str, str]:
        """instance ("host:port") -> log path, of the service's workers this gateway ran
        or runs (a port reused later: the newest log)."""
        paths = [*self.crash_logs.get(name, ()), *self.kept_logs.get(name, ())]
        st = self.states.get(name)
        if st is not None:
            paths += [w.log_path for w in st.workers]
        found = {}
        for path in sorted(paths, key=_mtime):
            port = os.path.basename(path)[len(name) + 1:-len(".log")]
            found[f"{self.worker_host}:{port}"] = path
        return found


def default_lock_path(owner: str, location: str) -> str:
    """The lock that makes one of several gateway processes of one identity the
    launcher: in the state directory (embedded store: shared by exactly those
    processes), else in this user's private directory -- never a predictable
    name in /tmp."""
    from ..registry import is_redis_url

    digest = hashlib.sha1(f"{owner}\0{location}".encode()).hexdigest()[:16]
    if is_redis_url(location):
        base = private_dir("runtime")
    else:
        base = os.path.abspath(os.path.expanduser(location))
        os.makedirs(base, mode=0o700, exist_ok=True)
    return os.path.join(base, f"launcher-{digest}.lock")


__all__ = ["Launcher", "fingerprint", "last_line", "default_lock_path", "private_dir",
           "ensure_private_dir", "open_private", "ServiceError"]
