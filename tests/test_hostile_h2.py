"""Hostile HTTP/2 against running workers and gateways (issue 21: C1, C2, H1, H2, M1, M8,
L7 over gRPC): nothing crashes, smuggles a request through, stalls the loop or grows
without bound, and a canary client keeps being answered throughout."""
from __future__ import annotations

import http.client
import socket
import threading

import pytest
import tritonclient.grpc as tgrpc

from conftest import cpu_seconds, free_port, infergate_cmd
from gateway_helpers import endpoints, seed_services, worker_requests
from h2_raw import (COMPRESSION_ERROR, NO_ERROR, PREFACE, PROTOCOL_ERROR, REFUSED_STREAM,
                    RawH2, frame, grpc_message, settings, wait_listening, window_update)
from hyperframe.frame import PingFrame, SettingsFrame

TOKEN = "h2-secret"
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"
SERVER_METADATA = "/inference.GRPCInferenceService/ServerMetadata"
MODEL_READY = "/inference.GRPCInferenceService/ModelReady"
OK, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 3, 4, 8


def start_worker(procs, *extra):
    from gateway.models import DIGITS_MODEL

    port, grpc_port = free_port(), free_port()
    worker = procs.start(infergate_cmd(
        "worker", "--service", "digits", "--model", str(DIGITS_MODEL), "--host", "127.0.0.1",
        "--port", str(port), "--grpc-port", str(grpc_port), "--token", TOKEN, *extra), port)
    worker.grpc_port = grpc_port
    wait_listening(grpc_port)
    return worker


def start_front(procs, tmp_path, *extra, worker=None, wrap=()):
    """A gateway with a gRPC port in front of a worker (`wrap`: a command it runs under)."""
    worker = worker or start_worker(procs)
    state = tmp_path / "state"
    seed_services(str(state), [{"name": "digits", "token": TOKEN,
                                "config": {"endpoints": endpoints(worker)}}])
    grpc_port, port = free_port(), free_port()
    gateway = procs.start([*wrap, *infergate_cmd(
        "gateway", "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state),
        "--admin-token", "admin-secret", "--health-interval", "0.3", "--grpc-port",
        str(grpc_port), *extra)], port)
    gateway.grpc_port = grpc_port
    gateway.worker = worker
    wait_listening(grpc_port)
    return gateway


def live(grpc_port: int, timeout: float = 5.0) -> bool:
    """A canary: tritonclient's ServerLive, answered within a deadline only a hang passes."""
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        return client.is_server_live(client_timeout=timeout)
    finally:
        client.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def model_ready_request(name: str) -> bytes:
    from gateway.protos import oip_pb2 as pb

    return pb.ModelReadyRequest(name=name).SerializeToString()


# --- C1: the pre-authentication HPACK crash --------------------------------------------------

@pytest.mark.parametrize("block", ["00ff8080808008", "000161fff8feffff0f"],
                         ids=["negative-length", "looping"])  # (a length of -9 at byte 9)
def test_c1_header_blocks_are_compression_errors_on_worker_and_gateway(procs, tmp_path,
                                                                         block):
    gateway = start_front(procs, tmp_path)
    for target in (gateway.worker, gateway):
        c = RawH2(target.grpc_port)
        c.send(frame(0x1, 0x5, 1, bytes.fromhex(block)))
        assert c.goaway_code() == COMPRESSION_ERROR
        assert target.proc.poll() is None
        assert live(target.grpc_port)


# --- C2: nothing unvalidated crosses into HTTP/1.1 -----------------------------------------

def test_c2_an_injected_model_name_is_refused(procs, tmp_path):
    """A model name carrying a second request (the one that once answered another
    client's next call) is INVALID_ARGUMENT naming the field, and the next client gets
    its own answer."""
    gateway = start_front(procs, tmp_path)
    injected = ("digits/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                "GET /v2/models/digits/versions/x")
    c = RawH2(gateway.grpc_port)
    c.call(1, MODEL_READY, model_ready_request(injected), [("authorization", TOKEN)])
    answer = c.answer(1)
    assert answer.status == INVALID_ARGUMENT and "model name" in answer.message
    for name in ("../digits", "digits/../x", "a" * 129, "digits x"):
        c = RawH2(gateway.grpc_port)
        c.call(1, MODEL_READY, model_ready_request(name), [("authorization", TOKEN)])
        assert c.answer(1).status == INVALID_ARGUMENT, name
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}")
    assert client.is_model_ready("digits", headers={"authorization": TOKEN})
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    conn.request("GET", "/v2/models/nosuch/ready")
    assert conn.getresponse().status == 404


def test_c2_metadata_that_is_not_http_never_reaches_the_upstream(procs, tmp_path):
    """CR, LF, NUL in values, spaces or upper case in names: nghttp2 refuses them at the
    HPACK level (RST_STREAM PROTOCOL_ERROR), or the gateway does (INVALID_ARGUMENT);
    either way nothing is forwarded, and the worker saw no request."""
    gateway = start_front(procs, tmp_path)
    for metadata in ([("x-evil", "a\r\nx-injected: 1")], [("x-evil", "a\nGET / HTTP/1.1")],
                     [("x-evil", "a\x00b")], [("x evil", "a")], [("X-Upper", "a")]):
        c = RawH2(gateway.grpc_port)
        c.call(1, MODEL_READY, model_ready_request("digits"),
               [("authorization", TOKEN), *metadata])
        answer = c.answer(1)
        assert answer.reset == PROTOCOL_ERROR or answer.status == INVALID_ARGUMENT, \
            (metadata, answer.reset, answer.status, answer.message)
    assert worker_requests(gateway.worker.url) == 0


def test_c2_a_request_id_must_be_visible_ascii(procs, tmp_path):
    gateway = start_front(procs, tmp_path)
    for request_id, code in (("a b", INVALID_ARGUMENT), ("x" * 129, INVALID_ARGUMENT),
                             ("req-1", OK)):
        c = RawH2(gateway.grpc_port)
        c.call(1, MODEL_READY, model_ready_request("digits"),
               [("authorization", TOKEN), ("x-request-id", request_id)])
        answer = c.answer(1)
        assert answer.status == code, (request_id, answer.message)
        if code:
            assert "x-request-id" in answer.message


# --- L7 over gRPC: two authorization entries ---------------------------------------------

def test_l7_two_authorization_entries_are_refused(procs, tmp_path):
    gateway = start_front(procs, tmp_path)
    for target in (gateway.worker, gateway):
        c = RawH2(target.grpc_port)
        c.call(1, MODEL_READY, model_ready_request("digits"),
               [("authorization", "wrong"), ("authorization", TOKEN)])
        answer = c.answer(1)
        assert answer.status == INVALID_ARGUMENT and "authorization" in answer.message


# --- H1: zero-window streams and small frames ------------------------------------------------

def test_h1_zero_window_streams_do_not_stall_the_loop(procs, tmp_path):
    """20,000 streams whose answers wait on a zero window, then a stream of 13-byte
    WINDOW_UPDATEs: the gateway refuses streams past 100, and a canary keeps being
    answered (the old core walked every blocked answer per frame: seconds each)."""
    gateway = start_front(procs, tmp_path)
    attacker = RawH2(gateway.grpc_port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0},
                     timeout=30)
    streams = [attacker.headers_frame(2 * i + 1) + frame(0x0, 0x1, 2 * i + 1, grpc_message())
               for i in range(20000)]
    drained = threading.Event()

    def drain():  # the attacker reads what comes back, and keeps nothing of it
        attacker.sock.settimeout(60)
        try:
            while attacker.sock.recv(1 << 16):
                pass
        except OSError:
            pass
        drained.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    sender_done = threading.Event()

    def attack():
        try:
            for i in range(0, len(streams), 500):
                attacker.send(b"".join(streams[i:i + 500]))
            for _ in range(300):
                attacker.send(window_update(0, 1))
        except OSError:
            pass
        sender_done.set()

    threading.Thread(target=attack, daemon=True).start()
    answered = []
    while not sender_done.is_set() and len(answered) < 40:
        answered.append(live(gateway.grpc_port))
    assert sender_done.wait(60)
    answered.append(live(gateway.grpc_port))
    assert all(answered), answered
    attacker.close()


# --- H2: stream cap, unended streams, idle connections ------------------------------------

def test_h2_the_gateway_caps_streams_at_100(procs, tmp_path):
    gateway = start_front(procs, tmp_path)
    c = RawH2(gateway.grpc_port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    c.until(lambda: any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in c.frames))
    c.send(b"".join(c.headers_frame(2 * i + 1) for i in range(150)))
    assert c.stream_error(201) in (REFUSED_STREAM, PROTOCOL_ERROR)
    assert live(gateway.grpc_port)


def test_h2_unended_streams_share_a_connection_budget(procs, tmp_path):
    """8 streams of 3 MiB that never end, on a gateway taking 4 MiB messages: the
    connection holds 2 messages' worth at most, the rest get RESOURCE_EXHAUSTED."""
    gateway = start_front(procs, tmp_path, "--max-body-mb", "4")
    before = rss_kib(gateway.proc.pid)
    c = RawH2(gateway.grpc_port, timeout=30)
    for stream in range(1, 17, 2):
        c.send(c.headers_frame(stream, MODEL_READY, [("authorization", TOKEN)]))
        c.send_data(stream, bytes(3 << 20))
    c.until(lambda: sum(a.status == RESOURCE_EXHAUSTED for a in c.answers.values()) >= 6,
            timeout=30)
    refused = [a for a in c.answers.values() if a.status == RESOURCE_EXHAUSTED]
    assert "unfinished requests" in refused[0].message
    assert rss_kib(gateway.proc.pid) - before < 40 * 1024
    assert live(gateway.grpc_port)


def test_grpc_and_http_bodies_share_the_gateways_body_budget(procs, tmp_path):
    """Item 2: one memory budget for request bodies across the gateway. An HTTP/1 body that
    has not finished arriving holds what has arrived of it (3 of --max-buffered-body-mb's 4); a gRPC message that
    would pass it gets RESOURCE_EXHAUSTED naming the flag, and fits again once the HTTP
    client has gone."""
    gateway = start_front(procs, tmp_path, "--max-body-mb", "4", "--max-buffered-body-mb", "4")
    held = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
    held.sendall(b"POST /api/predict/digits HTTP/1.1\r\nHost: gw\r\nAuthorization: %s\r\n"
                 b"Content-Length: %d\r\n\r\n" % (TOKEN.encode(), 4 << 20) + bytes(3 << 20))
    probe = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    probe.request("GET", "/health")  # answered after the held head is read (one loop, in order)
    assert probe.getresponse().status == 200
    c = RawH2(gateway.grpc_port, timeout=30)
    c.send(c.headers_frame(1, MODEL_READY, [("authorization", TOKEN)]))
    c.send_data(1, grpc_message(bytes(2 << 20)))
    answer = c.answer(1)
    assert answer.status == RESOURCE_EXHAUSTED and "--max-buffered-body-mb" in answer.message
    held.close()
    for _ in range(50):  # the gateway frees the HTTP client's share once it sees the close
        again = RawH2(gateway.grpc_port, timeout=30)
        again.send(again.headers_frame(1, MODEL_READY, [("authorization", TOKEN)]))
        again.send_data(1, grpc_message(model_ready_request("digits")), end_stream=True)
        if again.answer(1).status != RESOURCE_EXHAUSTED:
            break
    assert again.answer(1).status == OK


def test_h2_unended_requests_and_idle_connections_time_out(procs, tmp_path):
    gateway = start_front(procs, tmp_path, "--read-timeout", "1", "--idle-timeout", "1")
    c = RawH2(gateway.grpc_port)
    c.send(c.headers_frame(1, MODEL_READY, [("authorization", TOKEN)]) +
           frame(0x0, 0, 1, b"\x00\x00"))
    answer = c.answer(1)
    assert answer.status == DEADLINE_EXCEEDED and "not received" in answer.message
    assert c.goaway_code() == NO_ERROR  # then idle: closed
    half = RawH2(gateway.grpc_port)
    half.send(half.headers_frame(1, end_headers=False))  # a header block never finished
    assert half.goaway_code() == PROTOCOL_ERROR


def test_h2_idle_grpc_connections_count_against_max_connections(procs, tmp_path):
    """A gateway with 128 descriptors (so 64 client connections): 200 idle gRPC
    connections cannot take them all; HTTP and gRPC clients are still served."""
    gateway = start_front(procs, tmp_path, wrap=("prlimit", "--nofile=128:128"))
    idle = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", gateway.grpc_port), timeout=5)
        s.sendall(PREFACE + settings())
        idle.append(s)
    try:
        assert live(gateway.grpc_port)
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        assert live(gateway.grpc_port)
    finally:
        for s in idle:
            s.close()


def test_idle_grpc_connections_cannot_take_a_workers_descriptors(procs):
    """A worker with 128 descriptors: 200 idle gRPC connections meet its connection cap
    (below the descriptor limit) and the longest idle make room, so a client is served."""
    from gateway.models import DIGITS_MODEL

    port, grpc_port = free_port(), free_port()
    worker = procs.start(["prlimit", "--nofile=128:128", *infergate_cmd(
        "worker", "--service", "digits", "--model", str(DIGITS_MODEL), "--host", "127.0.0.1",
        "--port", str(port), "--grpc-port", str(grpc_port))], port)
    wait_listening(grpc_port)
    idle = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", grpc_port), timeout=5)
        s.sendall(PREFACE + settings())
        idle.append(s)
    try:
        assert live(grpc_port)
        conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        for s in idle:
            s.close()


# --- M1: acks to a client that never reads ---------------------------------------------------

@pytest.mark.parametrize("flood", ["ping", "settings"])
def test_m1_a_flood_that_never_reads_stays_bounded(procs, tmp_path, flood):
    gateway = start_front(procs, tmp_path)
    pid = gateway.proc.pid
    before = rss_kib(pid)
    if flood == "ping":
        p = PingFrame(0)
        p.opaque_data = b"12345678"
        one = p.serialize()
    else:
        one = settings((0x3, 100))
    burst = one * ((1 << 20) // len(one))  # about 1 MiB of frames
    s = socket.create_connection(("127.0.0.1", gateway.grpc_port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(PREFACE + settings())
    sent = 0
    try:
        while sent < 32 << 20:  # the old core took all of it, queueing an ack for each
            s.sendall(burst)
            sent += len(burst)
    except OSError:  # the gateway stopped reading (timeout) or closed the connection
        pass
    assert live(gateway.grpc_port)
    assert rss_kib(pid) - before < 64 * 1024, (sent >> 20, "MiB sent")
    s.close()


# --- M8: HPACK state across streams the server reset ----------------------------------------

def test_m8_header_blocks_on_reset_streams_are_still_decoded(procs, tmp_path):
    """Stream 1 is refused early (its message is over the worker's 1 MiB) and reset; its
    trailers, sent as the reset crossed them, add ':path ServerMetadata' to HPACK's table. Stream 3 names its
    method by that entry: the worker must run ServerMetadata, not what a table that
    skipped the trailers would say."""
    worker = start_worker(procs, "--max-body-mb", "1")
    c = RawH2(worker.grpc_port)
    c.send(c.headers_frame(1, SERVER_LIVE))
    c.send_data(1, bytes(1 << 20))
    c.send(frame(0x0, 0, 1, bytes(100)))
    assert c.answer(1).status == RESOURCE_EXHAUSTED
    c.reset_code(1)  # (NO_ERROR: the client may stop sending) and the client, racing it:
    c.send(frame(0x1, 0x5, 1, c.block([(":path", SERVER_METADATA)])))
    c.send(frame(0x1, 0x4, 3, c.block([
        (":method", "POST"), (":scheme", "http"), (":path", SERVER_METADATA),
        (":authority", "localhost"), ("content-type", "application/grpc"),
        ("te", "trailers")])) + frame(0x0, 0x1, 3, grpc_message()))
    answer = c.answer(3)
    assert answer.status == OK
    from gateway.protos import oip_pb2 as pb

    assert pb.ServerMetadataResponse.FromString(answer.data[5:]).name


def test_a_tokenless_call_spends_no_work_on_its_typed_contents(procs, tmp_path):
    """The gateway turns typed contents (here 3 million BYTES elements, 2 bytes each on the
    wire) into a tensor body on its loop, which costs memory and time linear in the
    message: a call without the service's token is refused before that."""
    from gateway.protos import oip_pb2 as pb

    gateway = start_front(procs, tmp_path)
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=[3_000_000])
    tensor.contents.bytes_contents.extend([b""] * 3_000_000)
    message = grpc_message(request.SerializeToString())
    c = RawH2(gateway.grpc_port, timeout=30)
    assert live(gateway.grpc_port)  # (started up: its CPU time from here is the call's)
    cpu_before = cpu_seconds(gateway.proc.pid)
    c.send(c.headers_frame(1, "/inference.GRPCInferenceService/ModelInfer",
                           [("authorization", "not-the-token")]))
    c.send_data(1, message, end_stream=True)
    answer = c.answer(1, timeout=30)
    # The gRPC front's own refusal, before the message's contents are converted (the
    # chain's, after them, says "invalid token"); that conversion alone cost 1.2 s of CPU.
    assert answer.status == 16 and "does not match" in answer.message  # UNAUTHENTICATED
    assert cpu_seconds(gateway.proc.pid) - cpu_before < 0.6
