"""Moving an EAS or ModelArts service over unchanged: each case as a user moving one would
hit it, through a running gateway, the workers it launches, the CLI, and the unchanged
eas-prediction SDK where a client is involved."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gateway.models import DIGITS_MODEL
from test_control_plane import Gateway, cli, cli_ok, desc, http, served, wait_for, write_json
from test_eas_compat import assert_scores, eas_py, run_cases  # noqa: F401 (eas_py: a fixture)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway("--state-dir", str(tmp_path_factory.mktemp("state"))).start()
    g.files = tmp_path_factory.mktemp("files")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def unsigned_model(tmp_path_factory) -> str:
    """The digits model as a converter writes it: no signature_name metadata."""
    import onnx

    model = onnx.load(str(DIGITS_MODEL))
    del model.metadata_props[:]
    path = tmp_path_factory.mktemp("models") / "converted.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def digits_batch():
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    x = rng.random((3, 784), dtype=np.float32)
    session = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])
    return x, session.run(["scores"], {"images": x})[0]


def tf_case(endpoint: str, service: str, batch: np.ndarray, token: str = "") -> dict:
    """One TFRequest("predict_images") of `batch` by the unchanged eas-prediction SDK."""
    return dict(endpoint=endpoint, service=service, kind="tf", shape=list(batch.shape),
                x=batch.ravel().tolist(), token=token)


def create(gw, name: str, **config) -> dict:
    spec = write_json(gw.files / f"{name}.json", {"name": name, **config})
    cli_ok(gw.url, "create", spec)
    return wait_for(lambda: (v := desc(gw.url, name))["status"] == "Running" and v, 30,
                    what=f"{name} to run")


def test_a_model_without_a_signature_serves_any_signature_name(gw, unsigned_model, eas_py,
                                                               digits_batch, tmp_path):
    """Models converted from TensorFlow or PyTorch declare no signature: the EAS client's
    TFRequest("predict_images") must work, and GET shows serving_default."""
    x, expected = digits_batch
    token = create(gw, "converted", model_path=unsigned_model, processor="tensorflow_cpu_1.15",
                   generate_token="true")["token"]
    named = create(gw, "named", model_path=unsigned_model, processor="tensorflow",
                   token="tok", metadata={"signature_name": "serving_images"})["token"]
    results = run_cases(tmp_path, [
        tf_case(gw.url, "converted", x, token),
        tf_case(gw.url, "named", x[:1], named),  # sends predict_images
    ])
    assert_scores(results[0], expected)
    assert not results[1]["ok"] and results[1]["code"] == 400
    assert "serving_images" in results[1]["message"]
    status, body = http(gw.url, "GET", "/api/predict/converted", headers={"Authorization": token})
    assert status == 200 and json.loads(body)["signature_name"] == "serving_default"
    res = cli(gw.url, "create", write_json(gw.files / "bad-sig.json", {
        "name": "bad-sig", "model_path": unsigned_model, "metadata": {"signature_name": 3}}))
    assert res.returncode == 1 and "metadata.signature_name" in res.stderr


def test_scaling_and_metadata_change_the_running_version(gw):
    """Only the model, the processor or their configuration make a version: instances and
    other metadata change the running one, so rollback lists hold real versions."""
    create(gw, "versions", model_path=str(DIGITS_MODEL), processor="tensorflow",
           metadata={"instance": 1})
    out = cli_ok(gw.url, "modify", "versions", "-Dmetadata.instance=2")
    assert "version 1" in out
    cli_ok(gw.url, "modify", "versions", "-Dmetadata.rpc.keepalive=4000")
    view = wait_for(lambda: (v := desc(gw.url, "versions"))["running_instances"] == 2 and v, 30,
                    what="two instances")
    assert view["revision"] == 1 and view["latest_revision"] == 1
    assert view["config"]["metadata"]["rpc.keepalive"] == 4000
    cli_ok(gw.url, "modify", "versions", "-Dprocessor=tensorflow_cpu_1.15")  # a new version
    view = desc(gw.url, "versions")
    assert view["revision"] == 2 and view["latest_revision"] == 2
    cli_ok(gw.url, "version", "versions", "1")  # back to the first model and processor...
    view = desc(gw.url, "versions")
    assert view["revision"] == 1 and view["config"]["processor"] == "tensorflow"
    assert view["config"]["metadata"]["instance"] == 2  # ...keeping today's instances
    assert view["config"]["metadata"]["rpc.keepalive"] == 4000


def test_flat_and_nested_rpc_keys_that_disagree_are_refused(gw):
    spec = write_json(gw.files / "clash.json", {
        "name": "clash", "model_path": str(DIGITS_MODEL),
        "metadata": {"rpc.keepalive": 5000, "rpc": {"keepalive": -1}}})
    res = cli(gw.url, "create", spec)
    assert res.returncode == 1
    assert 'metadata key "rpc.keepalive" is 5000' in res.stderr
    assert "metadata.rpc object gives keepalive -1" in res.stderr
    assert cli(gw.url, "desc", "clash").returncode == 1  # nothing was created
    agree = write_json(gw.files / "agree.json", {
        "name": "agree", "model_path": str(DIGITS_MODEL),
        "metadata": {"rpc.keepalive": 3000, "rpc": {"keepalive": 3000}}})
    cli_ok(gw.url, "create", agree)
    assert desc(gw.url, "agree")["config"]["metadata"]["rpc.keepalive"] == 3000


def test_eas_python_processor_runs_unchanged(gw, eas_py, tmp_path):
    """The manual's allspark processor: status 0 is success, model_config reaches it, and
    an exception in process() is a 400 with its message that the gateway does not retry."""
    app_dir = os.path.join(os.path.dirname(__file__), "data", "allspark_app")
    view = create(gw, "spark", processor="python", processor_path=app_dir,
                  processor_entry="app.py", model_config='{"w0": 10, "w1": 3}',
                  generate_token="true", metadata={"instance": 2})
    token = view["token"]
    served_before = served(gw.url, "spark")
    results = run_cases(tmp_path, [
        dict(endpoint=gw.url, service="spark", kind="raw", data=data, token=token)
        for data in ("10 20", "1 500", "0 0", "config", "not numbers")])
    assert results[0] == {"ok": True, "body": "True"}
    assert not results[1]["ok"] and results[1]["code"] == 400  # the processor's own 400
    assert results[2] == {"ok": True, "body": "zero"}           # status 0: success
    assert json.loads(results[3]["body"]) == {"w0": 10, "w1": 3}
    failed = results[4]
    assert not failed["ok"] and failed["code"] == 400
    assert "ValueError" in failed["message"] and "process() failed" in failed["message"]
    assert served(gw.url, "spark") - served_before == 5  # nothing was retried elsewhere


def test_service_env_reaches_the_workers(gw, eas_py, tmp_path):
    """service.json `env` (name to value) is the workers' environment."""
    app_dir = tmp_path / "env_app"
    app_dir.mkdir()
    with open(app_dir / "app.py", "w") as f:
        f.write("import os\nimport allspark\n\n\nclass Env(allspark.BaseProcessor):\n"
                "    def process(self, data):\n"
                "        return os.environ.get(data.decode(), '<unset>'), 200\n")
    create(gw, "envsvc", processor="python", processor_path=str(app_dir),
           processor_entry="app.py", env={"MODEL_FLAVOUR": "vanilla"})
    results = run_cases(tmp_path, [dict(endpoint=gw.url, service="envsvc", kind="raw",
                                        data="MODEL_FLAVOUR")])
    assert results == [{"ok": True, "body": "vanilla"}]
    res = cli(gw.url, "create", write_json(gw.files / "badenv.json", {
        "name": "badenv", "model_path": str(DIGITS_MODEL), "env": {"X": 1}}))
    assert res.returncode == 1 and "env must be" in res.stderr


def test_held_out_digits_ship_with_the_package():
    """The demo's digits need no scikit-learn: the shipped copy is the held-out split."""
    from gateway.models import load_digits_split, load_held_out_digits

    x, y = load_held_out_digits()
    _, _, x_ref, y_ref = load_digits_split()
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)


def test_worker_logs_are_kept_and_read_from_the_cli(gw):
    """A normally stopped worker's log stays, and `infergate logs` shows it (filtered by
    instance and time); -f follows new lines."""
    import subprocess
    import time

    from conftest import infergate_cmd
    from test_control_plane import ADMIN

    view = create(gw, "logged", model_path=str(DIGITS_MODEL), processor="tensorflow",
                  metadata={"instance": 1})
    first = view["instances"][0]["id"]
    out = cli_ok(gw.url, "logs", "logged")
    assert f"{first}  " in out and "listening on" in out
    cli_ok(gw.url, "modify", "logged", "-Dmetadata.rpc.keepalive=3000")  # replaces the worker
    wait_for(lambda: [i["id"] for i in desc(gw.url, "logged")["instances"]] not in ([first], []),
             30, what="a new worker")
    wait_for(lambda: "shutting down" in cli_ok(gw.url, "logs", "logged", "--instance", first),
             20, what="the stopped worker's log")
    out = cli_ok(gw.url, "logs", "logged")
    assert {line.split("  ")[0] for line in out.splitlines()} >= {first}
    assert len({line.split("  ")[0] for line in out.splitlines()}) == 2  # old and new worker
    assert cli_ok(gw.url, "logs", "logged", "--since", "0s").strip() == ""
    follow = subprocess.Popen(infergate_cmd("logs", "logged", "-f", "--since", "1s"),
                              stdout=subprocess.PIPE, text=True, env=dict(
                                  os.environ, INFERGATE_GATEWAY=gw.url,
                                  INFERGATE_ADMIN_TOKEN=ADMIN))
    try:
        time.sleep(1.5)
        cli_ok(gw.url, "modify", "logged", "-Dmetadata.instance=2")  # a new worker logs
        wait_for(lambda: desc(gw.url, "logged")["running_instances"] == 2, 30)
        line = follow.stdout.readline()
        assert "listening on" in line or "loaded" in line or "worker" in line, line
    finally:
        follow.terminate()
        follow.wait(10)
    res = cli(gw.url, "logs", "nope")
    assert res.returncode == 1 and "nope" in res.stderr


def test_gateway_access_log(tmp_path, procs, worker_factory):
    """--access-log writes one JSON line per answer (forwarded or not); off by default."""
    import socket

    from gateway_helpers import endpoints, post, seed_services, start_gateway

    worker = worker_factory()
    seed_services(str(tmp_path), [{"name": "digits", "token": "tok",
                                   "config": {"endpoints": endpoints(worker)}}])
    log_path = tmp_path / "access.jsonl"
    gateway = start_gateway(procs, str(tmp_path), "--access-log", str(log_path))
    from test_control_plane import tf_body

    x = np.zeros((1, 784), np.float32)
    assert post(gateway.url + "/api/predict/digits?trace=1", tf_body(x),
                {"Authorization": "tok"})[0] == 200
    assert post(gateway.url + "/api/predict/digits", tf_body(x))[0] == 401
    assert post(gateway.url + "/api/predict/nope", b"")[0] == 404
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        sock.recv(1000)
    def logged():
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        return [r for r in lines if r["path"] != "/health"]  # the start-up checks
    records = wait_for(lambda: len(logged()) >= 4 and logged(), 10, what="4 access log lines")
    assert [(r["method"], r["path"], r["status"]) for r in records] == [
        ("POST", "/api/predict/digits?trace=1", 200), ("POST", "/api/predict/digits", 401),
        ("POST", "/api/predict/nope", 404), ("-", "-", 400)]
    assert all(r["client"] == "127.0.0.1" and r["ms"] >= 0 for r in records)
    assert records[0]["bytes"] > 0


@pytest.fixture
def http_files(tmp_path):
    """A local HTTP server for the test's files: (directory, base URL)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_model_and_processor_packages_by_url(gw, http_files, eas_py, digits_batch, tmp_path):
    """model_path and processor_path as http:// archives, the way EAS service.json files
    give them: fetched once, extracted safely, failures shown in desc."""
    import io
    import tarfile
    import zipfile

    root, base = http_files
    x, expected = digits_batch
    with tarfile.open(root / "model.tar.gz", "w:gz") as tar:
        tar.add(str(DIGITS_MODEL), arcname="model/digits.onnx")
    app = os.path.join(os.path.dirname(__file__), "data", "allspark_app", "app.py")
    with zipfile.ZipFile(root / "processor.zip", "w") as z:
        z.write(app, "app.py")
    with tarfile.open(root / "evil.tar", "w") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../../escape.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    token = create(gw, "fetched", model_path=f"{base}/model.tar.gz",
                   model_entry="model/digits.onnx", processor="tensorflow",
                   token="tok")["token"]
    create(gw, "fetched-py", processor="python", processor_path=f"{base}/processor.zip",
           processor_entry="app.py")
    results = run_cases(tmp_path, [tf_case(gw.url, "fetched", x, token),
                                   dict(endpoint=gw.url, service="fetched-py", kind="raw",
                                        data="10 20")])
    assert_scores(results[0], expected)
    assert results[1] == {"ok": True, "body": "True"}

    for name, url, why in (("evil", f"{base}/evil.tar", "points outside"),
                           ("missing", f"{base}/nothing.tar.gz", "404")):
        spec = write_json(gw.files / f"{name}.json", {"name": name, "model_path": url})
        cli_ok(gw.url, "create", spec, "--no-wait")
        view = wait_for(lambda: (v := desc(gw.url, name))["status"] == "Failed" and v, 30,
                        what=f"{name} to fail")
        assert why in view["message"] and url in view["message"]
    assert not (tmp_path / "escape.txt").exists() and not any(
        p.name == "escape.txt" for p in gw.files.parent.rglob("escape.txt"))


def test_caller_identities_drive_modelarts_builtins(gw, eas_py, digits_batch, tmp_path):
    """#USER_NAME and the other built-ins come from the identified caller whose token the
    request carries; a rule on a built-in is refused while the service has no callers."""
    x, expected = digits_batch
    create(gw, "who", model_path=str(DIGITS_MODEL), processor="tensorflow", token="svc-token")
    create(gw, "who-v2", model_path=str(DIGITS_MODEL), processor="tensorflow")
    rules = write_json(gw.files / "who-rules.json", [
        {"condition": "#USER_NAME == 'alice' and #DOMAIN_NAME == 'acme'", "target": "who-v2"}])
    res = cli(gw.url, "rules", "who", rules)
    assert res.returncode == 1 and "#USER_NAME" in res.stderr and "no identified callers" \
        in res.stderr
    out = cli_ok(gw.url, "callers", "who", "add", "--user-name", "alice", "--domain-name", "acme",
                 "--user-id", "u-1")
    alice = out.strip().rsplit(" ", 1)[1]
    bob = json.loads(cli_ok(gw.url, "callers", "who", "add", "--user-name", "bob",
                            "--domain-name", "acme", "--json"))["token"]
    cli_ok(gw.url, "rules", "who", rules)
    listed = cli_ok(gw.url, "callers", "who")
    assert "alice" in listed and "bob" in listed and alice in listed
    before = {n: served(gw.url, n) for n in ("who", "who-v2")}
    results = run_cases(tmp_path, [tf_case(gw.url, "who", x, alice),
                                   tf_case(gw.url, "who", x, bob),
                                   tf_case(gw.url, "who", x, "svc-token"),
                                   tf_case(gw.url, "who", x, "not-a-caller")])
    for result in results[:3]:
        assert_scores(result, expected)
    assert not results[3]["ok"] and results[3]["code"] == 401
    after = {n: served(gw.url, n) - before[n] for n in before}
    assert after == {"who": 2, "who-v2": 1}  # only alice's request matched the rule
    res = cli(gw.url, "callers", "who", "remove", "alice")
    assert res.returncode == 0
    res = cli(gw.url, "callers", "who", "remove", "bob")
    assert res.returncode == 1 and "rules on caller built-ins" in res.stderr
