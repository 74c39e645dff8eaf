"""The gateway's compiled data plane (csrc/proxy/dataplane.pyx) at the HTTP level.

A real gateway in front of a small real HTTP server that echoes what it got
(method, path, headers, body) and can answer chunked. Raw sockets send what
clients send: pipelined requests, chunked bodies, Expect: 100-continue,
broken heads.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gateway_helpers import start_gateway
from test_control_plane import admin


@pytest.fixture
def echo_server():
    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen = json.dumps({"method": self.command, "path": self.path,
                               "headers": {k.lower(): v for k, v in self.headers.items()},
                               "body": body.decode("latin-1")}).encode()
            if self.path.endswith("/not-modified"):  # a length, and no body (RFC 9110)
                self.send_response(304)
                self.send_header("Content-Length", "1234")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Upstream", "echo")
            self.send_header("Keep-Alive", "timeout=5")
            if self.path.endswith("/chunked"):
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(seen), 7):
                    part = seen[start:start + 7]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("Content-Length", str(len(seen)))
            self.end_headers()
            self.wfile.write(seen)

        do_POST = do_GET = answer

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "42")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def gateway(procs, tmp_path, echo_server):
    gw = start_gateway(procs, str(tmp_path / "state"))
    status, _ = admin(gw.url, "POST", "/admin/services", {
        "name": "echo", "upstream_path": "/up",
        "endpoints": [{"ip": "127.0.0.1", "port": echo_server}]})
    assert status in (200, 201)
    return gw


def exchange(gw, data: bytes, responses: int = 1, timeout: float = 10.0) -> list[tuple]:
    """Send raw bytes on one connection; read `responses` answers: (status, headers, body)."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    sock.sendall(data)
    buf = b""
    answers = []
    deadline = time.monotonic() + timeout
    while len(answers) < responses and time.monotonic() < deadline:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buf[:head_end].decode("latin-1").split("\r\n")
            status = int(head[0].split()[1])
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", 0))
            if len(buf) >= head_end + 4 + length:
                answers.append((status, headers, buf[head_end + 4:head_end + 4 + length]))
                buf = buf[head_end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    sock.close()
    return answers


def test_forwarded_request_and_answer_are_rewritten_as_a_proxy_must(gateway):
    """Upstream gets the subpath and query, its own Host, a request id, the client's own
    headers and the body, and no hop-by-hop headers; the client gets the upstream's status,
    content type, its own headers, the request id, and no hop-by-hop ones."""
    (status, headers, body), = exchange(gateway, (
        b"POST /api/predict/echo/sub/path?x=1 HTTP/1.1\r\nHost: gw\r\nX-Custom: yes\r\n"
        b"Connection: keep-alive\r\nKeep-Alive: timeout=9\r\nContent-Length: 5\r\n\r\nhello"))
    seen = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["x-upstream"] == "echo" and "keep-alive" not in headers
    assert seen["path"] == "/up/sub/path?x=1" and seen["body"] == "hello"
    assert seen["headers"]["x-custom"] == "yes" and "keep-alive" not in seen["headers"]
    assert seen["headers"]["host"].startswith("127.0.0.1:")
    assert seen["headers"]["x-request-id"] == headers["x-request-id"]
    assert len(headers["x-request-id"]) == 32


def test_pipelined_requests_are_answered_in_order(gateway):
    requests = b"".join(b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n"
                        b"\r\n%s" % (len(b), b) for b in (b"one", b"two", b"three"))
    answers = exchange(gateway, requests, responses=3)
    assert [json.loads(body)["body"] for _, _, body in answers] == ["one", "two", "three"]


def test_chunked_bodies_both_ways(gateway):
    """A chunked request body reaches the upstream whole; a chunked answer reaches the
    client with a Content-Length."""
    (status, headers, body), = exchange(gateway, (
        b"POST /api/predict/echo/chunked HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n"))
    assert status == 200 and "transfer-encoding" not in headers
    assert int(headers["content-length"]) == len(body)
    assert json.loads(body)["body"] == "wikipedia"


def test_expect_100_continue(gateway):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 4\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(b"body")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200") and b'"body": "body"' in answer
    sock.close()


@pytest.mark.parametrize("request_bytes, status, says", [
    (b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n"
     b"Content-Length: 4\r\n\r\nabcd", 400, "malformed"),
    (b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "malformed"),
    (b"GARBAGE\r\n\r\n", 400, "malformed"),
    (b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 999999999999\r\n\r\n", 413,
     "larger than the limit"),
    (b"GET /api/predict/echo HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
     431, "too large"),
    (b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 400, "upgrades"),
    # one header hiding another behind a bare LF (request smuggling)
    (b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nX-A: b\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 2\r\n\r\nhi", 400, "malformed"),
    (b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nContent-Length\t: 2\r\n\r\nhi", 400,
     "malformed"),
    (b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
     b"0\r\n\r\n", 400, "malformed"),
    (b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"+4\r\nwiki\r\n0\r\n\r\n", 400, "chunk size"),
    (b"POST /api/predict/echo HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0x4\r\nwiki\r\n0\r\n\r\n", 400, "chunk size"),
])
def test_bad_requests_get_a_clear_error_and_the_connection_closes(gateway, request_bytes,
                                                                  status, says):
    answers = exchange(gateway, request_bytes)
    assert answers and answers[0][0] == status, answers
    assert says in json.loads(answers[0][2])["message"]
    assert answers[0][1].get("connection") == "close"


def test_head_requests_and_the_python_side_share_the_port(gateway):
    """HEAD (no body after a Content-Length) goes through the Python forwarder; health,
    metrics and the admin API answer on the same port; answers to HEAD carry no body."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(b"HEAD /api/predict/echo HTTP/1.1\r\nHost: gw\r\n\r\n"
                 b"HEAD /health HTTP/1.1\r\nHost: gw\r\n\r\n"
                 b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
    seen = b""
    while not seen.endswith(b'{"status":"ok"}'):
        chunk = sock.recv(65536)
        assert chunk, seen
        seen += chunk
    sock.close()
    heads = seen.split(b"\r\n\r\n")
    assert [h.split(b"\r\n")[0] for h in heads[:3]] == [b"HTTP/1.1 200 OK"] * 3
    assert heads[3] == b'{"status":"ok"}'  # only the GET's answer has a body
    for path in (b"/health", b"/metrics", b"/admin/services"):
        (status, _, _), = exchange(gateway, b"GET %s HTTP/1.1\r\nHost: gw\r\n"
                                            b"Authorization: Bearer admin-secret\r\n\r\n" % path)
        assert status == 200, path


def test_an_answer_without_a_body_is_passed_on_at_once(gateway):
    """A 304 may give a Content-Length without a body: the gateway must not wait for one."""
    started = time.monotonic()
    (status, headers, body), = exchange(
        gateway, b"GET /api/predict/echo/not-modified HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 304 and body == b"" and time.monotonic() - started < 5, body


def test_http_1_0_closes_unless_asked_to_keep_alive(gateway):
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(b"POST /api/predict/echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
    answer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break  # closed by the gateway after its answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
    sock.close()
