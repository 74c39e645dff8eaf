"""bench/ratelimit: what a rate limit costs the gateway per request (not a test).

One gateway process on a Redis registry in front of a fast upstream (nginx
answering a fixed body). Services, same upstream, limits set far too high to
ever refuse (rate and burst 1e9), so every request pays the limiter and
nothing else changes:

  plain         no limit
  local         a local limit keyed by client address (compiled token buckets)
  global        a global limit keyed by client address (one EVALSHA on Redis
                per request, pipelined connection: the default client)
  global+local  both

and, from a second gateway process started with
INFERGATE_RATELIMIT_REDIS_CLIENT=redis-py, the global limit through
redis.asyncio (the client Redis Cluster URLs use) against its own "plain".

Cases run interleaved, round by round, each round starting one case later
(wrk, 32 connections, a 1x784 TF body).
Gateways on CPU 0; wrk, nginx and redis-server on CPU 1. Two measures of
the limiter's cost per request, from the medians over rounds:

* CPU: the gateway process's own CPU time (utime + stime from /proc) per
  request answered, minus the same for "no limit" -- what the limiter
  costs the gateway, and the figure least disturbed by other load on the
  machine;
* throughput: 1e6/rps(case) - 1e6/rps(no limit), microseconds of wall time
  per request on the gateway's single core (noisier on a shared machine).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile

from bench.procs import free_port, start, stop, wait_port
from bench.proxy import nginx_conf, start_nginx
from bench.worker import tf_body
from bench.wrk import nanmedian, rotated, run_wrk, table

HIGH = 1e9
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start_redis(port: int, cpu: int, tmp: str) -> subprocess.Popen:
    proc = subprocess.Popen(["taskset", "-c", str(cpu), shutil.which("redis-server"), "--port",
                             str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, "redis-server")
    return proc


def seed(url: str, upstream: int) -> None:
    from gateway.registry import open_store
    from gateway.registry.records import ServiceRecord

    local = {"key": "ip", "rate": HIGH, "burst": HIGH}
    glob = {"key": "ip", "rate": HIGH, "burst": HIGH, "scope": "global"}
    both = [{"key": "service", "rate": HIGH, "burst": HIGH}, glob]
    services = {"plain": [], "local": [local], "global": [glob], "both": both}

    async def write():
        store = open_store(url)
        await store.start()
        for name, limits in services.items():
            await store.put_service(ServiceRecord(
                name=name, status="Running",
                config={"name": name, "upstream_path": "/",
                        "endpoints": [{"ip": "127.0.0.1", "port": upstream, "weight": 100}],
                        "metadata": {"rate_limits": limits}}))
        await store.close()

    asyncio.run(write())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    for tool in ("nginx", "redis-server", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/dev.sh bench installs it)")
    body = tf_body()
    tmp = tempfile.mkdtemp(prefix="infergate-bench-rl-")
    procs = []
    try:
        up = free_port()
        conf = os.path.join(tmp, "upstream.conf")
        nginx_conf(conf, [(up, "ok")], None, tmp)
        procs.append(start_nginx(conf, up, cpu=1))
        redis_port = free_port()
        procs.append(start_redis(redis_port, 1, tmp))
        url = f"redis://127.0.0.1:{redis_port}/0"
        seed(url, up)
        gateways = {}
        for client in ("pipelined", "redis-py"):
            port = free_port()
            proc = start(["gateway", "--port", str(port), "--registry", url,
                          "--log-level", "WARNING", "--health-interval", "60"], port, cpu=0,
                         env={"INFERGATE_RATELIMIT_REDIS_CLIENT": client})
            procs.append(proc)
            gateways[client] = (f"http://127.0.0.1:{port}/api/predict/", proc.pid)
        (main_gw, main_pid), (py_gw, py_pid) = gateways["pipelined"], gateways["redis-py"]
        cases = {
            "no limit": (main_gw + "plain", main_pid, "no limit"),
            "local limit": (main_gw + "local", main_pid, "no limit"),
            "global limit (pipelined)": (main_gw + "global", main_pid, "no limit"),
            "global + local": (main_gw + "both", main_pid, "no limit"),
            "no limit, 2nd gateway": (py_gw + "plain", py_pid, "no limit, 2nd gateway"),
            "global limit (redis.asyncio)": (py_gw + "global", py_pid, "no limit, 2nd gateway"),
        }
        results = {name: [] for name in cases}
        for target, _, _ in cases.values():  # warm-up: connections, script load, buckets
            run_wrk(target, body, args.connections, 1, cpu=1)
        for round_no in range(args.rounds):
            for name in rotated(list(cases), round_no):
                target, pid, _ = cases[name]
                before = cpu_seconds(pid)
                result = run_wrk(target, body, args.connections, args.seconds, cpu=1)
                used = cpu_seconds(pid) - before
                result["cpu_us"] = used * 1e6 / max(1.0, result["rps"] * args.seconds)
                results[name].append(result)
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    rps = {name: statistics.median(r["rps"] for r in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(r["cpu_us"] for r in runs) for name, runs in results.items()}
    for name, runs in results.items():
        base = cases[name][2]
        rows.append({"case": name, "rps": rps[name], "vs": rps[name] / rps[base],
                     "p50_ms": nanmedian(r["p50_ms"] for r in runs),
                     "p99_ms": nanmedian(r["p99_ms"] for r in runs),
                     "cpu_us": cpu[name], "cpu_cost": cpu[name] - cpu[base],
                     "wall_cost": 1e6 / rps[name] - 1e6 / rps[base],
                     "errors": sum(r["errors"] for r in runs)})
    print(table(rows, [("case", "", "{}"), ("rps", "req/s", "{:,.0f}"),
                       ("vs", "x no limit", "{:.2f}"), ("p50_ms", "p50 ms", "{:.2f}"),
                       ("p99_ms", "p99 ms", "{:.2f}"), ("cpu_us", "gw CPU us/req", "{:.1f}"),
                       ("cpu_cost", "limiter CPU us/req", "{:+.1f}"),
                       ("wall_cost", "limiter wall us/req", "{:+.1f}"),
                       ("errors", "non-2xx", "{}")]))
    print(f"\nmedian of {args.rounds} interleaved rounds of {args.seconds}s, {args.connections} "
          f"connections, {len(body)}-byte body; gateways on CPU 0, wrk + nginx + redis on CPU 1; "
          "limits never trigger (rate 1e9). limiter CPU = gateway CPU us/req - the same without "
          "a limit; limiter wall = 1e6/rps - 1e6/rps(no limit)")


if __name__ == "__main__":
    main()
