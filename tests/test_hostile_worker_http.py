"""A worker's HTTP front against hostile clients (issue 21, M6 and M7), through a real worker
process over real sockets.

M7: a request's head and whole-message timeouts count from its first byte, so a client
that sends a byte now and then gets a 408 and a closed connection; bytes between requests
(CR LF) do not keep an idle connection open. The worker runs with short timeouts from the
environment so that each test takes seconds; the tests judge by the answers, with
deadlines that only a connection held open for good would reach.

M6: a JSON body whose innermost array is spoiled at its end, 32 levels deep, is read once,
not once per level: the worker spends on it about what it spends on a body of the same
size spoiled at the top.
"""
import json
import select
import socket
import time

import pytest

from conftest import cpu_seconds, free_port, infergate_cmd

TIMEOUTS = {"INFERGATE_WORKER_HEAD_TIMEOUT": "1", "INFERGATE_WORKER_READ_TIMEOUT": "2",
            "INFERGATE_WORKER_IDLE_TIMEOUT": "2"}
HANG = 20.0  # seconds: a connection still open this long would be open for good
PREDICT = "/api/predict/digits"


@pytest.fixture
def json_worker(procs):
    from gateway.models import DIGITS_MODEL

    port = free_port()
    return procs.start(infergate_cmd("worker", "--service", "digits", "--model",
                                     str(DIGITS_MODEL), "--processor", "json", "--host",
                                     "127.0.0.1", "--port", str(port)), port, env=TIMEOUTS)


def json_body(rows: int = 1) -> bytes:
    return json.dumps({"inputs": {"images": [[0.5] * 784] * rows}}).encode()


def trickle(port: int, first: bytes, then: bytes, every: float = 0.2) -> bytes:
    """Send `first`, then `then` a byte at a time every `every` seconds (round and round)
    until the worker closes the connection or HANG passes; what it answered (b"reset"
    when a byte crossed the worker's close: the kernel resets, and the answer is lost)."""
    sock = socket.create_connection(("127.0.0.1", port))
    answer = b""
    try:
        sock.sendall(first)
        deadline = time.monotonic() + HANG
        k = 0
        while time.monotonic() < deadline:
            if select.select([sock], [], [], every)[0]:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    return b"reset"
                if not chunk:
                    return answer
                answer += chunk
                continue
            try:
                sock.sendall(then[k % len(then):k % len(then) + 1])
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed: the next recv says so
            k += 1
        raise AssertionError(f"the connection was still open after {HANG}s: {answer!r}")
    finally:
        sock.close()


def call(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG)
    with sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: w\r\nContent-Length: {len(body)}\r\n"
                     "Content-Type: application/json\r\nConnection: close\r\n\r\n".encode()
                     + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, content = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), content


def test_a_head_sent_a_byte_at_a_time_gets_408_and_is_closed(json_worker):
    """Each byte used to start the read timeout again: 20 of 20 slow heads were open at 45 s."""
    answer = trickle(json_worker.port, f"POST {PREDICT} HTTP/1.1\r\n".encode(),
                     b"X-Slow: " + b"a" * 1000)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"request head was not received within 1s" in answer


def test_a_body_sent_a_byte_at_a_time_gets_408_and_is_closed(json_worker):
    body = json_body()
    answer = trickle(json_worker.port,
                     f"POST {PREDICT} HTTP/1.1\r\nHost: w\r\nContent-Length: {len(body)}\r\n"
                     "\r\n".encode(), body)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"request was not received within 2s" in answer


def test_line_ends_between_requests_keep_no_idle_connection_open(json_worker):
    """CR LF between requests begins no request: the connection is idle all the same."""
    answer = trickle(json_worker.port, b"GET /health HTTP/1.1\r\nHost: w\r\n\r\n", b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1, answer


def test_slow_clients_leave_the_worker_serving(json_worker):
    """Many slow heads at once are all closed (answered 408, or reset where a byte crossed
    the close), and a request split over pauses shorter than the timeouts is served; so
    is a plain one after them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: trickle(json_worker.port, b"POST / HTTP/1.1\r\n",
                                                  b"X: y\r\n"), range(20)))
    assert all(a.startswith(b"HTTP/1.1 408 ") or a == b"reset" for a in answers), answers
    assert any(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers
    body = json_body()
    with socket.create_connection(("127.0.0.1", json_worker.port), timeout=HANG) as sock:
        sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: w\r\n".encode())
        time.sleep(0.3)
        sock.sendall(f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        time.sleep(0.3)
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"outputs"' in answer, answer
    status, content = call(json_worker.port, "POST", PREDICT, body)
    assert status == 200, content


def test_a_deeply_nested_spoiled_array_is_read_once(json_worker):
    """8 MB, 32 levels deep, the innermost array spoiled at its end: every level used to read
    all of it again (4 s of CPU with /health blocked, against 0.2 s spoiled at the top).
    Now both cost the worker about the same, and both are answered 400 naming the input."""
    row = "[" + ",".join(["0.25"] * 784) + "]"
    rows = ",".join([row] * 2000) + ',"end"'
    deep = ('{"inputs": {"images": ' + "[" * 31 + rows + "]" * 31 + "}}").encode()
    flat = ('{"inputs": {"images": [' + rows + "]}}").encode()
    pid = json_worker.proc.pid
    spent = {}
    for name, body in (("flat", flat), ("deep", deep), ("flat", flat), ("deep", deep)):
        before = cpu_seconds(pid)
        status, content = call(json_worker.port, "POST", PREDICT, body)
        spent[name] = min(spent.get(name, 1e9), cpu_seconds(pid) - before)
        assert status == 400 and b"input 'images'" in content, content
    assert spent["deep"] <= 4 * spent["flat"] + 0.1, spent
    assert call(json_worker.port, "GET", "/health")[0] == 200
