"""GPU serving, checked on the CPU: padded batches, warm-up before ready, device
assignment by the launcher, provider choice, and the `gpu` extra.

No GPU is needed: the padding and warm-up paths are the same on every provider
(padding is switched on explicitly with rpc.batch_sizes), the launcher's device
assignment is read from the environment of the workers it really starts, and
provider choice is checked against the provider lists onnxruntime-gpu reports.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from packaging.requirements import Requirement

from conftest import Proc, free_port, infergate_cmd
from gateway.batching import BatchingRunner
from gateway.models import DIGITS_MODEL
from gateway.worker.model import OnnxModel, choose_providers
from gateway.worker.processors.base import Call
from test_batching import (Recorder, build_slow_model, reference, run_async, settings, soon,
                           wait_until)
from test_control_plane import ADMIN, admin, desc, wait_for

SIZES = (1, 2, 4, 8, 16, 32)


def test_padded_batches_answer_each_request_as_a_one_request_run():
    """For every batch size: requests queued behind a held run form one batch whose rows
    are padded up to that size; each request gets exactly what running it alone gives,
    with its own rows only."""
    gate = threading.Event()
    rec = Recorder(OnnxModel(str(DIGITS_MODEL)), gate)
    alone = reference(DIGITS_MODEL)
    batcher = BatchingRunner(rec, settings(max_batch_size=32, batch_sizes=SIZES,
                                           worker_threads=1, max_batch_timeout=10_000))
    assert batcher.pad_sizes == SIZES
    rng = np.random.default_rng(11)

    async def one_batch(rows_each):
        gate.clear()
        rec.started.clear()
        holder = asyncio.ensure_future(batcher.infer(Call({"images": rng.random(
            (1, 784), dtype=np.float32)}, ("scores",)), soon()))
        await wait_until(rec.started.is_set)  # the model is busy: the rest queue up
        xs = [rng.random((n, 784), dtype=np.float32) for n in rows_each]
        calls = [asyncio.ensure_future(batcher.infer(Call({"images": x}, ("scores",)), soon()))
                 for x in xs]
        await asyncio.sleep(0.01)
        assert batcher.waiting == len(xs)
        gate.set()
        await holder
        return xs, await asyncio.gather(*calls)

    try:
        for size in SIZES:
            rows = size if size <= 2 else size // 2 + 1  # past the size below: padded
            rows_each = [1] * (rows % 2) + [2] * (rows // 2) if size > 1 else [1]
            runs_before = len(rec.runs)
            xs, outs = run_async(lambda: one_batch(rows_each))
            assert sum(rows_each) <= size
            ran = [rows for rows, _, _ in rec.runs[runs_before + 1:]]
            assert ran == [size], (rows_each, ran)  # one run, padded to the size
            for x, out in zip(xs, outs):
                assert out[0].shape == (x.shape[0], 10)  # padded rows never come back
                np.testing.assert_array_equal(out[0], alone({"images": x})[0])
    finally:
        gate.set()
        batcher.close()
    assert batcher.padded_rows > 0


def test_batch_sizes_default_to_powers_of_two_on_accelerators_only():
    from gateway.batching.batcher import batch_sizes
    from gateway.serviceconfig import rpc_settings

    class OnGpu:
        provider = "CUDAExecutionProvider"

    class OnCpu:
        provider = "CPUExecutionProvider"

    s = rpc_settings({"rpc.max_batch_size": 48})
    assert batch_sizes(s, OnGpu()) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_sizes(s, OnCpu()) == ()
    listed = rpc_settings({"rpc": {"max_batch_size": 64, "batch_sizes": [8, 1, 32]}})
    assert batch_sizes(listed, OnCpu()) == (1, 8, 32, 64)
    assert batch_sizes(rpc_settings({"rpc.batch_sizes": "4,16"}), OnCpu()) == (4, 16)
    assert batch_sizes(rpc_settings({"rpc.batch_sizes": []}), OnGpu()) == ()


def test_bad_batch_sizes_and_provider_options_are_refused():
    from gateway.serviceconfig import ConfigError, validate_service

    base = {"name": "s", "model_path": "m.onnx"}
    for metadata, words in [({"rpc.batch_sizes": [4, 0]}, "rpc.batch_sizes[1]"),
                            ({"rpc.batch_sizes": "a,b"}, "rpc.batch_sizes[0]"),
                            ({"onnxruntime": {"rocm": {}}}, "metadata.onnxruntime.rocm"),
                            ({"onnxruntime": {"cuda": "fast"}}, "metadata.onnxruntime.cuda")]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            validate_service(dict(base, metadata=metadata))


def test_provider_choice():
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}
    assert choose_providers(gpu_build) == [("CUDAExecutionProvider", {}),
                                           ("CPUExecutionProvider", {})]
    assert choose_providers(gpu_build, "auto", {"cuda": cuda, "tensorrt": True}) == [
        ("TensorrtExecutionProvider", {}),
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC",
                                   "do_copy_in_default_stream": "1"}),
        ("CPUExecutionProvider", {})]
    assert choose_providers(gpu_build, "cpu", {"cuda": cuda}) == [("CPUExecutionProvider", {})]
    assert choose_providers(["CPUExecutionProvider"], "cuda") == [("CPUExecutionProvider", {})]


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_worker_is_ready_only_after_warm_up(tmp_path):
    """A model slow enough that warm-up at sizes 1..64 takes a while: /health answers at
    once, /ready says 503 "warming up" until every size has run, then 200."""
    model = build_slow_model(tmp_path / "slow.onnx")
    port = free_port()
    worker = Proc(infergate_cmd("worker", "--service", "slow", "--model", model, "--port",
                                str(port), "--batching", "--max-batch-size", "64",
                                "--batch-sizes", "1,2,4,8,16,32,64"), port)
    try:
        status, answer = _get(worker.url + "/ready")
        assert status == 503 and answer["message"].startswith("warming up"), answer
        deadline = time.monotonic() + 60
        while _get(worker.url + "/ready")[0] != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        assert "warmed up at batch sizes 1,2,4,8,16,32,64" in worker.output()
    finally:
        worker.stop()


@pytest.mark.slow
def test_launcher_gives_each_worker_a_device(procs, tmp_path):
    """A gateway that sees two GPUs (CUDA_VISIBLE_DEVICES=0,1) hands them out round robin,
    one per instance for gpu: 1; gpu: 0 hides every device and keeps the worker on the CPU.
    Here onnxruntime has no CUDA, so the workers run and answer on the CPU either way."""
    port = free_port()
    gw = procs.start(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(port),
                                   "--state-dir", str(tmp_path / "state"), "--admin-token", ADMIN,
                                   "--health-interval", "0.3"), port,
                     env={"CUDA_VISIBLE_DEVICES": "0,1"})
    for name, gpu, instances in (("ongpu", 1, 3), ("oncpu", 0, 1)):
        status, view = admin(gw.url, "POST", "/admin/services", {
            "name": name, "model_path": str(DIGITS_MODEL), "processor": "tensorflow",
            "metadata": {"instance": instances, "gpu": gpu}})
        assert status in (200, 201), view
    views = {name: wait_for(lambda n=name, k=k: (v := desc(gw.url, n))["status"] == "Running"
                            and v["running_instances"] == k and v, 60, what=f"{name} Running")
             for name, k in (("ongpu", 3), ("oncpu", 1))}

    def devices(view):
        found = []
        for worker in view["workers"]:
            with open(f"/proc/{worker['pid']}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            found.append(env.get(b"CUDA_VISIBLE_DEVICES", b"(unset)").decode())
        return sorted(found)

    assert devices(views["ongpu"]) == ["0", "0", "1"]
    assert devices(views["oncpu"]) == [""]
    with open(views["oncpu"]["workers"][0]["log"]) as f:
        assert "loaded on CPUExecutionProvider" in f.read()


def test_gpu_extra_brings_onnxruntime_gpu_instead_of_onnxruntime():
    requirements = [Requirement(r) for r in importlib.metadata.requires("infergate")]

    def names(extra):
        return {r.name for r in requirements
                if (r.marker.evaluate({"extra": extra}) if r.marker else extra == "")}

    always = names("")
    assert "onnxruntime" not in always and "onnxruntime-gpu" not in always
    assert {"onnxruntime-gpu", "nvidia-ml-py"} <= names("gpu")
    assert "onnxruntime" not in names("gpu") - always
    assert "onnxruntime" in names("cpu") and "onnxruntime-gpu" not in names("cpu")


def test_on_an_accelerator_a_partial_batch_waits_for_rows_while_another_runs():
    """The batching of a model on a GPU, driven on the CPU: the model says it runs on
    CUDA. A lone request on an idle device starts at once; while it runs, a partial
    batch gathers rows until its window closes (then runs padded to a batch size), and
    a full batch starts without waiting for its window."""
    gate = threading.Event()
    rec = Recorder(OnnxModel(str(DIGITS_MODEL)), gate)
    rec.provider = "CUDAExecutionProvider"
    alone = reference(DIGITS_MODEL)
    batcher = BatchingRunner(rec, settings(max_batch_size=8, worker_threads=2,
                                           max_batch_timeout=1500))
    assert batcher.pad_sizes == (1, 2, 4, 8)  # the default on an accelerator
    rng = np.random.default_rng(12)
    x = [rng.random((n, 784), dtype=np.float32) for n in (1, 1, 1, 1, 8)]

    def infer(i):
        return asyncio.ensure_future(batcher.infer(Call({"images": x[i]}, ("scores",)), soon()))

    async def go():
        a = infer(0)
        await wait_until(lambda: batcher.inflight == 1)  # A runs (held), nothing waited
        started = time.monotonic()
        b, c = infer(1), infer(2)
        await asyncio.sleep(0.05)
        d = infer(3)  # joins B and C: their window is still open
        await asyncio.sleep(0.05)
        assert batcher.inflight == 1 and batcher.waiting == 0  # B, C, D taken, waiting
        await wait_until(lambda: batcher.inflight == 2)  # the window closed: they run
        waited = time.monotonic() - started
        gate.set()
        outs = await asyncio.gather(a, b, c, d)
        gate.clear()
        rec.started.clear()
        first = infer(0)
        await wait_until(lambda: batcher.inflight == 1)
        full = infer(4)  # 8 rows: full, so it starts at once beside the running one
        await wait_until(lambda: batcher.inflight == 2, timeout=0.75)
        gate.set()
        return waited, outs + await asyncio.gather(first, full)

    try:
        waited, outs = run_async(go)
    finally:
        gate.set()
        batcher.close()
    assert waited >= 1.4  # B's window (1.5 s from its arrival)
    assert [rows for rows, _, _ in rec.runs] == [1, 4, 1, 8]  # B, C, D: 3 rows padded to 4
    for i, out in zip((0, 1, 2, 3, 0, 4), outs):
        np.testing.assert_array_equal(out[0], alone({"images": x[i]})[0])


def test_on_an_accelerator_each_batch_size_runs_on_a_session_of_its_own():
    """cuDNN keeps only the last input shape's plans per session, so a batching worker on
    a GPU gives each padded size its own session (the smallest stays on the first, with
    every unpadded shape). Driven on the CPU with a model that says it runs on CUDA: the
    answers at every size equal a one-request run, and each size ran on its session."""
    model = OnnxModel(str(DIGITS_MODEL))
    model.provider = "CUDAExecutionProvider"
    batcher = BatchingRunner(model, settings(max_batch_size=8, worker_threads=1))
    assert model.batch_sessions == (2, 4, 8)
    ran = []
    for rows, run in list(model._run_by_rows.items()):
        model._run_by_rows[rows] = lambda names, feeds, opts, run=run, rows=rows: (
            ran.append(rows), run(names, feeds, opts))[1]
    alone = reference(DIGITS_MODEL)
    rng = np.random.default_rng(3)
    try:
        for rows in (1, 2, 3, 5, 8):
            x = rng.random((rows, 784), dtype=np.float32)
            got = run_async(lambda: batcher.infer(Call({"images": x}, ("scores",)), soon()))
            np.testing.assert_array_equal(got[0], alone({"images": x})[0])
    finally:
        batcher.close()
    assert ran == [2, 4, 8, 8]  # 3 rows padded to 4, 5 to 8; 1 row on the first session
