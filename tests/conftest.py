"""Shared fixtures: free loopback ports, a real redis-server, real processes."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The logs of the processes tests start: one folder, removed when the session ends well
# (a failed session keeps it, and says where).
PROC_LOGS = tempfile.mkdtemp(prefix="infergate-test-logs-")


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0:
        shutil.rmtree(PROC_LOGS, ignore_errors=True)
    else:
        print(f"\nlogs of the processes the tests started: {PROC_LOGS}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s: {last}")


class Proc:
    """A child process of ours (a worker, a gateway) with its address."""

    def __init__(self, args, port, health_path="/health", env=None, log_dir=None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="infergate-", suffix=".log", delete=False,
                                               dir=log_dir or PROC_LOGS)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        try:
            wait_http_ok(self.url + health_path, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"{args} did not start:\n{self.output()}")

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) a process has used, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In the child: SIGTERM when pytest dies, so a killed test run leaks no servers."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def infergate_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "gateway.cli.main", *args]


@pytest.fixture
def procs():
    """Start processes with procs.start(...); all are stopped at teardown."""
    started: list[Proc] = []

    class Starter:
        def start(self, args, port, **kw) -> Proc:
            p = Proc(args, port, **kw)
            started.append(p)
            return p

    yield Starter()
    for p in reversed(started):
        p.stop()


@pytest.fixture
def worker_factory(procs):
    """Start an infergate worker serving the bundled digits model (by default)."""
    from gateway.models import DIGITS_MODEL

    def start(service="digits", processor="tensorflow", model=None, extra=()):
        port = free_port()
        return procs.start(infergate_cmd("worker", "--service", service, "--model",
                                         str(model or DIGITS_MODEL), "--processor", processor,
                                         "--host", "127.0.0.1", "--port", str(port), *extra), port)

    return start


class RedisServer:
    def __init__(self):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (.ci/run installs it)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="infergate-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def redis_server():
    """A real redis-server on a free loopback port, for one test."""
    server = RedisServer()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)
