"""Faults under load: what clients see when instances, Redis and the gateway fail.

`python -m bench chaos [-- --redis-restarts 20 --soak 1000000 --only faults|h2]`

One gateway on Redis (an append-only file, so a restart keeps the data) and three
workers that register themselves with leases. Sixteen keep-alive clients post
digits requests the whole time, and each request is recorded as: answered (200
or another status), refused (the connection could not be opened: nothing was
read), or lost (sent, then the connection closed or reset with no answer).
Faults, one after another, each with some seconds of load around it:

- SIGKILL of a worker (a replacement registers on a new port);
- SIGSTOP of a worker for 4 s, then SIGCONT: requests already sent to it may
  wait; a request sent 1 s after it stopped must not go to it (counted as
  "slow": a request begun then that took over 1 s);
- Redis restarts, each down for 0.5 to 4 s (some longer than a lease);
- Redis restarts that come back empty (its files deleted);
- SIGTERM of the gateway and a new one on the same port (clients reconnect);
  every request it read must be answered: none lost.

Then a soak: `--soak` requests (h2load, 32 keep-alive connections) and the
gateway's RSS before and after, after a warm-up.

Targets (issue 15): 0 failed or lost requests for every fault but the hang, whose
failures may only be requests already sent to it; 0 slow requests after the hang's
first second; RSS growth <= 20 MB over 1M requests.

Then the HTTP/2 attacks on the gRPC ports (bench/chaos_h2.py; `--only h2` runs only
those, `--only faults` only the rows above).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

import numpy as np

from bench import chaos_h2
from bench.procs import free_port, start, stop, wait_port
from gateway.models import DIGITS_MODEL

SERVICE = "digits"
ADMIN = "chaos-admin"
CLIENTS = 16


def digits_body() -> bytes:
    from gateway.protos import tf_predict_pb2 as pb

    request = pb.PredictRequest(signature_name="predict_images")
    tensor = request.inputs["images"]
    tensor.dtype = pb.DT_FLOAT
    tensor.array_shape.dim.extend([1, 784])
    tensor.float_val.extend(np.random.default_rng(0).random(784, dtype=np.float32).tolist())
    return request.SerializeToString()


class Load:
    """CLIENTS keep-alive clients on their own event loop (a thread); each request recorded
    as (phase, started, outcome, seconds), outcome a status code, "refused" or "lost"."""

    def __init__(self, port: int, body: bytes):
        self.request = (f"POST /api/predict/{SERVICE} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        f"Content-Type: application/octet-stream\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.port = port
        self.phase = "warm-up"
        self.records: list[tuple[str, float, object, float]] = []
        self.stopping = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(60)

    async def _run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(CLIENTS)))

    async def _client(self) -> None:
        writer = reader = None
        while not self.stopping:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    self.records.append((self.phase, time.monotonic(), "refused", 0.0))
                    await asyncio.sleep(0.02)
                    continue
            phase, began = self.phase, time.monotonic()
            try:
                writer.write(self.request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                    asyncio.LimitOverrunError):
                self.records.append((phase, began, "lost", time.monotonic() - began))
                writer.close()
                writer = None
                continue
            self.records.append((phase, began, int(head[9:12]), time.monotonic() - began))
            if re.search(rb"(?i)\r\nconnection:\s*close", head):
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    def in_phase(self, phase: str) -> list:
        return [r for r in self.records if r[0] == phase]


class Redis:
    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="infergate-chaos-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self.dir, "--save", "", "--appendonly", "yes",
             "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, "redis-server")

    def stop(self, wipe: bool = False) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if wipe:
            for name in os.listdir(self.dir):
                path = os.path.join(self.dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def admin_post(port: int, path: str, body: dict) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {ADMIN}",
                                      "Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()


def discovered(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/servicediscovery/upstreams/"
                                f"{SERVICE}", timeout=5) as resp:
        return len(json.loads(resp.read())["endpoints"]["items"])


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gave up waiting for {what}")


class Fleet:
    def __init__(self, redis: Redis):
        self.redis = redis
        self.port = free_port()
        self.gateway = None
        self.workers: list[subprocess.Popen] = []

    def start_gateway(self) -> None:
        self.gateway = start(["gateway", "--host", "127.0.0.1", "--port", str(self.port),
                              "--registry", self.redis.url, "--admin-token", ADMIN,
                              "--log-level", "WARNING"], self.port)

    def start_worker(self) -> None:
        port = free_port()
        self.workers.append(start(["worker", "--service", SERVICE, "--model", str(DIGITS_MODEL),
                                   "--host", "127.0.0.1", "--port", str(port),
                                   "--registry", self.redis.url, "--log-level", "WARNING"],
                                  port))

    def stop(self) -> None:
        for proc in self.workers + [self.gateway]:
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                stop(proc)


def summary(load: Load, phase: str, hung_at: float | None = None) -> dict:
    records = load.in_phase(phase)
    row = {"fault": phase, "requests": len(records),
           "failed": sum(1 for r in records if isinstance(r[2], int) and r[2] != 200),
           "lost": sum(1 for r in records if r[2] == "lost"),
           "refused": sum(1 for r in records if r[2] == "refused")}
    if hung_at is not None:
        row["slow"] = sum(1 for r in records if r[1] >= hung_at + 1.0 and r[3] > 1.0)
    return row


def soak(port: int, body: bytes, requests: int, pid: int) -> dict:
    h2load = shutil.which("h2load")
    if h2load is None:
        return {"skipped": "h2load is not installed (apt-get install nghttp2-client)"}
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(body)
        f.flush()

        def run(n: int) -> str:
            return subprocess.run(
                [h2load, "--h1", "-n", str(n), "-c", "32", "-t", "1", "-d", f.name,
                 "-H", "content-type: application/octet-stream",
                 f"http://127.0.0.1:{port}/api/predict/{SERVICE}"],
                capture_output=True, text=True, timeout=3600).stdout
        run(50_000)  # warm-up: pools, buffers and caches reach their size
        before = rss_mb(pid)
        began = time.monotonic()
        out = run(requests)
        seconds = time.monotonic() - began
        after = rss_mb(pid)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    return {"requests": int(done.group(1)) if done else 0,
            "non_2xx": sum(int(x) for x in codes.groups()[1:]) if codes else -1,
            "rps": requests / seconds, "rss_before_mb": before, "rss_after_mb": after,
            "growth_mb": after - before}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench chaos")
    p.add_argument("--redis-restarts", type=int, default=20)
    p.add_argument("--empty-restarts", type=int, default=3)
    p.add_argument("--soak", type=int, default=1_000_000, help="requests (0: no soak)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", choices=("faults", "h2"),
                   help="run only the faults under load, or only the HTTP/2 attacks")
    chaos_h2.add_arguments(p)
    args = p.parse_args(argv)
    if args.only != "h2":
        faults(args)
    if args.only != "faults":
        print("\n--- HTTP/2 attacks on the gRPC ports ---", flush=True)
        chaos_h2.run(args)


def faults(args) -> None:
    rng = random.Random(args.seed)
    body = digits_body()
    redis = Redis()
    redis.start()
    fleet = Fleet(redis)
    load = None
    rows = []
    try:
        fleet.start_gateway()
        admin_post(fleet.port, "/admin/services", {"name": SERVICE})
        for _ in range(3):
            fleet.start_worker()
        wait_for(lambda: discovered(fleet.port) == 3, "three workers to register")
        load = Load(fleet.port, body)
        load.start()
        time.sleep(2)

        load.phase = "SIGKILL of a worker"
        victim = fleet.workers.pop(0)
        victim.kill()
        victim.wait()
        time.sleep(2)
        fleet.start_worker()
        time.sleep(2)
        rows.append(summary(load, load.phase))

        load.phase = "SIGSTOP of a worker (4 s)"
        hung = fleet.workers[0]
        hung_at = time.monotonic()
        os.kill(hung.pid, signal.SIGSTOP)
        time.sleep(4)
        os.kill(hung.pid, signal.SIGCONT)
        time.sleep(3)
        rows.append(summary(load, load.phase, hung_at))

        load.phase = f"Redis restarts x{args.redis_restarts} (down 0.5-4 s)"
        for _ in range(args.redis_restarts):
            redis.stop()
            time.sleep(rng.uniform(0.5, 4.0))
            redis.start()
            time.sleep(2)
        rows.append(summary(load, load.phase))

        load.phase = f"Redis back empty x{args.empty_restarts}"
        for _ in range(args.empty_restarts):
            redis.stop(wipe=True)
            time.sleep(rng.uniform(0.5, 2.0))
            redis.start()
            time.sleep(3)
        wait_for(lambda: discovered(fleet.port) == 3, "the instances to be back in Redis")
        rows.append(summary(load, load.phase))

        load.phase = "SIGTERM of the gateway, and a new one"
        fleet.gateway.send_signal(signal.SIGTERM)
        fleet.gateway.wait(30)
        fleet.start_gateway()
        time.sleep(3)
        rows.append(summary(load, load.phase))

        load.phase = "after"
        time.sleep(1)
        load.stop()
        load = None
        from bench.wrk import table

        print(table(rows, [("fault", "fault", "{}"), ("requests", "requests", "{}"),
                           ("failed", "failed", "{}"), ("lost", "lost", "{}"),
                           ("refused", "refused (not read)", "{}"),
                           ("slow", "slow after 1 s", "{}")]))
        if args.soak:
            result = soak(fleet.port, body, args.soak, fleet.gateway.pid)
            print(f"\nsoak: {json.dumps(result)}")
            rows.append({"fault": "soak", **result})
        ok = all(r.get("failed", 0) == 0 and r.get("lost", 0) == 0 and r.get("slow", 0) == 0
                 for r in rows if r["fault"] != "soak") and \
            all(r.get("growth_mb", 0) <= 20 and r.get("non_2xx", 0) == 0
                for r in rows if r["fault"] == "soak")
        print("\ntargets (0 failed or lost, 0 slow after the hang's first second, "
              f"RSS growth <= 20 MB): {'met' if ok else 'NOT met'}")
    finally:
        if load is not None:
            load.stop()
        fleet.stop()
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)
