"""bench/worker: one worker, keep-alive, 32 connections, a 1x784 TF request.

Prints requests/s, p50 and p99 of the worker next to the raw ONNX Runtime
call rate of the same model measured in the same run, and the server's
overhead per request: 1/rps(worker) - 1/rate(raw ORT), in microseconds.
The worker is pinned to CPU 0 and wrk to CPU 1, so "per request on one core".
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnxruntime as ort

from bench.procs import free_port, start, stop
from bench.wrk import run_wrk, table


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
    args = parser.parse_args(argv)
    model = str(DIGITS_MODEL)
    port = free_port()
    worker = start(["worker", "--service", "digits", "--model", model, "--port", str(port),
                    "--log-level", "WARNING", "--max-queue-size", "1024"], port, cpu=0)
    try:
        url = f"http://127.0.0.1:{port}/api/predict/digits"
        run_wrk(url, tf_body(), args.connections, 1, cpu=1)  # warm-up
        served = run_wrk(url, tf_body(), args.connections, args.seconds, cpu=1)
    finally:
        stop(worker)
    raw = raw_ort_rate(model, args.seconds)
    overhead_us = (1 / served["rps"] - 1 / raw) * 1e6
    rows = [{"what": "raw onnxruntime call (1 thread, CPU 0)", "rps": raw},
            {"what": f"worker, {args.connections} keep-alive connections", **served}]
    print(table(rows, [("what", "", "{}"), ("rps", "req/s", "{:,.0f}"),
                       ("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
                       ("errors", "non-2xx", "{}")]))
    print(f"\nserver overhead per request: {overhead_us:.1f} us (aim: under 25 us on one core)")


if __name__ == "__main__":
    main()
