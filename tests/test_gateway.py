"""The gateway data plane through real processes: gateway, workers, sockets."""
from __future__ import annotations

import concurrent.futures
import http.client
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from conftest import free_port, infergate_cmd
from gateway_helpers import (endpoints, error_message, post, seed_services, start_gateway,
                             worker_requests)

ECHO = os.path.join(os.path.dirname(__file__), "data", "echo_processor.py")


def start_echo_worker(procs, service="echo", extra=()):
    port = free_port()
    return procs.start(infergate_cmd("worker", "--service", service, "--processor", "python",
                                     "--model", ECHO, "--host", "127.0.0.1", "--port", str(port),
                                     *extra), port, env={"ECHO_PORT": str(port)})


def digits_request(images: np.ndarray) -> bytes:
    from gateway.codec.tensors import encode_array
    from gateway.protos import tf_predict_pb2 as pb

    request = pb.PredictRequest(signature_name="predict_images")
    encode_array(images.astype(np.float32), request.inputs["images"])
    return request.SerializeToString()


def test_weights_3_to_1_and_right_answers(procs, worker_factory, tmp_path):
    import onnxruntime as ort
    from gateway.codec.tensors import decode_array
    from gateway.models import DIGITS_MODEL, load_digits_split
    from gateway.protos import tf_predict_pb2 as pb

    a, b = worker_factory(), worker_factory()
    seed_services(str(tmp_path), [{"name": "digits", "config": {
        "name": "digits", "endpoints": endpoints(a, b, weights=[3, 1])}}])
    gw = start_gateway(procs, str(tmp_path))
    _, _, x_test, _ = load_digits_split()
    session = ort.InferenceSession(str(DIGITS_MODEL))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    for i in range(400):
        images = x_test[i % len(x_test)][None, :]
        conn.request("POST", "/api/predict/digits", body=digits_request(images))
        resp = conn.getresponse()
        assert resp.status == 200
        out = pb.PredictResponse()
        out.ParseFromString(resp.read())
        want = session.run(["scores"], {"images": images.astype(np.float32)})[0]
        np.testing.assert_allclose(decode_array(out.outputs["scores"], "scores"), want, rtol=1e-5)
    conn.close()
    # Smooth WRR is exact: 300 and 100.
    assert (worker_requests(a.url), worker_requests(b.url)) == (300, 100)


def test_auth_token_raw_and_signed(procs, tmp_path):
    from gateway.auth import sign

    w = start_echo_worker(procs)
    seed_services(str(tmp_path), [{"name": "echo", "token": "s3cret",
                                   "config": {"name": "echo", "endpoints": endpoints(w)}}])
    gw = start_gateway(procs, str(tmp_path))
    url = gw.url + "/api/predict/echo"
    status, body, _ = post(url, b"hi")
    assert status == 401 and "token" in error_message(body)
    assert post(url, b"hi", {"Authorization": "wrong"})[0] == 401
    assert post(url, b"hi", {"Authorization": "s3cret"})[0] == 200
    assert post(url, b"hi", sign("s3cret", b"hi", "echo"))[0] == 200
    assert post(url, b"hi", sign("other", b"hi", "echo"))[0] == 401
    tampered = sign("s3cret", b"hi", "echo")
    status, body, _ = post(url, b"HI", tampered)  # body changed after signing
    assert status == 401 and "MD5" in error_message(body)
    stale = sign("s3cret", b"hi", "echo", now=time.time() - 4000)
    status, body, _ = post(url, b"hi", stale)
    assert status == 401 and "15 minutes" in error_message(body)
    # eas-prediction labels local time GMT: a client in UTC+8 is exactly 8 hours "ahead".
    assert post(url, b"hi", sign("s3cret", b"hi", "echo", now=time.time() + 8 * 3600))[0] == 200
    signed_subpath = sign("s3cret", b"hi", "echo/v2")
    assert post(url + "/v2", b"hi", signed_subpath)[0] == 200


def test_errors_and_request_id(procs, tmp_path):
    w = start_echo_worker(procs)
    seed_services(str(tmp_path), [{"name": "echo", "config": {"name": "echo",
                                                              "endpoints": endpoints(w)}}])
    gw = start_gateway(procs, str(tmp_path), "--max-body-mb", "1")
    status, body, _ = post(gw.url + "/api/predict/nope", b"x")
    assert status == 404 and "nope" in error_message(body)
    import socket
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"POST /api/predict/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"limit" in answer
    status, body, headers = post(gw.url + "/api/predict/echo/sub/path?q=1", b"abc",
                                 {"X-Request-Id": "trace-42"})
    assert status == 200 and body == f"{w.port}:abc".encode()
    assert headers["X-Request-Id"] == "trace-42"
    status, _, headers = post(gw.url + "/api/predict/echo", b"abc")
    assert status == 200 and len(headers["X-Request-Id"]) == 32


def test_retries_on_another_instance(procs, tmp_path):
    """450 and 5xx are retried elsewhere; the client sees the healthy instance's answer."""
    bad = start_echo_worker(procs)
    good = start_echo_worker(procs)
    seed_services(str(tmp_path), [{"name": "echo", "config": {
        "name": "echo", "endpoints": endpoints(bad, good)}}])
    gw = start_gateway(procs, str(tmp_path))
    # A dead port in front: connect errors are retried too.
    bad.stop()
    for _ in range(20):
        status, body, _ = post(gw.url + "/api/predict/echo", b"x")
        assert status == 200 and body == f"{good.port}:x".encode()
    # When every instance answers 503 the client gets that answer, after trying each once.
    status, body, _ = post(gw.url + "/api/predict/echo", b"status:503")
    assert status == 503
    status, body, _ = post(gw.url + "/api/predict/echo", b"status:450")
    assert status == 450


def test_killing_an_instance_under_load_loses_no_request(procs, tmp_path):
    workers = [start_echo_worker(procs) for _ in range(3)]
    seed_services(str(tmp_path), [{"name": "echo", "config": {
        "name": "echo", "endpoints": endpoints(*workers)}}])
    gw = start_gateway(procs, str(tmp_path))
    failures = []
    done = []

    def client(n):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        for i in range(n):
            conn.request("POST", "/api/predict/echo", body=b"ping")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                failures.append((resp.status, body))
            done.append(1)
        conn.close()

    threads = [threading.Thread(target=client, args=(300,)) for _ in range(4)]
    for t in threads:
        t.start()
    while len(done) < 300:
        time.sleep(0.01)
    workers[0].kill(signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert len(done) == 1200
    assert failures == []


def test_health_checks_take_out_and_bring_back(procs, tmp_path):
    a = start_echo_worker(procs)
    b_port = free_port()
    seed_services(str(tmp_path), [{"name": "echo", "config": {
        "name": "echo", "endpoints": endpoints(a) + [{"ip": "127.0.0.1", "port": b_port,
                                                       "weight": 100}]}}])
    gw = start_gateway(procs, str(tmp_path))

    def discovered():
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        conn.request("GET", "/api/v1/servicediscovery/upstreams/echo")
        import json
        items = json.loads(conn.getresponse().read())["endpoints"]["items"]
        conn.close()
        return sorted(item["port"] for item in items)

    deadline = time.monotonic() + 10
    while discovered() != [a.port] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert discovered() == [a.port]  # the dead one was taken out
    procs.start(infergate_cmd("worker", "--service", "echo", "--processor", "python", "--model",
                              ECHO, "--host", "127.0.0.1", "--port", str(b_port)), b_port,
                env={"ECHO_PORT": str(b_port)})
    deadline = time.monotonic() + 10
    while discovered() != sorted([a.port, b_port]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert discovered() == sorted([a.port, b_port])


def test_sigterm_drains_in_flight_requests(procs, tmp_path):
    w = start_echo_worker(procs)
    seed_services(str(tmp_path), [{"name": "echo", "config": {"name": "echo",
                                                              "endpoints": endpoints(w)}}])
    gw = start_gateway(procs, str(tmp_path))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(post, gw.url + "/api/predict/echo", b"sleep:1.0") for _ in range(4)]
        time.sleep(0.4)
        gw.kill(signal.SIGTERM)
        results = [f.result() for f in pending]
    assert [status for status, _, _ in results] == [200] * 4
    assert gw.proc.wait(10) == 0
    with pytest.raises(OSError):
        post(gw.url + "/api/predict/echo", b"x", timeout=2)


def test_metrics_expose_what_eas_shows(procs, tmp_path):
    w = start_echo_worker(procs)
    seed_services(str(tmp_path), [{"name": "echo", "config": {"name": "echo",
                                                              "endpoints": endpoints(w)}}])
    gw = start_gateway(procs, str(tmp_path))
    for _ in range(5):
        post(gw.url + "/api/predict/echo", b"12345")
    post(gw.url + "/api/predict/echo", b"status:404")
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'infergate_requests_total{code="2xx",service="echo",version="echo"} 5.0' in text
    assert 'infergate_requests_total{code="4xx",service="echo",version="echo"} 1.0' in text
    assert 'infergate_request_bytes_total{service="echo",version="echo"} 35.0' in text
    assert "infergate_request_seconds_bucket" in text
    assert f'infergate_instance_up{{instance="127.0.0.1:{w.port}",service="echo"}} 1.0' in text


def test_weight_zero_drains(procs, tmp_path):
    a, b = start_echo_worker(procs), start_echo_worker(procs)
    seed_services(str(tmp_path), [{"name": "echo", "config": {
        "name": "echo", "endpoints": endpoints(a, b, weights=[100, 0])}}])
    gw = start_gateway(procs, str(tmp_path))
    bodies = {post(gw.url + "/api/predict/echo", b"x")[1] for _ in range(20)}
    assert bodies == {f"{a.port}:x".encode()}
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("GET", "/exported/apis/eas.alibaba-inc.k8s.io/v1/upstreams/echo")
    import json
    listed = json.loads(conn.getresponse().read())
    assert listed == {"correlative": ["echo"], "endpoints": {"items": [
        {"app": "echo", "ip": "127.0.0.1", "port": a.port, "weight": 100}]}}


def test_client_disconnect_cancels_the_upstream_request(procs, tmp_path):
    """The gateway closes its upstream connection when the client goes away mid-request."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    slow_port = listener.getsockname()[1]
    seed_services(str(tmp_path), [{"name": "slow", "config": {
        "name": "slow", "endpoints": [{"ip": "127.0.0.1", "port": slow_port}]}}])
    gw = start_gateway(procs, str(tmp_path), "--health-interval", "60")
    client = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    client.sendall(b"POST /api/predict/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    listener.settimeout(5)
    upstream, _ = listener.accept()
    upstream.settimeout(5)
    assert upstream.recv(65536).startswith(b"POST /api/predict/slow HTTP/1.1\r\n")
    client.close()  # the client gives up before the upstream answers
    assert upstream.recv(65536) == b""  # EOF: the gateway dropped the upstream request
    upstream.close()
    listener.close()


def test_several_processes_share_one_port(procs, tmp_path):
    w = start_echo_worker(procs)
    seed_services(str(tmp_path), [{"name": "echo", "config": {"name": "echo",
                                                              "endpoints": endpoints(w)}}])
    gw = start_gateway(procs, str(tmp_path), "--processes", "2")
    for _ in range(40):  # fresh connections: the kernel spreads them over both processes
        assert post(gw.url + "/api/predict/echo", b"x")[0] == 200
    import os
    import subprocess
    children = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert len(children) == 2
    gw.kill(signal.SIGTERM)
    assert gw.proc.wait(15) == 0
    assert all(not os.path.exists(f"/proc/{pid}") for pid in children)


def test_instances_without_a_service_record_are_not_routed(procs, tmp_path):
    """A deleted service must not come back, tokenless, through a worker still heartbeating."""
    import asyncio

    from gateway.registry import open_store
    from gateway.registry.records import InstanceRecord

    w = start_echo_worker(procs, "ghost")

    async def register():
        store = open_store(str(tmp_path))
        await store.start()
        await store.register_instance(InstanceRecord(service="ghost", ip="127.0.0.1",
                                                     port=w.port), ttl=0)
        await store.close()

    asyncio.run(register())
    gw = start_gateway(procs, str(tmp_path))
    status, body, _ = post(gw.url + "/api/predict/ghost", b"x")
    assert status == 404 and "ghost" in error_message(body)


def test_an_upstream_that_never_answers_gets_504_at_its_deadline(procs, tmp_path):
    # The kernel completes connections to a listening socket nobody accepts on:
    # requests are sent and never answered.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    seed_services(str(tmp_path), [{"name": "silent", "config": {
        "name": "silent", "metadata": {"rpc.keepalive": 300},
        "endpoints": [{"ip": "127.0.0.1", "port": silent.getsockname()[1], "weight": 100}]}}])
    gw = start_gateway(procs, str(tmp_path))
    results = []

    def call():
        started = time.monotonic()
        status, body, _ = post(gw.url + "/api/predict/silent", b"hi")
        results.append((status, error_message(body), time.monotonic() - started))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # rpc.keepalive (0.3 s) plus the gateway's 1 s margin; never sooner.
    assert [r[:2] for r in results] == [
        (504, f"upstream 127.0.0.1:{silent.getsockname()[1]} did not answer within 1.3s")] * 6
    assert all(1.3 <= r[2] < 8 for r in results), results
    # The gateway itself stays responsive.
    assert post(gw.url + "/api/predict/nope", b"x")[0] == 404
    silent.close()


# --- the filter chain on its own -----------------------------------------------------------

def test_chain_pauses_at_a_waiting_filter_and_resumes_with_the_next():
    """A filter that must wait returns an awaitable: the chain pauses the request there
    and, when it gives None, goes on with the next filter (which answers here); a filter
    that answers at once stops the chain. Every answer gets its request id and is
    recorded once, by the observer handed to the chain."""
    import asyncio

    from gateway._native.chain import AuthFilter, Chain, RouteFilter, VersionFilter
    from gateway.proxy.filter import Filter
    from gateway.ratelimit import RateLimitFilter
    from gateway.server import Request, Response

    calls, observed = [], []

    def waits(ex):
        calls.append("waits")

        async def later():
            await asyncio.sleep(0.01)
            calls.append("waited")
            return None
        return later()

    def answers(ex):
        calls.append("answers")
        return Response(200, b"from the filter", None, "text/plain")

    def never(ex):
        calls.append("never")

    chain = Chain([waits, answers, never], lambda *a: observed.append(a),
                  lambda *a: None)
    request = Request("POST", "/api/predict/svc/sub", "", {"x-request-id": "r-1"}, [], b"abc",
                      ("127.0.0.1", 1), True)

    async def go():
        pending = chain.run(request)
        assert not isinstance(pending, Response)  # paused
        return await pending

    response = asyncio.run(go())
    assert calls == ["waits", "waited", "answers"]
    assert response.body == b"from the filter" and b"X-Request-Id: r-1" in response.headers
    assert len(observed) == 1 and observed[0][0] == "_unknown" and observed[0][2] == 200
    # Every filter of the gateway's chain is a Filter (gateway/proxy/filter.py).
    for f in (RouteFilter(None), AuthFilter(lambda *a: None), VersionFilter(),
              RateLimitFilter().check, waits):
        assert isinstance(f, Filter)
