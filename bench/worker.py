"""bench/worker: one worker, keep-alive: a 1x784 TF request at 32 connections, and a
1x784 JSON request (the EAS JSON processor) at 8 and 64 connections.

Prints requests/s, p50 and p99 of the worker next to the raw ONNX Runtime
call rate of the same model (InferenceSession.run, one thread) measured in the
same run, and the server's overhead per request on the TF row: 1/rps(worker) -
1/rate(raw ORT), in microseconds. The worker is pinned to CPU 0 and wrk to CPU
1, so "per request on one core". --rounds interleaves the rows and the raw
measurements, each round in a rotated order (the machine is shared and noisy),
and reports medians. "cpu us/req" is the worker's CPU time (all its threads)
over the requests it served: on a busy machine it moves less than req/s does.

--against DIR serves the same rows from the workers of a second checkout (built
with build_ext --inplace), interleaved with ours, and prints each row's ratio
ours/theirs of the medians (an A/B against an older commit: check out that
commit in a git worktree and build it there).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort

from bench.procs import free_port, start, stop
from bench.wrk import nanmedian, rotated, run_wrk, table


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


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system, all threads) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tf_body() -> bytes:
    from gateway.codec.tensors import encode_array
    from gateway.protos import tf_predict_pb2 as pb

    request = pb.PredictRequest(signature_name="predict_images")
    encode_array(np.random.rand(1, 784).astype(np.float32), request.inputs["images"])
    return request.SerializeToString()


def json_body() -> bytes:
    """A 1x784 float32 tensor as a JSON client sends it (numbers as Python prints them)."""
    import orjson

    rows = np.random.rand(1, 784).astype(np.float32).tolist()
    return orjson.dumps({"inputs": {"images": rows}})


def main(argv=None) -> None:
    from gateway.models import DIGITS_MODEL

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32, help="of the TF row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", metavar="DIR",
                        help="a second built checkout whose workers serve the same rows")
    args = parser.parse_args(argv)
    model = str(DIGITS_MODEL)  # the same model file for both checkouts
    checkouts = {"ours": None}
    if args.against:
        checkouts["theirs"] = os.path.abspath(args.against)
    bodies = {"tensorflow": tf_body(), "json": json_body()}
    rows = [("tensorflow", args.connections), ("json", 8), ("json", 64)]
    cases = [(who, processor, connections) for who in checkouts for processor, connections in rows]
    workers, urls, pids = [], {}, {}
    runs = {case: [] for case in cases}
    raws, overheads = [], []
    try:
        for who, cwd in checkouts.items():
            for processor in bodies:
                port = free_port()
                workers.append(start(["worker", "--service", "digits", "--model", model,
                                      "--processor", processor, "--port", str(port),
                                      "--log-level", "WARNING", "--max-queue-size", "1024"],
                                     port, cpu=0, health="/ready", cwd=cwd))
                urls[who, processor] = f"http://127.0.0.1:{port}/api/predict/digits"
                pids[who, processor] = workers[-1].pid
        for who, processor, connections in cases:  # warm-up
            run_wrk(urls[who, processor], bodies[processor], connections, 1, cpu=1)
        for round_no in range(args.rounds):
            for case in rotated(cases, round_no):
                who, processor, connections = case
                before = cpu_seconds(pids[who, processor])
                run = run_wrk(urls[who, processor], bodies[processor], connections, args.seconds,
                              cpu=1)
                run["cpu_us"] = (cpu_seconds(pids[who, processor]) - before) * 1e6 / \
                    max(1.0, run["rps"] * args.seconds)
                runs[case].append(run)
            raws.append(raw_ort_rate(model, args.seconds))
            overheads.append((1 / runs["ours", "tensorflow", args.connections][-1]["rps"]
                              - 1 / raws[-1]) * 1e6)
    finally:
        for worker in workers:
            stop(worker)
    served = {case: {key: nanmedian([r[key] for r in runs[case]])
                     for key in ("rps", "p50_ms", "p99_ms", "cpu_us")} for case in cases}
    table_rows = [{"what": "raw onnxruntime call (1 thread, CPU 0)",
                   "rps": statistics.median(raws)}]
    for case in cases:
        who, processor, connections = case
        what = f"worker, {'TF' if processor == 'tensorflow' else 'JSON'}, " \
               f"{connections} keep-alive connections" + (f" ({who})" if args.against else "")
        table_rows.append({"what": what, **served[case],
                           "errors": sum(r["errors"] for r in runs[case])})
    print(table(table_rows, [("what", "", "{}"), ("rps", "req/s", "{:,.0f}"),
                             ("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
                             ("cpu_us", "cpu us/req", "{:.0f}"), ("errors", "non-2xx", "{}")]))
    print(f"\nserver overhead per request: {statistics.median(overheads):.1f} us, median of "
          f"{args.rounds} rounds ({', '.join(f'{o:.0f}' for o in overheads)}) "
          "(aim: 20 us or less on one core)")
    if args.against:
        print(f"\nours / theirs ({args.against}), medians of {args.rounds} rotated rounds:")
        ratios = []
        for processor, connections in rows:
            ours, theirs = ("ours", processor, connections), ("theirs", processor, connections)
            per_round = [a["rps"] / b["rps"] for a, b in zip(runs[ours], runs[theirs])]
            ratios.append({"what": f"{'TF' if processor == 'tensorflow' else 'JSON'}, "
                                   f"{connections} connections",
                           "rps": served[ours]["rps"] / served[theirs]["rps"],
                           "low": min(per_round), "high": max(per_round),
                           "p99": served[ours]["p99_ms"] / served[theirs]["p99_ms"],
                           "cpu": served[ours]["cpu_us"] / served[theirs]["cpu_us"]})
        print(table(ratios, [("what", "", "{}"), ("rps", "req/s", "{:.2f}x"),
                             ("low", "rounds from", "{:.2f}x"), ("high", "to", "{:.2f}x"),
                             ("p99", "p99", "{:.2f}x"), ("cpu", "cpu/req", "{:.2f}x")]))


if __name__ == "__main__":
    main()
