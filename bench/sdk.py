"""bench/sdk: the client SDK, direct mode against gateway mode, same workers, same run.

Two workers of the digits model behind one gateway (the service seeded in the
gateway's embedded store; weights 1:1). From this one client process:

* sync ``PredictClient``, one request in flight: gateway mode, then direct mode
  (discovery from the same gateway, straight to the workers);
* asyncio ``AsyncPredictClient`` with ``--concurrency`` requests in flight, both
  modes;
* the reference ``eas-prediction`` client, when its environment exists
  (``$INFERGATE_EAS_PYTHON`` or ``.venv-eas``; never created here), both modes,
  one in flight, in a subprocess timed the same way.

Every case sends ``--requests`` (default 2,000) 1x784 TF requests with a token
(signed), in ``--rounds`` interleaved rounds after a warm-up, and reports
requests/s and p50/p99 latency. Servers are pinned to CPU 0, clients to CPU 1
(on machines with two or more CPUs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.procs import free_port, start, stop
from bench.wrk import table

SERVICE = "digits"
TOKEN = "bench-sdk-token"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EAS_SCRIPT = r'''
import json, sys, time
from eas_prediction import PredictClient, TFRequest, ENDPOINT_TYPE_DIRECT
cfg = json.loads(sys.argv[1])
client = PredictClient(cfg["endpoint"], cfg["service"])
client.set_token(cfg["token"])
if cfg["mode"] == "direct":
    client.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
client.init()
req = TFRequest("predict_images")
req.add_feed("images", [1, 784], TFRequest.DT_FLOAT, cfg["x"])
for _ in range(cfg["warmup"]):
    client.predict(req)
lat = []
errors = 0
started = time.perf_counter()
for _ in range(cfg["n"]):
    t = time.perf_counter()
    try:
        client.predict(req)
    except Exception:
        errors += 1
    lat.append(time.perf_counter() - t)
wall = time.perf_counter() - started
print(json.dumps({"lat": lat, "wall": wall, "errors": errors}))
'''


def seed(state_dir: str, ports: list[int]) -> None:
    from gateway.registry import open_store
    from gateway.registry.records import ServiceRecord

    async def write():
        store = open_store(state_dir)
        await store.start()
        await store.put_service(ServiceRecord.from_dict({
            "name": SERVICE, "token": TOKEN, "status": "Running",
            "config": {"name": SERVICE, "token": TOKEN, "processor": "tensorflow",
                       "endpoints": [{"ip": "127.0.0.1", "port": p, "weight": 100}
                                     for p in ports]}}))
        await store.close()

    asyncio.run(write())


def eas_python() -> str | None:
    explicit = os.environ.get("INFERGATE_EAS_PYTHON")
    if explicit and os.path.exists(explicit):
        return explicit
    local = os.path.join(REPO, ".venv-eas", "bin", "python")
    return local if os.path.exists(local) else None


class Case:
    def __init__(self, name: str):
        self.name = name
        self.lat: list[float] = []
        self.wall = 0.0
        self.errors = 0

    def row(self) -> dict:
        lat = np.array(self.lat) * 1000
        return {"case": self.name, "n": len(lat), "rps": len(lat) / self.wall,
                "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                "errors": self.errors}


def run_sync(client, req, n: int, case: Case) -> None:
    lat = case.lat
    started = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        try:
            client.predict(req)
        except Exception:
            case.errors += 1
        lat.append(time.perf_counter() - t)
    case.wall += time.perf_counter() - started


async def run_async(client, req, n: int, concurrency: int, case: Case) -> None:
    left = n

    async def one_worker():
        nonlocal left
        while left > 0:
            left -= 1
            t = time.perf_counter()
            try:
                await client.predict(req)
            except Exception:
                case.errors += 1
            case.lat.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(one_worker() for _ in range(concurrency)))
    case.wall += time.perf_counter() - started


def main(argv=None) -> None:
    from gateway.models import DIGITS_MODEL
    from gateway.sdk import (ENDPOINT_TYPE_DIRECT, ENDPOINT_TYPE_GATEWAY, PredictClient,
                             TFRequest)
    from gateway.sdk.aio import AsyncPredictClient

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="per case")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8, help="asyncio client in flight")
    parser.add_argument("--no-eas", action="store_true", help="skip the eas-prediction rows")
    args = parser.parse_args(argv)

    two_cpus = (os.cpu_count() or 1) >= 2
    server_cpu = 0 if two_cpus else None
    if two_cpus:
        os.sched_setaffinity(0, {1})
    procs = []
    state = tempfile.mkdtemp(prefix="infergate-bench-sdk-")
    try:
        ports = []
        for _ in range(2):
            port = free_port()
            procs.append(start(["worker", "--service", SERVICE, "--model", str(DIGITS_MODEL),
                                "--port", str(port), "--token", TOKEN, "--log-level", "WARNING"],
                               port, cpu=server_cpu))
            ports.append(port)
        seed(state, ports)
        gw_port = free_port()
        procs.append(start(["gateway", "--port", str(gw_port), "--state-dir", state,
                            "--admin-token", "bench-admin", "--open-discovery",
                            "--log-level", "WARNING"],
                           gw_port, cpu=server_cpu))
        endpoint = f"http://127.0.0.1:{gw_port}"
        # Wait until the gateway announces both workers.
        probe = PredictClient(endpoint, SERVICE)
        probe.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
        deadline = time.monotonic() + 20
        while True:
            try:
                probe.init()
                if len(probe.instances()) == 2:
                    break
            except Exception:
                pass
            finally:
                probe.destroy()
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway does not announce the workers")
            time.sleep(0.2)

        x = np.random.default_rng(0).random((1, 784), dtype=np.float32)
        req = TFRequest("predict_images")
        req.add_feed("images", x)

        def sync_client(kind):
            c = PredictClient(endpoint, SERVICE)
            c.set_token(TOKEN)
            c.set_endpoint_type(kind)
            c.init()
            return c

        sync_clients = {"gateway": sync_client(ENDPOINT_TYPE_GATEWAY),
                        "direct": sync_client(ENDPOINT_TYPE_DIRECT)}
        cases = {}
        for mode in ("gateway", "direct"):
            cases[f"sdk sync, {mode}"] = Case(f"infergate sync, {mode} mode, 1 in flight")
        for mode in ("gateway", "direct"):
            cases[f"sdk async, {mode}"] = Case(
                f"infergate asyncio, {mode} mode, {args.concurrency} in flight")

        async def async_rounds():
            clients = {}
            for mode, kind in (("gateway", ENDPOINT_TYPE_GATEWAY), ("direct", ENDPOINT_TYPE_DIRECT)):
                c = AsyncPredictClient(endpoint, SERVICE)
                c.set_token(TOKEN)
                c.set_endpoint_type(kind)
                await c.init()
                clients[mode] = c
            return clients

        loop = asyncio.new_event_loop()
        async_clients = loop.run_until_complete(async_rounds())
        # Warm-up, then interleaved rounds.
        for mode, c in sync_clients.items():
            run_sync(c, req, args.warmup, Case("warmup"))
            loop.run_until_complete(run_async(async_clients[mode], req, args.warmup,
                                              args.concurrency, Case("warmup")))
        per_round = max(1, args.requests // args.rounds)
        for r in range(args.rounds):
            order = ["gateway", "direct"] if r % 2 == 0 else ["direct", "gateway"]
            for mode in order:
                run_sync(sync_clients[mode], req, per_round, cases[f"sdk sync, {mode}"])
            for mode in order:
                loop.run_until_complete(run_async(async_clients[mode], req, per_round,
                                                  args.concurrency, cases[f"sdk async, {mode}"]))
        for c in sync_clients.values():
            c.destroy()
        for c in async_clients.values():
            loop.run_until_complete(c.destroy())
        loop.close()

        rows = [case.row() for case in cases.values()]
        eas = None if args.no_eas else eas_python()
        if eas:
            for mode in ("gateway", "direct"):
                cfg = {"endpoint": endpoint, "service": SERVICE, "token": TOKEN, "mode": mode,
                       "x": x.ravel().tolist(), "warmup": args.warmup, "n": per_round * args.rounds}
                out = subprocess.run(
                    ["taskset", "-c", "1", eas, "-c", EAS_SCRIPT, json.dumps(cfg)] if two_cpus
                    else [eas, "-c", EAS_SCRIPT, json.dumps(cfg)],
                    capture_output=True, text=True, timeout=600,
                    env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
                if out.returncode != 0:
                    print(f"eas-prediction ({mode}) failed: {out.stderr[-2000:]}", file=sys.stderr)
                    continue
                data = json.loads(out.stdout.strip().splitlines()[-1])
                case = Case(f"eas-prediction (reference), {mode} mode, 1 in flight")
                case.lat, case.wall, case.errors = data["lat"], data["wall"], data["errors"]
                rows.append(case.row())
        elif not args.no_eas:
            print("(no eas-prediction environment: set INFERGATE_EAS_PYTHON or create .venv-eas "
                  "with `python tests/eas_env.py` for the reference rows)")
    finally:
        for proc in reversed(procs):
            stop(proc)
        if two_cpus:
            os.sched_setaffinity(0, range(os.cpu_count()))

    print(f"{len(ports)} workers behind one gateway; 1x784 TF request, signed; "
          f"{per_round * args.rounds} requests per case in {args.rounds} interleaved rounds")
    print(table(rows, [("case", "", "{}"), ("n", "requests", "{}"), ("rps", "req/s", "{:,.0f}"),
                       ("p50", "p50 ms", "{:.3f}"), ("p99", "p99 ms", "{:.3f}"),
                       ("errors", "errors", "{}")]))


if __name__ == "__main__":
    main()
