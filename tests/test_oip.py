"""The Open Inference Protocol (KServe v2) with the unchanged tritonclient, over HTTP and
gRPC, against a worker and through the gateway.

Everything runs as real processes on loopback: workers serving the bundled digits
model and a model of mixed datatypes (INT64, BYTES, FP16), and a gateway with an
HTTP and a gRPC port in front of them. Scores are compared with onnxruntime's on
the same input.
"""
import asyncio
import gzip
import http.client
import json
import tempfile
import zlib

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from tritonclient.utils import InferenceServerException

from conftest import free_port, infergate_cmd
from gateway.models import DIGITS_MODEL
from gateway_helpers import endpoints, seed_services, start_gateway, worker_requests

TOKEN = "v2-secret"
CLIENTS = ["http", "http.aio", "grpc", "grpc.aio"]


def build_mixed_model(path) -> None:
    """ids INT64 [-1, 3] -> twice = ids + ids; text BYTES [-1] -> echo; half FP16 [-1, 2] ->
    half_twice = half + half."""
    from onnx import TensorProto as T, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "ids"], ["twice"]),
         helper.make_node("Identity", ["text"], ["echo"]),
         helper.make_node("Add", ["half", "half"], ["half_twice"])], "mixed",
        [helper.make_tensor_value_info("ids", T.INT64, [None, 3]),
         helper.make_tensor_value_info("text", T.STRING, [None]),
         helper.make_tensor_value_info("half", T.FLOAT16, [None, 2])],
        [helper.make_tensor_value_info("twice", T.INT64, [None, 3]),
         helper.make_tensor_value_info("echo", T.STRING, [None]),
         helper.make_tensor_value_info("half_twice", T.FLOAT16, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


class Servers:
    """Workers (HTTP and gRPC) and a gateway (HTTP and gRPC) for the whole module."""

    def __init__(self, procs, tmp):
        self.procs = procs
        mixed = f"{tmp}/mixed.onnx"
        build_mixed_model(mixed)
        self.workers = {}
        for name, model in (("digits", DIGITS_MODEL), ("digits-new", DIGITS_MODEL),
                            ("mixed", mixed)):
            port, grpc_port = free_port(), free_port()
            proc = procs.start(infergate_cmd(
                "worker", "--service", name, "--model", str(model), "--host", "127.0.0.1",
                "--port", str(port), "--grpc-port", str(grpc_port), "--token", TOKEN),
                port, health_path="/ready")
            proc.grpc_port = grpc_port
            self.workers[name] = proc
        state = tempfile.mkdtemp(dir=tmp)
        w = self.workers
        seed_services(state, [
            {"name": "digits", "token": TOKEN, "traffic": {"digits": 80, "digits-new": 20},
             "config": {"endpoints": [dict(endpoints(w["digits"])[0],
                                           grpc_port=w["digits"].grpc_port)]}},
            {"name": "digits-new", "token": TOKEN,
             "config": {"endpoints": endpoints(w["digits-new"])}},
            {"name": "mixed", "token": TOKEN, "config": {"endpoints": endpoints(w["mixed"])}},
            # A v2 server fronted at its root (as a Triton fleet is): no doubled slash.
            {"name": "fleet", "token": TOKEN,
             "config": {"endpoints": endpoints(w["mixed"]), "upstream_path": "/"}},
        ])
        self.gateway_grpc_port = free_port()
        self.gateway = start_gateway(procs, state, "--grpc-port", str(self.gateway_grpc_port))

    def url(self, client: str, target: str) -> str:
        """Where a tritonclient of kind `client` reaches `target` ("gateway" or a worker)."""
        if target == "gateway":
            port = self.gateway_grpc_port if client.startswith("grpc") else self.gateway.port
        else:
            worker = self.workers[target]
            port = worker.grpc_port if client.startswith("grpc") else worker.port
        return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from conftest import Proc

    started = []

    class Starter:
        def start(self, args, port, **kw):
            p = Proc(args, port, **kw)
            started.append(p)
            return p

    yield Servers(Starter(), tmp_path_factory.mktemp("oip"))
    for p in reversed(started):
        p.stop()


def auth(client: str, token: str = TOKEN) -> dict:
    return {"authorization": token} if client.startswith("grpc") else {"Authorization": token}


class Client:
    """One synchronous face over the four tritonclient flavours (aio ones run on a loop)."""

    def __init__(self, kind: str, url: str):
        self.kind = kind
        self.module = tgrpc if kind.startswith("grpc") else thttp
        self.loop = asyncio.new_event_loop() if kind.endswith("aio") else None
        factory = {"http": thttp, "http.aio": thttp_aio, "grpc": tgrpc,
                   "grpc.aio": tgrpc_aio}[kind].InferenceServerClient
        self.client = self._run(self._make(factory, url)) if self.loop else factory(url)

    @staticmethod
    async def _make(factory, url):
        return factory(url)

    def _run(self, value):
        return self.loop.run_until_complete(value) if self.loop else value

    def __getattr__(self, name):
        method = getattr(self.client, name)
        return lambda *a, **kw: self._run(method(*a, **kw))

    def input(self, name, array, datatype, binary=True):
        tensor = self.module.InferInput(name, list(array.shape), datatype)
        if self.module is thttp:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def output(self, name, binary=True):
        if self.module is thttp:
            return thttp.InferRequestedOutput(name, binary_data=binary)
        return tgrpc.InferRequestedOutput(name)

    def close(self):
        self._run(self.client.close())
        if self.loop:
            self.loop.close()


@pytest.fixture
def make_client():
    made = []

    def make(kind, url):
        client = Client(kind, url)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def digits_scores(images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])
    return session.run(["scores"], {"images": images})[0]


def model_name(client, result) -> str:
    response = result.get_response()
    return response["model_name"] if isinstance(response, dict) else response.model_name


@pytest.mark.parametrize("target", ["digits", "gateway"])
@pytest.mark.parametrize("kind", CLIENTS)
def test_server_and_model_queries(servers, make_client, kind, target):
    client = make_client(kind, servers.url(kind, target))
    headers = auth(kind)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits", headers=headers)
    metadata = client.get_server_metadata()
    name = metadata["name"] if isinstance(metadata, dict) else metadata.name
    assert name == "infergate"
    model = client.get_model_metadata("digits", model_version="digits", headers=headers)
    if not isinstance(model, dict):
        model = {"name": model.name, "inputs": [{"name": t.name, "datatype": t.datatype,
                                                 "shape": list(t.shape)} for t in model.inputs]}
    assert model["name"] == "digits"
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}]
    config = client.get_model_config("digits", headers=headers)
    if isinstance(config, dict):
        max_batch, dims = config["max_batch_size"], config["input"][0]["dims"]
    else:
        max_batch, dims = config.config.max_batch_size, list(config.config.input[0].dims)
    assert max_batch == 16 and dims == [784]  # the first dimension is the batch


@pytest.mark.parametrize("target", ["digits", "gateway"])
@pytest.mark.parametrize("kind", CLIENTS)
def test_infer_matches_onnxruntime(servers, make_client, kind, target):
    client = make_client(kind, servers.url(kind, target))
    images = np.random.default_rng(7).random((5, 784), dtype=np.float32)
    expected = digits_scores(images)
    for binary in ([True, False] if kind.startswith("http") else [True]):
        result = client.infer("digits", [client.input("images", images, "FP32", binary)],
                              outputs=[client.output("scores", binary)], headers=auth(kind))
        np.testing.assert_allclose(result.as_numpy("scores"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["mixed", "gateway"])
@pytest.mark.parametrize("kind", CLIENTS)
def test_infer_int64_bytes_fp16(servers, make_client, kind, target):
    client = make_client(kind, servers.url(kind, target))
    ids = np.arange(6, dtype=np.int64).reshape(2, 3) - 2 ** 40
    text = np.array(["héllo".encode(), b"v2"], dtype=object)
    half = np.array([[0.5, -1.25], [2.0, 3.5]], dtype=np.float16)
    for binary in ([True, False] if kind.startswith("http") else [True]):
        result = client.infer("mixed", [client.input("ids", ids, "INT64", binary),
                                        client.input("text", text, "BYTES", binary),
                                        client.input("half", half, "FP16", binary)],
                              headers=auth(kind))
        np.testing.assert_array_equal(result.as_numpy("twice"), ids * 2)
        assert list(result.as_numpy("echo")) == list(text)
        np.testing.assert_array_equal(result.as_numpy("half_twice"), half * 2)


@pytest.mark.parametrize("target", ["digits", "gateway"])
@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_async_infer(servers, make_client, kind, target):
    client = make_client(kind, servers.url(kind, target))
    images = np.random.default_rng(3).random((2, 784), dtype=np.float32)
    tensor = client.input("images", images, "FP32")
    if kind == "http":
        pending = [client.client.async_infer("digits", [tensor], headers=auth(kind))
                   for _ in range(4)]
        results = [p.get_result() for p in pending]
    else:
        import queue

        done = queue.Queue()
        for _ in range(4):
            client.client.async_infer("digits", [tensor], lambda result, error: done.put((result, error)),
                                      headers=auth(kind))
        results = []
        for _ in range(4):
            result, error = done.get(timeout=10)
            assert error is None
            results.append(result)
    for result in results:
        np.testing.assert_allclose(result.as_numpy("scores"), digits_scores(images), rtol=1e-5)


@pytest.mark.parametrize("target", ["digits", "gateway"])
@pytest.mark.parametrize("kind", CLIENTS)
def test_wrong_token_is_refused(servers, make_client, kind, target):
    client = make_client(kind, servers.url(kind, target))
    images = np.zeros((1, 784), dtype=np.float32)
    for headers in ({}, auth(kind, "not-the-token")):
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits", [client.input("images", images, "FP32")], headers=headers)
        assert err.value.status() == ("StatusCode.UNAUTHENTICATED" if kind.startswith("grpc")
                                      else "401")


def test_url_prefix_and_endpoints_at_root(servers, make_client):
    """tritonclient keeps a URL's path: /api/predict/<service>/v2/...; a service fronting a
    v2 server at its root (upstream_path "/") gets /v2/..., not //v2/..."""
    ids = np.ones((1, 3), dtype=np.int64)
    text = np.array([b"x"], dtype=object)
    half = np.zeros((1, 2), dtype=np.float16)
    for service, model in (("mixed", "mixed"), ("fleet", "mixed")):
        client = make_client("http", f"127.0.0.1:{servers.gateway.port}/api/predict/{service}")
        assert client.is_model_ready(model, headers=auth("http"))
        result = client.infer(model, [client.input("ids", ids, "INT64"),
                                      client.input("text", text, "BYTES"),
                                      client.input("half", half, "FP16")], headers=auth("http"))
        np.testing.assert_array_equal(result.as_numpy("twice"), ids * 2)


def test_release_splits_v2_traffic_as_eas(servers, make_client):
    """digits sends 20% to digits-new: v2 over HTTP and gRPC splits as EAS does (50
    requests each: ten rounds of the smooth weighted round robin's 4:1 cycle)."""
    from gateway.sdk import PredictClient, TFRequest

    images = np.zeros((1, 784), dtype=np.float32)
    counts = {}
    for kind in ("http", "grpc"):
        client = make_client(kind, servers.url(kind, "gateway"))
        names = [model_name(client, client.infer(
            "digits", [client.input("images", images, "FP32")], headers=auth(kind)))
            for _ in range(50)]
        counts[kind] = {n: names.count(n) for n in set(names)}
    before = {n: worker_requests(servers.workers[n].url) for n in ("digits", "digits-new")}
    eas = PredictClient(servers.gateway.url, "digits")
    eas.set_token(TOKEN)
    eas.init()
    try:
        for _ in range(50):
            request = TFRequest()
            request.add_feed("images", images)
            eas.predict(request)
    finally:
        eas.destroy()
    counts["eas"] = {n: worker_requests(servers.workers[n].url) - before[n] for n in before}
    assert counts["http"] == counts["grpc"] == counts["eas"] == {"digits": 40, "digits-new": 10}


def test_model_version_names_a_version(servers, make_client):
    for kind in ("http", "grpc"):
        client = make_client(kind, servers.url(kind, "gateway"))
        images = np.zeros((1, 784), dtype=np.float32)
        names = {model_name(client, client.infer(
            "digits", [client.input("images", images, "FP32")], model_version="digits-new",
            headers=auth(kind))) for _ in range(5)}
        assert names == {"digits-new"}


# -- malformed requests: 400 / INVALID_ARGUMENT naming what is wrong ---------------------


def raw_infer(port: int, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Authorization": TOKEN, **headers})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def binary_body(inputs: list, outputs=None) -> tuple[bytes, int]:
    header = {"inputs": [{"name": n, "datatype": d, "shape": s,
                          "parameters": {"binary_data_size": len(raw)}}
                         for n, d, s, raw in inputs]}
    if outputs:
        header["outputs"] = outputs
    head = json.dumps(header).encode()
    return head + b"".join(raw for *_, raw in inputs), len(head)


MALFORMED = {
    "header length past the body": (lambda b, n: (b, str(len(b) + 10)),
                                    "Inference-Header-Content-Length"),
    "header length not a number": (lambda b, n: (b, "ten"), "Inference-Header-Content-Length"),
    "header length cuts the JSON": (lambda b, n: (b, str(n - 5)), "not valid JSON"),
    "size does not match shape x datatype": (
        lambda b, n: binary_body([("images", "FP32", [1, 784], bytes(4 * 783))]),
        "needs 3136"),
    "negative dimension": (lambda b, n: binary_body([("images", "FP32", [-1, 784],
                                                      bytes(4 * 784))]), "negative"),
    "unknown datatype": (lambda b, n: binary_body([("images", "FP33", [1, 784],
                                                    bytes(4 * 784))]), "unknown datatype"),
    "binary data nobody claims": (lambda b, n: (b + b"xx", str(n)), "no input's binary_data_size"),
}


@pytest.mark.parametrize("target", ["digits", "gateway"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_bodies_get_400(servers, case, target):
    good, length = binary_body([("images", "FP32", [1, 784], bytes(4 * 784))])
    make, names = MALFORMED[case]
    body, header_length = make(good, length)
    port = servers.workers["digits"].port if target == "digits" else servers.gateway.port
    status, answer = raw_infer(port, "/v2/models/digits/infer", body,
                               {"Inference-Header-Content-Length": str(header_length)})
    assert status == 400, answer
    assert names in answer["error"]


def test_gzip_bodies_and_bad_json_data(servers):
    port = servers.workers["digits"].port
    images = np.random.default_rng(1).random((1, 784), dtype=np.float32)
    good = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 784],
                                   "data": images.ravel().tolist()}]}).encode()
    for encoding, packed in (("gzip", gzip.compress(good)), ("deflate", zlib.compress(good))):
        status, answer = raw_infer(port, "/v2/models/digits/infer", packed,
                                   {"Content-Encoding": encoding})
        assert status == 200, answer
        np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(1, 10),
                                   digits_scores(images), rtol=1e-5)
    status, answer = raw_infer(port, "/v2/models/digits/infer", gzip.compress(good)[:-30],
                               {"Content-Encoding": "gzip"})
    assert status == 400 and "gzip" in answer["error"]
    short = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 784],
                                    "data": [0.0] * 700}]}).encode()
    status, answer = raw_infer(port, "/v2/models/digits/infer", short, {})
    assert status == 400 and "700 values" in answer["error"] and "'images'" in answer["error"]


@pytest.mark.parametrize("target", ["digits", "gateway"])
def test_malformed_grpc_requests_get_invalid_argument(servers, target):
    from gateway.protos import oip_pb2 as pb

    port = servers.workers["digits"].grpc_port if target == "digits" \
        else servers.gateway_grpc_port
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[1, 784])
    request.raw_input_contents.append(bytes(4 * 784))
    cases = {}
    tensor.shape[:] = [1, -784]
    cases["negative"] = request.SerializeToString()
    tensor.shape[:] = [1, 784]
    tensor.datatype = "FP33"
    cases["unknown datatype"] = request.SerializeToString()
    tensor.datatype = "FP32"
    request.raw_input_contents[0] = bytes(4 * 700)
    cases["raw_input_contents[0] is 2800 bytes"] = request.SerializeToString()
    request.raw_input_contents[0] = bytes(4 * 784)
    cases["ModelInferRequest"] = request.SerializeToString()[:-100]  # truncated protobuf
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for names, data in cases.items():
            with pytest.raises(grpc.RpcError) as err:
                infer(data, metadata=(("authorization", TOKEN),), timeout=10)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert names in err.value.details()


# -- the SDK and discovery ---------------------------------------------------------------


def test_sdk_infer_request_gateway_and_direct(servers):
    """The SDK's InferRequest through the gateway, and straight to the instances that
    discovery lists (with their gRPC ports, where tritonclient can go too)."""
    from gateway.sdk import ENDPOINT_TYPE_DIRECT, InferRequest, PredictClient

    images = np.random.default_rng(5).random((3, 784), dtype=np.float32)
    for direct in (False, True):
        client = PredictClient(servers.gateway.url, "digits")
        client.set_token(TOKEN)
        if direct:
            client.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
        client.init()
        try:
            request = InferRequest()
            request.add_input("images", images)
            response = client.predict(request)
            if direct:
                assert client.instances() == [("127.0.0.1", servers.workers["digits"].port,
                                                100)]
        finally:
            client.destroy()
        assert response.model_name == "digits"
        np.testing.assert_allclose(response.get_array("scores"), digits_scores(images),
                                   rtol=1e-5)
    conn = http.client.HTTPConnection("127.0.0.1", servers.gateway.port, timeout=10)
    conn.request("GET", "/api/v1/servicediscovery/upstreams/digits",
                 headers={"Authorization": TOKEN})
    items = json.loads(conn.getresponse().read())["endpoints"]["items"]
    conn.close()
    assert [item["grpc_port"] for item in items] == [servers.workers["digits"].grpc_port]
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{items[0]['grpc_port']}")
    assert client.is_model_ready("digits", headers=auth("grpc"))
    client.close()

    client = PredictClient(servers.workers["mixed"].url, "mixed")
    client.set_token(TOKEN)
    client.init()
    try:
        request = InferRequest()
        request.add_input("ids", np.arange(3, dtype=np.int64).reshape(1, 3))
        request.add_input("text", ["a", "b"], datatype="BYTES")
        request.add_input("half", np.zeros((1, 2), np.float16))
        request.add_output("echo")
        response = client.predict(request)
    finally:
        client.destroy()
    assert response.keys() == ["echo"] and list(response.get_array("echo")) == ["a", "b"]


def test_v2_and_eas_requests_share_batches():
    """A v2 request joins the same batches as EAS requests (one model run for both)."""
    import threading

    from gateway.serviceconfig import RpcSettings
    from gateway.worker.app import WorkerApp
    from gateway.worker.oip import HttpInferJob
    from test_batching import Recorder, run_async, soon, tf_body, tf_outputs, wait_until

    app = WorkerApp("digits", RpcSettings(batching=True, max_batch_size=32, worker_threads=1),
                    str(DIGITS_MODEL), "tensorflow")
    gate = threading.Event()
    recorder = Recorder(app.model, gate)
    app.batcher.model = recorder
    app.batcher.whole = None  # even a lone request goes through a batch
    rng = np.random.default_rng(9)
    xs = [rng.random((1, 784), dtype=np.float32) for _ in range(9)]

    def v2_job(x):
        body, length = binary_body([("images", "FP32", [1, 784], x.tobytes())])
        return HttpInferJob(app.oip, body, str(length), None)

    async def go():
        loop = asyncio.get_running_loop()
        app.batcher.bind(loop)
        first = app.batcher.submit(soon(), tf_body({"images": xs[0]}), app._encode, 0.0)
        await wait_until(recorder.started.is_set)  # the first batch holds the thread
        rest = []
        for i, x in enumerate(xs[1:]):
            if i % 2:
                rest.append(app.batcher.submit(soon(), tf_body({"images": x}), app._encode, 0.0))
            else:
                job = v2_job(x)
                rest.append(app.batcher.submit(soon(), job, job.finish, 0.0))
        gate.set()
        return await asyncio.gather(first, *rest)

    try:
        answers = run_async(go)
    finally:
        app.batcher.close()
    assert [rows for rows, _, _ in recorder.runs] == [1, 8]  # the 4 v2 and 4 EAS: one run
    expected = digits_scores(np.concatenate(xs))
    for i, answer in enumerate(answers):
        assert answer.status == 200
        if i == 0 or i % 2 == 0:  # EAS
            scores = tf_outputs(answer.body)["scores"]
        else:
            length = int(answer.headers.decode().split(":")[1])
            header = json.loads(answer.body[:length])
            scores = np.frombuffer(answer.body[length:], np.float32).reshape(
                header["outputs"][0]["shape"])
        np.testing.assert_allclose(scores, expected[i:i + 1], rtol=1e-5)


# -- the compiled gRPC server: large messages, many calls, bad clients ---------------------


@pytest.mark.parametrize("target", ["mixed", "gateway"])
def test_grpc_large_messages_and_flow_control(servers, target):
    """A 960 KB request (many DATA frames, past the 64 KB windows) and a 960 KB answer
    (sent as the client's WINDOW_UPDATEs allow)."""
    client = tgrpc.InferenceServerClient(servers.url("grpc", target))
    ids = np.arange(40000 * 3, dtype=np.int64).reshape(40000, 3)
    text = np.array([b"x"] * 5, dtype=object)
    half = np.zeros((1, 2), dtype=np.float16)
    inputs = [tgrpc.InferInput("ids", list(ids.shape), "INT64"),
              tgrpc.InferInput("text", [5], "BYTES"), tgrpc.InferInput("half", [1, 2], "FP16")]
    for tensor, array in zip(inputs, (ids, text, half)):
        tensor.set_data_from_numpy(array)
    result = client.infer("mixed", inputs, headers=auth("grpc"))
    np.testing.assert_array_equal(result.as_numpy("twice"), ids * 2)
    client.close()


def test_grpc_many_calls_on_one_connection(servers):
    async def go():
        client = tgrpc_aio.InferenceServerClient(servers.url("grpc.aio", "digits"))
        rng = np.random.default_rng(11)
        xs = [rng.random((1, 784), dtype=np.float32) for _ in range(64)]

        async def one(x):
            tensor = tgrpc_aio.InferInput("images", [1, 784], "FP32")
            tensor.set_data_from_numpy(x)
            return (await client.infer("digits", [tensor], headers=auth("grpc"))).as_numpy(
                "scores")
        try:
            return xs, await asyncio.gather(*[one(x) for x in xs])
        finally:
            await client.close()
    xs, outs = asyncio.run(go())
    np.testing.assert_allclose(np.concatenate(outs), digits_scores(np.concatenate(xs)),
                               rtol=1e-5)


def test_grpc_bad_clients_and_unserved_calls(servers):
    """Garbage, a half-sent preface and a stream call: the server answers or hangs up on
    that client alone, and the next call works."""
    import socket

    port = servers.workers["digits"].grpc_port
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(30),
                 b"PRI * HTTP"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(junk)
            if len(junk) > 10:
                sock.settimeout(5)
                while sock.recv(4096):  # the server says GOAWAY and closes
                    pass
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_live()
    errors = []
    client.start_stream(callback=lambda result, error: errors.append(error))
    tensor = tgrpc.InferInput("images", [1, 784], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 784), np.float32))
    client.async_stream_infer("digits", [tensor])
    client.stop_stream()
    assert errors and "UNIMPLEMENTED" in str(errors[0])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")(b"",
                                                                                  timeout=5)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
