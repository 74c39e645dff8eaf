"""bench/gpu: served req/s, p50 and p99 of a worker against raw ONNX Runtime on the same
device, batching off and on, for an MLP and a convolutional net.

    python -m bench gpu [-- --seconds 3 --clients 16,64 --client-procs 8 --threads 4 --processes 1]

Runs on whatever the worker picks (CUDA with onnxruntime-gpu and a device, the CPU
otherwise) and says which. The models: MLP 784-2048-10, and resnet18 exported from
torchvision when torch and torchvision are installed, else a small conv net
(3x224x224 in, so the requests are as large: 600 KB) built with onnx. The raw rate
is InferenceSession.run on the same provider at batch 1 and at max batch size, in
the same run. 1-row TF requests from closed-loop clients, spread over
--client-procs processes (a 600 KB request at 5k req/s is 3 GB/s: one Python
process cannot drive that); the generator's own ceiling, against a worker that
answers without running a model, is printed first.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import sys
import tempfile
import time

import numpy as np

from bench.procs import free_port, start, stop
from bench.wrk import table

NULL_PROCESSOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "null_processor.py")


def conv_net(path: str) -> tuple[str, tuple]:
    """resnet18 (torchvision, random weights) when torch is there, else a small conv net."""
    try:
        import torch
        import torchvision
    except ImportError:
        torch = None
    if torch is not None:
        net = torchvision.models.resnet18(weights=None).eval()
        export = dict(input_names=["images"], output_names=["scores"], opset_version=17,
                      dynamic_axes={"images": {0: "N"}, "scores": {0: "N"}})
        try:  # the TorchScript exporter (newer torch defaults to dynamo, which needs more)
            torch.onnx.export(net, torch.rand(1, 3, 224, 224), path, dynamo=False, **export)
        except TypeError:  # a torch too old to know dynamo=
            torch.onnx.export(net, torch.rand(1, 3, 224, 224), path, **export)
        return "resnet18", (3, 224, 224)
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)
               for name, shape in (("w1", (16, 3, 7, 7)), ("w2", (32, 16, 3, 3)),
                                   ("w3", (64, 32, 3, 3)), ("fc", (64, 10)))]
    nodes = [helper.make_node("Conv", ["images", "w1"], ["c1"], strides=[4, 4], pads=[3, 3, 3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("GlobalAveragePool", ["r3"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["scores"])]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return "convnet (onnx)", (3, 224, 224)


def raw_rate(path: str, shape: tuple, batch: int, seconds: float) -> tuple[float, str]:
    """(rows/s, provider) of InferenceSession.run at `batch` rows."""
    import onnxruntime as ort

    from gateway.worker.model import choose_providers

    providers = choose_providers(ort.get_available_providers())
    session = ort.InferenceSession(path, providers=[name for name, _ in providers])
    x = np.random.rand(batch, *shape).astype(np.float32)
    for _ in range(5):
        session.run(None, {"images": x})
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {"images": x})
        n += 1
    return n * batch / (time.perf_counter() - started), session.get_providers()[0]


def tf_bodies(shape: tuple, count: int = 4) -> list[bytes]:
    from gateway.codec.tensors import encode_array
    from gateway.protos import tf_predict_pb2 as pb

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        request = pb.PredictRequest()
        encode_array(rng.random((1, *shape), dtype=np.float32), request.inputs["images"])
        bodies.append(request.SerializeToString())
    return bodies


async def _client(port, heads, record_from, stop_at, latencies, errors):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(heads[i % len(heads)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            await reader.readexactly(length)
            if started >= record_from:
                if head[9:12] == b"200":
                    latencies.append(time.perf_counter() - started)
                else:
                    errors.append(head[9:12])
    finally:
        writer.close()


def _client_process(port, path, bodies, connections, record_from, stop_at, results):
    heads = [(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(b)}\r\n\r\n"
              ).encode() + b for b in bodies]
    latencies, errors = [], []

    async def run():
        await asyncio.gather(*(_client(port, heads, record_from, stop_at, latencies, errors)
                               for _ in range(connections)))
    asyncio.run(run())
    results.put((np.array(latencies), len(errors)))


def drive(port: int, service: str, bodies: list, clients: int, procs: int, seconds: float) -> dict:
    """Closed-loop clients over several processes; req/s, p50, p99 (ms) and errors."""
    procs = max(1, min(procs, clients))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    record_from = time.perf_counter() + 0.5 + 0.1 * procs  # after warm-up and start-up
    stop_at = record_from + seconds
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    workers = [context.Process(target=_client_process, args=(
        port, f"/api/predict/{service}", bodies, n, record_from, stop_at, results)) for n in share]
    for w in workers:
        w.start()
    parts = [results.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    latencies = np.concatenate([p[0] for p in parts]) * 1e3
    return {"rps": len(latencies) / seconds, "errors": sum(p[1] for p in parts),
            "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
            "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan")}


def worker_args(service: str, model: str | None, batching: bool, args) -> list[str]:
    cmd = ["worker", "--service", service, "--port", "0", "--threads", str(args.threads),
           "--max-queue-size", "4096", "--keepalive-ms", "60000", "--log-level", "WARNING"]
    if model is None:
        cmd += ["--processor", "python", "--processor-entry", NULL_PROCESSOR]
    else:
        cmd += ["--model", model, "--processor", "tensorflow"]
        if args.processes > 1:
            cmd += ["--processes", str(args.processes)]
    if batching:
        cmd += ["--batching", "--max-batch-size", str(args.max_batch_size),
                "--max-batch-timeout-ms", str(args.max_batch_timeout_ms)]
    return cmd


def serve(cmd: list[str]):
    port = free_port()
    cmd = [*cmd]
    cmd[cmd.index("--port") + 1] = str(port)
    return start(cmd, port, health="/ready", timeout=300), port


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="16,64")
    parser.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--threads", type=int, default=4, help="rpc.worker_threads")
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes (--processes), each with its own session")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-timeout-ms", type=int, default=5)
    parser.add_argument("--models", default="mlp,conv")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]

    from gateway.models.build_digits import build_mlp

    rows = []
    with tempfile.TemporaryDirectory(prefix="infergate-gpu-") as tmp:
        models = []
        if "mlp" in args.models:
            models.append(("mlp 784-2048-10", str(build_mlp(os.path.join(tmp, "mlp.onnx"), hidden=2048)),
                           (784,)))
        if "conv" in args.models:
            name, shape = conv_net(os.path.join(tmp, "conv.onnx"))
            models.append((name, os.path.join(tmp, "conv.onnx"), shape))
        for name, path, shape in models:
            bodies = tf_bodies(shape)
            null, port = serve(worker_args("null", None, False, args))
            try:
                ceiling = drive(port, "null", bodies, max(clients), args.client_procs, args.seconds)
            finally:
                stop(null)
            raw1, provider = raw_rate(path, shape, 1, args.seconds)
            raw_batch, _ = raw_rate(path, shape, args.max_batch_size, args.seconds)
            print(f"{name}: {provider}, {args.processes} worker process(es); raw {raw1:,.0f} "
                  f"rows/s at batch 1, {raw_batch:,.0f} at "
                  f"batch {args.max_batch_size}; load generator ceiling ({args.client_procs} "
                  f"processes, {max(clients)} connections, no model): {ceiling['rps']:,.0f} req/s",
                  flush=True)
            cells = {}
            for batching in (False, True):
                proc, port = serve(worker_args("bench", path, batching, args))
                try:
                    for n in clients:
                        cells[batching, n] = drive(port, "bench", bodies, n, args.client_procs,
                                                   args.seconds)
                finally:
                    stop(proc)
            for n in clients:
                off = cells[False, n]
                for batching in (False, True):
                    cell = cells[batching, n]
                    rows.append({"model": name, "provider": provider.replace("ExecutionProvider", ""),
                                 "batching": "on" if batching else "off", "clients": n, **cell,
                                 "vs_raw": f"{cell['rps'] / raw_batch:.3f}",
                                 "vs_off": f"{cell['rps'] / off['rps']:.2f}x" if batching else ""})
    print(table(rows, [("model", "model", "{}"), ("provider", "on", "{}"),
                       ("batching", "batching", "{}"), ("clients", "clients", "{}"),
                       ("rps", "req/s", "{:,.0f}"), ("p50_ms", "p50 ms", "{:.2f}"),
                       ("p99_ms", "p99 ms", "{:.2f}"), ("errors", "errors", "{}"),
                       ("vs_raw", f"vs raw batch-{args.max_batch_size} rows/s", "{}"),
                       ("vs_off", "vs off", "{}")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
