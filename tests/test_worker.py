"""A worker process serving the bundled model: answers, formats, HTTP behaviour, bad input."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import free_port, infergate_cmd
from gateway_helpers import error_message, post

ECHO = os.path.join(os.path.dirname(__file__), "data", "echo_processor.py")


@pytest.fixture(scope="module")
def digits():
    from gateway.models import load_digits_split

    _, _, x_test, y_test = load_digits_split()
    return x_test, y_test


@pytest.fixture(scope="module")
def module_worker(request):
    """One TF worker shared by the tests of this module that only send requests."""
    from conftest import Proc
    from gateway.models import DIGITS_MODEL

    port = free_port()
    proc = Proc(infergate_cmd("worker", "--service", "digits", "--model", str(DIGITS_MODEL),
                              "--processor", "tensorflow", "--port", str(port)), port)
    yield proc
    proc.stop()


def tf_body(arrays: dict, signature="predict_images", fetch=()) -> bytes:
    from gateway.codec.tensors import encode_array
    from gateway.protos import tf_predict_pb2 as pb

    request = pb.PredictRequest(signature_name=signature)
    for name, array in arrays.items():
        encode_array(np.asarray(array), request.inputs[name])
    request.output_filter.extend(fetch)
    return request.SerializeToString()


def tf_scores(body: bytes) -> np.ndarray:
    from gateway.codec.tensors import decode_array
    from gateway.protos import tf_predict_pb2 as pb

    response = pb.PredictResponse()
    response.ParseFromString(body)
    return decode_array(response.outputs["scores"], "scores")


def test_classifies_held_out_digits(module_worker, digits):
    x_test, y_test = digits
    status, body, _ = post(module_worker.url + "/api/predict/digits",
                           tf_body({"images": x_test.astype(np.float32)}))
    assert status == 200
    scores = tf_scores(body)
    assert scores.shape == (len(x_test), 10)
    accuracy = float((scores.argmax(1) == y_test).mean())
    assert accuracy >= 0.90, accuracy


def test_signature_json(module_worker):
    import urllib.request

    with urllib.request.urlopen(module_worker.url + "/api/predict/digits") as resp:
        signature = json.loads(resp.read())
    assert signature == {
        "signature_name": "predict_images",
        "inputs": [{"name": "images", "shape": [-1, 784], "type": "DT_FLOAT"}],
        "outputs": [{"name": "scores", "shape": [-1, 10], "type": "DT_FLOAT"}]}


def test_output_filter(module_worker):
    status, body, _ = post(module_worker.url + "/api/predict/digits",
                           tf_body({"images": np.zeros((1, 784), np.float32)}, fetch=["scores"]))
    assert status == 200 and tf_scores(body).shape == (1, 10)
    status, body, _ = post(module_worker.url + "/api/predict/digits",
                           tf_body({"images": np.zeros((1, 784), np.float32)}, fetch=["nope"]))
    assert status == 400 and "nope" in error_message(body)


def _bad_inputs():
    from gateway.codec.tensors import encode_array
    from gateway.protos import tf_predict_pb2 as pb

    ok = np.zeros((1, 784), np.float32)
    short = pb.PredictRequest()
    encode_array(ok, short.inputs["images"])
    short.inputs["images"].float_val.pop()
    return {
        "empty body": (b"", "empty"),
        "malformed protobuf": (b"\xff\xff\xff\xff", "not a valid"),
        "unknown input": (tf_body({"images": ok, "extra": ok}), "'extra'"),
        "missing input": (tf_body({}), "missing input 'images'"),
        "wrong dtype": (tf_body({"images": np.array([[b"x"] * 784], dtype=object)}), "DT_FLOAT"),
        "wrong value count": (short.SerializeToString(), "needs 784 values, got 783"),
        "wrong shape": (tf_body({"images": np.zeros((1, 28, 28), np.float32)}), "[-1, 784]"),
        "wrong width": (tf_body({"images": np.zeros((1, 100), np.float32)}), "got [1, 100]"),
        "unknown signature": (tf_body({"images": ok}, signature="other"), "signature_name"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_is_a_400_naming_the_problem(module_worker, case):
    body, expected = _bad_inputs()[case]
    status, answer, _ = post(module_worker.url + "/api/predict/digits", body)
    assert status == 400, answer
    assert expected in error_message(answer)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_worker(module_worker, data):
    status, body, _ = post(module_worker.url + "/api/predict/digits", data)
    assert status in (200, 400), body
    if status == 400:
        assert json.loads(body)["code"] == 400


_dtypes = st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.int8, np.uint8,
                           np.bool_, np.float16])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["images", "image", "x"]), dtype=_dtypes,
       shape=st.lists(st.integers(0, 900), min_size=0, max_size=3))
def test_well_formed_wrong_messages_get_400(module_worker, name, dtype, shape):
    if np.prod(shape) > 4000:
        shape = [1, 3]
    array = np.zeros(shape, dtype)
    status, body, _ = post(module_worker.url + "/api/predict/digits", tf_body({name: array}))
    fits = (name == "images" and len(shape) == 2 and shape[1] == 784 and shape[0] > 0
            and np.dtype(dtype).kind in "fiu")
    assert status == (200 if fits else 400), body
    assert post(module_worker.url + "/health", b"")[0] in (200, 405)


def _raw_exchange(port: int, payload: bytes, expect: int) -> list[bytes]:
    """Send raw bytes, read `expect` responses (Content-Length framed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        buf = b""
        answers = []
        while len(answers) < expect:
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, buf = buf.split(b"\r\n\r\n", 1)
            length = int([line for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(buf) < length:
                buf += s.recv(65536)
            answers.append(head.split(b"\r\n")[0] + b"|" + buf[:length])
            buf = buf[length:]
        return answers


def test_pipelined_requests_answered_in_order(procs):
    port = free_port()
    procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python", "--model",
                              ECHO, "--port", str(port)), port, env={"ECHO_PORT": "w"})
    reqs = b""
    # The first one is slow: later ones must still come back after it.
    for body in (b"sleep:0.3", b"one", b"two", b"three"):
        reqs += (b"POST /api/predict/echo HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    answers = _raw_exchange(port, reqs, 4)
    assert [a.split(b"|")[1] for a in answers] == [b"slept w", b"w:one", b"w:two", b"w:three"]


def test_chunked_request_body(procs):
    port = free_port()
    procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python", "--model",
                              ECHO, "--port", str(port)), port, env={"ECHO_PORT": "w"})
    chunked = (b"POST /api/predict/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert _raw_exchange(port, chunked, 1) == [b"HTTP/1.1 200 OK|w:hello world"]


def test_body_limit_413(procs):
    port = free_port()
    procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python", "--model",
                              ECHO, "--port", str(port), "--max-body-mb", "1"), port)
    # Refused from the headers alone, before the client sends the body.
    big = b"POST /api/predict/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"
    answer = _raw_exchange(port, big, 1)[0]
    assert answer.startswith(b"HTTP/1.1 413 ") and b"limit" in answer
    # A chunked body has no length up front: refused once it grows past the limit.
    chunk = b"x" * 65536
    chunked = (b"POST /api/predict/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               + (b"10000\r\n" + chunk + b"\r\n") * 17 + b"0\r\n\r\n")
    assert _raw_exchange(port, chunked, 1)[0].startswith(b"HTTP/1.1 413 ")


def test_expect_100_continue_and_upgrade(procs):
    import socket

    port = free_port()
    procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python", "--model",
                              ECHO, "--port", str(port)), port, env={"ECHO_PORT": "w"})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /api/predict/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hi")
        assert s.recv(1000).endswith(b"w:hi")
    upgrade = (b"POST /api/predict/echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               b"Upgrade: h2c\r\nContent-Length: 2\r\n\r\nhi")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(upgrade)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 400 ")
    assert b"upgrades are not supported" in data


def test_keepalive_408_and_full_queue_450(procs):
    port = free_port()
    procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python", "--model",
                              ECHO, "--port", str(port), "--threads", "1", "--max-queue-size", "2",
                              "--keepalive-ms", "500"), port)
    url = f"http://127.0.0.1:{port}/api/predict/echo"
    status, body, _ = post(url, b"sleep:1.5")
    assert status == 408 and "rpc.keepalive" in error_message(body)
    results = []

    def send():
        results.append(post(url, b"sleep:0.3")[0])

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One runs, two wait, the rest are refused at once; none fail otherwise.
    assert results.count(450) >= 4
    assert set(results) <= {200, 408, 450}


def test_pytorch_caffe_json_processors(worker_factory, digits):
    import cramjam

    from gateway.codec.tensors import decode_array, decode_caffe, encode_array, encode_caffe
    from gateway.protos import caffe_predict_pb2 as caffe_pb
    from gateway.protos import pytorch_predict_pb2 as torch_pb

    x_test, y_test = digits
    images = x_test[:50].astype(np.float32)
    expected = None
    torch_worker = worker_factory(processor="pytorch")
    for mode in ("positional", "named", "snappy"):
        request = torch_pb.PredictRequest()
        encode_array(images, request.map_inputs["images"] if mode == "named" else request.inputs.add())
        body = request.SerializeToString()
        if mode == "snappy":
            body = bytes(cramjam.snappy.compress_raw(body))
        status, answer, _ = post(torch_worker.url + "/api/predict/digits", body)
        assert status == 200, answer
        response = torch_pb.PredictResponse()
        response.ParseFromString(answer)
        proto = response.map_outputs["scores"] if mode == "named" else response.outputs[0]
        scores = decode_array(proto, "scores")
        expected = scores if expected is None else expected
        np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert (expected.argmax(1) == y_test[:50]).mean() >= 0.9

    caffe_worker = worker_factory(processor="caffe")
    request = caffe_pb.PredictRequest(input_name=["images"])
    encode_caffe(images, request.input_data.add())
    status, answer, _ = post(caffe_worker.url + "/api/predict/digits", request.SerializeToString())
    assert status == 200
    response = caffe_pb.PredictResponse()
    response.ParseFromString(answer)
    assert list(response.output_name) == ["scores"]
    np.testing.assert_allclose(decode_caffe(response.output_data[0], "scores"), expected, rtol=1e-6)

    json_worker = worker_factory(processor="json")
    status, answer, headers = post(json_worker.url + "/api/predict/digits",
                                   json.dumps({"inputs": {"images": images.tolist()}}).encode())
    assert status == 200 and headers["Content-Type"] == "application/json"
    np.testing.assert_allclose(np.array(json.loads(answer)["outputs"]["scores"]), expected,
                               rtol=1e-5)
    status, answer, _ = post(json_worker.url + "/api/predict/digits", b'{"inputs": {"images": [[1, 2], [3]]}}')
    assert status == 400 and "images" in error_message(answer)


def test_python_processor_and_unknown_service(procs):
    port = free_port()
    procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python", "--model",
                              ECHO, "--port", str(port)), port, env={"ECHO_PORT": "w"})
    status, body, _ = post(f"http://127.0.0.1:{port}/api/predict/echo", b"abc")
    assert (status, body) == (200, b"w:abc")
    status, body, _ = post(f"http://127.0.0.1:{port}/api/predict/echo", b"status:418")
    assert status == 418
    status, body, _ = post(f"http://127.0.0.1:{port}/api/predict/other", b"abc")
    assert status == 404 and "other" in error_message(body)


def test_bad_command_line_is_one_clear_line(tmp_path):
    import subprocess

    result = subprocess.run(infergate_cmd("worker", "--service", "x", "--model",
                                          str(tmp_path / "missing.onnx")),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    result = subprocess.run(infergate_cmd("worker", "--service", "x", "--processor", "keras",
                                          "--model", "m.onnx"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "processor must be one of" in result.stderr


def test_shutdown_finishes_a_half_received_request(procs):
    import signal
    import socket
    import time

    port = free_port()
    worker = procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python",
                                       "--model", ECHO, "--port", str(port)), port,
                         env={"ECHO_PORT": "w"})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /api/predict/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        time.sleep(0.3)
        worker.kill(signal.SIGTERM)  # accepted bytes are a request we owe an answer
        time.sleep(0.3)
        s.sendall(b"world")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"w:helloworld")
    assert b"Connection: close" in data  # said before the server closes it
    assert worker.proc.wait(10) == 0


def test_large_batches_give_the_same_answers(module_worker, digits):
    """A request above LARGE_PAYLOAD (decoded and encoded on a codec thread) answers right."""
    x_test, _ = digits
    images = np.concatenate([x_test] * 3).astype(np.float32)  # ~3.4 MB of float_val
    status, body, _ = post(module_worker.url + "/api/predict/digits", tf_body({"images": images}))
    assert status == 200
    big = tf_scores(body)
    status, body, _ = post(module_worker.url + "/api/predict/digits",
                           tf_body({"images": images[:5]}))
    np.testing.assert_allclose(big[:5], tf_scores(body), rtol=1e-5)
    assert big.shape == (len(images), 10)


def test_processes_serve_one_port_each_with_its_model(digits):
    """--processes 2: two processes behind one port (SO_REUSEPORT); the kernel spreads
    connections over both, and both answer right."""
    import http.client

    from conftest import Proc
    from gateway.models import DIGITS_MODEL

    x_test, y_test = digits
    port = free_port()
    proc = Proc(infergate_cmd("worker", "--service", "digits", "--model", str(DIGITS_MODEL),
                              "--port", str(port), "--processes", "2"), port, health_path="/ready")
    connections = []
    try:
        with open(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        assert len(children) == 2

        def owners(want):
            """The processes holding the server side of the port's TCP sockets that
            `want(remote port, state)` picks (from /proc/net/tcp and their fds)."""
            inodes = set()
            with open("/proc/net/tcp") as f:
                next(f)
                for fields in map(str.split, f):
                    local, remote = (int(x.split(":")[1], 16) for x in fields[1:3])
                    if local == port and want(remote, fields[3]):
                        inodes.add(f"socket:[{fields[9]}]")
            return {pid for pid in children for fd in os.listdir(f"/proc/{pid}/fd")
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes}

        deadline = time.monotonic() + 30  # /ready answered from one: wait for both to listen
        while owners(lambda remote, state: state == "0A") != set(children):
            assert time.monotonic() < deadline, "a process never listened"
            time.sleep(0.05)
        predicted = []
        for i in range(24):  # kept open: each stays with the process that accepted it
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connections.append(conn)
            conn.request("POST", "/api/predict/digits",
                         tf_body({"images": x_test[i:i + 1].astype(np.float32)}))
            response = conn.getresponse()
            assert response.status == 200
            predicted.append(int(tf_scores(response.read()).argmax()))
        ours = {conn.sock.getsockname()[1] for conn in connections}
        assert owners(lambda remote, state: remote in ours) == set(children)  # both took some
        assert np.mean(np.array(predicted) == y_test[:24]) >= 0.9
    finally:
        for conn in connections:
            conn.close()
        proc.stop()


def test_one_cpu_runs_the_model_on_two_threads(digits):
    """rpc.worker_threads 5 in a process allowed one CPU: two threads run the model (more
    only take turns at the GIL), the log says so, and concurrent requests get the right
    answers. A python processor keeps its 5 (user code may wait on I/O)."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import Proc
    from gateway.models import DIGITS_MODEL

    x_test, y_test = digits
    port = free_port()
    worker = Proc(["taskset", "-c", "0"] + infergate_cmd(
        "worker", "--service", "digits", "--model", str(DIGITS_MODEL), "--processor", "json",
        "--threads", "5", "--port", str(port)), port)
    try:
        def classify(i):
            body = json.dumps({"inputs": {"images": x_test[i:i + 1].tolist()}}).encode()
            status, answer, _ = post(worker.url + "/api/predict/digits", body)
            assert status == 200, answer
            return int(np.argmax(json.loads(answer)["outputs"]["scores"][0]))

        with ThreadPoolExecutor(16) as pool:
            predicted = list(pool.map(classify, range(64)))
        assert np.mean(np.array(predicted) == y_test[:64]) >= 0.9
        assert "rpc.worker_threads 5: 2 threads run the model" in worker.output()
    finally:
        worker.stop()
    port = free_port()
    user = Proc(["taskset", "-c", "0"] + infergate_cmd(
        "worker", "--service", "echo", "--model", ECHO, "--processor", "python",
        "--threads", "5", "--port", str(port)), port)
    try:
        assert post(user.url + "/api/predict/echo", b"hi")[0] == 200
        assert "threads run the model" not in user.output()
    finally:
        user.stop()


def test_bearer_token_gets_a_hint(procs, digits):
    """A client that sends `Bearer <token>` (as the admin API and KServe's clients do) is
    told that an EAS service token goes as it is; the token as it is passes."""
    from gateway.models import DIGITS_MODEL

    x_test, _ = digits
    port = free_port()
    procs.start(infergate_cmd("worker", "--service", "digits", "--model", str(DIGITS_MODEL),
                              "--processor", "tensorflow", "--token", "s3cret", "--port",
                              str(port)), port)
    url = f"http://127.0.0.1:{port}/api/predict/digits"
    body = tf_body({"images": x_test[:1].astype(np.float32)})
    status, answer, _ = post(url, body, {"Authorization": "Bearer s3cret"})
    assert status == 401 and "without 'Bearer '" in error_message(answer)
    assert post(url, body, {"Authorization": "s3cret"})[0] == 200
