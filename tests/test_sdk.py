"""The client SDK (gateway.sdk) against real worker processes and a real gateway.

Gateway mode and direct mode (discovery from the gateway, local smooth WRR,
retries on another instance), tokens, SIGKILL of an instance under load, a new
instance picked up by the background refresh, weights, the asyncio client.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import Proc, free_port, infergate_cmd
from gateway_helpers import endpoints, seed_services, start_gateway, worker_requests

from gateway.sdk import (ENDPOINT_TYPE_DIRECT, ENDPOINT_TYPE_GATEWAY, PredictClient,
                         PredictException, StringRequest, TFRequest, TorchRequest)
from gateway.sdk.endpoints import InstanceTable, normalize_endpoint_type, parse_endpoint

TOKEN = "sdk-test-token"
SERVICE = "digits"


# --- shared data -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    """Real held-out digits and onnxruntime's own answers for them."""
    import onnxruntime as ort

    from gateway.models import DIGITS_MODEL, load_digits_split

    _, _, x_test, y_test = load_digits_split()
    x = np.ascontiguousarray(x_test[:64], dtype=np.float32)
    session = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])

    def expected(batch: np.ndarray) -> np.ndarray:
        return session.run(["scores"], {"images": batch})[0]

    return x, y_test[:64], expected


def start_worker(start, *extra, service=SERVICE, processor="tensorflow"):
    from gateway.models import DIGITS_MODEL

    port = free_port()
    return start(infergate_cmd("worker", "--service", service, "--model", str(DIGITS_MODEL),
                               "--processor", processor, "--host", "127.0.0.1", "--port",
                               str(port), *extra), port)


def digits_request(batch: np.ndarray) -> TFRequest:
    req = TFRequest("predict_images")
    req.add_feed("images", batch)
    return req


def discovery(gateway_url: str, service: str = SERVICE, token: str = TOKEN) -> list[int]:
    """Ports the gateway announces for ``service`` (to a client with its token)."""
    conn = http.client.HTTPConnection(gateway_url.split("//")[1], timeout=5)
    try:
        conn.request("GET", f"/api/v1/servicediscovery/upstreams/{service}",
                     headers={"Authorization": token})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        return []
    return sorted(item["port"] for item in json.loads(body)["endpoints"]["items"])


def wait_for(condition, what: str, timeout: float = 30.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"gave up waiting for {what}")


def make_client(url: str, kind: str = ENDPOINT_TYPE_GATEWAY, token: str = TOKEN,
                interval: float = 0.5) -> PredictClient:
    client = PredictClient(url, SERVICE)
    if token:
        client.set_token(token)
    client.set_endpoint_type(kind)
    client.set_discovery_interval(interval)
    client.set_timeout(10000)
    client.enable_instance_counts()
    client.init()
    return client


# --- one gateway and two token-protected workers (weights 3:1) for several tests --------------
class Cluster:
    def __init__(self, state_dir: str):
        self.started: list[Proc] = []
        start = self._start
        self.a = start_worker(start, "--token", TOKEN)
        self.b = start_worker(start, "--token", TOKEN)
        seed_services(state_dir, [{"name": SERVICE, "token": TOKEN, "config": {
            "name": SERVICE, "token": TOKEN, "processor": "tensorflow",
            "endpoints": endpoints(self.a, self.b, weights=[300, 100])}}])

        class Starter:
            def start(_, args, port, **kw):
                return self._start(args, port, **kw)

        self.gateway = start_gateway(Starter(), state_dir)
        wait_for(lambda: discovery(self.gateway.url) == sorted([self.a.port, self.b.port]),
                 "the gateway to announce both workers")

    def _start(self, args, port, **kw) -> Proc:
        proc = Proc(args, port, **kw)
        self.started.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("sdk-state")))
    yield c
    c.stop()


# --- tests without processes ------------------------------------------------------------------
def test_endpoint_parsing_and_types():
    t = parse_endpoint("127.0.0.1:8080")
    assert (t.scheme, t.host, t.port, t.prefix) == ("http", "127.0.0.1", 8080, "")
    t = parse_endpoint("http://example.com/")
    assert (t.host, t.port, t.prefix) == ("example.com", 80, "")
    t = parse_endpoint("https://example.com/eas/")
    assert (t.scheme, t.port, t.prefix) == ("https", 443, "/eas")
    assert normalize_endpoint_type("DEFAULT") == ENDPOINT_TYPE_GATEWAY
    assert normalize_endpoint_type("") == ENDPOINT_TYPE_GATEWAY
    assert normalize_endpoint_type("direct") == ENDPOINT_TYPE_DIRECT
    with pytest.raises(PredictException):
        normalize_endpoint_type("VIPSERVER")


class _Pool:
    def close(self):
        pass


def test_instance_table_never_repeats_and_honours_weights():
    table = InstanceTable(lambda ip, port: _Pool())
    table.update([("10.0.0.1", 1, 3), ("10.0.0.2", 2, 1), ("10.0.0.3", 3, 0)])
    picks = [table.pick().key for _ in range(400)]
    assert picks.count("10.0.0.1:1") == 300 and picks.count("10.0.0.2:2") == 100
    # A request that failed on one instance goes to another, then (all tried) starts over.
    first = table.pick()
    second = table.pick([first.key])
    assert second.key != first.key
    assert table.pick([first.key, second.key]) is not None
    # An instance that refused a connection is out of rotation while others are up...
    table.failed(table.snapshot.by_key["10.0.0.1:1"], down=True)
    assert {table.pick().key for _ in range(20)} == {"10.0.0.2:2"}
    # ...but is still tried when it is the only one left.
    assert table.pick(["10.0.0.2:2"]).key == "10.0.0.1:1"
    # An unchanged list keeps the picker; a new one carries the down mark over.
    picker = table.snapshot.picker
    assert not table.update([("10.0.0.2", 2, 1), ("10.0.0.1", 1, 3), ("10.0.0.3", 3, 0)])
    assert table.snapshot.picker is picker
    assert table.update([("10.0.0.1", 1, 3), ("10.0.0.2", 2, 1), ("10.0.0.4", 4, 1)])
    assert "10.0.0.1:1" not in {table.pick().key for _ in range(20)}
    table.update([])
    assert table.pick() is None


def test_tf_request_forms_agree(digits):
    from gateway.protos import tf_predict_pb2 as pb

    x, _, _ = digits
    batch = x[:3]
    a = TFRequest("predict_images")
    a.add_feed("images", batch)
    b = TFRequest("predict_images")
    b.add_feed("images", [3, 784], TFRequest.DT_FLOAT, batch.ravel().tolist())
    c = TFRequest("predict_images").add_feed("images", [3, 784], TFRequest.DT_FLOAT, batch)
    ref = pb.PredictRequest(signature_name="predict_images")
    ref.inputs["images"].dtype = pb.DT_FLOAT
    ref.inputs["images"].array_shape.dim.extend([3, 784])
    ref.inputs["images"].float_val.extend(batch.ravel().tolist())
    for req in (a, b, c):
        parsed = pb.PredictRequest()
        parsed.ParseFromString(req.to_string())
        assert parsed == ref
    q = TFRequest()
    q.add_feed("q", [2], TFRequest.DT_QINT8, [1, -2])
    parsed = pb.PredictRequest()
    parsed.ParseFromString(q.to_string())
    assert parsed.inputs["q"].dtype == pb.DT_QINT8 and list(parsed.inputs["q"].int_val) == [1, -2]
    with pytest.raises(ValueError, match="needs 4 values"):
        TFRequest().add_feed("images", [2, 2], TFRequest.DT_FLOAT, [1.0])


# --- against real processes --------------------------------------------------------------------
@pytest.mark.parametrize("kind", [ENDPOINT_TYPE_GATEWAY, ENDPOINT_TYPE_DIRECT])
def test_predictions_equal_onnxruntime(cluster, digits, kind):
    x, y, expected = digits
    client = make_client(cluster.gateway.url, kind)
    try:
        if kind == ENDPOINT_TYPE_DIRECT:
            assert sorted(p for _, p, _ in client.instances()) == sorted(
                [cluster.a.port, cluster.b.port])
        correct = 0
        for start in range(0, len(x), 8):
            batch = x[start:start + 1 + start % 7]
            resp = client.predict(digits_request(batch))
            scores = resp.get_array("scores")
            assert resp.get_tensor_shape("scores") == [len(batch), 10]
            np.testing.assert_allclose(scores, expected(batch), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(resp.get_values("scores"), scores.ravel(), rtol=0)
            assert set(resp.to_numpy()) == {"scores"}
            correct += int((scores.argmax(1) == y[start:start + len(batch)]).sum())
        assert correct > 0.8 * sum(len(x[s:s + 1 + s % 7]) for s in range(0, len(x), 8))
        # The reference SDK's form: flat values, explicit shape and dtype.
        req = TFRequest("predict_images").add_feed(
            "images", [2, 784], TFRequest.DT_FLOAT, x[:2].ravel().tolist()).add_fetch("scores")
        np.testing.assert_allclose(client.predict(req).get_array("scores"), expected(x[:2]),
                                   rtol=1e-5, atol=1e-7)
        counts = client.instance_counts()
        if kind == ENDPOINT_TYPE_DIRECT:  # both instances took traffic, straight from the SDK
            assert set(counts) == {f"127.0.0.1:{cluster.a.port}", f"127.0.0.1:{cluster.b.port}"}
        else:
            assert set(counts) == {f"127.0.0.1:{cluster.gateway.port}"}
    finally:
        client.destroy()


@pytest.mark.parametrize("kind", [ENDPOINT_TYPE_GATEWAY, ENDPOINT_TYPE_DIRECT])
def test_token_required(cluster, digits, kind):
    x, _, expected = digits
    for token in ("", "wrong-token"):
        client = None
        try:
            # Direct mode is refused at discovery: the instances are listed to clients only.
            with pytest.raises(PredictException) as info:
                client = make_client(cluster.gateway.url, kind, token=token)
                client.predict(digits_request(x[:1]))
            assert info.value.code == 401
            assert info.value.message and "{" not in info.value.message  # the server's message
            assert (client is None) == (kind == ENDPOINT_TYPE_DIRECT)
        finally:
            if client is not None:
                client.destroy()
    client = make_client(cluster.gateway.url, kind)
    try:
        np.testing.assert_allclose(client.predict(digits_request(x[:1])).get_array("scores"),
                                   expected(x[:1]), rtol=1e-5, atol=1e-7)
    finally:
        client.destroy()


def test_client_errors_are_not_retried(cluster):
    client = make_client(cluster.gateway.url, ENDPOINT_TYPE_DIRECT)
    before = worker_requests(cluster.a.url) + worker_requests(cluster.b.url)
    try:
        req = TFRequest("predict_images")
        req.add_feed("images", np.zeros((1, 783), np.float32))
        with pytest.raises(PredictException) as info:
            client.predict(req)
        assert info.value.code == 400 and "images" in info.value.message
        assert "Code: 400" in str(info.value)
    finally:
        client.destroy()
    assert worker_requests(cluster.a.url) + worker_requests(cluster.b.url) == before + 1


def test_direct_mode_weights_3_to_1(cluster, digits):
    x, _, _ = digits
    client = make_client(cluster.gateway.url, ENDPOINT_TYPE_DIRECT)
    before = worker_requests(cluster.a.url), worker_requests(cluster.b.url)
    try:
        assert sorted(w for _, _, w in client.instances()) == [100, 300]
        req = digits_request(x[:1])
        for _ in range(2000):
            client.predict(req)
    finally:
        client.destroy()
    a = worker_requests(cluster.a.url) - before[0]
    b = worker_requests(cluster.b.url) - before[1]
    assert a + b == 2000
    assert abs(a / 2000 - 0.75) <= 0.01, (a, b)


def test_asyncio_client(cluster, digits):
    from gateway.sdk import AsyncPredictClient

    x, _, expected = digits

    async def run(kind):
        client = AsyncPredictClient(cluster.gateway.url, SERVICE)
        client.set_token(TOKEN)
        client.set_endpoint_type(kind)
        client.enable_instance_counts()
        async with client:
            batches = [x[i:i + 4] for i in range(0, 32, 4)]
            answers = await asyncio.gather(*(client.predict(digits_request(b)) for b in batches))
            for batch, resp in zip(batches, answers):
                np.testing.assert_allclose(resp.get_array("scores"), expected(batch),
                                           rtol=1e-5, atol=1e-7)
            client.set_token("wrong")
            with pytest.raises(PredictException) as info:
                await client.predict(digits_request(x[:1]))
            assert info.value.code == 401
            return client.instance_counts()

    assert set(asyncio.run(run(ENDPOINT_TYPE_GATEWAY))) == {f"127.0.0.1:{cluster.gateway.port}"}
    assert set(asyncio.run(run(ENDPOINT_TYPE_DIRECT))) == {
        f"127.0.0.1:{cluster.a.port}", f"127.0.0.1:{cluster.b.port}"}



def test_torch_caffe_string_requests_against_workers(procs, digits):
    """Every request type of the SDK against a worker of its processor (gateway mode
    pointed at the worker itself), numbers equal to onnxruntime's."""
    from gateway.sdk import CaffeRequest

    x, _, expected = digits
    batch = x[:5]
    want = expected(batch)
    torch = start_worker(procs.start, processor="pytorch")
    caffe = start_worker(procs.start, processor="caffe")
    js = start_worker(procs.start, processor="json")
    clients = {name: make_client(w.url, token="") for name, w in
               (("torch", torch), ("caffe", caffe), ("json", js))}
    try:
        for flag in (False, True):
            req = TorchRequest(flag=flag)
            req.add_feed(0, list(batch.shape), TorchRequest.DT_FLOAT, batch.ravel())
            req.add_fetch(0)
            resp = clients["torch"].predict(req)
            assert resp.get_tensor_shape(0) == [5, 10]
            np.testing.assert_allclose(resp.get_array(0), want, rtol=1e-5, atol=1e-7)
            req = TorchRequest(flag=flag)
            req.add_feed_map("images", batch)
            resp = clients["torch"].predict(req)
            assert resp.get_tensor_shape_map("scores") == [5, 10]
            np.testing.assert_allclose(np.reshape(resp.get_values_map("scores"), (5, 10)), want,
                                       rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(resp.to_numpy()["scores"], want, rtol=1e-5, atol=1e-7)
        req = CaffeRequest()
        req.add_feed("images", batch)
        req.add_fetch("scores")
        resp = clients["caffe"].predict(req)
        assert resp.keys() == ["scores"] and resp.get_tensor_shape("scores") == [5, 10]
        np.testing.assert_allclose(resp.get_array("scores"), want, rtol=1e-5, atol=1e-7)
        req = CaffeRequest()
        req.add_feed("images", [5, 784], batch.ravel().tolist())
        np.testing.assert_allclose(clients["caffe"].predict(req).to_numpy()["scores"], want,
                                   rtol=1e-5, atol=1e-7)
        body = json.dumps({"inputs": {"images": batch.tolist()}})
        resp = clients["json"].predict(StringRequest(body, content_type="application/json"))
        np.testing.assert_allclose(np.array(resp.json()["outputs"]["scores"], np.float32), want,
                                   rtol=1e-5, atol=1e-7)
        with pytest.raises(KeyError, match="scores"):
            clients["torch"].predict(req_map_missing(batch)).get_values_map("nope")
    finally:
        for c in clients.values():
            c.destroy()


def req_map_missing(batch):
    req = TorchRequest()
    req.add_feed_map("images", batch)
    return req

@pytest.mark.slow
def test_direct_mode_survives_sigkill_of_an_instance(procs, digits, tmp_path):
    """Three workers, four client threads, 2,000 requests; one worker is SIGKILLed
    halfway: every request still succeeds (retried on another instance)."""
    x, _, expected = digits
    workers = [start_worker(procs.start) for _ in range(3)]
    seed_services(str(tmp_path), [{"name": SERVICE, "config": {
        "name": SERVICE, "endpoints": endpoints(*workers)}}])
    gw = start_gateway(procs, str(tmp_path))
    wait_for(lambda: discovery(gw.url) == sorted(w.port for w in workers), "discovery")
    client = make_client(gw.url, ENDPOINT_TYPE_DIRECT, token="", interval=0.5)
    want = expected(x[:2])
    done = []
    errors = []
    halfway = threading.Event()
    lock = threading.Lock()

    def run(n):
        req = digits_request(x[:2])
        for _ in range(n):
            try:
                scores = client.predict(req).get_array("scores")
                np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-7)
            except Exception as exc:  # collected: the assertion below shows them
                errors.append(repr(exc))
            with lock:
                done.append(1)
                if len(done) == 1000:
                    halfway.set()

    victim = workers[1]
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(run, 500) for _ in range(4)]
            assert halfway.wait(120), "the first 1,000 requests did not finish"
            victim.kill(signal.SIGKILL)
            for f in futures:
                f.result()
        assert victim.proc.wait(10) == -signal.SIGKILL
        assert errors == []
        assert len(done) == 2000
        served = [worker_requests(w.url) for w in (workers[0], workers[2])]
        assert sum(served) >= 1000  # the survivors took the second half
    finally:
        client.destroy()


@pytest.mark.slow
def test_direct_mode_picks_up_a_new_instance(procs, digits, tmp_path):
    """Workers join the gateway with --registry; one added later gets traffic after the
    client's next refresh, and one that leaves (SIGTERM: deregisters, drains) costs no
    request."""
    from gateway.models import DIGITS_MODEL

    x, _, _ = digits
    # Registered instances are routed (and announced) only under a service record.
    seed_services(str(tmp_path), [{"name": SERVICE, "config": {"name": SERVICE,
                                                               "processor": "tensorflow"}}])
    gw = start_gateway(procs, str(tmp_path))

    def joining_worker():
        port = free_port()
        return procs.start(infergate_cmd("worker", "--service", SERVICE, "--model",
                                         str(DIGITS_MODEL), "--processor", "tensorflow",
                                         "--host", "127.0.0.1", "--port", str(port),
                                         "--registry", gw.url), port,
                           env={"INFERGATE_ADMIN_TOKEN": "admin-secret"})

    a, b = joining_worker(), joining_worker()
    wait_for(lambda: discovery(gw.url) == sorted([a.port, b.port]), "both workers to register")
    client = make_client(gw.url, ENDPOINT_TYPE_DIRECT, token="", interval=0.3)
    try:
        req = digits_request(x[:1])
        for _ in range(20):
            client.predict(req)
        c = joining_worker()
        wait_for(lambda: c.port in discovery(gw.url), "the gateway to announce the new worker")
        # The refresh that starts after the gateway announced it must bring it in.
        seen = client.discovery.refreshes
        wait_for(lambda: client.discovery.refreshes >= seen + 2, "two client refreshes")
        assert c.port in [p for _, p, _ in client.instances()]
        for _ in range(3):  # equal weights: smooth WRR reaches every instance within 3 picks
            client.predict(req)
        assert client.instance_counts().get(f"127.0.0.1:{c.port}", 0) >= 1
        assert worker_requests(c.url) >= 1
        # A worker that leaves: no request fails, and the local list drops it.
        c.stop()
        for _ in range(50):
            client.predict(req)
        wait_for(lambda: c.port not in [p for _, p, _ in client.instances()],
                 "the client to drop the stopped worker")
    finally:
        client.destroy()

ECHO = os.path.join(os.path.dirname(__file__), "data", "echo_processor.py")


def start_echo(procs, port=None):
    port = port or free_port()
    return procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python",
                                     "--model", ECHO, "--host", "127.0.0.1", "--port", str(port)),
                       port, env={"ECHO_PORT": str(port)})


def test_retries_go_to_another_instance(procs, tmp_path):
    """450 and 5xx are retried on the other instance, never twice on one while another is
    untried; 4xx is not retried; a timeout counts as a failure too."""
    a, b = start_echo(procs), start_echo(procs)
    seed_services(str(tmp_path), [{"name": "echo", "config": {"name": "echo",
                                                              "endpoints": endpoints(a, b)}}])
    gw = start_gateway(procs, str(tmp_path))
    wait_for(lambda: discovery(gw.url, "echo") == sorted([a.port, b.port]), "discovery")
    client = PredictClient(gw.url, "echo")
    client.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
    client.set_retry_count(2)
    client.init()
    try:
        answers = {client.predict(StringRequest("hi")).to_string() for _ in range(4)}
        assert answers == {f"{a.port}:hi", f"{b.port}:hi"}
        for status in (450, 503, 500):
            before = worker_requests(a.url), worker_requests(b.url)
            with pytest.raises(PredictException) as info:
                client.predict(StringRequest(f"status:{status}"))
            assert info.value.code == status
            assert (worker_requests(a.url) - before[0], worker_requests(b.url) - before[1]) == (1, 1)
        before = worker_requests(a.url) + worker_requests(b.url)
        with pytest.raises(PredictException) as info:
            client.predict(StringRequest("status:404"))
        assert info.value.code == 404
        assert worker_requests(a.url) + worker_requests(b.url) == before + 1
        client.set_timeout(300)
        with pytest.raises(PredictException) as info:
            client.predict(StringRequest("sleep:1"))
        assert info.value.code == 504 and "timed out" in info.value.message
    finally:
        client.destroy()

    from gateway.sdk import AsyncPredictClient

    async def run_async():
        aclient = AsyncPredictClient(gw.url, "echo")
        aclient.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
        aclient.set_retry_count(2)
        async with aclient:
            answers = {(await aclient.predict(StringRequest("hi"))).to_string() for _ in range(4)}
            assert answers == {f"{a.port}:hi", f"{b.port}:hi"}
            before = worker_requests(a.url), worker_requests(b.url)
            with pytest.raises(PredictException) as info:
                await aclient.predict(StringRequest("status:450"))
            assert info.value.code == 450
            assert (worker_requests(a.url) - before[0], worker_requests(b.url) - before[1]) == (1, 1)
            aclient.set_timeout(300)
            with pytest.raises(PredictException) as info:
                await aclient.predict(StringRequest("sleep:1"))
            assert info.value.code == 504

    asyncio.run(run_async())


def test_stale_keepalive_connection_is_replaced(procs):
    """A pooled connection to a worker that restarted is replaced by a fresh one, without
    spending an attempt (retry count 1)."""
    w = start_echo(procs)
    client = PredictClient(w.url, "echo")
    client.set_retry_count(1)
    client.init()
    try:
        assert client.predict(StringRequest("one")).to_string() == f"{w.port}:one"
        w.stop()
        w2 = start_echo(procs, port=w.port)
        assert client.predict(StringRequest("two")).to_string() == f"{w2.port}:two"
    finally:
        client.destroy()


# --- answers cut off: raw socket servers --------------------------------------------------------
class RawServer:
    """A loopback HTTP server on raw sockets that answers each request with the bytes
    ``answer(path)`` returns and then closes the connection (or keeps it, for None)."""

    def __init__(self, answer):
        import socket

        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.paths: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                rest += chunk
            path = lines[0].split(" ")[1]
            self.paths.append(path)
            conn.sendall(self.answer(path))

    def close(self):
        self.sock.close()


CUT_LENGTH = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\npartial"
CUT_CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"7\r\npartial\r\n")
CLOSE_DELIMITED = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nthe whole answer"


def raw_predict(url, kind=ENDPOINT_TYPE_GATEWAY, retries=2, use_async=False):
    """The body of one StringRequest through the sync or the asyncio client, or the
    PredictException it raised."""
    async def run_async():
        from gateway.sdk import AsyncPredictClient

        client = AsyncPredictClient(url, "raw")
        client.set_endpoint_type(kind)
        client.set_retry_count(retries)
        client.set_timeout(5000)
        async with client:
            try:
                return (await client.predict(StringRequest("hi"))).to_string()
            except PredictException as exc:
                return exc

    if use_async:
        return asyncio.run(run_async())
    client = PredictClient(url, "raw")
    client.set_endpoint_type(kind)
    client.set_retry_count(retries)
    client.set_timeout(5000)
    client.init()
    try:
        return client.predict(StringRequest("hi")).to_string()
    except PredictException as exc:
        return exc
    finally:
        client.destroy()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("cut", [CUT_LENGTH, CUT_CHUNKED], ids=["content-length", "chunked"])
def test_cut_off_answer_is_a_transport_error_not_a_success(cut, use_async):
    """Content-Length: 100, then 7 bytes and the end of the connection (or a chunked body
    without its last chunk): a 502 PredictException after every attempt, never a 200."""
    server = RawServer(lambda path: cut)
    try:
        outcome = raw_predict(server.url, retries=2, use_async=use_async)
        assert isinstance(outcome, PredictException), outcome
        assert outcome.code == 502
        assert "connection closed" in outcome.message
        if cut is CUT_LENGTH:
            assert "7 of 100 body bytes" in outcome.message
        assert len(server.paths) == 2  # a transport error: the attempt was retried
    finally:
        server.close()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_answer_delimited_by_the_end_of_the_connection_is_complete(use_async):
    """Neither Content-Length nor chunked: the end of the connection ends the body."""
    server = RawServer(lambda path: CLOSE_DELIMITED)
    try:
        assert raw_predict(server.url, retries=1, use_async=use_async) == "the whole answer"
        assert len(server.paths) == 1
    finally:
        server.close()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_cut_off_answer_is_retried_on_another_instance(use_async):
    """Direct mode: the instance that cut its answer off is tried first (weight 100 against
    1); the request succeeds on the other one."""
    good = RawServer(lambda path: b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")
    bad = RawServer(lambda path: CUT_LENGTH)
    items = [{"app": "raw", "ip": "127.0.0.1", "port": bad.port, "weight": 100},
             {"app": "raw", "ip": "127.0.0.1", "port": good.port, "weight": 1}]
    doc = json.dumps({"correlative": ["raw"], "endpoints": {"items": items}}).encode()
    discovery_server = RawServer(lambda path: b"HTTP/1.1 200 OK\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(doc), doc))
    try:
        outcome = raw_predict(discovery_server.url, ENDPOINT_TYPE_DIRECT, retries=2,
                              use_async=use_async)
        assert outcome == "good"
        assert discovery_server.paths == ["/api/v1/servicediscovery/upstreams/raw"]
        assert bad.paths == ["/api/predict/raw"] and good.paths == ["/api/predict/raw"]
    finally:
        for server in (good, bad, discovery_server):
            server.close()


def test_response_framing_rules():
    """The shared reader (both clients use it) on answers fed piece by piece."""
    from gateway.sdk.core import ResponseReader, TransportError

    def read(*pieces):
        reader = ResponseReader("test:1")
        for piece in pieces:
            reader.feed(piece)
            if reader.done:
                return reader.result()
        return reader.eof()

    assert read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe", b"llo") == (200, b"hello",
                                                                                True)
    assert read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                b"0\r\n\r\n") == (200, b"hello", True)
    assert read(b"HTTP/1.0 200 OK\r\n\r\nto the end") == (200, b"to the end", False)
    assert read(b"HTTP/1.1 204 No Content\r\n\r\n")[:2] == (204, b"")
    for pieces, what in (
            ((b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",), "7 of 100"),
            ((b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",), "0 of 3"),
            ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",), "chunked"),
            ((b"HTTP/1.1 200 OK\r\nContent-Le",), "before a complete answer"),
            ((b"HTTP/1.1 500 Oops\r\nContent-Length: 9\r\n\r\nabc",), "3 of 9")):
        with pytest.raises(TransportError, match=what) as info:
            read(*pieces)
        assert info.value.code == 502 and not info.value.before_response
    with pytest.raises(TransportError) as info:
        read()
    assert info.value.before_response  # nothing came: maybe a stale keep-alive connection
    with pytest.raises(TransportError, match="invalid HTTP answer"):
        read(b"NOT HTTP\r\n\r\n")


def test_retry_rules_shared_by_both_clients():
    """Attempts: never the same instance twice while others remain, transport errors and
    5xx/450 retried, other answers raised at once, the last error raised at the end."""
    from gateway.sdk.core import Attempts, TransportError, retryable

    assert [s for s in (200, 400, 401, 404, 408, 429, 450, 500, 502, 503, 504)
            if retryable(s)] == [450, 500, 502, 503, 504]
    table = InstanceTable(lambda ip, port: _Pool())
    table.update([("10.0.0.1", 1, 1), ("10.0.0.2", 2, 1), ("10.0.0.3", 3, 1)])
    attempts = Attempts(table, 5, lambda: "none")
    seen = []
    outcomes = [TransportError(502, "reset"), (450, b'{"code": 450, "message": "full"}'),
                (503, b"down")]
    while (inst := attempts.next()) is not None:
        seen.append(inst.key)
        outcome = outcomes[len(seen) - 1] if len(seen) <= 3 else (503, b"again")
        if isinstance(outcome, TransportError):
            attempts.transport_failed(inst, outcome)
        else:
            assert attempts.answered(inst, *outcome) is False
    assert len(seen) == 5 and len(set(seen[:3])) == 3   # all three before any repeat
    assert (attempts.error.code, attempts.error.message) == (503, "again")
    attempts = Attempts(table, 5, lambda: "none")
    inst = attempts.next()
    with pytest.raises(PredictException) as info:
        attempts.answered(inst, 404, b'{"code": 404, "message": "no such service"}')
    assert (info.value.code, info.value.message) == (404, "no such service")
    counted = []
    attempts = Attempts(table, 5, lambda: "none", on_success=counted.append)
    inst = attempts.next()
    assert attempts.answered(inst, 200, b"ok") is True and counted == [inst]
    empty = InstanceTable(lambda ip, port: _Pool())
    attempts = Attempts(empty, 5, lambda: "no instance of 'x'")
    assert attempts.next() is None
    assert (attempts.error.code, attempts.error.message) == (503, "no instance of 'x'")


def test_instance_table_never_repeats_past_the_pickers_exclusion_limit():
    """Twelve instances, ten tried: the next pick is always one of the two untried ones
    (the compiled picker excludes at most 8 tried indexes by itself)."""
    table = InstanceTable(lambda ip, port: _Pool())
    table.update([(f"10.0.1.{i}", 80, 1) for i in range(12)])
    keys = [inst.key for inst in table.instances]
    tried = keys[:10]
    assert {table.pick(tried).key for _ in range(40)} <= set(keys[10:])
    assert table.pick(keys) is not None  # all tried: start over


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_unexpected_upgrade_is_a_transport_error(use_async):
    """Both clients read answers with the same rules: a protocol switch is a 502 at once
    (not an exception escaping the asyncio protocol, then a timeout)."""
    server = RawServer(lambda path: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                    b"Connection: Upgrade\r\n\r\n")
    try:
        outcome = raw_predict(server.url, retries=1, use_async=use_async)
        assert isinstance(outcome, PredictException), outcome
        assert outcome.code == 502 and "upgrade" in outcome.message
    finally:
        server.close()
