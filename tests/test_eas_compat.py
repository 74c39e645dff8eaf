"""The unchanged eas-prediction SDK (PyPI) against infergate.

eas-prediction pins protobuf <= 3.20, so it runs in an environment of its own
(``tests/eas_env.py``): each test writes its cases as JSON and runs the client
script below with that interpreter. Covered: a worker reached directly
(TFRequest, TorchRequest with positional and map inputs, snappy-compressed
TorchRequest, StringRequest to a JSON worker), a gateway in gateway mode with a
token (signature checked; a wrong or missing token is a 401 PredictException),
and direct mode (ENDPOINT_TYPE_DIRECT: the SDK's own discovery request to the
gateway and its own weighted round robin to the workers). The numbers must
equal onnxruntime's on the same input.

Quirks of the reference client that shape these tests:

* it logs errors to stdout, so the script writes its results to a file;
* its ``Date`` header is the *local* time labelled GMT: right only where the
  local zone is UTC; the gateway accepts a Date off by a whole zone offset
  (gateway.auth.date_is_fresh), which the UTC+8 test below checks;
* ``resp.status / 100 == 5`` is only true for 500 under Python 3, so it
  retries 500 alone and raises other 5xx at once;
* in direct mode it asks ``<endpoint>/api/v1/servicediscovery/upstreams/<svc>``
  at ``init()`` and then every 3 seconds, with no token (so, for a service with
  one, the gateway must run with ``--open-discovery``), and balances with its
  own (interleaved, not smooth) weighted round robin.
"""
from __future__ import annotations

import http.client
import json
import os
import subprocess

import numpy as np
import pytest

from conftest import Proc, free_port, infergate_cmd
from eas_env import eas_python
from gateway_helpers import endpoints, seed_services, start_gateway, worker_requests

TOKEN = "eas-compat-token"
SERVICE = "digits"

CLIENT_SCRIPT = r'''
import json, sys
from eas_prediction import (PredictClient, PredictException, StringRequest, TFRequest,
                            TorchRequest, ENDPOINT_TYPE_DIRECT)

cfg = json.load(open(sys.argv[1]))
clients = {}


def client_for(case):
    key = (case["endpoint"], case["service"], case.get("token", ""), case.get("mode", ""))
    if key not in clients:
        client = PredictClient(case["endpoint"], case["service"])
        if case.get("token"):
            client.set_token(case["token"])
        if case.get("mode") == "direct":
            client.set_endpoint_type(ENDPOINT_TYPE_DIRECT)
        client.set_timeout(10000)
        client.init()
        clients[key] = client
    return clients[key]


def run(case):
    client = client_for(case)
    kind, shape, x = case["kind"], case.get("shape"), case.get("x")
    if kind == "tf":
        req = TFRequest("predict_images")
        req.add_feed("images", shape, TFRequest.DT_FLOAT, x)
        req.add_fetch("scores")
        resp = client.predict(req)
        return {"shape": resp.get_tensor_shape("scores"), "values": list(resp.get_values("scores"))}
    if kind == "torch":
        req = TorchRequest(flag=case.get("flag", False))
        req.add_feed(0, shape, TorchRequest.DT_FLOAT, x)
        req.add_fetch(0)
        resp = client.predict(req)
        return {"shape": resp.get_tensor_shape(0), "values": list(resp.get_values(0))}
    if kind == "torch_map":
        req = TorchRequest(flag=case.get("flag", False))
        req.add_feed_map("images", shape, TorchRequest.DT_FLOAT, x)
        resp = client.predict(req)
        return {"shape": resp.get_tensor_shape_map("scores"),
                "values": list(resp.get_values_map("scores"))}
    if kind == "string":
        rows = [x[i * shape[1]:(i + 1) * shape[1]] for i in range(shape[0])]
        resp = client.predict(StringRequest(json.dumps({"inputs": {"images": rows}})))
        scores = json.loads(resp.response_data)["outputs"]["scores"]
        return {"shape": [len(scores), len(scores[0])], "values": [v for r in scores for v in r]}
    if kind == "raw":
        resp = client.predict(StringRequest(case["data"]))
        return {"body": bytes(resp.response_data).decode("utf-8", "replace")}
    raise ValueError(kind)


results = []
for case in cfg["cases"]:
    try:
        for _ in range(case.get("repeat", 1)):
            result = run(case)
        results.append(dict(ok=True, **result))
    except PredictException as exc:
        message = exc.message
        if isinstance(message, (bytes, bytearray)):
            message = bytes(message).decode("utf-8", "replace")
        results.append({"ok": False, "code": exc.code, "message": str(message)})
for client in clients.values():
    client.destroy()
json.dump(results, open(cfg["out"], "w"))
'''


def run_cases(tmp_path, cases: list[dict], tz: str = "UTC") -> list[dict]:
    """Run ``cases`` through the reference SDK; one result dict per case."""
    cfg = tmp_path / f"cases-{os.urandom(4).hex()}.json"
    out = cfg.with_suffix(".out.json")
    cfg.write_text(json.dumps({"cases": cases, "out": str(out)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TZ"] = tz
    proc = subprocess.run([eas_python(), "-c", CLIENT_SCRIPT, str(cfg)], capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, f"eas-prediction client failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def metric_total(url: str, name: str) -> int:
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{")))


@pytest.fixture(scope="module")
def eas_py():
    return eas_python()


@pytest.fixture(scope="module")
def digits():
    import onnxruntime as ort

    from gateway.models import DIGITS_MODEL, load_digits_split

    _, _, x_test, _ = load_digits_split()
    session = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])
    return (np.ascontiguousarray(x_test[:16], dtype=np.float32),
            lambda batch: session.run(["scores"], {"images": batch})[0])


class Fleet:
    """Workers of each processor and a gateway with a token in front of two TF workers."""

    def __init__(self, state_dir: str):
        self.started: list[Proc] = []
        self.tf_a = self.worker("tensorflow", "--token", TOKEN)
        self.tf_b = self.worker("tensorflow", "--token", TOKEN)
        self.torch = self.worker("pytorch")
        self.json = self.worker("json")
        seed_services(state_dir, [{"name": SERVICE, "token": TOKEN, "config": {
            "name": SERVICE, "token": TOKEN, "processor": "tensorflow",
            "endpoints": endpoints(self.tf_a, self.tf_b, weights=[300, 100])}}])
        fleet = self

        class Starter:
            def start(self, args, port, **kw):
                proc = Proc(args, port, **kw)
                fleet.started.append(proc)
                return proc

        # eas-prediction sends no token when it discovers (direct mode).
        self.gateway = start_gateway(Starter(), state_dir, "--open-discovery")

    def worker(self, processor: str, *extra) -> Proc:
        from gateway.models import DIGITS_MODEL

        port = free_port()
        proc = Proc(infergate_cmd("worker", "--service", SERVICE, "--model", str(DIGITS_MODEL),
                                  "--processor", processor, "--host", "127.0.0.1", "--port",
                                  str(port), *extra), port)
        self.started.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture(scope="module")
def fleet(eas_py, tmp_path_factory):
    f = Fleet(str(tmp_path_factory.mktemp("eas-state")))
    yield f
    f.stop()


def case(endpoint: str, kind: str, batch: np.ndarray, **kw) -> dict:
    return dict(endpoint=endpoint, service=SERVICE, kind=kind, shape=list(batch.shape),
                x=batch.ravel().tolist(), **kw)


def assert_scores(result: dict, want: np.ndarray):
    assert result["ok"], result
    assert result["shape"] == list(want.shape)
    np.testing.assert_allclose(np.array(result["values"], np.float32).reshape(want.shape), want,
                               rtol=1e-5, atol=1e-7)


def test_worker_direct_tf_torch_string(fleet, digits, tmp_path):
    """Issue 2's done-when: the reference SDK's numbers equal onnxruntime's."""
    x, expected = digits
    batches = [x[:1], x[1:4], x[4:11]]
    cases = []
    for b in batches:
        cases.append(case(fleet.tf_a.url, "tf", b, token=TOKEN))
        cases.append(case(fleet.torch.url, "torch", b))
        cases.append(case(fleet.torch.url, "torch_map", b))
        cases.append(case(fleet.torch.url, "torch", b, flag=True))
        cases.append(case(fleet.torch.url, "torch_map", b, flag=True))
        cases.append(case(fleet.json.url, "string", b))
    results = run_cases(tmp_path, cases)
    assert len(results) == len(cases)
    for i, result in enumerate(results):
        assert_scores(result, expected(batches[i // 6]))


def test_gateway_mode_with_token(fleet, digits, tmp_path):
    x, expected = digits
    gw = fleet.gateway.url
    results = run_cases(tmp_path, [
        case(gw, "tf", x[:2], token=TOKEN),
        case(gw, "tf", x[2:3], token=TOKEN, repeat=20),
        case(gw, "tf", x[:1], token="not-the-token"),
        case(gw, "tf", x[:1]),
    ])
    assert_scores(results[0], expected(x[:2]))
    assert_scores(results[1], expected(x[2:3]))
    for bad in results[2:]:
        assert not bad["ok"] and bad["code"] == 401, bad
        assert json.loads(bad["message"])["code"] == 401


def test_direct_mode_discovery_and_weights(fleet, digits, tmp_path):
    """ENDPOINT_TYPE_DIRECT: the reference SDK discovers the workers through the gateway and
    balances across them itself (the gateway forwards nothing); weights 3:1 hold."""
    x, expected = digits
    before_a, before_b = worker_requests(fleet.tf_a.url), worker_requests(fleet.tf_b.url)
    before_gw = metric_total(fleet.gateway.url, "infergate_requests_total")
    results = run_cases(tmp_path, [
        case(fleet.gateway.url, "tf", x[:3], token=TOKEN, mode="direct"),
        case(fleet.gateway.url, "tf", x[3:4], token=TOKEN, mode="direct", repeat=399),
    ])
    assert_scores(results[0], expected(x[:3]))
    assert_scores(results[1], expected(x[3:4]))
    a = worker_requests(fleet.tf_a.url) - before_a
    b = worker_requests(fleet.tf_b.url) - before_b
    assert a + b == 400
    assert abs(a / 400 - 0.75) <= 0.01, (a, b)
    assert metric_total(fleet.gateway.url, "infergate_requests_total") == before_gw


def test_signature_from_a_client_outside_utc(fleet, digits, tmp_path):
    x, expected = digits
    results = run_cases(tmp_path, [case(fleet.gateway.url, "tf", x[:1], token=TOKEN)],
                        tz="CST-8")
    assert_scores(results[0], expected(x[:1]))
