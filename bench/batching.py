"""Server-side batching benchmark (issue 6): throughput and latency, batching on and off.

    python bench/batching.py [--seconds 3] [--max-requests 20000] [--threads 2]

For the bundled digits model and a heavier random MLP (784-2048-10, built here
into a temp dir with gateway.models.build_digits.build_mlp), starts one worker
per (model, batching on/off) on loopback and drives it with 1, 8 and 64
concurrent closed-loop clients (asyncio, one keep-alive connection each, one
1-row TF PredictRequest per call). Each cell runs --rounds times for --seconds (in two halves,
off-on-on-off, each after a short warm-up, so that both modes see the same
background load) or --max-requests requests, whichever comes first; the "vs off"
ratio is the median of the rounds' ratios, and the cell reports
requests/s, p50 and p99 latency, and the mean batch size (rows per model run,
from the worker's /metrics). Both modes use the same rpc.worker_threads, queue
size and keepalive; batching adds --max-batch-size and --max-batch-timeout-ms.

Not a test: numbers depend on the machine (and on whatever else runs on it).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

SERVICE = "bench"
PATH = f"/api/predict/{SERVICE}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(model: str, batching: bool, args) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli.main", "worker", "--service", SERVICE,
           "--model", model, "--processor", "tensorflow", "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(args.threads), "--max-queue-size", "1024",
           "--keepalive-ms", "30000", "--log-level", "WARNING"]
    if args.processes > 1:
        cmd += ["--processes", str(args.processes)]
    if batching:
        cmd += ["--batching", "--max-batch-size", str(args.max_batch_size),
                "--max-batch-timeout-ms", str(args.max_batch_timeout_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"worker exited with {proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("worker did not start")


def stop_worker(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def batch_metrics(port: int) -> tuple[float, float]:
    """(rows summed, model runs) of the batcher so far; (0, 0) when it does not run."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = runs = 0.0
    for line in text.splitlines():
        if line.startswith("infergate_worker_batch_rows_sum "):
            total = float(line.split()[1])
        elif line.startswith("infergate_worker_batch_rows_count "):
            runs = float(line.split()[1])
    return total, runs


def request_body(rng) -> bytes:
    from gateway.codec.tensors import encode_array
    from gateway.protos import tf_predict_pb2

    request = tf_predict_pb2.PredictRequest()
    encode_array(rng.random((1, 784), dtype=np.float32), request.inputs["images"])
    return request.SerializeToString()


async def client(port: int, bodies: list, stop_at: list, budget: list, latencies: list,
                 errors: list, record_from: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    heads = [(f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream"
              f"\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    i = 0
    try:
        while time.perf_counter() < stop_at[0] and budget[0] > 0:
            started = time.perf_counter()
            if started >= record_from:
                budget[0] -= 1
            writer.write(heads[i % len(heads)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            if started >= record_from:
                if status == 200:
                    latencies.append(done - started)
                else:
                    errors.append(status)
    finally:
        writer.close()


async def drive(port: int, clients: int, seconds: float, max_requests: int, bodies) -> dict:
    warmup = min(0.3, seconds / 4)
    now = time.perf_counter()
    record_from = now + warmup
    stop_at = [record_from + seconds]
    budget = [max_requests]
    latencies: list = []
    errors: list = []
    await asyncio.gather(*(client(port, bodies, stop_at, budget, latencies, errors, record_from)
                           for _ in range(clients)))
    elapsed = min(time.perf_counter(), stop_at[0]) - record_from
    return {"latencies": latencies, "elapsed": elapsed, "errors": len(errors)}


def summarize(parts: list[dict]) -> dict:
    latencies = [x for part in parts for x in part["latencies"]]
    elapsed = sum(part["elapsed"] for part in parts)
    lat = np.array(latencies) * 1e3
    return {"rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "n": len(latencies), "errors": sum(part["errors"] for part in parts)}


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    parser.add_argument("--max-requests", type=int, default=20000, help="cap per cell")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="rpc.worker_threads of every worker (both modes)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-batch-timeout-ms", type=int, default=10)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes per worker (--processes, both modes)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="off-on-on-off rounds per cell; ratios are their median")
    args = parser.parse_args(argv)

    from gateway.models import DIGITS_MODEL
    from gateway.models.build_digits import build_mlp

    rng = np.random.default_rng(0)
    bodies = [request_body(rng) for _ in range(16)]
    concurrency = [int(c) for c in args.clients.split(",")]
    results = {}
    ratio = {}  # (model, clients) -> (median of the rounds' on/off ratios, the ratios)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="infergate-bench-") as tmp:
        heavy = str(build_mlp(os.path.join(tmp, "mlp2048.onnx"), hidden=2048))
        models = [("digits (bundled)", str(DIGITS_MODEL)), ("mlp 784-2048-10", heavy)]
        for model_name, model in models:
            # Both workers run side by side (an idle one costs nothing) and each cell is
            # measured in two halves, off-on-on-off, so that both modes see the same
            # background load on a shared machine.
            workers = {batching: start_worker(model, batching, args) for batching in (False, True)}
            try:
                for clients in concurrency:
                    parts = {False: [], True: []}
                    ratios = []
                    before = {b: batch_metrics(port) for b, (_, port) in workers.items()}
                    for _ in range(args.rounds):
                        this = {False: [], True: []}
                        for batching in (False, True, True, False):
                            port = workers[batching][1]
                            this[batching].append(asyncio.run(drive(
                                port, clients, args.seconds / 2, args.max_requests // 2, bodies)))
                        for batching in (False, True):
                            parts[batching] += this[batching]
                        off_rps = summarize(this[False])["rps"]
                        ratios.append(summarize(this[True])["rps"] / off_rps if off_rps else 0.0)
                    ratio[(model_name, clients)] = (statistics.median(ratios), ratios)
                    for batching in (False, True):
                        port = workers[batching][1]
                        after = batch_metrics(port)
                        runs = after[1] - before[batching][1]
                        cell = summarize(parts[batching])
                        cell["batch"] = (after[0] - before[batching][0]) / runs if runs else None
                        results[(model_name, clients, batching)] = cell
                        print(f"  {model_name:18} clients={clients:<3} batching="
                              f"{'on ' if batching else 'off'} {cell['rps']:8.0f} req/s",
                              file=sys.stderr, flush=True)
            finally:
                for proc, _ in workers.values():
                    stop_worker(proc)
    total = time.perf_counter() - started

    rows = []
    for model_name, _ in models:
        for clients in concurrency:
            off = results[(model_name, clients, False)]
            for batching in (False, True):
                cell = results[(model_name, clients, batching)]
                rows.append([model_name, str(clients), "on" if batching else "off",
                             f"{cell['rps']:.0f}", f"{cell['p50']:.2f}", f"{cell['p99']:.2f}",
                             "-" if cell["batch"] is None else f"{cell['batch']:.1f}",
                             f"{ratio[(model_name, clients)][0]:.2f}x" if batching else "",
                             str(cell["n"]), str(cell["errors"])])
    print(f"server-side batching, 1-row TF requests over loopback keep-alive connections; "
          f"worker_threads={args.threads}, batching: max_batch_size={args.max_batch_size}, "
          f"max_batch_timeout={args.max_batch_timeout_ms} ms; {args.seconds:g} s per cell; "
          f"{os.cpu_count()} CPUs")
    print(table(rows, ["model", "clients", "batching", "req/s", "p50 ms", "p99 ms",
                       "mean batch", "vs off", "requests", "errors"]))
    heavy_name = models[1][0]
    top = max(concurrency)
    on, off = results[(heavy_name, top, True)], results[(heavy_name, top, False)]

    def rounds(clients):
        median, each = ratio[(heavy_name, clients)]
        return f"{median:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in each)})"
    print(f"{heavy_name} at {top} clients: {rounds(top)} throughput with batching (aim >= 3x), "
          f"p99 {on['p99']:.2f} ms vs {off['p99']:.2f} ms off (aim: no worse)")
    for clients in concurrency:
        if clients != top:
            print(f"{heavy_name} at {clients} clients: {rounds(clients)} with batching "
                  f"(aim >= 0.95x)")
    print(f"whole run {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
