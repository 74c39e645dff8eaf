"""Traffic control through a running gateway: shares, header rules, live releases."""
from __future__ import annotations

import http.client
import json
import threading

import pytest

from gateway_helpers import post, start_gateway
from test_gateway import start_echo_worker

ADMIN = "admin-secret"  # start_gateway's admin token


def admin(gw, method: str, path: str, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                 headers={"Authorization": f"Bearer {ADMIN}"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    assert resp.status in (200, 201), payload
    return json.loads(payload) if payload else None


def java_hash(text: str) -> int:
    h = 0
    for unit in text.encode("utf-16-le").hex(" ", 2).split():  # UTF-16 code units
        h = (31 * h + int.from_bytes(bytes.fromhex(unit), "little")) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def java_rem(a: int, b: int) -> int:
    r = abs(a) % abs(b)
    return -r if a < 0 else r


@pytest.fixture
def fleet(procs, tmp_path):
    """A gateway with service `shop` (worker a) and a second version `shop_v2` (worker b)."""
    a, b = start_echo_worker(procs, "shop"), start_echo_worker(procs, "shop_v2")
    gw = start_gateway(procs, str(tmp_path / "state"))
    for name, worker in (("shop", a), ("shop_v2", b)):
        admin(gw, "POST", "/admin/services", {
            "name": name, "endpoints": [{"ip": "127.0.0.1", "port": worker.port, "weight": 100}]})
    return gw, a, b


def answered_by(body: bytes) -> int:
    return int(body.split(b":", 1)[0])


def send(gw, count: int, headers_for=lambda i: {}, threads: int = 4):
    """(port that answered, headers sent) per request; failures collected separately."""
    results, failures = [], []
    lock = threading.Lock()

    def client(offset):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        for i in range(offset, count, threads):
            headers = headers_for(i)
            conn.request("POST", "/api/predict/shop", body=b"x", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            with lock:
                if resp.status == 200:
                    results.append((answered_by(body), headers))
                else:
                    failures.append((resp.status, body))
        conn.close()

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    return results, failures


def test_80_20_split_over_20000_requests(fleet):
    gw, a, b = fleet
    admin(gw, "PUT", "/admin/services/shop/traffic", {"shop": 80, "shop_v2": 20})
    results, failures = send(gw, 20000)
    assert failures == []
    share_b = sum(1 for port, _ in results if port == b.port) / len(results)
    assert len(results) == 20000
    assert abs(share_b - 0.20) <= 0.01, share_b


def test_header_rules_pick_their_version_deterministically(fleet):
    gw, a, b = fleet
    admin(gw, "PUT", "/admin/services/shop/traffic", {"shop": 80, "shop_v2": 20})
    admin(gw, "PUT", "/admin/services/shop/rules", [
        {"condition": "#HEADER_version == '0.0.2'", "target": "shop_v2"},
        {"condition": "#HEADER_uid.hashCode() % 100 < 10 and #HEADER_uid.hashCode() % 100 > -10",
         "target": "shop_v2", "header_name": "X-Canary", "header_value": "true"},
        {"condition": "#HEADER_uid matches 'internal-.*'", "target": "shop"},
    ])
    uids = [f"user-{i}" for i in range(300)] + [f"internal-{i}" for i in range(50)]

    def headers_for(i):
        if i % 7 == 0:
            return {"Version": "0.0.2"}
        return {"uid": uids[i % len(uids)]}

    results, failures = send(gw, 3500, headers_for)
    assert failures == []
    by_uid: dict[str, set] = {}
    for port, headers in results:
        if "Version" in headers:
            assert port == b.port  # rule 1, header names case-insensitive
            continue
        uid = headers["uid"]
        by_uid.setdefault(uid, set()).add(port)
        if -10 < java_rem(java_hash(uid), 100) < 10:
            assert port == b.port, uid  # rule 2
        elif uid.startswith("internal-"):
            assert port == a.port, uid  # rule 3
    matched = [u for u in by_uid if -10 < java_rem(java_hash(u), 100) < 10
               or u.startswith("internal-")]
    assert len(matched) > 30
    assert all(len(by_uid[u]) == 1 for u in matched)  # same value, same version, every time
    # Unmatched requests follow the 80/20 shares.
    rest = [port for port, h in results if "uid" in h and h["uid"] not in matched]
    assert 0.10 < sum(1 for p in rest if p == b.port) / len(rest) < 0.30


@pytest.fixture
def header_echo_server():
    """Any HTTP server behind the gateway: this one answers with the headers it got."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_rule_adds_its_header_to_the_forwarded_request(procs, tmp_path, header_echo_server):
    gw = start_gateway(procs, str(tmp_path / "state"))
    admin(gw, "POST", "/admin/services", {
        "name": "shop", "upstream_path": "/infer",
        "endpoints": [{"ip": "127.0.0.1", "port": header_echo_server}]})
    admin(gw, "PUT", "/admin/services/shop/rules", [
        {"condition": "#HEADER_user == 'a'", "target": "shop", "header_name": "X-Canary",
         "header_value": "true"}])
    status, body, _ = post(gw.url + "/api/predict/shop", b"hello", {"User": "a"})
    seen = json.loads(body)
    assert status == 200 and seen["x-canary"] == "true" and seen["user"] == "a"
    assert len(seen["x-request-id"]) == 32
    status, body, _ = post(gw.url + "/api/predict/shop", b"hello", {"User": "b"})
    assert status == 200 and "x-canary" not in json.loads(body)


def test_release_0_50_100_under_load_loses_no_request(fleet):
    gw, a, b = fleet
    admin(gw, "POST", "/admin/services?linked=true", {
        "name": "shop", "upstream_path": "/api/predict/shop_v2",
        "endpoints": [{"ip": "127.0.0.1", "port": b.port, "weight": 100}]})
    linked = [s["name"] for s in admin(gw, "GET", "/admin/services")
              if s.get("linked_to") == "shop"][0]
    stop = threading.Event()
    seen, failures = [], []

    def load():
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        while not stop.is_set():
            conn.request("POST", "/api/predict/shop", body=b"x")
            resp = conn.getresponse()
            body = resp.read()
            (seen.append(answered_by(body)) if resp.status == 200
             else failures.append((resp.status, body)))
        conn.close()

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    import time
    phases = {}
    for weight in (0, 50, 100):
        admin(gw, "POST", f"/admin/services/{linked}/release", {"weight": weight})
        time.sleep(0.3)  # the change reaches the data plane
        start = len(seen)
        time.sleep(1.0)
        phases[weight] = seen[start:]
    stop.set()
    for t in threads:
        t.join(30)
    assert failures == []
    assert len(seen) > 300
    share = {w: sum(1 for p in s if p == b.port) / len(s) for w, s in phases.items()}
    assert share[0] == 0.0
    assert 0.40 <= share[50] <= 0.60
    assert share[100] == 1.0


def test_discovery_lists_the_services_own_instances(fleet):
    """Direct clients call a service's own instances (they serve its name and token);
    shares and rules are applied by the gateway."""
    gw, a, b = fleet
    admin(gw, "PUT", "/admin/services/shop/traffic", {"shop": 80, "shop_v2": 20})
    for service, worker in (("shop", a), ("shop_v2", b)):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        conn.request("GET", f"/api/v1/servicediscovery/upstreams/{service}")
        listed = json.loads(conn.getresponse().read())
        conn.close()
        assert listed == {"correlative": [service], "endpoints": {"items": [
            {"app": service, "ip": "127.0.0.1", "port": worker.port, "weight": 100}]}}


def test_servers_without_a_health_route_stay_in(procs, tmp_path, header_echo_server):
    """Static endpoints (Triton and friends have no /health) are checked by a TCP connect."""
    import time

    gw = start_gateway(procs, str(tmp_path / "state"))  # health checks every 0.3 s
    admin(gw, "POST", "/admin/services", {
        "name": "ext", "upstream_path": "/infer",
        "endpoints": [{"ip": "127.0.0.1", "port": header_echo_server}]})
    time.sleep(1.5)
    for _ in range(5):
        assert post(gw.url + "/api/predict/ext", b"x")[0] == 200


def test_a_stopped_version_gives_its_share_to_the_others(fleet):
    gw, a, b = fleet
    admin(gw, "PUT", "/admin/services/shop/traffic", {"shop": 70, "shop_v2": 30})
    admin(gw, "POST", "/admin/services/shop_v2/stop")
    results, failures = send(gw, 40)
    assert failures == [] and {port for port, _ in results} == {a.port}


def test_token_set_and_cleared_with_modify(fleet):
    gw, a, b = fleet
    admin(gw, "POST", "/admin/services/shop/modify", {"set": {"token": "t0ken"}})
    assert post(gw.url + "/api/predict/shop", b"x")[0] == 401
    assert post(gw.url + "/api/predict/shop", b"x", {"Authorization": "t0ken"})[0] == 200
    admin(gw, "POST", "/admin/services/shop/modify", {"set": {"token": None}})  # -Dtoken=null
    assert post(gw.url + "/api/predict/shop", b"x")[0] == 200


def test_versions_must_speak_the_same_request_format(procs, tmp_path):
    from gateway.models import DIGITS_MODEL

    gw = start_gateway(procs, str(tmp_path / "state"))
    for name, processor in (("tf", "tensorflow"), ("js", "json"), ("tf2", "tensorflow")):
        admin(gw, "POST", "/admin/services?wait=false", {
            "name": name, "model_path": str(DIGITS_MODEL), "processor": processor,
            "metadata": {"instance": 0}})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("PUT", "/admin/services/tf/traffic", body=json.dumps({"tf": 70, "js": 30}),
                 headers={"Authorization": f"Bearer {ADMIN}"})
    resp = conn.getresponse()
    message = json.loads(resp.read())["message"]
    conn.close()
    assert resp.status == 400 and "json" in message and "tensorflow" in message
    admin(gw, "PUT", "/admin/services/tf/traffic", {"tf": 70, "tf2": 30})


def test_heartbeats_leave_the_pickers_in_place(procs, tmp_path):
    """Two registered instances of equal weight take turns (smooth WRR). A heartbeat
    after every request changes nothing that routes, so the turns go on: were the
    route table rebuilt on each one, every request would start a new cycle and land
    on the first instance."""
    from gateway_helpers import seed_services

    a, b = start_echo_worker(procs, "pair"), start_echo_worker(procs, "pair")
    state = str(tmp_path / "state")
    seed_services(state, [{"name": "pair", "config": {"name": "pair"}}])
    gw = start_gateway(procs, state)
    for worker in (a, b):
        admin(gw, "POST", "/admin/instances/pair", {
            "instance": {"ip": "127.0.0.1", "port": worker.port, "weight": 100}, "ttl": 60})
    instance_a = f"127.0.0.1:{a.port}"
    answered = []
    for _ in range(20):
        status, body, _ = post(gw.url + "/api/predict/pair", b"x")
        assert status == 200, body
        answered.append(answered_by(body))
        assert admin(gw, "POST", f"/admin/instances/pair/{instance_a}/heartbeat",
                     {"ttl": 60})["ok"]
    assert answered.count(a.port) == answered.count(b.port) == 10
    assert all(x != y for x, y in zip(answered, answered[1:]))  # strictly in turns
