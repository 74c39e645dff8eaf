"""bench/oip: the Open Inference Protocol's paths next to the EAS path, on one worker.

One worker serving the digits model (HTTP and gRPC), pinned to CPU 0; the load
generator on CPU 1, 32 requests in flight, a 1x784 float32 input each:

- EAS: wrk POSTing a TF PredictRequest to /api/predict/digits (the reference);
- v2 HTTP binary: wrk POSTing tritonclient's default form (a JSON header, the
  tensor in binary) to /v2/models/digits/infer;
- v2 HTTP JSON: the same with the tensor as JSON numbers;
- v2 gRPC: h2load (Debian's nghttp2-client) sending ModelInfer messages on 8
  HTTP/2 connections of 4 streams each.

Rounds interleave the cases (rotated each round) and report medians, as a ratio
to EAS. Aims: v2 binary over HTTP >= 0.95x EAS, gRPC >= v2 HTTP. Every answer is
checked: wrk's non-2xx count, and for gRPC (always HTTP 200) the worker's own
count of successful requests against h2load's.

`--through-gateway` adds the same cases through a gateway (CPU 1 shared with the
load generator: compare them with each other, not with the worker's).
`--against DIR` serves every case from a second built checkout too (an older
commit in a git worktree), interleaved with ours, and prints ours/theirs.

perf_analyzer (Triton's load generator) runs too when it is on PATH
(`perf_analyzer -m digits -u HOST:PORT -i http|grpc --concurrency-range 32`);
PyPI's `perf-analyzer` here is a 0.1.0 placeholder without the binary.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import urllib.request

import numpy as np

from bench.procs import free_port, start, stop
from bench.worker import tf_body
from bench.wrk import nanmedian, rotated, run_wrk, table


def v2_binary() -> tuple[bytes, dict]:
    data = np.random.rand(1, 784).astype(np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 784],
                                   "parameters": {"binary_data_size": len(data)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


def v2_json() -> bytes:
    return json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 784],
                                   "data": np.random.rand(784).astype(np.float32).tolist()}]
                       }).encode()


def grpc_message() -> bytes:
    """A ModelInferRequest in gRPC's length-prefixed framing."""
    from gateway.protos import oip_pb2 as pb

    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 784])
    request.raw_input_contents.append(np.random.rand(1, 784).astype(np.float32).tobytes())
    data = request.SerializeToString()
    return b"\0" + len(data).to_bytes(4, "big") + data


def worker_successes(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("infergate_worker_requests_total{") and 'code="200"' in line)


def run_h2load(port: int, body: bytes, seconds: int, metrics_port: int, cpu: int) -> dict:
    h2load = shutil.which("h2load")
    if h2load is None:
        raise SystemExit("h2load is not installed: apt-get install nghttp2-client")
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(body)
        f.flush()
        before = worker_successes(metrics_port)
        out = subprocess.run(
            ["taskset", "-c", str(cpu), h2load, "-c", "8", "-m", "4", "-t", "1",
             "-D", str(seconds), "-d", f.name, "-H", "content-type: application/grpc",
             "-H", "te: trailers",
             f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"],
            capture_output=True, text=True, timeout=seconds + 30).stdout
        answered = worker_successes(metrics_port) - before
    match = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    total = re.search(r"requests: (\d+) total, \d+ started, (\d+) done", out)
    if match is None or total is None:
        raise RuntimeError(f"h2load printed no result:\n{out}")
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    done = int(total.group(2))
    return {"rps": float(match.group(1)), "errors": max(0, done - int(answered)),
            "mean_ms": _ms(mean.group(1)) if mean else float("nan")}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def perf_analyzer(port: int, grpc_port: int) -> None:
    exe = shutil.which("perf_analyzer")
    if exe is None:
        print("\nperf_analyzer: not on PATH, skipped (PyPI's perf-analyzer here is a 0.1.0 "
              "placeholder; Triton's SDK image has the binary)")
        return
    for protocol, where in (("http", port), ("grpc", grpc_port)):
        out = subprocess.run([exe, "-m", "digits", "-u", f"127.0.0.1:{where}", "-i", protocol,
                              "--concurrency-range", "32", "--shape", "images:784"],
                             capture_output=True, text=True, timeout=300).stdout
        print(f"\nperf_analyzer -i {protocol}:\n{out[-600:]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--through-gateway", action="store_true")
    parser.add_argument("--against", metavar="DIR",
                        help="a second built checkout whose worker (and gateway) serve the "
                             "same cases, interleaved with ours")
    args = parser.parse_args(argv)
    checkouts = {"": None}
    if args.against:
        checkouts["theirs "] = os.path.abspath(args.against)
    procs, cases, ports = [], {}, {}
    tmp = tempfile.mkdtemp()
    try:
        for who, cwd in checkouts.items():
            ports[who] = _serve(who, cwd, args.through_gateway, tmp, procs, cases)
        for run in cases.values():
            run(1)  # warm-up
        results = {name: [] for name in cases}
        for round_no in range(args.rounds):
            for name in rotated(list(cases), round_no):
                results[name].append(cases[name](args.seconds))
        perf_analyzer(*ports[""])
    finally:
        for proc in reversed(procs):
            stop(proc)
    rows = []
    for name, runs in results.items():
        who = "theirs " if name.startswith("theirs ") else ""
        own = name[len(who):]
        ref = results[who + ("gateway: EAS" if own.startswith("gateway") else "EAS (TF protobuf)")]
        ratios = [r["rps"] / e["rps"] for r, e in zip(runs, ref)]
        rows.append({"case": name, "rps": nanmedian([r["rps"] for r in runs]),
                     "ratio": statistics.median(ratios),
                     "all": " ".join(f"{x:.2f}" for x in ratios),
                     "errors": sum(r["errors"] for r in runs)})
    print(table(rows, [("case", "case", "{}"), ("rps", "req/s", "{:,.0f}"),
                       ("ratio", "vs EAS", "{:.2f}x"), ("all", "each round", "{}"),
                       ("errors", "failed", "{}")]))
    by = {row["case"]: row for row in rows}
    print(f"\naims: v2 binary over HTTP >= 0.95x EAS ({by['v2 HTTP binary']['ratio']:.2f}x), "
          f"gRPC >= v2 HTTP ({by['v2 gRPC']['rps'] / by['v2 HTTP binary']['rps']:.2f}x); "
          f"medians of {args.rounds} interleaved rounds")
    if args.against:
        print(f"\nours / theirs ({args.against}), per round and median:")
        for name in (n for n in results if not n.startswith("theirs ")):
            per_round = [a["rps"] / b["rps"]
                         for a, b in zip(results[name], results["theirs " + name])]
            print(f"  {name:<26} {statistics.median(per_round):.2f}x   "
                  f"({' '.join(f'{x:.2f}' for x in per_round)})")


def _serve(who: str, cwd: str | None, through_gateway: bool, tmp: str, procs: list,
           cases: dict) -> tuple[int, int]:
    """Start one checkout's worker (and gateway) and add its cases, named with `who`
    first; (HTTP port, gRPC port) of the worker."""
    from gateway.models import DIGITS_MODEL

    port, grpc_port = free_port(), free_port()
    procs.append(start(["worker", "--service", "digits", "--model", str(DIGITS_MODEL), "--port",
                        str(port), "--grpc-port", str(grpc_port), "--log-level", "WARNING",
                        "--max-queue-size", "1024"], port, cpu=0, health="/ready", cwd=cwd))
    binary, binary_headers = v2_binary()
    base = f"http://127.0.0.1:{port}"
    cases.update({
        who + "EAS (TF protobuf)": lambda s: run_wrk(f"{base}/api/predict/digits", tf_body(),
                                                     32, s, cpu=1),
        who + "v2 HTTP binary": lambda s: run_wrk(f"{base}/v2/models/digits/infer", binary, 32,
                                                  s, headers=binary_headers, cpu=1),
        who + "v2 HTTP JSON": lambda s: run_wrk(f"{base}/v2/models/digits/infer", v2_json(), 32,
                                                s, cpu=1),
        who + "v2 gRPC": lambda s: run_h2load(grpc_port, grpc_message(), s, port, 1),
    })
    if through_gateway:
        gateway_port, gateway_grpc = free_port(), free_port()
        state = os.path.join(tmp, who.strip() or "ours")
        _seed(state, port)
        procs.append(start(["gateway", "--port", str(gateway_port), "--grpc-port",
                            str(gateway_grpc), "--state-dir", state, "--log-level",
                            "WARNING"], gateway_port, cpu=1, cwd=cwd))
        gw = f"http://127.0.0.1:{gateway_port}"
        cases.update({
            who + "gateway: EAS": lambda s: run_wrk(f"{gw}/api/predict/digits", tf_body(), 32,
                                                    s, cpu=1),
            who + "gateway: v2 HTTP binary": lambda s: run_wrk(
                f"{gw}/v2/models/digits/infer", binary, 32, s, headers=binary_headers, cpu=1),
            who + "gateway: v2 gRPC": lambda s: run_h2load(gateway_grpc, grpc_message(), s,
                                                           port, 1),
        })
    return port, grpc_port


def _seed(state_dir: str, worker_port: int) -> None:
    import asyncio

    from gateway.registry import open_store
    from gateway.registry.records import ServiceRecord

    async def write():
        store = open_store(state_dir)
        await store.start()
        await store.put_service(ServiceRecord.from_dict({
            "name": "digits", "status": "Running",
            "config": {"endpoints": [{"ip": "127.0.0.1", "port": worker_port}]}}))
        await store.close()

    asyncio.run(write())


if __name__ == "__main__":
    main()
