"""Hostile traffic and faults against running gateways and workers (issue 15): no request
can stall the gateway, no path escapes its service, no web page drives the admin API,
no answer is amplified, shutdown loses nothing sent, tokens are not world-readable."""
from __future__ import annotations

import http.client
import threading

import pytest

from conftest import free_port, infergate_cmd
from gateway_helpers import endpoints, seed_services, start_gateway
from test_control_plane import ADMIN, admin, http as http_call


def test_a_header_rule_cannot_stall_the_gateway(procs, tmp_path, worker_factory):
    """`(a+)+$` backtracks 2^n steps on n a's: matched by RE2, a 40-byte header costs
    nothing, and everything else keeps being served meanwhile."""
    worker = worker_factory()
    seed_services(str(tmp_path), [{"name": "digits", "config": {"endpoints": endpoints(worker)},
                                   "rules": [{"condition": "#HEADER_x-user matches '(a+)+$'",
                                              "target": "digits"}]}])
    gateway = start_gateway(procs, str(tmp_path))
    answers = []

    def hostile():
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
        conn.request("GET", "/api/predict/digits", headers={"X-User": "a" * 40 + "!"})
        answers.append(conn.getresponse().status)
        conn.close()

    thread = threading.Thread(target=hostile)
    thread.start()
    thread.join(20)
    assert answers == [200]  # the signature GET, routed by the shares: no hang
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


def test_rules_that_need_backtracking_are_refused(procs, tmp_path):
    port = free_port()
    gateway = procs.start(infergate_cmd("gateway", "--port", str(port), "--state-dir",
                                        str(tmp_path), "--admin-token", ADMIN), port)
    status, _ = admin(gateway.url, "POST", "/admin/services",
                      {"name": "s", "endpoints": [{"ip": "127.0.0.1", "port": 9}]})
    assert status == 201
    status, body = admin(gateway.url, "PUT", "/admin/services/s/rules",
                         [{"condition": r"#HEADER_x matches '(a)\1'", "target": "s"}])
    assert status == 400 and "backtracking" in body["message"]


def test_state_files_are_private(procs, tmp_path):
    """Tokens live in the state directory: 0700, its database files 0600, and an
    existing loose one is tightened."""
    import os
    import stat

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "state.db").touch(mode=0o644)
    os.chmod(state / "state.db", 0o644)
    port = free_port()
    gateway = procs.start(infergate_cmd("gateway", "--port", str(port), "--state-dir",
                                        str(state), "--admin-token", ADMIN), port)
    admin(gateway.url, "POST", "/admin/services",
          {"name": "s", "token": "secret", "endpoints": [{"ip": "127.0.0.1", "port": 9}]})
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    files = [f for f in os.listdir(state) if f.startswith("state.db")]
    assert "state.db" in files
    for name in files:
        assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name


def test_paths_cannot_leave_their_service(procs, tmp_path, worker_factory):
    """`/api/predict/pub/../../secret/...` must not reach `secret` (with no token) through
    an upstream that normalises paths: dot segments, encoded ones, encoded slashes and
    doubled slashes are refused (400) before anything is forwarded."""
    worker = worker_factory()
    seed_services(str(tmp_path), [
        {"name": "pub", "config": {"endpoints": endpoints(worker), "upstream_path": "/"}},
        {"name": "secret", "token": "tok", "config": {"endpoints": endpoints(worker)}}])
    gateway = start_gateway(procs, str(tmp_path))
    for path in ("/api/predict/pub/../../api/predict/secret", "/api/predict/pub/%2e%2e/x",
                 "/api/predict/pub/.%2E/x", "/api/predict/pub/./x", "/api/predict/pub//x",
                 "/api/predict/pub/a%2f..%2fb", "/api/predict/pub/a\\\\..\\\\b",
                 "/v2/models/pub/../../secret/infer"):
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
        conn.request("POST", path, body=b"x")
        response = conn.getresponse()
        assert response.status == 400, (path, response.status)
        assert b"refused" in response.read()
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    conn.request("GET", "/api/predict/pub/api/predict/digits")  # an ordinary subpath
    assert conn.getresponse().status == 200


def test_the_admin_api_refuses_what_a_web_page_can_send(procs, tmp_path):
    """Without an admin token (allowed on loopback), a page in the user's browser must not
    drive the admin API: form posts (not JSON), foreign Origins, and DNS-rebound Hosts are
    refused (403); the CLI's own requests pass."""
    from test_control_plane import cli_ok

    port = free_port()
    gateway = procs.start(infergate_cmd("gateway", "--port", str(port), "--state-dir",
                                        str(tmp_path)), port)
    body = b'{"name": "evil", "endpoints": [{"ip": "127.0.0.1", "port": 9}]}'

    def call(method, path, body=None, **headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()

    assert call("POST", "/admin/services", body, **{"Content-Type": "text/plain"})[0] == 403
    assert call("POST", "/admin/services", body, **{"Content-Type": "application/json",
                                                    "Origin": "http://evil.example"})[0] == 403
    assert call("GET", "/admin/services", Host=f"evil.example:{port}")[0] == 403
    assert call("GET", "/admin/services")[0] == 200  # Host 127.0.0.1:port
    status, _ = call("POST", "/admin/services", body, **{"Content-Type": "application/json"})
    assert status == 201
    assert "evil" in cli_ok(gateway.url, "list")


def test_sigterm_answers_requests_on_idle_keep_alive_connections(procs, tmp_path,
                                                                   worker_factory):
    """On SIGTERM the gateway stops accepting, but a request sent just then on one of its
    idle keep-alive connections is answered (with Connection: close), not reset."""
    import signal
    import socket
    import time

    worker = worker_factory()
    seed_services(str(tmp_path), [{"name": "digits", "config": {"endpoints": endpoints(worker)}}])
    gateway = start_gateway(procs, str(tmp_path))
    request = b"GET /api/predict/digits HTTP/1.1\r\nHost: x\r\n\r\n"

    def answer(sock) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head

    socks = [socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
             for _ in range(16)]
    for sock in socks:  # each becomes an idle keep-alive connection
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")
    gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    heads = []
    for sock in socks:
        try:
            sock.sendall(request)
            heads.append(answer(sock))
        except OSError as exc:
            heads.append(repr(exc).encode())
    for sock in socks:
        sock.close()
    assert all(h.startswith(b"HTTP/1.1 200") and b"Connection: close" in h for h in heads), \
        heads
    assert gateway.proc.wait(15) == 0


def test_an_output_named_many_times_is_answered_once(worker_factory):
    """output_filter with "scores" 10,000 times: one scores tensor back, not 10,000."""
    import numpy as np

    from test_control_plane import http, tf_body
    from gateway.protos import tf_predict_pb2

    worker = worker_factory()
    request = tf_predict_pb2.PredictRequest.FromString(tf_body(np.zeros((2, 784), np.float32)))
    request.output_filter.extend(["scores"] * 10000)
    body = request.SerializeToString()
    status, answer = http(worker.url, "POST", "/api/predict/digits", body)
    assert status == 200
    response = tf_predict_pb2.PredictResponse.FromString(answer)
    assert list(response.outputs) == ["scores"] and len(answer) < 200


def test_slowloris_cannot_lock_legitimate_clients_out(procs, tmp_path, worker_factory):
    """300 connections sending a head a byte at a time against a gateway with 256 file
    descriptors: it keeps room for new clients by closing the slowest ones, so a
    legitimate request is answered at once instead of waiting behind them."""
    import socket
    import time

    worker = worker_factory()
    seed_services(str(tmp_path), [{"name": "digits", "config": {"endpoints": endpoints(worker)}}])
    port = free_port()
    command = " ".join(infergate_cmd("gateway", "--port", str(port), "--state-dir",
                                     str(tmp_path), "--admin-token", ADMIN))
    gateway = procs.start(["bash", "-c", f"ulimit -n 256; exec {command}"], port)
    slow = []
    try:
        for _ in range(300):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                sock.sendall(b"POST /api/predict/digits HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                slow.append(sock)
            except OSError:
                pass  # closed on us to make room: as designed
            time.sleep(0.001)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/predict/digits")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        for sock in slow:
            sock.close()
    assert gateway.proc.poll() is None


def test_removed_instances_leave_the_instance_up_gauge(procs, tmp_path):
    """infergate_instance_up must not go on saying 1 for an instance that was removed."""
    port = free_port()
    gateway = procs.start(infergate_cmd("gateway", "--port", str(port), "--state-dir",
                                        str(tmp_path), "--admin-token", ADMIN), port)
    admin(gateway.url, "POST", "/admin/services",
          {"name": "s", "endpoints": [{"ip": "127.0.0.1", "port": 9}]})

    def gauge() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        return "\n".join(line for line in text.splitlines()
                         if line.startswith("infergate_instance_up{"))

    assert 'instance="127.0.0.1:9"' in gauge()
    status, _ = admin(gateway.url, "DELETE", "/admin/services/s")
    assert status == 200
    assert gauge() == ""


def test_a_workers_signature_needs_its_token(worker_factory):
    from test_control_plane import http

    worker = worker_factory(extra=("--token", "tok"))
    assert http(worker.url, "GET", "/api/predict/digits")[0] == 401
    status, body = http(worker.url, "GET", "/api/predict/digits",
                        headers={"Authorization": "tok"})
    assert status == 200 and b"images" in body


def _load_during(gateway_port: int, fault, fault_at: float, until: float,
                 clients: int = 6) -> list[tuple[float, int, float]]:
    """`clients` keep-alive clients posting digits requests until `until` (monotonic
    seconds) while `fault()` runs, from `fault_at`. (start, status, seconds) of each."""
    import time

    import numpy as np

    from test_gateway import digits_request

    body = digits_request(np.zeros((1, 784), dtype=np.float32))
    done: list[tuple[float, int, float]] = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=30)
        while (start := time.monotonic()) < until:
            try:
                conn.request("POST", "/api/predict/digits", body=body)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except OSError:
                conn.close()
                status = 0
            done.append((start, status, time.monotonic() - start))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(max(0.0, fault_at - time.monotonic()))
        fault()
    finally:
        for t in threads:
            t.join(30)
    return done


def _load_through_a_hang(gateway_port: int, hung, stop_at: float, until: float):
    import signal

    try:
        return _load_during(gateway_port, lambda: hung.kill(signal.SIGSTOP), stop_at, until)
    finally:
        hung.kill(signal.SIGCONT)


def test_a_hung_instance_gets_no_new_requests(procs, tmp_path, worker_factory):
    """SIGSTOP of 1 of 3 workers: the kernel still accepts connections for it, so only
    outlier detection (it stalls) shows it. Requests already sent to it may fail (every
    client is soon waiting on one); none sent 1 s after it hung goes to it."""
    import time

    workers = [worker_factory() for _ in range(3)]
    seed_services(str(tmp_path), [{"name": "digits", "config": {
        "endpoints": endpoints(*workers), "metadata": {"rpc.keepalive": 1000}}}])
    gateway = start_gateway(procs, str(tmp_path))
    stop_at = time.monotonic() + 1.0
    done = _load_through_a_hang(gateway.port, workers[0], stop_at, stop_at + 3.5)
    late = [(start - stop_at, status, seconds) for start, status, seconds in done
            if start >= stop_at + 1.0]
    assert len(late) > 100
    # One sent to the stopped worker would get a 504 at its 2 s deadline.
    assert [r for r in late if r[1] != 200] == []
    assert sum(1 for start, _, _ in done if start < stop_at) > 50  # the load was on before
    metrics = http_call(gateway.url, "GET", "/metrics")[1].decode()
    assert f'infergate_outlier_ejections_total{{instance="127.0.0.1:{workers[0].port}"}}' \
        in metrics


def test_a_per_try_timeout_retries_requests_sent_to_a_hung_instance(procs, tmp_path,
                                                                       worker_factory):
    """With rpc.try_timeout, a request that the hung worker holds is retried on another
    while its deadline allows: no client sees a failure at all."""
    import time

    workers = [worker_factory() for _ in range(3)]
    seed_services(str(tmp_path), [{"name": "digits", "config": {
        "endpoints": endpoints(*workers),
        "metadata": {"rpc.keepalive": 5000, "rpc.try_timeout": 300}}}])
    gateway = start_gateway(procs, str(tmp_path))
    stop_at = time.monotonic() + 1.0
    done = _load_through_a_hang(gateway.port, workers[0], stop_at, stop_at + 2.0)
    # Without the retry, each request the stopped worker holds gets a 504 at 6 s.
    assert [r for r in done if r[1] != 200] == []


def _gateway_on_redis(procs, redis_server, worker_factory):
    """A gateway on Redis and three workers that registered themselves in it."""
    import json
    import time


    port = free_port()
    gateway = procs.start(infergate_cmd("gateway", "--host", "127.0.0.1", "--port", str(port),
                                        "--registry", redis_server.url, "--admin-token", ADMIN),
                          port)
    assert admin(gateway.url, "POST", "/admin/services", {"name": "digits"})[0] == 201
    workers = [worker_factory(extra=("--registry", redis_server.url)) for _ in range(3)]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, body = http_call(gateway.url, "GET", "/api/v1/servicediscovery/upstreams/digits")
        if status == 200 and len(json.loads(body)["endpoints"]["items"]) == 3:
            return gateway, workers
        time.sleep(0.1)
    raise AssertionError("the workers did not register")


def test_a_redis_pause_longer_than_a_lease_empties_nothing(procs, redis_server,
                                                          worker_factory):
    """Redis stopped for 4 s (leases are 3 s): when it resumes every lease has lapsed by its
    clock, but the time it was away is not held against them; no request fails."""
    import signal
    import time

    gateway, _ = _gateway_on_redis(procs, redis_server, worker_factory)

    def pause():
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(4.0)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)

    start = time.monotonic()
    done = _load_during(gateway.port, pause, start + 0.5, start + 7.5)
    assert len(done) > 200
    assert [r for r in done if r[1] != 200] == []


def test_a_redis_that_comes_back_empty_gets_the_state_back(procs, redis_server,
                                                          worker_factory):
    """Redis restarted without its data: the gateway writes back the services and instances
    it holds instead of dropping them; no request fails, and the state is in Redis again."""
    import time

    from gateway.registry.redis_store import RedisStore

    gateway, workers = _gateway_on_redis(procs, redis_server, worker_factory)

    def restart_empty():
        redis_server.stop()
        time.sleep(1.0)
        redis_server.start()

    start = time.monotonic()
    done = _load_during(gateway.port, restart_empty, start + 0.5, start + 5.0)
    assert len(done) > 200
    assert [r for r in done if r[1] != 200] == []

    async def stored():
        store = RedisStore(redis_server.url)
        try:
            services, instances = await store.snapshot()
        finally:
            await store.close()
        return sorted(services), sorted(i.port for i in instances.get("digits", []))

    import asyncio

    assert asyncio.run(stored()) == (["digits"], sorted(w.port for w in workers))


def test_launched_workers_hold_no_admin_token(tmp_path):
    """User code in a launched worker reads its environment: it finds a registration
    credential that keeps its own instance registered and opens nothing else of the admin
    API, and no admin token."""
    import json

    from test_control_plane import Gateway, cli_ok, desc, wait_for, write_json

    app_dir = tmp_path / "env_app"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(
        "import json\nimport os\nimport allspark\n\n\n"
        "class Env(allspark.BaseProcessor):\n"
        "    def process(self, data):\n"
        "        return json.dumps({k: v for k, v in os.environ.items()\n"
        "                           if k.startswith('INFERGATE_')}), 200\n")
    gw = Gateway("--state-dir", str(tmp_path / "state")).start()
    try:
        cli_ok(gw.url, "create", write_json(tmp_path / "s.json", {
            "name": "snoop", "processor": "python", "processor_path": str(app_dir),
            "processor_entry": "app.py"}))
        wait_for(lambda: desc(gw.url, "snoop")["status"] == "Running", 30)
        status, body = http_call(gw.url, "POST", "/api/predict/snoop", body=b"x")
        assert status == 200, body
        env = json.loads(body)
        assert ADMIN not in env.values() and "INFERGATE_ADMIN_TOKEN" not in env
        credential = env["INFERGATE_REGISTRATION_TOKEN"]
        auth = {"Authorization": f"Bearer {credential}"}
        assert http_call(gw.url, "GET", "/admin/services", headers=auth)[0] == 401
        assert http_call(gw.url, "DELETE", "/admin/services/snoop", headers=auth)[0] == 401
        assert http_call(gw.url, "GET", "/admin/instances/other", headers=auth)[0] == 401
        assert http_call(gw.url, "GET", "/admin/instances/snoop", headers=auth)[0] == 200
        assert desc(gw.url, "snoop")["running_instances"] == 1  # it registered with it
    finally:
        gw.stop()


def test_a_signature_cannot_be_replayed(procs, tmp_path, worker_factory):
    """An EAS-signed request seen on the wire opens the service once (and for the second
    its Date names), not for the next quarter hour; nor with a query string added."""
    import time

    import numpy as np

    from gateway import auth
    from test_gateway import digits_request
    from gateway_helpers import post

    worker = worker_factory(extra=("--token", "tok"))
    seed_services(str(tmp_path), [{"name": "digits", "token": "tok",
                                   "config": {"endpoints": endpoints(worker)}}])
    gateway = start_gateway(procs, str(tmp_path))
    body = digits_request(np.zeros((1, 784), dtype=np.float32))
    signed = auth.sign("tok", body, "digits")
    for url in (gateway.url, worker.url):
        assert post(f"{url}/api/predict/digits", body, signed)[0] == 200
        assert post(f"{url}/api/predict/digits", body, signed)[0] == 200  # the SDK's retry
        assert post(f"{url}/api/predict/digits?x=1", body, signed)[0] == 401
    time.sleep(auth.REPEAT_S + 0.5)
    for url in (gateway.url, worker.url):
        status, answer, _ = post(f"{url}/api/predict/digits", body, signed)
        assert status == 401 and b"already used" in answer, (url, answer)
        assert post(f"{url}/api/predict/digits", body, auth.sign("tok", body, "digits"))[0] \
            == 200


def test_discovery_lists_a_services_instances_to_its_clients_only(procs, tmp_path,
                                                                  worker_factory):
    """Where a service has a token, discovery needs it (raw or signed, as our SDK sends it);
    --open-discovery lists them to anyone, for the unchanged eas-prediction SDK."""
    import json

    from gateway.sdk.core import discovery_signature

    worker = worker_factory(extra=("--token", "tok"))
    seed_services(str(tmp_path), [
        {"name": "digits", "token": "tok", "config": {"endpoints": endpoints(worker)}},
        {"name": "public", "config": {"endpoints": endpoints(worker)}}])
    path = "/api/v1/servicediscovery/upstreams/"
    gateway = start_gateway(procs, str(tmp_path))
    status, body = http_call(gateway.url, "GET", path + "digits")
    assert status == 401 and b"send its token" in body
    assert http_call(gateway.url, "GET", path + "digits", headers={"Authorization": "x"})[0] \
        == 401
    for headers in ({"Authorization": "tok"}, discovery_signature("tok", "digits")):
        status, body = http_call(gateway.url, "GET", path + "digits", headers=headers)
        assert status == 200 and json.loads(body)["endpoints"]["items"][0]["port"] == worker.port
    assert http_call(gateway.url, "GET", path + "public")[0] == 200
    gateway.stop()
    gateway = start_gateway(procs, str(tmp_path), "--open-discovery")
    assert http_call(gateway.url, "GET", path + "digits")[0] == 200


@pytest.mark.parametrize("route", ["json processor", "v2 JSON"])
def test_a_large_json_body_costs_a_worker_a_few_times_its_size(worker_factory, route):
    """A JSON tensor used to cost a Python float and a list slot a number (a 63 MB body took a
    worker past 1 GB): its peak memory now stays within 10x the body."""
    rows = 12000  # about 38 MB of text
    row = "[" + ",".join(["0.0"] * 784) + "]"
    if route == "json processor":
        worker = worker_factory(processor="json")
        path = "/api/predict/digits"
        body = ('{"inputs": {"images": [' + ",".join([row] * rows) + "]}}").encode()
    else:
        worker = worker_factory()
        path = "/v2/models/digits/infer"
        body = ('{"inputs": [{"name": "images", "datatype": "FP32", "shape": [%d, 784], '
                '"data": [' % rows + ",".join([row] * rows) + "]}]}").encode()
    pid = worker.proc.pid

    def kib(key: str) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from here
    before = kib("VmRSS")
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=120)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = resp.read()
    conn.close()
    assert resp.status == 200, answer[:200]
    growth = (kib("VmHWM") - before) * 1024
    assert growth <= 10 * len(body), (growth / len(body), len(body))


def test_an_instance_cannot_flood_the_gateway_with_its_answer(procs, tmp_path):
    """The gateway buffers an instance's answer whole, so it takes at most --max-response-mb
    of it: past that the client gets a 502 (not retried: another instance would answer as
    much), whether the answer says its length or streams until it closes."""
    import socket

    def flooding_upstream(declared: bool) -> int:
        server = socket.create_server(("127.0.0.1", 0))

        def serve():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                conn.recv(65536)
                head = b"HTTP/1.1 200 OK\r\n" + (b"Content-Length: 3000000000\r\n" if declared
                                                 else b"Connection: close\r\n") + b"\r\n"
                try:
                    conn.sendall(head)
                    for _ in range(2000):  # at most 128 MB
                        conn.sendall(bytes(65536))
                except OSError:
                    pass
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return server.getsockname()[1]

    seed_services(str(tmp_path), [
        {"name": name, "config": {"endpoints": [
            {"ip": "127.0.0.1", "port": flooding_upstream(declared)}]}}
        for name, declared in (("declared", True), ("streamed", False))])
    gateway = start_gateway(procs, str(tmp_path), "--max-response-mb", "4")
    for name in ("declared", "streamed"):
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        conn.request("POST", f"/api/predict/{name}", body=b"x")
        resp = conn.getresponse()
        answer = resp.read()
        conn.close()
        assert resp.status == 502 and b"limit of 4 MB" in answer, (name, answer[:200])
    with open(f"/proc/{gateway.proc.pid}/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    assert peak_kib < 200 * 1024


def test_a_slow_model_is_not_taken_for_a_hung_instance(procs, tmp_path):
    """Outlier detection judges a stall against the instance's own latency: two workers whose
    every answer takes 0.8 s stay in, from their first request on."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway_helpers import post
    from test_gateway import start_echo_worker

    workers = [start_echo_worker(procs) for _ in range(2)]
    seed_services(str(tmp_path), [{"name": "echo", "config": {"endpoints": endpoints(*workers)}}])
    gateway = start_gateway(procs, str(tmp_path))
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(f"{gateway.url}/api/predict/echo", b"sleep:0.8",
                                               timeout=30)[0], range(12)))
    assert answers == [200] * 12
    assert "infergate_outlier_ejections_total{" not in \
        http_call(gateway.url, "GET", "/metrics")[1].decode()


def test_a_worker_refuses_oversized_heads(worker_factory):
    """Workers take clients directly too (the SDK's direct mode): the same head limits as the
    gateway's, 64 KiB and 100 headers, else 431."""
    import socket

    worker = worker_factory()

    def answer(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", worker.port), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    long_line = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000  # no end
    assert answer(long_line).startswith(b"HTTP/1.1 431")
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n"
    assert answer(many).startswith(b"HTTP/1.1 431")
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=5)
    conn.request("GET", "/health", headers={f"X-{i}": "y" for i in range(50)})
    assert conn.getresponse().status == 200
