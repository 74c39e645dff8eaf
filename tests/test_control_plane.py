"""The control plane end to end: real gateways, real workers, the CLI as users run it.

The embedded-store tests share one gateway (module fixture) and build on each
other in file order: create -> scale -> blue-green -> rules -> delete ->
version -> crash -> stop/start -> gateway restart. Redis tests start their own.
"""
from __future__ import annotations

import asyncio
import http.client as httpclient
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import Proc, free_port, infergate_cmd

from gateway.codec.tensors import decode_array, encode_array
from gateway.models import DIGITS_MODEL
from gateway.protos import tf_predict_pb2

ADMIN = "admin-secret"


# ----------------------------------------------------------------------------- helpers
def http(url: str, method: str = "GET", path: str = "/", body: bytes | None = None,
         headers: dict | None = None, timeout: float = 10.0):
    host, port = url.split("//")[1].split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def admin(url: str, method: str, path: str, body=None, token: str = ADMIN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = json.dumps(body).encode() if body is not None else None
    status, payload = http(url, method, path, data, headers)
    return status, (json.loads(payload) if payload else None)


def cli(url: str, *args, timeout: float = 90.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, INFERGATE_GATEWAY=url, INFERGATE_ADMIN_TOKEN=ADMIN)
    return subprocess.run(infergate_cmd(*args), capture_output=True, text=True, env=env,
                          timeout=timeout)


def cli_ok(url: str, *args) -> str:
    res = cli(url, *args)
    assert res.returncode == 0, f"{args}: {res.stderr}"
    return res.stdout


def desc(url: str, name: str) -> dict:
    status, view = admin(url, "GET", f"/admin/services/{name}")
    assert status == 200, view
    return view


def wait_for(check, timeout: float = 20.0, interval: float = 0.1, what: str = ""):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or check}: last={last!r}")


def tf_body(x: np.ndarray) -> bytes:
    req = tf_predict_pb2.PredictRequest(signature_name="predict_images")
    encode_array(np.ascontiguousarray(x, dtype=np.float32), req.inputs["images"])
    return req.SerializeToString()


def predict(url: str, service: str, x: np.ndarray, token: str = "", headers=None):
    h = dict(headers or {})
    if token:
        h["Authorization"] = token
    status, body = http(url, "POST", f"/api/predict/{service}", tf_body(x), h)
    if status != 200:
        return status, body
    resp = tf_predict_pb2.PredictResponse.FromString(body)
    return status, decode_array(resp.outputs["scores"])


def worker_requests(port: int) -> int:
    try:
        status, text = http(f"http://127.0.0.1:{port}", "GET", "/metrics", timeout=5)
    except OSError:
        return 0
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith("infergate_worker_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def served(url: str, name: str) -> int:
    """Predict requests the instances of service `name` answered so far."""
    return sum(worker_requests(i["port"]) for i in desc(url, name)["instances"])


@pytest.fixture(scope="module")
def digits():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("sklearn")
    from gateway.models import load_digits_split

    _, _, x, y = load_digits_split()
    session = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])
    x = x[:32]
    expected = session.run(["scores"], {"images": x})[0].argmax(1)
    return x, expected


class Gateway:
    def __init__(self, *extra: str, port: int | None = None):
        self.port = port or free_port()
        self.extra = extra
        self.proc = None

    def start(self) -> "Gateway":
        self.proc = Proc(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(self.port),
                                       "--admin-token", ADMIN, "--health-interval", "0.5",
                                       *self.extra), self.port)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


# ----------------------------------------------------------------------------- embedded store
@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    g = Gateway("--state-dir", str(state)).start()
    g.state = state
    g.files = tmp_path_factory.mktemp("files")
    g.shared = {}
    yield g
    g.stop()


def test_admin_api_needs_the_admin_token(gw):
    status, body = admin(gw.url, "GET", "/admin/services", token="")
    assert status == 401 and body["code"] == 401
    status, _ = admin(gw.url, "GET", "/admin/services", token="wrong")
    assert status == 401
    # The raw token works as well as "Bearer <token>".
    status, _ = http(gw.url, "GET", "/admin/services", headers={"Authorization": ADMIN})
    assert status == 200


@pytest.mark.parametrize("config, field", [
    ({"model_path": str(DIGITS_MODEL)}, "name"),
    ({"name": "bad", "model_path": "/nonexistent/model.onnx"}, "model_path"),
    ({"name": "bad", "model_path": str(DIGITS_MODEL), "metadata": {"instance": "many"}},
     "metadata.instance"),
    ({"name": "bad", "model_path": str(DIGITS_MODEL), "metadata": {"rpc.keepalive": -1}},
     "metadata.rpc.keepalive"),
    ({"name": "bad", "model_path": str(DIGITS_MODEL), "processor": "tensorflux"}, "processor"),
    ({"name": "bad", "endpoints": [{"ip": "127.0.0.1"}]}, "endpoints[0].port"),
    ({"name": "bad", "generate_token": "maybe"}, "generate_token"),
    ({"name": "bad", "endpoints": [{"ip": "127.0.0.1", "port": 1}],
      "metadata": {"rate_limits": [{"key": "ip", "rate": 0}]}}, "metadata.rate_limits[0]"),
])
def test_bad_service_json_is_one_line_and_creates_nothing(gw, tmp_path, config, field):
    res = cli(gw.url, "create", write_json(tmp_path / "service.json", config))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], res.stderr
    assert json.loads(cli_ok(gw.url, "list", "--json")) == []


def test_unparsable_service_json(gw, tmp_path):
    bad = tmp_path / "service.json"
    bad.write_text('{"name": "x", ')
    res = cli(gw.url, "create", str(bad))
    assert res.returncode == 1 and "not valid JSON" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert json.loads(cli_ok(gw.url, "list", "--json")) == []


def test_create_runs_instances_and_serves_right_predictions(gw, digits):
    x, expected = digits
    spec = write_json(gw.files / "digits.json", {
        "name": "digits", "generate_token": "true", "model_path": str(DIGITS_MODEL),
        "processor": "tensorflow_cpu_1.15", "metadata": {"instance": 2, "rpc.keepalive": 5000}})
    out = cli_ok(gw.url, "create", spec)
    assert "/api/predict/digits" in out and "Token" in out
    view = desc(gw.url, "digits")
    assert view["status"] == "Running" and view["revision"] == 1
    assert view["running_instances"] == 2 and len(view["instances"]) == 2
    token = view["token"]
    assert token and token in out
    gw.shared["token"] = token
    gw.shared["first_instances"] = {i["id"] for i in view["instances"]}
    gw.shared["first_pids"] = {w["pid"] for w in view["workers"]}
    # Creating the same name again is refused and changes nothing.
    res = cli(gw.url, "create", spec)
    assert res.returncode == 1 and "already exists" in res.stderr
    # Predictions through the gateway match onnxruntime run directly.
    status, scores = predict(gw.url, "digits", x, token)
    assert status == 200, scores
    assert (scores.argmax(1) == expected).all()
    for i in range(4):  # one by one, over both instances
        status, scores = predict(gw.url, "digits", x[i:i + 1], token)
        assert status == 200 and scores.argmax(1)[0] == expected[i]
    status, _ = predict(gw.url, "digits", x[:1])
    assert status == 401
    # desc: human-readable table with the essentials.
    text = cli_ok(gw.url, "desc", "digits")
    for word in ("Running", "127.0.0.1:", "healthy", token, "CurrentVersion"):
        assert word in text


def test_scale_up_leaves_running_instances_alone(gw):
    out = cli_ok(gw.url, "modify", "digits", "-Dmetadata.instance=3")
    assert "version 1" in out  # scaling changes the running version, makes none
    view = desc(gw.url, "digits")
    assert view["status"] == "Running" and view["revision"] == 1
    assert view["latest_revision"] == 1 and view["running_instances"] == 3
    ids = {i["id"] for i in view["instances"]}
    assert gw.shared["first_instances"] < ids
    assert gw.shared["first_pids"] < {w["pid"] for w in view["workers"]}
    assert view["config"]["metadata"]["instance"] == 3


def test_blue_green_release_moves_traffic(gw, digits):
    x, expected = digits
    token = gw.shared["token"]
    spec = write_json(gw.files / "digits_v2.json", {
        "name": "digits", "model_path": str(DIGITS_MODEL), "metadata": {"instance": 1}})
    res = cli(gw.url, "create", spec, "-r", "--json")
    assert res.returncode == 0, res.stderr
    linked = json.loads(res.stdout)["name"]
    assert linked.startswith("digits_") and linked != "digits"
    gw.shared["linked"] = linked
    assert desc(gw.url, linked)["linked_to"] == "digits"
    # Before release the new service has its own endpoint; the original's traffic is untouched.
    status, scores = predict(gw.url, linked, x[:4])
    assert status == 200 and (scores.argmax(1) == expected[:4]).all()

    def split(n=20):
        before = (served(gw.url, "digits"), served(gw.url, linked))
        for i in range(n):
            status, scores = predict(gw.url, "digits", x[i % len(x):i % len(x) + 1], token)
            assert status == 200 and scores.argmax(1)[0] == expected[i % len(x)]
        return served(gw.url, "digits") - before[0], served(gw.url, linked) - before[1]

    cli_ok(gw.url, "release", linked, "-w", "50")
    assert desc(gw.url, "digits")["traffic"] == {"digits": 50, linked: 50}
    status, _ = predict(gw.url, linked, x[:1])
    assert status == 404  # its own endpoint is closed once released
    old, new = split()
    assert old + new == 20 and 5 <= new <= 15, (old, new)

    cli_ok(gw.url, "release", linked, "-w", "100")
    assert split() == (0, 20)
    cli_ok(gw.url, "release", linked, "-w", "0")
    assert split() == (20, 0)
    text = cli_ok(gw.url, "list")
    assert linked in text and "0% of digits" in text

    res = cli(gw.url, "release", "digits", "-w", "10")
    assert res.returncode == 1 and "not a linked service" in res.stderr
    res = cli(gw.url, "release", linked, "-w", "101")
    assert res.returncode == 1 and "0 to 100" in res.stderr


def test_traffic_shares_and_header_rules(gw, digits, tmp_path):
    x, expected = digits
    token, linked = gw.shared["token"], gw.shared["linked"]
    res = cli(gw.url, "traffic", "digits", "digits=50", f"{linked}=40")
    assert res.returncode == 1 and "sum to 100, got 90" in res.stderr
    res = cli(gw.url, "traffic", "digits", "digits=50", "ghost=50")
    assert res.returncode == 1 and "'ghost' is not a service" in res.stderr
    assert desc(gw.url, "digits")["traffic"] == {"digits": 100, linked: 0}

    bad = write_json(tmp_path / "bad.json", [{"condition": "#HEADER_version == ", "target": linked}])
    res = cli(gw.url, "rules", "digits", bad)
    assert res.returncode == 1 and "position 19" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    rules = write_json(tmp_path / "rules.json", [
        {"condition": "#HEADER_version == 'v2'", "target": linked,
         "header_name": "X-Canary", "header_value": "yes"}])
    cli_ok(gw.url, "rules", "digits", rules)
    assert desc(gw.url, "digits")["rules"][0]["target"] == linked

    before = served(gw.url, linked)
    for i in range(6):
        status, scores = predict(gw.url, "digits", x[i:i + 1], token, {"version": "v2"})
        assert status == 200 and scores.argmax(1)[0] == expected[i]
    for i in range(4):
        status, _ = predict(gw.url, "digits", x[i:i + 1], token, {"version": "v1"})
        assert status == 200
    assert served(gw.url, linked) - before == 6

    cli_ok(gw.url, "traffic", "digits", "digits=30", f"{linked}=70")
    assert desc(gw.url, "digits")["traffic"] == {"digits": 30, linked: 70}


def test_deleting_the_linked_service_gives_traffic_back(gw, digits):
    x, _ = digits
    token, linked = gw.shared["token"], gw.shared["linked"]
    out = cli_ok(gw.url, "delete", linked)
    assert "deleted" in out
    view = desc(gw.url, "digits")
    assert view["traffic"] == {"digits": 100} and view["linked_services"] == []
    assert view["rules"] == []  # rules aiming at the deleted service go with it
    assert [v["name"] for v in json.loads(cli_ok(gw.url, "list", "--json"))] == ["digits"]
    for i in range(5):
        status, _ = predict(gw.url, "digits", x[i:i + 1], token)
        assert status == 200


def test_version_switches_back_and_scales_down(gw):
    cli_ok(gw.url, "modify", "digits", "-Dprocessor=tensorflow")  # a processor change: v2
    view = desc(gw.url, "digits")
    assert view["revision"] == 2 and view["latest_revision"] == 2
    cli_ok(gw.url, "version", "digits", "1")
    view = wait_for(lambda: (lambda v: v["status"] == "Running" and len(v["instances"]) == 3
                             and v)(desc(gw.url, "digits")), 30, what="version 1 running")
    assert view["revision"] == 1 and view["latest_revision"] == 2
    assert view["config"]["processor"] == "tensorflow_cpu_1.15"
    before = {w["pid"] for w in view["workers"]}
    cli_ok(gw.url, "modify", "digits", "-Dmetadata.instance=2")
    view = desc(gw.url, "digits")
    assert view["status"] == "Running" and len(view["instances"]) == 2
    assert {w["pid"] for w in view["workers"]} < before  # scale-down only stops the extra one
    res = cli(gw.url, "version", "digits", "7")
    assert res.returncode == 1 and "no version 7" in res.stderr


def test_config_change_replaces_workers_once_the_new_ones_are_up(gw, digits):
    x, expected = digits
    before = {w["pid"] for w in desc(gw.url, "digits")["workers"]}
    cli_ok(gw.url, "modify", "digits", "-Dmetadata.rpc.keepalive=4000")
    view = desc(gw.url, "digits")
    assert view["status"] == "Running" and view["revision"] == 1 and view["latest_revision"] == 2
    assert view["config"]["metadata"]["rpc.keepalive"] == 4000

    def replaced():
        v = desc(gw.url, "digits")
        pids = {w["pid"] for w in v.get("workers", [])}
        return len(pids) == 2 and not pids & before and len(v["instances"]) == 2
    wait_for(replaced, 20, what="the old workers to be retired")
    for i in range(4):
        status, scores = predict(gw.url, "digits", x[i:i + 1], gw.shared["token"])
        assert status == 200 and scores.argmax(1)[0] == expected[i]


def test_crashed_worker_is_restarted(gw, digits):
    x, _ = digits
    view = desc(gw.url, "digits")
    victim = view["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced():
        v = desc(gw.url, "digits")
        ports = {i["port"] for i in v["instances"]}
        return (v["status"] == "Running" and len(ports) == 2 and victim["port"] not in ports
                and v["running_instances"] == 2 and v)
    view = wait_for(replaced, 20, what="a replacement worker")
    assert view["restarts"] >= 1
    for i in range(4):
        status, _ = predict(gw.url, "digits", x[i:i + 1], gw.shared["token"])
        assert status == 200


def test_worker_that_cannot_start_marks_the_service_failed(gw):
    broken = gw.files / "broken.onnx"
    broken.write_bytes(b"this is not an onnx model")
    spec = write_json(gw.files / "broken.json", {"name": "broken", "model_path": str(broken),
                                                 "metadata": {"instance": 1}})
    res = cli(gw.url, "create", spec, "--timeout", "60")
    assert res.returncode == 1 and "failed" in res.stderr
    view = desc(gw.url, "broken")
    assert view["status"] == "Failed"
    assert "exited with code" in view["message"] and len(view["message"]) > 30
    assert view.get("workers", []) == []
    cli_ok(gw.url, "delete", "broken")


def test_worker_joins_embedded_gateway_over_http_and_leaves_on_lapse(gw, procs):
    cli_ok(gw.url, "create", write_json(gw.files / "bare.json", {"name": "bare"}))
    assert desc(gw.url, "bare")["status"] == "Running"
    # Without the admin token the gateway refuses the registration.
    from gateway.control.registration_client import (RegistrationError,
                                                     open_registration_client)
    rogue = {"service": "bare", "ip": "127.0.0.1", "port": 9}
    with pytest.raises(RegistrationError, match="401"):
        asyncio.run(open_registration_client(gw.url, token="").register(rogue, 3))
    assert admin(gw.url, "GET", "/admin/instances/bare")[1] == []
    # The token may ride in the registry URL.
    port = free_port()
    worker = procs.start(infergate_cmd(
        "worker", "--service", "bare", "--model", str(DIGITS_MODEL), "--host", "127.0.0.1",
        "--port", str(port), "--registry", f"http://{ADMIN}@127.0.0.1:{gw.port}"), port)

    def listed():
        status, body = http(gw.url, "GET", "/api/v1/servicediscovery/upstreams/bare")
        return status == 200 and [e["port"] for e in json.loads(body)["endpoints"]["items"]]
    assert wait_for(listed, 10, what="the worker in discovery") == [port]
    worker.kill(signal.SIGKILL)
    worker.proc.wait()
    wait_for(lambda: listed() == [], 15, what="the killed worker to leave discovery")
    # Its registration itself goes when the lease lapses (no heartbeat for the TTL).
    wait_for(lambda: admin(gw.url, "GET", "/admin/instances/bare")[1] == [], 15,
             what="the lease to lapse")
    cli_ok(gw.url, "delete", "bare")


def test_worker_joined_without_a_token_checks_its_services_token(gw, procs):
    """Clients that reach a joined worker directly (the SDK's direct mode) are checked
    against the service's token, and a changed token is followed."""
    cli_ok(gw.url, "create", write_json(gw.files / "locked.json",
                                        {"name": "locked", "token": "join-secret"}))
    port = free_port()
    procs.start(infergate_cmd(
        "worker", "--service", "locked", "--model", str(DIGITS_MODEL), "--host", "127.0.0.1",
        "--port", str(port), "--registry", f"http://{ADMIN}@127.0.0.1:{gw.port}"), port)
    worker = f"http://127.0.0.1:{port}"
    request = tf_predict_pb2.PredictRequest()
    encode_array(np.zeros((1, 784), np.float32), request.inputs["images"])
    body = request.SerializeToString()

    def status(token=None):
        return http(worker, "POST", "/api/predict/locked", body,
                    {"Authorization": token} if token else {})[0]
    wait_for(lambda: status() == 401, 10, what="the worker to take the service's token")
    assert status("join-secret") == 200 and status("wrong") == 401
    admin(gw.url, "POST", "/admin/services/locked/modify", {"set": {"token": "rotated"}})
    wait_for(lambda: status("rotated") == 200, 10, what="the worker to follow the new token")
    assert status("join-secret") == 401
    cli_ok(gw.url, "delete", "locked")


CRASHY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "crashy_processor.py")


def test_worker_that_crashes_soon_after_start_ends_failed(gw):
    """A worker that passes /health and dies 1.5 s later: restarted with growing backoff,
    shown as Restarting, and Failed after MAX_FAILURES (3) such crashes -- not restarted
    forever while the service says Running."""
    from gateway.control.launcher import MAX_CRASH_LOGS, MAX_FAILURES

    spec = write_json(gw.files / "crashy.json", {
        "name": "crashy", "processor": "python", "processor_entry": CRASHY,
        "metadata": {"instance": 1}})
    cli_ok(gw.url, "create", spec, "--no-wait")
    seen = []

    def failed():
        v = desc(gw.url, "crashy")
        if not seen or seen[-1] != v["status"]:
            seen.append(v["status"])
        return v["status"] == "Failed" and v
    view = wait_for(failed, 60, interval=0.1, what="the crash-looping service to fail")
    assert "Running" in seen and "Restarting" in seen, seen
    assert view["restarts"] == MAX_FAILURES
    assert "exited with code 3" in view["message"] and "giving up now" in view["message"]
    logs = view["crash_logs"]
    assert 1 <= len(logs) <= MAX_CRASH_LOGS and all(os.path.exists(p) for p in logs)
    assert "giving up now" in open(logs[-1]).read()
    # It stays Failed: no more workers are started.
    time.sleep(2)
    view = desc(gw.url, "crashy")
    assert view["status"] == "Failed" and view["restarts"] == MAX_FAILURES
    assert not view.get("workers")
    cli_ok(gw.url, "delete", "crashy")
    wait_for(lambda: not any(os.path.exists(p) for p in logs), 10,
             what="the crash logs of the deleted service to go")


def test_workers_of_a_deleted_service_do_not_bring_it_back(gw, procs):
    from gateway.control.registration_client import ServiceGone, open_registration_client

    # Registering for a service that does not exist: 404 with a clear message.
    status, body = admin(gw.url, "POST", "/admin/instances/nosuch",
                         {"instance": {"ip": "127.0.0.1", "port": 9}, "ttl": 3})
    assert status == 404 and "'nosuch' does not exist" in body["message"]
    with pytest.raises(ServiceGone):
        asyncio.run(open_registration_client(gw.url, token=ADMIN).register(
            {"service": "nosuch", "ip": "127.0.0.1", "port": 9}, 3))
    cli_ok(gw.url, "create", write_json(gw.files / "ephemeral.json", {"name": "ephemeral"}))
    # "healthy" must be a JSON boolean, not a string that bool() would call true.
    status, body = admin(gw.url, "POST", "/admin/instances/ephemeral",
                         {"instance": {"ip": "127.0.0.1", "port": 9, "healthy": "no"}, "ttl": 3})
    assert status == 400 and "instance.healthy" in body["message"]
    assert admin(gw.url, "GET", "/admin/instances/ephemeral")[1] == []

    port = free_port()
    worker = procs.start(infergate_cmd(
        "worker", "--service", "ephemeral", "--model", str(DIGITS_MODEL), "--host", "127.0.0.1",
        "--port", str(port)), port,
        env={"INFERGATE_REGISTRY": f"http://127.0.0.1:{gw.port}", "INFERGATE_ADMIN_TOKEN": ADMIN})
    wait_for(lambda: [i["port"] for i in admin(gw.url, "GET",
                                                "/admin/instances/ephemeral")[1]] == [port],
             10, what="the worker to register (registry from INFERGATE_REGISTRY)")
    cli_ok(gw.url, "delete", "ephemeral")
    # Its heartbeat now fails; re-registering is refused, and it stops trying.
    wait_for(lambda: "not registering" in worker.output(), 15,
             what="the worker to notice its service is gone")
    time.sleep(2.5)   # > 2 heartbeats: nothing comes back
    status, _ = admin(gw.url, "GET", "/admin/services/ephemeral")
    assert status == 404
    assert admin(gw.url, "GET", "/admin/instances/ephemeral")[1] == []
    assert worker.output().count("not registering") == 1
    # It still serves clients that reach it directly.
    assert http(worker.url, "GET", "/health")[0] == 200


def test_stop_and_start(gw, digits):
    x, _ = digits
    token = gw.shared["token"]
    cli_ok(gw.url, "stop", "digits")
    view = desc(gw.url, "digits")
    assert view["status"] == "Stopped"
    status, body = predict(gw.url, "digits", x[:1], token)
    assert status == 503, body
    wait_for(lambda: not desc(gw.url, "digits").get("workers"), 15, what="workers to stop")
    cli_ok(gw.url, "start", "digits")
    assert desc(gw.url, "digits")["status"] == "Running"
    status, _ = wait_for(lambda: (lambda r: r[0] == 200 and r)(predict(gw.url, "digits", x[:1],
                                                                       token)), 10)
    assert status == 200


def test_embedded_state_survives_a_gateway_restart(gw, digits):
    x, expected = digits
    token = gw.shared["token"]
    cli_ok(gw.url, "start", "digits")  # a no-op unless an earlier test left it stopped
    ports = [i["port"] for i in desc(gw.url, "digits")["instances"]]
    gw.stop()
    for port in ports:  # the gateway took its workers with it
        with pytest.raises(OSError):
            http(f"http://127.0.0.1:{port}", "GET", "/health", timeout=1)
    gw.start()
    view = desc(gw.url, "digits")
    assert view["token"] == token and view["revision"] == 1 and view["latest_revision"] == 2
    view = wait_for(lambda: (lambda v: v["status"] == "Running" and v["running_instances"] == 2
                             and v)(desc(gw.url, "digits")), 30, what="Running after restart")

    def answered():
        status, scores = predict(gw.url, "digits", x, token)
        return status == 200 and [scores]
    [scores] = wait_for(answered, 10)
    assert (scores.argmax(1) == expected).all()


def test_killing_the_gateway_kills_its_workers(tmp_path, digits):
    g = Gateway("--state-dir", str(tmp_path / "state")).start()
    try:
        cli_ok(g.url, "create", write_json(tmp_path / "s.json", {
            "name": "orphan", "model_path": str(DIGITS_MODEL), "metadata": {"instance": 1}}))
        pids = [w["pid"] for w in desc(g.url, "orphan")["workers"]]
        g.proc.kill(signal.SIGKILL)
        g.proc.proc.wait()

        def gone():
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    return False
                except ProcessLookupError:
                    pass
            return True
        wait_for(gone, 15, what="workers to die with their gateway")
    finally:
        g.stop()


# ----------------------------------------------------------------------------- Redis: many gateways
def test_two_gateways_share_services_through_redis(redis_server, tmp_path, procs, digits):
    x, expected = digits
    g1 = Gateway("--registry", redis_server.url).start()
    g2 = Gateway("--registry", redis_server.url).start()
    try:
        cli_ok(g1.url, "create", write_json(tmp_path / "s.json", {
            "name": "shared", "model_path": str(DIGITS_MODEL), "generate_token": "true",
            "metadata": {"instance": 1}}))
        token = desc(g1.url, "shared")["token"]
        # Served by the other gateway, which runs no workers of its own for it.
        view = desc(g2.url, "shared")
        assert view["token"] == token and view["owner"] != admin(g2.url, "GET", "/admin/info")[1][
            "gateway"]
        assert "workers" not in view and len(view["instances"]) == 1
        status, scores = wait_for(lambda: (lambda r: r[0] == 200 and r)(
            predict(g2.url, "shared", x, token)), 5)
        assert (scores.argmax(1) == expected).all()

        res = cli(g1.url, "create", write_json(tmp_path / "s2.json", {
            "name": "shared", "model_path": str(DIGITS_MODEL), "metadata": {"instance": 1}}),
            "-r", "--json")
        assert res.returncode == 0, res.stderr
        linked = json.loads(res.stdout)["name"]
        wait_for(lambda: desc(g2.url, linked)["running_instances"] == 1, 10)
        linked_port = desc(g2.url, linked)["instances"][0]["port"]

        cli_ok(g1.url, "release", linked, "-w", "100")
        released = time.monotonic()

        def all_to_linked():
            before = worker_requests(linked_port)
            for i in range(4):
                status, _ = predict(g2.url, "shared", x[i:i + 1], token)
                assert status == 200
            return worker_requests(linked_port) - before == 4
        # Redis pub/sub carries the change; no timing assertion (shared CI machines), but
        # the bound is generous and the delay is printed (-s) for whoever looks.
        wait_for(all_to_linked, 10, interval=0.02, what="the other gateway to honour release")
        print(f"release honoured by the other gateway after {time.monotonic() - released:.3f}s")

        # A worker that dies without deregistering leaves discovery once its lease lapses.
        cli_ok(g2.url, "create", write_json(tmp_path / "bare.json", {"name": "bare"}))
        port = free_port()
        worker = procs.start(infergate_cmd(
            "worker", "--service", "bare", "--model", str(DIGITS_MODEL), "--host", "127.0.0.1",
            "--port", str(port), "--registry", redis_server.url), port)

        def listed():
            status, body = http(g1.url, "GET", "/api/v1/servicediscovery/upstreams/bare")
            return status == 200 and [e["port"] for e in json.loads(body)["endpoints"]["items"]]
        assert wait_for(listed, 10, what="the worker in discovery") == [port]
        worker.kill(signal.SIGKILL)
        worker.proc.wait()
        wait_for(lambda: listed() == [], 15, what="the killed worker to leave discovery")
        wait_for(lambda: admin(g2.url, "GET", "/admin/instances/bare")[1] == [], 15,
                 what="the lease to lapse")
    finally:
        g2.stop()
        g1.stop()


# ----------------------------------------------------------------------------- operations, no processes
def run(coro):
    return asyncio.run(coro)


def with_ops(tmp_path, body):
    from gateway.control.services import ServiceOps
    from gateway.registry import open_store

    async def go():
        store = open_store(str(tmp_path / "ops-state"))
        await store.start()
        try:
            return await body(ServiceOps(store, "test-gw:1"), store)
        finally:
            await store.close()
    return run(go())


STATIC = {"endpoints": [{"ip": "127.0.0.1", "port": 9, "weight": 100}]}


def test_ops_release_and_delete_either_side(tmp_path):
    from gateway.control.services import ServiceError

    async def body(ops, store):
        await ops.create({"name": "m", **STATIC})
        new = await ops.create({"name": "m", **STATIC}, linked=True)
        again = await ops.create({"name": new.name, **STATIC}, linked=True)
        assert again.linked_to == "m"  # linking to a linked service links to the original
        await ops.release(new.name, 20)
        assert (await ops.get("m")).traffic == {"m": 80, new.name: 20}
        await ops.release(again.name, 50)
        assert (await ops.get("m")).traffic == {"m": 40, new.name: 10, again.name: 50}
        await ops.delete(again.name)
        assert (await ops.get("m")).traffic == {"m": 80, new.name: 20}
        # Deleting the original keeps its endpoint, forwarding everything to the new one.
        result = await ops.delete("m")
        assert result["kept_entry"] and result["traffic_to"] == [new.name]
        entry = await ops.get("m")
        assert entry.config["entry_only"] and entry.traffic == {new.name: 100}
        with pytest.raises(ServiceError):
            await ops.modify("m", sets={"metadata.instance": 2})
        # ... and when the last linked service goes, so does the entry.
        await ops.delete(new.name)
        assert await store.get_service("m") is None
        assert await ops.list() == []

    with_ops(tmp_path, body)


def test_ops_modify_versions_and_validation(tmp_path):
    from gateway.control.services import ServiceError

    async def body(ops, store):
        rec = await ops.create({"name": "s", "token": "tok", **STATIC,
                                "metadata": {"rpc": {"keepalive": 100}}})
        assert rec.token == "tok" and "token" not in rec.config
        assert rec.config["metadata"]["rpc.keepalive"] == 100
        rec = await ops.modify("s", sets={"metadata.rpc.keepalive": 200, "metadata.cpu": 2})
        assert rec.revision == 1 and rec.config["metadata"]["rpc.keepalive"] == 200
        rec = await ops.modify("s", sets={"model_config": "{\"threshold\": 0.5}"})
        assert rec.revision == 2  # the model's configuration makes a version
        rec = await ops.modify("s", patch={"metadata": {"rpc": {"keepalive": 300}}})
        assert rec.revision == 2 and rec.config["metadata"]["rpc.keepalive"] == 300
        same = await ops.modify("s", sets={"metadata.cpu": 2})
        assert same.revision == 2  # nothing changed
        with pytest.raises(ServiceError) as err:
            await ops.modify("s", sets={"metadata.rpc.keepalive": "soon"})
        assert err.value.status == 400 and "metadata.rpc.keepalive" in err.value.message
        with pytest.raises(ServiceError) as err:
            await ops.modify("s", patch={"name": "t"})
        assert "name cannot be changed" in err.value.message
        assert (await ops.get("s")).revision == 2
        rec = await ops.version("s", 1)
        assert rec.revision == 1 and "model_config" not in rec.config
        assert rec.config["metadata"]["rpc.keepalive"] == 300  # metadata is not a version's
        assert rec.config["metadata"]["owner"] == "test-gw:1"
        rec = await ops.modify("s", sets={"model_config": "{}"})
        assert rec.revision == 3  # new versions go after the latest, not the current
        with pytest.raises(ServiceError) as err:
            await ops.set_rules("s", [{"condition": "#HEADER_a matches", "target": "s"}])
        assert "position" in err.value.message
        with pytest.raises(ServiceError) as err:
            await ops.set_rules("s", [{"condition": "#HEADER_a == 'x'", "target": "nope"}])
        assert "'nope' is not a service" in err.value.message
        with pytest.raises(ServiceError) as err:
            await ops.set_traffic("s", {"s": 60, "t": "40"})
        assert "'t' is not a service" in err.value.message
        assert (await ops.set_traffic("s", {"s": 100})).traffic == {}

    with_ops(tmp_path, body)


# ----------------------------------------------------------------------------- two writers, one store
@pytest.fixture(params=["sqlite", "redis"])
def shared_backend(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "shared-state")
    return request.getfixturevalue("redis_server").url


def with_two_ops(backend, body):
    """Two ServiceOps on two store objects sharing one backend: two gateways, or two
    processes of one (--processes), as far as the store can tell."""
    from gateway.control.services import ServiceOps
    from gateway.registry import open_store

    async def go():
        a, b = open_store(backend), open_store(backend)
        await a.start()
        await b.start()
        try:
            return await body(ServiceOps(a, "gw-a:1"), ServiceOps(b, "gw-b:1"), a, b)
        finally:
            await a.close()
            await b.close()
    return run(go())


def interleave(store, before_write):
    """Make the next put/delete of ``store`` first run ``before_write()`` to the end:
    another writer gets in between this one's read and its write."""
    armed = {"put_service": True, "delete_service": True}

    def wrap(method):
        original = getattr(store, method)

        async def wrapped(*args, **kwargs):
            if armed["put_service"] and armed["delete_service"]:
                armed[method] = False
                await before_write()
            return await original(*args, **kwargs)
        setattr(store, method, wrapped)

    wrap("put_service")
    wrap("delete_service")


def test_concurrent_admin_change_and_status_update_both_stick(shared_backend):
    async def body(ops_a, ops_b, a, b):
        await ops_a.create({"name": "s", **STATIC})
        # The launcher (a) reads, the user's modify through the other gateway (b)
        # lands, then the launcher writes its status: the modify must survive.
        interleave(a, lambda: ops_b.modify("s", sets={"metadata.cpu": 4, "token": "t2"}))
        await ops_a.set_status("s", "Running", "all good")
        rec = await b.get_service("s")
        assert rec.config["metadata"]["cpu"] == 4 and rec.token == "t2" and rec.revision == 1
        assert rec.message == "all good"          # the status write only touched status
        # The other way round: a user's change computed from a stale read retries.
        interleave(a, lambda: ops_b.set_rules("s", [{"condition": "#HEADER_a == 'x'",
                                                     "target": "s"}]))
        rec = await ops_a.modify("s", sets={"metadata.memory": 1000})
        assert rec.rules and rec.config["metadata"]["cpu"] == 4
        rec = await b.get_service("s")
        assert rec.config["metadata"]["memory"] == 1000 and len(rec.rules) == 1
        assert rec.token == "t2" and rec.revision == 1

    with_two_ops(shared_backend, body)


def test_status_update_does_not_bring_a_deleted_service_back(shared_backend):
    async def body(ops_a, ops_b, a, b):
        await ops_a.create({"name": "gone", "token": "secret", **STATIC})
        interleave(a, lambda: ops_b.delete("gone"))
        assert await ops_a.set_status("gone", "Running", "started") is None
        assert await a.get_service("gone") is None and await b.get_service("gone") is None
        # Nor does a claim, nor a create racing a create (one wins, the other is 409).
        from gateway.control.services import ServiceError
        assert await ops_a.claim("gone") is None
        await ops_a.create({"name": "twice", **STATIC})
        with pytest.raises(ServiceError) as err:
            await ops_b.create({"name": "twice", **STATIC})
        assert err.value.status == 409

    with_two_ops(shared_backend, body)


def test_deleting_a_blue_green_original_leaves_no_share_or_rule_on_it(tmp_path):
    from gateway.control.services import ServiceError

    async def body(ops, store):
        await ops.create({"name": "m", **STATIC})
        new = await ops.create({"name": "m", **STATIC}, linked=True)
        await ops.release(new.name, 30)
        await ops.create({"name": "x", **STATIC})
        await ops.set_traffic("x", {"x": 50, "m": 50})
        await ops.set_rules("x", [{"condition": "#HEADER_v == 'm'", "target": "m"},
                                  {"condition": "#HEADER_v == 'x'", "target": "x"}])
        await ops.set_rules("m", [{"condition": "#HEADER_v == 'self'", "target": "m"},
                                  {"condition": "#HEADER_v == 'new'", "target": new.name}])
        result = await ops.delete("m")
        assert result["kept_entry"] and result["traffic_to"] == [new.name]
        entry = await ops.get("m")
        assert entry.traffic == {new.name: 100}
        assert [r["target"] for r in entry.rules] == [new.name]
        x = await ops.get("x")
        assert x.traffic == {} and [r["target"] for r in x.rules] == ["x"]
        # Every share and rule target left has instances of its own (not an entry).
        for rec in await ops.list():
            for target in list(rec.traffic) + [r["target"] for r in rec.rules]:
                assert not (await ops.get(target)).config.get("entry_only"), (rec.name, target)
        # ... and none can be pointed at the entry again.
        with pytest.raises(ServiceError, match="was deleted"):
            await ops.set_traffic("x", {"x": 50, "m": 50})
        with pytest.raises(ServiceError, match="was deleted"):
            await ops.set_rules("x", [{"condition": "#HEADER_v == 'm'", "target": "m"}])

    with_ops(tmp_path, body)


def test_model_spec_is_computed_once_per_record_version(tmp_path, monkeypatch):
    from gateway.control import services

    calls = []
    real = services.model_spec
    monkeypatch.setattr(services, "model_spec", lambda config: calls.append(1) or real(config))

    async def body(ops, store):
        await ops.create({"name": "m", "model_path": str(DIGITS_MODEL)})
        assert len(calls) == 1                      # check_config at create
        rec = await store.get_service("m")
        for _ in range(5):
            assert services.cached_model_spec(rec).model == str(DIGITS_MODEL)
        assert len(calls) == 2
        rec = await ops.modify("m", sets={"metadata.cpu": 2})
        calls.clear()
        services.cached_model_spec(await store.get_service("m"))
        services.cached_model_spec(await store.get_service("m"))
        assert len(calls) == 1                      # a new version: computed again, once

    with_ops(tmp_path, body)


# ----------------------------------------------------------------------------- secrets, files, IPv6
@pytest.fixture
def redis_with_password(tmp_path):
    import shutil
    import socket

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    password = "s3cret-pw-" + os.urandom(4).hex()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path),
                             "--requirepass", password],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                reply = b""
                while b"PONG" not in reply and len(reply) < 256:
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    reply += chunk
                if b"+PONG" in reply:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    yield f"redis://:{password}@127.0.0.1:{port}/0", password
    proc.terminate()
    proc.wait(5)


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)


def test_redis_password_stays_off_command_lines(redis_with_password, tmp_path, procs):
    url, password = redis_with_password
    port = free_port()
    # The gateway takes the URL from INFERGATE_REGISTRY too, so it is on no command line.
    g = procs.start(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(port),
                                  "--admin-token", ADMIN), port,
                    env={"INFERGATE_REGISTRY": url, "INFERGATE_LOG_DIR": str(tmp_path / "logs")})
    gw_url = f"http://127.0.0.1:{port}"
    cli_ok(gw_url, "create", write_json(tmp_path / "s.json", {
        "name": "pw", "model_path": str(DIGITS_MODEL), "metadata": {"instance": 1}}))
    view = desc(gw_url, "pw")
    assert view["status"] == "Running" and len(view["instances"]) == 1
    pid = view["workers"][0]["pid"]
    assert password not in _cmdline(pid) and "--registry" not in _cmdline(pid)
    assert _environ(pid)["INFERGATE_REGISTRY"] == url
    assert password not in _cmdline(g.proc.pid)

    # A worker started by hand for a service that does not exist registers nothing.
    wport = free_port()
    ghost = procs.start(infergate_cmd("worker", "--service", "ghost", "--model",
                                      str(DIGITS_MODEL), "--host", "127.0.0.1",
                                      "--port", str(wport)), wport,
                        env={"INFERGATE_REGISTRY": url})
    wait_for(lambda: "not registering" in ghost.output(), 10, what="the ghost worker to give up")
    assert admin(gw_url, "GET", "/admin/instances/ghost")[1] == []
    status, _ = admin(gw_url, "GET", "/admin/services/ghost")
    assert status == 404


def test_launcher_files_are_private_and_not_followed(tmp_path, monkeypatch):
    import stat as stat_

    from gateway.control.launcher import (Launcher, default_lock_path, ensure_private_dir,
                                          private_dir)

    # Embedded store: the lock lives in the state directory, not in /tmp.
    state = tmp_path / "state"
    lock = default_lock_path("host:8080", str(state))
    assert os.path.dirname(lock) == str(state)
    # Redis: a per-user 0700 directory; a symlink planted at its place is refused.
    runtime = tmp_path / "run"
    runtime.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, runtime / "infergate")
    with pytest.raises(OSError, match="symlink"):
        ensure_private_dir(str(runtime / "infergate"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "statehome"))
    chosen = private_dir("runtime")
    assert chosen == str(tmp_path / "statehome" / "infergate")    # skipped the symlink
    assert stat_.S_IMODE(os.stat(chosen).st_mode) == 0o700
    lock = default_lock_path("host:8080", "redis://127.0.0.1:6379/0")
    assert os.path.dirname(lock) == chosen
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    ensure_private_dir(str(loose))
    assert stat_.S_IMODE(os.stat(loose).st_mode) == 0o700
    # A lock file that is a symlink is not followed (nor truncated): no leadership.
    target = tmp_path / "victim"
    target.write_text("precious")
    os.symlink(target, tmp_path / "evil.lock")
    launcher = Launcher(None, None, "me", "http://127.0.0.1:1", "127.0.0.1",
                        str(tmp_path / "logs"), lock_path=str(tmp_path / "evil.lock"))
    assert launcher._try_lock() is False
    assert target.read_text() == "precious"
    # Crash logs: only the newest MAX_CRASH_LOGS of a service are kept.
    from gateway.control.launcher import MAX_CRASH_LOGS
    paths = []
    for i in range(MAX_CRASH_LOGS + 3):
        p = tmp_path / f"svc-{1000 + i}.log"
        p.write_text("crash")
        paths.append(str(p))
        launcher._keep_crash_log("svc", str(p))
    assert [os.path.exists(p) for p in paths] == [False] * 3 + [True] * MAX_CRASH_LOGS


def test_ipv6_urls_and_gateway_id():
    from gateway.control import gateway_id, http_url, normalize_url, split_url

    assert split_url("http://:::8080") == ("http", "::", 8080, "")
    assert split_url("http://[::]:8080") == ("http", "::", 8080, "")
    assert split_url("http://::1:9000/x") == ("http", "::1", 9000, "/x")
    assert split_url("http://fe80::1") == ("http", "fe80::1", 80, "")
    assert split_url("http://tok@127.0.0.1:5") == ("http", "127.0.0.1", 5, "")
    assert split_url("gw.example") == ("http", "gw.example", 80, "")
    assert normalize_url("http://:::8080") == "http://[::]:8080"
    assert normalize_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert http_url("::1", 8080) == "http://[::1]:8080"
    assert http_url("[::1]", 8080) == "http://[::1]:8080"
    assert gateway_id("http://:::8080").endswith(":8080")
    assert gateway_id("http://[::]:8080") == gateway_id("http://0.0.0.0:8080")


def _ipv6_loopback() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_gateway_on_ipv6_wildcard_runs_workers(tmp_path, digits):
    """--host :: (the gateway listens on IPv6 only): it starts, and its launched
    workers register through http://[::1]:PORT."""
    from conftest import wait_http_ok

    x, expected = digits
    port = free_port()
    log = open(tmp_path / "gw.log", "wb")
    proc = subprocess.Popen(infergate_cmd("gateway", "--host", "::", "--port", str(port),
                                          "--state-dir", str(tmp_path / "state"),
                                          "--admin-token", ADMIN),
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://[::1]:{port}"
    try:
        wait_http_ok(url + "/health", proc=proc)
        env = dict(os.environ, INFERGATE_ADMIN_TOKEN=ADMIN)
        res = subprocess.run(infergate_cmd("create", write_json(tmp_path / "s.json", {
            "name": "six", "model_path": str(DIGITS_MODEL), "metadata": {"instance": 1}}),
            "--gateway", url, "--json"), capture_output=True, text=True, env=env, timeout=90)
        assert res.returncode == 0, res.stderr + (tmp_path / "gw.log").read_text()
        view = json.loads(res.stdout)
        assert view["status"] == "Running" and len(view["instances"]) == 1
        res = subprocess.run(infergate_cmd("list", "--gateway", url, "--json"),
                             capture_output=True, text=True, env=env, timeout=30)
        assert res.returncode == 0 and json.loads(res.stdout)[0]["name"] == "six"
        import urllib.request
        req = urllib.request.Request(url + "/admin/info",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=5) as resp:
            info = json.loads(resp.read())
        # With the embedded store the state dir is the gateway's identity (any port).
        assert info["public_url"] == f"http://[::]:{port}" and info["gateway"].endswith(
            ":" + str(tmp_path / "state"))
        conn = httpclient.HTTPConnection("::1", port, timeout=10)
        conn.request("POST", "/api/predict/six", body=tf_body(x[:4]))
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200, body
        scores = decode_array(tf_predict_pb2.PredictResponse.FromString(body).outputs["scores"])
        assert (scores.argmax(1) == expected[:4]).all()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_embedded_services_follow_their_state_dir_to_another_port(tmp_path, digits):
    """A gateway restarted on another port with the same state dir runs its services."""
    x, expected = digits
    state = str(tmp_path / "state")
    first = Gateway("--state-dir", state).start()
    try:
        cli_ok(first.url, "create", write_json(tmp_path / "s.json", {
            "name": "moving", "model_path": str(DIGITS_MODEL), "metadata": {"instance": 1}}))
    finally:
        first.stop()
    second = Gateway("--state-dir", state).start()  # a new free port
    try:
        assert first.url != second.url
        view = wait_for(lambda: (v := desc(second.url, "moving"))["status"] == "Running"
                        and v["running_instances"] == 1 and v, what="Running again")
        assert view["status"] == "Running"
        status, scores = predict(second.url, "moving", x[:3])
        assert status == 200 and list(scores.argmax(1)) == list(expected[:3])
    finally:
        second.stop()
