"""bench/worker: one worker, keep-alive, 32 connections, a 1x784 TF request.

Prints requests/s, p50 and p99 of the worker next to the raw ONNX Runtime
call rate of the same model (InferenceSession.run, one thread) measured in the
same run, and the server's overhead per request: 1/rps(worker) - 1/rate(raw
ORT), in microseconds. The worker is pinned to CPU 0 and wrk to CPU 1, so "per
request on one core". --rounds interleaves worker and raw measurements (the
machine is shared and noisy) and reports medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort

from bench.procs import free_port, start, stop
from bench.wrk import nanmedian, run_wrk, table


def raw_ort_rate(model: str, seconds: float) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = {"images": np.random.rand(1, 784).astype(np.float32)}
    os.sched_setaffinity(0, {0})
    try:
        for _ in range(200):
            session.run(["scores"], feeds)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(100):
                session.run(["scores"], feeds)
            n += 100
        return n / (time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, range(os.cpu_count()))


def tf_body() -> bytes:
    from gateway.codec.tensors import encode_array
    from gateway.protos import tf_predict_pb2 as pb

    request = pb.PredictRequest(signature_name="predict_images")
    encode_array(np.random.rand(1, 784).astype(np.float32), request.inputs["images"])
    return request.SerializeToString()


def main(argv=None) -> None:
    from gateway.models import DIGITS_MODEL

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model = str(DIGITS_MODEL)
    port = free_port()
    worker = start(["worker", "--service", "digits", "--model", model, "--port", str(port),
                    "--log-level", "WARNING", "--max-queue-size", "1024"], port, cpu=0,
                   health="/ready")
    raws, runs, overheads = [], [], []
    try:
        url = f"http://127.0.0.1:{port}/api/predict/digits"
        run_wrk(url, tf_body(), args.connections, 1, cpu=1)  # warm-up
        for _ in range(args.rounds):
            runs.append(run_wrk(url, tf_body(), args.connections, args.seconds, cpu=1))
            raws.append(raw_ort_rate(model, args.seconds))
            overheads.append((1 / runs[-1]["rps"] - 1 / raws[-1]) * 1e6)
    finally:
        stop(worker)
    raw = statistics.median(raws)
    overhead_us = statistics.median(overheads)
    served = {key: nanmedian([r[key] for r in runs]) for key in ("rps", "p50_ms", "p99_ms")}
    served["errors"] = sum(r["errors"] for r in runs)
    rows = [{"what": "raw onnxruntime call (1 thread, CPU 0)", "rps": raw},
            {"what": f"worker, {args.connections} keep-alive connections", **served}]
    print(table(rows, [("what", "", "{}"), ("rps", "req/s", "{:,.0f}"),
                       ("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
                       ("errors", "non-2xx", "{}")]))
    print(f"\nserver overhead per request: {overhead_us:.1f} us, median of {args.rounds} rounds "
          f"({', '.join(f'{o:.0f}' for o in overheads)}) (aim: 20 us or less on one core)")


if __name__ == "__main__":
    main()
