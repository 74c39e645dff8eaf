"""Server-side batching (issue 6, SPEC section 4).

Unit tests drive gateway.batching.BatchingRunner directly with real OnnxModels
(wrapped to record or hold model runs, so the orderings they check do not depend
on timing); process tests run real `infergate worker --batching` processes and
talk EAS protobuf to them over loopback.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import statistics
import threading
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest

from gateway.batching import BatchingRunner
from gateway.codec.tensors import decode_array, decode_caffe, encode_array, encode_caffe
from gateway.models import DIGITS_MODEL
from gateway.protos import caffe_predict_pb2, pytorch_predict_pb2, tf_predict_pb2
from gateway.serviceconfig import RpcSettings
from gateway.worker.model import OnnxModel
from gateway.worker.processors.base import Call
from gateway.worker.runner import DeadlineExceeded, QueueFull

# -- models built in the tests --------------------------------------------------------------


def _save(nodes, name, inputs, outputs, initializers, path):
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return str(path)


def build_shape_model(path):
    """x [N, D] (D dynamic) -> y = 2x [N, D], s = sum over D [N, 1]."""
    from onnx import TensorProto, helper, numpy_helper

    return _save(
        [helper.make_node("Mul", ["x", "two"], ["y"]),
         helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1)],
        "shape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "d"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "d"]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")], path)


def build_slow_model(path, dim=1024, layers=400):
    """x [N, dim] -> y = tanh(...tanh(x W)... W) [N, dim], z = sum(y) [N, 1]: slow, on purpose."""
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(1).standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32)
    nodes, cur = [], "x"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [cur, "w"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        cur = f"t{i}"
    nodes += [helper.make_node("Identity", [cur], ["y"]),
              helper.make_node("ReduceSum", [cur, "axes"], ["z"], keepdims=1)]
    return _save(nodes, "slow",
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim]),
                  helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 1])],
                 [numpy_helper.from_array(w, "w"),
                  numpy_helper.from_array(np.array([1], np.int64), "axes")], path)


def build_column_sum_model(path):
    """y = the sum over the batch, [1, 4]: onnxruntime sees the fixed first dimension."""
    from onnx import TensorProto, helper, numpy_helper

    return _save(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "colsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes")], path)


def build_doubling_model(path):
    """y = concat(x, x) along dimension 0: declared [batch, 4], yet 2N rows come out."""
    from onnx import TensorProto, helper

    return _save(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=0)],
        "double", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [], path)


@pytest.fixture(scope="module")
def slow_model_path(tmp_path_factory):
    return build_slow_model(tmp_path_factory.mktemp("slow") / "slow.onnx")


def reference(path):
    """Plain onnxruntime on one request: what an unbatched worker computes."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds, names=None: session.run(names, feeds)


# -- unit: BatchingRunner with real models -----------------------------------------------------


class Recorder:
    """A real OnnxModel whose runs are recorded and, with a gate, held until the gate opens."""

    def __init__(self, model: OnnxModel, gate: threading.Event | None = None):
        self.model = model
        self.inputs, self.outputs = model.inputs, model.outputs
        self.gate = gate
        self.runs = []  # (rows, {input: shape}, output names)
        self.started = threading.Event()

    def run(self, feeds, output_names):
        first = next(iter(feeds.values()))
        self.runs.append((first.shape[0], {k: v.shape for k, v in feeds.items()},
                          tuple(output_names)))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        return self.model.run(feeds, output_names)


def settings(**kw):
    base = dict(batching=True, max_batch_size=32, max_batch_timeout=20, max_queue_size=64,
                keepalive=5000, worker_threads=1)
    base.update(kw)
    return RpcSettings(**base)


def run_async(coro_fn, timeout=30):
    async def bounded():
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


def soon(seconds=10.0):
    return time.monotonic() + seconds


async def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def test_unit_batched_equals_unbatched_and_merges():
    rec = Recorder(OnnxModel(str(DIGITS_MODEL)))
    ref = reference(DIGITS_MODEL)
    cfg = settings(max_batch_size=16, worker_threads=2, max_queue_size=128)
    batcher = BatchingRunner(rec, cfg)
    rng = np.random.default_rng(0)
    xs = [rng.random((int(rng.integers(1, 4)), 784), dtype=np.float32) for _ in range(64)]
    big = rng.random((40, 784), dtype=np.float32)  # more than max_batch_size: runs alone

    async def go():
        calls = [batcher.infer(Call({"images": x}, ("scores",)), soon()) for x in xs]
        calls.insert(10, batcher.infer(Call({"images": big}, ("scores",)), soon()))
        return await asyncio.gather(*calls)

    try:
        outs = run_async(go)
    finally:
        batcher.close()
    big_out = outs.pop(10)
    assert np.allclose(big_out[0], ref({"images": big})[0], rtol=1e-5)
    for x, out in zip(xs, outs):
        assert len(out) == 1 and out[0].shape == (x.shape[0], 10)
        assert np.allclose(out[0], ref({"images": x})[0], rtol=1e-5)
    rows = [r for r, _, _ in rec.runs]
    assert sum(rows) == sum(x.shape[0] for x in xs) + 40
    assert 40 in rows and all(r <= 16 for r in rows if r != 40)
    assert batcher.merged_batches > 0 and batcher.max_batch_requests > 1
    assert batcher.batches == len(rec.runs) < 65
    assert batcher.waiting == 0 and batcher.inflight == 0


def test_unit_different_keys_never_merge(tmp_path):
    path = build_shape_model(tmp_path / "shape.onnx")
    rec = Recorder(OnnxModel(path))
    cfg = settings(max_batch_size=64, max_batch_timeout=50, worker_threads=1)
    batcher = BatchingRunner(rec, cfg)
    rng = np.random.default_rng(1)
    kinds = [(3, ("y",)), (5, ("y",)), (3, ("y", "s")), (3, ("s",))]
    requests = []
    for i in range(48):
        d, names = kinds[i % len(kinds)]
        requests.append((rng.random((1 + i % 3, d), dtype=np.float32), names))

    async def go():
        return await asyncio.gather(*(batcher.infer(Call({"x": x}, names), soon())
                                      for x, names in requests))

    try:
        outs = run_async(go)
    finally:
        batcher.close()
    for (x, names), out in zip(requests, outs):
        want = {"y": 2 * x, "s": x.sum(axis=1, keepdims=True)}
        assert [o.shape for o in out] == [want[n].shape for n in names]
        for name, got in zip(names, out):
            assert np.allclose(got, want[name], rtol=1e-5)
    # Each model run had one trailing shape and one output filter; the rows each
    # (shape, filter) got from the runs are exactly the rows sent with it, so no
    # run mixed requests of different keys.
    assert batcher.split_reruns == 0
    sent, ran = {}, {}
    for x, names in requests:
        sent[(x.shape[1], names)] = sent.get((x.shape[1], names), 0) + x.shape[0]
    for rows, shapes, names in rec.runs:
        key = (shapes["x"][1], names)
        ran[key] = ran.get(key, 0) + rows
    assert ran == sent
    assert batcher.merged_batches > 0
    assert len(rec.runs) >= len(kinds)


def test_unit_unsplittable_outputs_rerun_one_by_one(tmp_path):
    rec = Recorder(OnnxModel(build_doubling_model(tmp_path / "double.onnx")))
    batcher = BatchingRunner(rec, settings(max_batch_timeout=50, worker_threads=1))
    xs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(1, 7)]

    async def go():
        return await asyncio.gather(*(batcher.infer(Call({"x": x}, ("y",)), soon()) for x in xs))

    try:
        outs = run_async(go)
        assert batcher.split_reruns == 1  # merged once, outputs did not split: re-run each
        for x, out in zip(xs, outs):
            assert np.array_equal(out[0], np.concatenate([x, x]))
        before = len(rec.runs)
        outs = run_async(go)  # that key is never merged again
        assert len(rec.runs) - before == len(xs) and batcher.split_reruns == 1
        for x, out in zip(xs, outs):
            assert np.array_equal(out[0], np.concatenate([x, x]))
    finally:
        batcher.close()


def test_unit_fixed_first_dimension_is_never_merged(tmp_path):
    rec = Recorder(OnnxModel(build_column_sum_model(tmp_path / "colsum.onnx")))
    batcher = BatchingRunner(rec, settings(max_batch_timeout=50, worker_threads=1))
    xs = [np.full((3, 4), i, np.float32) for i in range(1, 7)]

    async def go():
        return await asyncio.gather(*(batcher.infer(Call({"x": x}, ("y",)), soon()) for x in xs))

    try:
        outs = run_async(go)
    finally:
        batcher.close()
    assert not batcher.mergeable and batcher.merged_batches == 0
    assert [r for r, _, _ in rec.runs] == [3] * len(xs)
    for x, out in zip(xs, outs):
        assert np.allclose(out[0], x.sum(axis=0, keepdims=True))


def test_unit_deadline_while_waiting_and_while_running():
    gate = threading.Event()
    rec = Recorder(OnnxModel(str(DIGITS_MODEL)), gate)
    ref = reference(DIGITS_MODEL)
    batcher = BatchingRunner(rec, settings(worker_threads=1, max_batch_timeout=10_000))
    x = np.random.default_rng(2).random((2, 784), dtype=np.float32)

    async def go():
        # A runs (held by the gate); B waits behind it and its deadline passes.
        a = asyncio.ensure_future(batcher.infer(Call({"images": x}, ("scores",)), soon(30)))
        await wait_until(rec.started.is_set)
        with pytest.raises(DeadlineExceeded):
            await batcher.infer(Call({"images": x[:1]}, ("scores",)), soon(0.1))
        assert not a.done() and not gate.is_set()  # answered while the batch still runs
        assert batcher.expired_waiting == 1 and batcher.waiting == 0 and batcher.inflight == 1
        gate.set()
        out = await a
        assert np.allclose(out[0], ref({"images": x})[0], rtol=1e-5)
        # C runs (held again) and its own deadline passes while it runs.
        gate.clear()
        rec.started.clear()
        c = asyncio.ensure_future(batcher.infer(Call({"images": x}, ("scores",)), soon(0.1)))
        await wait_until(rec.started.is_set)
        with pytest.raises(DeadlineExceeded):
            await c
        assert batcher.inflight == 1 and batcher.expired_running == 1 and not gate.is_set()
        gate.set()
        await wait_until(lambda: batcher.inflight == 0)
        out = await batcher.infer(Call({"images": x}, ("scores",)), soon())
        assert np.allclose(out[0], ref({"images": x})[0], rtol=1e-5)

    try:
        run_async(go)
    finally:
        gate.set()
        batcher.close()
    assert [r for r, _, _ in rec.runs] == [2, 2, 2]  # B never ran


def test_unit_queue_full_and_cancelled_requests():
    gate = threading.Event()
    rec = Recorder(OnnxModel(str(DIGITS_MODEL)), gate)
    ref = reference(DIGITS_MODEL)
    batcher = BatchingRunner(rec, settings(worker_threads=1, max_queue_size=2,
                                           max_batch_timeout=10_000))
    rng = np.random.default_rng(3)
    xs = [rng.random((1, 784), dtype=np.float32) for _ in range(4)]

    def infer(x):
        return asyncio.ensure_future(batcher.infer(Call({"images": x}, ("scores",)), soon(30)))

    async def go():
        a = infer(xs[0])
        await wait_until(rec.started.is_set)  # A runs; the queue is empty
        b, c = infer(xs[1]), infer(xs[2])
        await asyncio.sleep(0.01)
        assert batcher.waiting == 2
        with pytest.raises(QueueFull):  # at once, not when something finishes
            await batcher.infer(Call({"images": xs[3]}, ("scores",)), soon(30))
        assert batcher.rejected == 1
        c.cancel()  # C's client went away: it leaves the queue and never runs
        with pytest.raises(asyncio.CancelledError):
            await c
        assert batcher.waiting == 1
        d = infer(xs[3])  # room again
        await wait_until(lambda: batcher.waiting == 2)  # B and D both queued behind A
        gate.set()
        return await asyncio.gather(a, b, d)

    try:
        outs = run_async(go)
    finally:
        gate.set()
        batcher.close()
    for x, out in zip((xs[0], xs[1], xs[3]), outs):
        assert np.allclose(out[0], ref({"images": x})[0], rtol=1e-5)
    assert sum(r for r, _, _ in rec.runs) == 3
    assert rec.runs[1][0] == 2  # B and D ran together after A


def test_unit_a_cancelled_job_leaves_the_runner_queue_at_once():
    """Cancelling a queued job's Future (what the servers do when its client goes away)
    frees its slot and lets its request go at once, before any thread takes it; the
    husks left for the threads to skip are bounded too."""
    import gc
    import weakref

    from gateway.worker.runner import ABANDONED_PER_SLOT, ThreadedRunner

    gate = threading.Event()
    runner = ThreadedRunner(settings(max_queue_size=2, worker_threads=1))

    class Body:  # a request body whose release can be watched
        pass

    async def go():
        runner.bind(asyncio.get_running_loop())
        busy = runner.submit(soon(), gate.wait, 30)
        await wait_until(lambda: runner.waiting == 0)  # the thread holds `busy`
        body = Body()
        released = weakref.ref(body)
        queued = [runner.submit(soon(), id, body), runner.submit(soon(), id, Body())]
        del body
        with pytest.raises(QueueFull):
            runner.submit(soon(), id, Body())
        for job in queued:
            job.cancel()
        gc.collect()
        assert runner.waiting == 0 and released() is None
        answer = runner.submit(soon(), len, b"abc")  # room again, at once
        for _ in range(runner.max_entries):  # husks: bounded while the thread is busy
            try:
                runner.submit(soon(), len, b"").cancel()
            except QueueFull:
                break
        else:
            raise AssertionError("abandoned jobs were never bounded")
        assert runner.jobs.qsize() == runner.max_entries == 2 * (1 + ABANDONED_PER_SLOT)
        gate.set()
        assert await busy is True and await answer == 3

    try:
        run_async(go)
    finally:
        gate.set()
        runner.close()


# -- process tests: real workers over loopback ----------------------------------------------------


def tf_body(feeds: dict, output_filter=()) -> bytes:
    request = tf_predict_pb2.PredictRequest()
    for name, array in feeds.items():
        encode_array(array, request.inputs[name])
    request.output_filter.extend(output_filter)
    return request.SerializeToString()


def tf_outputs(body: bytes) -> dict:
    response = tf_predict_pb2.PredictResponse()
    response.ParseFromString(body)
    return {name: decode_array(proto, name) for name, proto in response.outputs.items()}


def send_all(url: str, path: str, bodies, delays=None, timeout=60.0):
    """POST every body at once (one connection each, released together, or at
    `delays` seconds from a common start); returns [(status, body, monotonic time received)]."""
    host, port = url.split("//")[1].split(":")
    start = threading.Barrier(len(bodies))

    def one(i):
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.connect()
            start.wait(timeout)
            t0 = time.monotonic()
            if delays is not None:
                time.sleep(max(0.0, delays[i] - (time.monotonic() - t0)))
            conn.request("POST", path, bodies[i])
            response = conn.getresponse()
            data = response.read()
            return response.status, data, time.monotonic()
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, range(len(bodies))))


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def batch_requests_stats(url):
    m = scrape(url)
    count = m[("infergate_worker_batch_requests_count", ())]
    total = m[("infergate_worker_batch_requests_sum", ())]
    singles = m[("infergate_worker_batch_requests_bucket", (("le", "1.0"),))]
    return count, total, singles, m


def test_worker_batched_outputs_equal_unbatched_and_batches_form(worker_factory):
    worker = worker_factory(extra=("--batching", "--max-batch-size", "32",
                                   "--max-batch-timeout-ms", "20", "--threads", "2"))
    ref = reference(DIGITS_MODEL)
    rng = np.random.default_rng(4)
    xs = [rng.random((int(rng.integers(1, 4)), 784), dtype=np.float32) for _ in range(64)]
    results = send_all(worker.url, "/api/predict/digits", [tf_body({"images": x}) for x in xs])
    for x, (status, body, _) in zip(xs, results):
        assert status == 200, body
        out = tf_outputs(body)
        assert out["scores"].shape == (x.shape[0], 10)
        assert np.allclose(out["scores"], ref({"images": x})[0], rtol=1e-5)
    count, total, singles, m = batch_requests_stats(worker.url)
    assert total == 64
    assert count < 64 and singles < count, "no batch of more than one request formed"
    assert m[("infergate_worker_batched_rows_total", ())] == sum(x.shape[0] for x in xs)
    assert m[("infergate_worker_batch_queue_wait_seconds_count", ())] == 64


def test_worker_trailing_shapes_and_filters_stay_apart(worker_factory, tmp_path):
    path = build_shape_model(tmp_path / "shape.onnx")
    worker = worker_factory(service="shapes", model=path,
                            extra=("--batching", "--max-batch-timeout-ms", "20"))
    rng = np.random.default_rng(5)
    requests = [(rng.random((1 + i % 3, (3, 5)[i % 2]), dtype=np.float32),
                 (("y",), ("s",), ("y", "s"))[i % 3]) for i in range(36)]
    results = send_all(worker.url, "/api/predict/shapes",
                       [tf_body({"x": x}, names) for x, names in requests])
    for (x, names), (status, body, _) in zip(requests, results):
        assert status == 200, body
        out = tf_outputs(body)
        assert sorted(out) == sorted(names)
        want = {"y": 2 * x, "s": x.sum(axis=1, keepdims=True)}
        for name in names:
            assert out[name].shape == want[name].shape
            assert np.allclose(out[name], want[name], rtol=1e-5)


def test_worker_pytorch_and_caffe_batched(worker_factory):
    ref = reference(DIGITS_MODEL)
    rng = np.random.default_rng(6)
    xs = [rng.random((int(rng.integers(1, 4)), 784), dtype=np.float32) for _ in range(24)]
    flags = ("--batching", "--max-batch-timeout-ms", "20", "--threads", "1")

    torch_worker = worker_factory(processor="pytorch", extra=flags)
    bodies = []
    for x in xs:
        request = pytorch_predict_pb2.PredictRequest()
        encode_array(x, request.inputs.add())
        bodies.append(request.SerializeToString())
    for x, (status, body, _) in zip(xs, send_all(torch_worker.url, "/api/predict/digits", bodies)):
        assert status == 200, body
        response = pytorch_predict_pb2.PredictResponse()
        response.ParseFromString(body)
        assert np.allclose(decode_array(response.outputs[0]), ref({"images": x})[0], rtol=1e-5)
    assert batch_requests_stats(torch_worker.url)[1] == len(xs)

    caffe_worker = worker_factory(processor="caffe", extra=flags)
    bodies = []
    for x in xs:
        request = caffe_predict_pb2.PredictRequest()
        request.input_name.append("images")
        encode_caffe(x, request.input_data.add())
        bodies.append(request.SerializeToString())
    for x, (status, body, _) in zip(xs, send_all(caffe_worker.url, "/api/predict/digits", bodies)):
        assert status == 200, body
        response = caffe_predict_pb2.PredictResponse()
        response.ParseFromString(body)
        assert list(response.output_name) == ["scores"]
        got = decode_caffe(response.output_data[0]).reshape(x.shape[0], 10)
        assert np.allclose(got, ref({"images": x})[0], rtol=1e-5)
    assert batch_requests_stats(caffe_worker.url)[1] == len(xs)


def _seconds_for_8_rows(path) -> float:
    model = OnnxModel(path)
    x = np.random.default_rng(7).random((8, 1024), dtype=np.float32)
    model.run({"x": x}, ("z",))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.run({"x": x}, ("z",))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_worker_deadline_fires_while_a_long_batch_runs(worker_factory, slow_model_path):
    """One inference thread. P, long (96 rows: about 12 t8, t8 the time of one 8-row
    run), runs past its deadline (keepalive 4 t8). W, one row sent at 0.2 t8, waits for
    the thread (its window is long). W's 408 must come at its deadline, while P still
    runs (the in-flight gauge says so when W's answer is in), not when P's batch ends;
    P's own 408 too. Afterwards the worker answers a full batch right."""
    t8 = _seconds_for_8_rows(slow_model_path)
    keepalive = max(0.2, 4 * t8)
    worker = worker_factory(service="slow", model=slow_model_path, extra=(
        "--batching", "--threads", "1", "--max-batch-size", "8", "--max-batch-timeout-ms", "60000",
        "--keepalive-ms", str(int(keepalive * 1000))))
    rng = np.random.default_rng(8)
    p, w, l8 = (rng.random((n, 1024), dtype=np.float32) for n in (96, 1, 8))
    # One run first, so that the timed ones do not pay for the first run's allocations.
    assert send_all(worker.url, "/api/predict/slow", [tf_body({"x": l8})])[0][0] == 200
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long_one = pool.submit(send_all, worker.url, "/api/predict/slow", [tf_body({"x": p})])
        (w_status, w_body, _), = send_all(worker.url, "/api/predict/slow",
                                          [tf_body({"x": w}, ("z",))], delays=[0.2 * t8])
        in_flight = scrape(worker.url)[("infergate_worker_batches_in_flight", ())]
        (p_status, _, _), = long_one.result()
    assert w_status == 408, w_body
    assert in_flight == 1  # P was still running when W was answered
    assert p_status == 408
    deadline = time.monotonic() + 60
    while scrape(worker.url)[("infergate_worker_batches_in_flight", ())] != 0:
        assert time.monotonic() < deadline, "P's batch never ended"
        time.sleep(0.05)
    (l_status, l_body, _), = send_all(worker.url, "/api/predict/slow", [tf_body({"x": l8})])
    assert l_status == 200, l_body
    out = tf_outputs(l_body)
    want_y, want_z = reference(slow_model_path)({"x": l8})
    assert np.allclose(out["y"], want_y, rtol=1e-5, atol=1e-6)
    assert np.allclose(out["z"], want_z, rtol=1e-5, atol=1e-5)


def test_worker_full_queue_answers_450(worker_factory, slow_model_path):
    worker = worker_factory(service="slow", model=slow_model_path, extra=(
        "--batching", "--threads", "1", "--max-queue-size", "2", "--max-batch-size", "16",
        "--keepalive-ms", "30000"))
    rng = np.random.default_rng(9)
    xs = [rng.random((8, 1024), dtype=np.float32) for _ in range(12)]
    results = send_all(worker.url, "/api/predict/slow", [tf_body({"x": x}, ("z",)) for x in xs])
    statuses = [status for status, _, _ in results]
    assert 450 in statuses and 500 not in statuses
    assert set(statuses) <= {200, 450}, statuses
    ref = reference(slow_model_path)
    for x, (status, body, _) in zip(xs, results):
        if status == 200:
            assert np.allclose(tf_outputs(body)["z"], ref({"x": x}, ["z"])[0], rtol=1e-5, atol=1e-5)
    assert statuses.count(200) >= 1
