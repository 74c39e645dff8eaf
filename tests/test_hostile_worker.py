"""Hostile requests against real workers (issue 21, the workers' codecs and queues): a small
body cannot buy a large amount of memory (BYTES shapes, compressed bodies), malformed
protobuf is a 400 or INVALID_ARGUMENT and never a 500 or a misread, and clients that go
away do not keep the queue's slots from those that stay.

Memory is judged by the worker's peak RSS (VmHWM), with generous bounds: each hostile
request below cost hundreds of megabytes before its fix."""
from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import time

import grpc
import pytest

from conftest import free_port
from wire_mutations import varint

TESTS = os.path.dirname(os.path.abspath(__file__))
MB = 1 << 20


def peak_rss(worker) -> int:
    with open(f"/proc/{worker.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def post(worker, path: str, body: bytes, headers=None, timeout=60.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def v2_binary(name: str, datatype: str, shape: list, raw: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


@pytest.fixture
def grpc_worker(procs, worker_factory):
    port = free_port()
    worker = worker_factory(extra=("--grpc-port", str(port)))
    worker.grpc_port = port
    return worker


def grpc_infer(worker, message: bytes):
    """ModelInfer with `message` as its bytes: (status code, details or answer bytes)."""
    with grpc.insecure_channel(f"127.0.0.1:{worker.grpc_port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            return grpc.StatusCode.OK, infer(message, timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


# -- H4: a BYTES shape is checked against its payload before anything is allocated ----------


def test_a_bytes_shape_cannot_buy_memory(grpc_worker):
    """[2^26] BYTES elements claimed by a few bytes: 400 naming the input and the size it
    needs, in the binary HTTP form, over gRPC (raw contents) and in JSON; the worker's peak
    memory hardly moves (a 512 MB object array before)."""
    from gateway.protos import oip_pb2 as pb

    worker, shape = grpc_worker, [1 << 26]
    before = peak_rss(worker)
    body, headers = v2_binary("images", "BYTES", shape, b"\x01\x00\x00\x00a")
    status, answer = post(worker, "/v2/models/digits/infer", body, headers)
    assert status == 400, answer
    assert b"'images'" in answer and b"BYTES needs at least 268435456" in answer

    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(b"\x01\x00\x00\x00a")
    code, details = grpc_infer(worker, request.SerializeToString())
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "needs at least" in details

    document = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": shape,
                            "data": ["a"]}]}
    status, answer = post(worker, "/v2/models/digits/infer", json.dumps(document).encode())
    assert status == 400 and b"has 1 values" in answer
    assert peak_rss(worker) - before < 100 * MB


def test_deeply_nested_bytes_data_is_a_400(worker_factory):
    """BYTES data nested as deep as the JSON reader allows: flattened by a loop, not by
    recursion (a RecursionError was a 500)."""
    worker = worker_factory()
    nested = "[" * 1000 + '"a"' + "]" * 1000
    body = ('{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": '
            + nested + "}]}").encode()
    status, answer = post(worker, "/v2/models/digits/infer", body)
    assert status == 400 and b"has 1 values" in answer, answer


# -- M5, L2: compressed bodies inflate within a size and a ratio -----------------------------


def snappy_bomb(size: int) -> bytes:
    """A valid raw snappy stream of `size` bytes of b"a", 21 times smaller: its length, one
    literal, then 64-byte copies of it (offset 1), as a hostile client writes it."""
    copies, rest = divmod(size - 1, 64)
    tail = bytes([(rest - 1) << 2 | 2, 1, 0]) if rest else b""
    return varint(size) + b"\x00a" + b"\xfe\x01\x00" * copies + tail


def test_a_snappy_body_inflates_only_to_the_body_limit(worker_factory):
    """A 3 MB snappy body that declares 64 MiB, to a worker whose body limit is 8 MiB:
    refused with 413 naming the limit before anything is inflated."""
    import cramjam

    assert bytes(cramjam.snappy.decompress_raw(snappy_bomb(1000))) == b"a" * 1000
    bomb = snappy_bomb(64 * MB)
    worker = worker_factory(processor="pytorch", extra=("--max-body-mb", "8"))
    before = peak_rss(worker)
    status, answer = post(worker, "/api/predict/digits", bomb)
    assert status == 413, answer
    assert b"snappy" in answer and b"8388608-byte body limit" in answer
    assert peak_rss(worker) - before < 48 * MB


def test_a_gzip_body_inflates_only_to_100_times_its_size(worker_factory):
    """16 MB of JSON zeros in 16 KB of gzip (1000:1): 413 naming the ratio, where the
    worker inflated it and parsed 8 million numbers before."""
    worker = worker_factory()
    document = b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 784], ' \
               b'"data": [' + b"0," * (8 * MB) + b'0]}]}'
    body = gzip.compress(document)
    assert len(body) * 100 < len(document)
    before = peak_rss(worker)
    status, answer = post(worker, "/v2/models/digits/infer", body, {"Content-Encoding": "gzip"})
    assert status == 413, answer
    assert b"100 times its size" in answer
    assert peak_rss(worker) - before < 48 * MB


def test_compressed_bodies_within_the_limits_are_served(worker_factory):
    import cramjam
    import numpy as np

    from gateway.codec.tensors import encode_array
    from gateway.protos import pytorch_predict_pb2 as torch_pb

    worker = worker_factory(processor="pytorch")
    request = torch_pb.PredictRequest()
    encode_array(np.zeros((64, 784), np.float32), request.inputs.add())  # 200 KB, ~10:1
    status, answer = post(worker, "/api/predict/digits",
                          bytes(cramjam.snappy.compress_raw(request.SerializeToString())))
    assert status == 200, answer
    document = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 784],
                            "data": [0.5] * 1568}]}
    status, answer = post(worker, "/v2/models/digits/infer",
                          gzip.compress(json.dumps(document).encode()),
                          {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [2, 10]


# -- L1: overflowing numbers in the compiled v2 readers --------------------------------------


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def test_overflowing_sizes_are_400s_not_500s(worker_factory):
    """binary_data_size and dimensions past 2^63 in the binary form's JSON header, a
    shape whose product wraps around 2^64 to the payload's size, and a header length
    past 2^63."""
    worker = worker_factory()
    for shape, size, raw in (([1, 784], 1 << 63, b""), ([1 << 63, 784], 0, b""),
                             ([1 << 32, 1 << 32], 0, b""), ([1 << 62, 4], 0, b"")):
        header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": shape,
                                         "parameters": {"binary_data_size": size}}],
                             "parameters": {"binary_data_output": True}}).encode()
        status, answer = post(worker, "/v2/models/digits/infer", header + raw,
                              {"Inference-Header-Content-Length": str(len(header))})
        assert status == 400, (shape, size, answer)
        assert b"'images'" in answer or b"binary_data_size" in answer
    status, answer = post(worker, "/v2/models/digits/infer", b'{"inputs": []}',
                          {"Inference-Header-Content-Length": "9" * 20})
    assert status == 400 and b"Inference-Header-Content-Length" in answer, answer


def test_a_tf_shape_numpy_cannot_make_is_a_400(worker_factory):
    """[0, 2^31, 2^31] holds no values, but numpy cannot make it (the product of its
    non-zero dimensions overflows): the compiled TF reader took it, a 500."""
    from gateway.protos import tf_predict_pb2 as tf_pb

    request = tf_pb.PredictRequest()
    request.inputs["images"].dtype = tf_pb.DT_FLOAT
    request.inputs["images"].array_shape.dim.extend([0, 1 << 31, 1 << 31])
    status, answer = post(worker_factory(), "/api/predict/digits", request.SerializeToString())
    assert status == 400 and b"'images'" in answer, answer


def test_a_field_number_past_32_bits_is_not_taken_for_another(grpc_worker):
    """Field number 2^32 + 7 is not raw_input_contents (7): protobuf refuses the message, so
    the worker answers INVALID_ARGUMENT where it answered the misread request."""
    from gateway.protos import oip_pb2 as pb

    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 784])
    good = request.SerializeToString()
    raw = varint(4 * 784) + bytes(4 * 784)
    code, _ = grpc_infer(grpc_worker, good + tag(7, 2) + raw)
    assert code is grpc.StatusCode.OK  # the same request, well formed
    code, details = grpc_infer(grpc_worker, good + tag((1 << 32) + 7, 2) + raw)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "does not parse" in details
    code, details = grpc_infer(grpc_worker, good + tag(5, 2) + b"\x81\x80\x80\x80\x80\x80\x80"
                               b"\x80\x80\x80\x01")  # a length of 11 varint bytes
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details


# -- M2: a job whose client went away gives its queue slot back at once ----------------------


def send(worker, path: str, body: bytes) -> socket.socket:
    """POST `body` on a connection of its own, without waiting for the answer."""
    sock = socket.create_connection(("127.0.0.1", worker.port), timeout=120)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(body), body))
    return sock


def status_of(sock: socket.socket) -> int:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response.status


def round_trip(worker) -> None:
    """One answer through the worker's loop: what reached it before has been read."""
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def fill_then_leave(worker, path: str, slow: bytes, waiting: bytes, probe: bytes,
                    queue_size: int, running=round_trip) -> socket.socket:
    """`slow` takes the one inference thread (`running(worker)` returns once it has);
    `queue_size` requests queue behind it until the queue is full (a probe gets 450);
    then their clients close their connections. Returns the slow request's connection."""
    slow_sock = send(worker, path, slow)
    running(worker)
    gone = [send(worker, path, waiting) for _ in range(queue_size)]
    round_trip(worker)
    assert post(worker, path, probe)[0] == 450  # full (of requests whose clients will go)
    for sock in gone:
        sock.close()
    round_trip(worker)  # the closes are in
    return slow_sock


def served(worker, path: str, bodies: list) -> list:
    """[(status, body)] of `bodies` sent together."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: post(worker, path, body), bodies))


def test_abandoned_jobs_give_their_slots_back(worker_factory):
    """One inference thread busy on a slow request, the queue (4) full of requests whose
    clients then closed their connections: the next 4 requests are queued and served
    (before, they got 450 until a thread popped the abandoned ones)."""
    worker = worker_factory(service="echo", processor="python", model=os.path.join(
        TESTS, "data", "echo_processor.py"), extra=("--threads", "1", "--max-queue-size", "4",
                                                     "--keepalive-ms", "60000"))
    path = "/api/predict/echo"
    slow = fill_then_leave(worker, path, b"sleep:2", b"gone", b"probe", 4)
    answers = served(worker, path, [b"stayed %d" % i for i in range(4)])
    assert [status for status, _ in answers] == [200] * 4, answers
    assert all(body.endswith(b"stayed %d" % i) for i, (_, body) in enumerate(answers))
    assert status_of(slow) == 200


def batch_running(worker) -> None:
    """Returns once a batch runs (the in-flight gauge), or fails at a deadline."""
    from test_batching import scrape

    deadline = time.monotonic() + 30
    while scrape(worker.url)[("infergate_worker_batches_in_flight", ())] != 1:
        assert time.monotonic() < deadline, "the slow batch never started"
        time.sleep(0.01)


def test_abandoned_jobs_give_their_batcher_slots_back(worker_factory, tmp_path):
    """The same with batching: a long batch runs, the queue (2) is full of requests whose
    clients went away; the next 2 are served."""
    import numpy as np
    from test_batching import build_slow_model, tf_body, tf_outputs

    model = build_slow_model(tmp_path / "slow.onnx")
    worker = worker_factory(service="slow", model=model, extra=(
        "--batching", "--threads", "1", "--max-queue-size", "2", "--max-batch-size", "8",
        "--keepalive-ms", "60000"))
    path = "/api/predict/slow"
    rows = np.random.default_rng(1).random((64, 1024), dtype=np.float32)
    one = tf_body({"x": rows[:1]}, ("z",))
    slow = fill_then_leave(worker, path, tf_body({"x": rows}, ("z",)), one, one, 2,
                           batch_running)
    answers = served(worker, path, [one, one])
    assert [status for status, _ in answers] == [200] * 2, answers
    assert tf_outputs(answers[0][1])["z"].shape == (1, 1)
    assert status_of(slow) == 200
