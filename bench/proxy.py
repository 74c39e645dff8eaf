"""bench/proxy: infergate against nginx in front of the same fast upstream, in one run.

Upstream: two nginx servers answering a fixed body (weights 3:1 behind each
proxy). Cases, interleaved round by round, each round starting one case later:
(a) infergate, one process; (b) nginx from Debian's packages, one worker, keep-alive
upstream pool; (c) nothing (wrk straight at one upstream). wrk: 32
connections, a 1x784 TF request POSTed. infergate runs with auth and one
header rule off and on.
The proxy runs on CPU 0; wrk and the upstreams share CPU 1.
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
from bench.worker import tf_body
from bench.wrk import nanmedian, rotated, run_wrk, table

TOKEN = "bench-token"


def nginx_conf(path: str, listen: list[tuple[int, str]], upstreams: list[tuple[int, int]] | None,
               tmp: str) -> None:
    servers = []
    for port, body in listen:
        if upstreams:
            location = ("proxy_pass http://backends; proxy_http_version 1.1; "
                        'proxy_set_header Connection "";')
        else:
            location = f'return 200 "{body}";'
        servers.append(f"server {{ listen 127.0.0.1:{port} reuseport; access_log off; "
                       f"client_body_buffer_size 64k; location / {{ {location} }} }}")
    pool = ""
    if upstreams:
        members = " ".join(f"server 127.0.0.1:{p} weight={w};" for p, w in upstreams)
        pool = f"upstream backends {{ {members} keepalive 64; }}"
    with open(path, "w") as f:
        f.write(f"worker_processes 1; daemon off; pid {tmp}/nginx-{os.path.basename(path)}.pid;\n"
                f"error_log {tmp}/error.log crit;\n"
                "events { worker_connections 4096; }\n"
                f"http {{ client_body_temp_path {tmp}; proxy_temp_path {tmp}; "
                f"keepalive_requests 1000000; {pool} {' '.join(servers)} }}\n")


def start_nginx(conf: str, port: int, cpu: int) -> subprocess.Popen:
    proc = subprocess.Popen(["taskset", "-c", str(cpu), shutil.which("nginx"), "-c", conf],
                            stderr=subprocess.DEVNULL)
    wait_port(port, "nginx")
    return proc


def seed(state_dir: str, upstreams: list[tuple[int, int]]) -> None:
    from gateway.registry import open_store
    from gateway.registry.records import ServiceRecord

    endpoints = [{"ip": "127.0.0.1", "port": p, "weight": w} for p, w in upstreams]

    async def write():
        store = open_store(state_dir)
        await store.start()
        for name, token, rules in (
                ("plain", "", []),
                ("guarded", TOKEN, [{"condition": "#HEADER_x-user == 'bench'", "target": "guarded",
                                     "header_name": "X-Routed", "header_value": "rule"}])):
            await store.put_service(ServiceRecord(
                name=name, token=token, status="Running", rules=rules,
                config={"name": name, "endpoints": endpoints, "upstream_path": "/"}))
        await store.close()

    asyncio.run(write())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is not installed: apt-get install nginx (scripts/dev.sh bench does)")
    body = tf_body()
    tmp = tempfile.mkdtemp(prefix="infergate-bench-")
    up = [(free_port(), 3), (free_port(), 1)]
    procs = []
    try:
        conf = os.path.join(tmp, "upstream.conf")
        nginx_conf(conf, [(p, "ok") for p, _ in up], None, tmp)
        procs.append(start_nginx(conf, up[0][0], cpu=1))
        front = free_port()
        conf = os.path.join(tmp, "front.conf")
        nginx_conf(conf, [(front, "")], up, tmp)
        procs.append(start_nginx(conf, front, cpu=0))
        seed(os.path.join(tmp, "state"), up)
        cases = {
            "direct to upstream (no proxy)": (f"http://127.0.0.1:{up[0][0]}/", {}),
            "nginx, 1 worker, keepalive pool": (f"http://127.0.0.1:{front}/", {}),
        }
        gw_port = free_port()
        procs.append(start(["gateway", "--port", str(gw_port), "--state-dir",
                            os.path.join(tmp, "state"), "--log-level", "WARNING",
                            "--health-interval", "60"], gw_port, cpu=0))
        cases["infergate, 1 process"] = (f"http://127.0.0.1:{gw_port}/api/predict/plain", {})
        cases["infergate, auth + header rule"] = (
            f"http://127.0.0.1:{gw_port}/api/predict/guarded",
            {"Authorization": TOKEN, "X-User": "bench"})
        results = {name: [] for name in cases}
        for url, headers in cases.values():  # warm-up
            run_wrk(url, body, args.connections, 1, headers=headers, cpu=1)
        for round_no in range(args.rounds):
            for name in rotated(list(cases), round_no):
                url, headers = cases[name]
                results[name].append(run_wrk(url, body, args.connections, args.seconds,
                                             headers=headers, cpu=1))
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, runs in results.items():
        rows.append({"case": name, "rps": statistics.median(r["rps"] for r in runs),
                     "p50_ms": nanmedian(r["p50_ms"] for r in runs),
                     "p99_ms": nanmedian(r["p99_ms"] for r in runs),
                     "errors": sum(r["errors"] for r in runs)})
    nginx_rps = rows[1]["rps"]
    for row in rows:
        row["vs_nginx"] = row["rps"] / nginx_rps
    print(table(rows, [("case", "", "{}"), ("rps", "req/s", "{:,.0f}"), ("p50_ms", "p50 ms", "{:.2f}"),
                       ("p99_ms", "p99 ms", "{:.2f}"), ("vs_nginx", "x nginx", "{:.2f}"),
                       ("errors", "non-2xx", "{}")]))
    print(f"\nmedian of {args.rounds} interleaved rounds of {args.seconds}s, "
          f"{args.connections} connections, 1x784 TF request ({len(body)} bytes)")


if __name__ == "__main__":
    main()
