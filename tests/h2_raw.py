"""A raw HTTP/2 client for tests of our gRPC servers: frames written byte for byte
(hyperframe and hpack, the h2 package's own layers), so that a test can send what no
well-behaved client would, and read every frame the server sends back."""
from __future__ import annotations

import socket
import struct
import time

from hpack import Decoder, Encoder
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame,
                              PingFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9113 section 7 error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xb
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"


def wait_listening(port: int, timeout: float = 20.0) -> None:
    """Until the port accepts connections (a gRPC port opens after the HTTP one answers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One frame as bytes, whatever it holds."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + \
        struct.pack(">I", stream) + payload


def grpc_message(message: bytes = b"") -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


class Answer:
    """What came back on one stream."""

    def __init__(self):
        self.headers: list[tuple[str, str]] = []
        self.data = b""
        self.reset: int | None = None   # RST_STREAM error code
        self.ended = False

    @property
    def status(self) -> int | None:
        values = [v for k, v in self.headers if k == "grpc-status"]
        return int(values[-1]) if values else None

    @property
    def message(self) -> str:
        values = [v for k, v in self.headers if k == "grpc-message"]
        return values[-1] if values else ""


class RawH2:
    """One connection: send frames, read the server's, keep what each stream got."""

    def __init__(self, port: int, settings: dict | None = None, timeout: float = 10.0,
                 handshake: bool = True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.encoder, self.decoder = Encoder(), Decoder()
        self.answers: dict[int, Answer] = {}
        self.goaway: GoAwayFrame | None = None
        self.frames: list[Frame] = []   # every frame read, in order
        self.closed = False
        self._buf = b""
        # Our send windows (RFC 9113 6.9): the connection's, each stream's, and the
        # initial one the server's SETTINGS give new streams.
        self.window = 65535
        self.stream_windows: dict[int, int] = {}
        self.initial_window = 65535
        if handshake:
            s = SettingsFrame(0)
            s.settings = settings or {}
            self.send(PREFACE + s.serialize())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def headers_frame(self, stream: int, path: str = SERVER_LIVE, metadata=(),
                      end_stream: bool = False, end_headers: bool = True,
                      method: str = "POST") -> bytes:
        block = self.block([(":method", method), (":scheme", "http"), (":path", path),
                            (":authority", "localhost"), ("content-type", "application/grpc"),
                            ("te", "trailers"), *metadata])
        flags = (0x1 if end_stream else 0) | (0x4 if end_headers else 0)
        return frame(0x1, flags, stream, block)

    def block(self, fields) -> bytes:
        return self.encoder.encode(list(fields))

    def call(self, stream: int, path: str = SERVER_LIVE, message: bytes = b"",
             metadata=()) -> None:
        """A whole unary call: HEADERS, then its one message with END_STREAM."""
        self.send(self.headers_frame(stream, path, metadata) +
                  frame(0x0, 0x1, stream, grpc_message(message)))

    def send_data(self, stream: int, data: bytes, end_stream: bool = False,
                  timeout: float = 30.0) -> bool:
        """DATA within the server's windows, waiting for WINDOW_UPDATEs as a client must;
        False if the stream was answered or reset first (the rest is not sent)."""
        deadline = time.monotonic() + timeout
        at = 0
        while at < len(data) or (end_stream and at == len(data) == 0):
            answer = self.answers.get(stream)
            if answer is not None and (answer.ended or answer.reset is not None):
                return False
            room = min(16384, self.window, self.stream_windows.setdefault(
                stream, self.initial_window), len(data) - at)
            if room <= 0 and len(data):
                if self.read_frame(deadline) is None:
                    return False
                continue
            last = at + room >= len(data)
            self.send(frame(0x0, 0x1 if end_stream and last else 0, stream,
                            data[at:at + room]))
            self.window -= room
            self.stream_windows[stream] -= room
            at += room
            if not len(data):
                break
        return True

    # reading
    def read_frame(self, deadline: float) -> Frame | None:
        """The next frame, or None at EOF; TimeoutError past the deadline."""
        while True:
            if len(self._buf) >= 9:
                length = int.from_bytes(self._buf[:3], "big")
                if len(self._buf) >= 9 + length:
                    head, body = self._buf[:9], self._buf[9:9 + length]
                    self._buf = self._buf[9 + length:]
                    f, length = Frame.parse_frame_header(memoryview(head))
                    f.parse_body(memoryview(body))
                    self._take(f)
                    return f
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the server sent nothing more in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise TimeoutError("the server sent nothing more in time") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                return None
            self._buf += chunk

    def _take(self, f: Frame) -> None:
        self.frames.append(f)
        if isinstance(f, (HeadersFrame, ContinuationFrame)):
            answer = self.answers.setdefault(f.stream_id, Answer())
            answer.headers += [(k.decode() if isinstance(k, bytes) else k,
                                v.decode() if isinstance(v, bytes) else v)
                               for k, v in self.decoder.decode(f.data)]
        elif isinstance(f, DataFrame):
            self.answers.setdefault(f.stream_id, Answer()).data += f.data
        elif isinstance(f, RstStreamFrame):
            self.answers.setdefault(f.stream_id, Answer()).reset = f.error_code
        elif isinstance(f, GoAwayFrame):
            self.goaway = f
        elif isinstance(f, WindowUpdateFrame):
            if f.stream_id:
                self.stream_windows[f.stream_id] = self.stream_windows.get(
                    f.stream_id, self.initial_window) + f.window_increment
            else:
                self.window += f.window_increment
        if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
            self.send(SettingsFrame(0, flags=["ACK"]).serialize())  # as every client does
        if isinstance(f, SettingsFrame) and SettingsFrame.INITIAL_WINDOW_SIZE in f.settings:
            delta = f.settings[SettingsFrame.INITIAL_WINDOW_SIZE] - self.initial_window
            self.initial_window += delta
            for stream in self.stream_windows:
                self.stream_windows[stream] += delta
        if isinstance(f, (HeadersFrame, DataFrame)) and "END_STREAM" in f.flags:
            self.answers[f.stream_id].ended = True

    def until(self, done, timeout: float = 10.0) -> None:
        """Read until done() holds; AssertionError if the connection ends first."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.read_frame(deadline) is None:
                assert done(), "the server closed the connection"
                return

    def answer(self, stream: int, timeout: float = 10.0) -> Answer:
        """The stream's answer once it ended (trailers) or was reset."""
        self.until(lambda: stream in self.answers and (
            self.answers[stream].ended or self.answers[stream].reset is not None), timeout)
        return self.answers[stream]

    def goaway_code(self, timeout: float = 10.0) -> int:
        """The error code of the server's GOAWAY, read until the connection closes."""
        deadline = time.monotonic() + timeout
        while self.read_frame(deadline) is not None:
            pass
        assert self.goaway is not None, "the connection closed without a GOAWAY"
        return self.goaway.error_code

    def reset_code(self, stream: int, timeout: float = 10.0) -> int:
        self.until(lambda: stream in self.answers and self.answers[stream].reset is not None,
                   timeout)
        return self.answers[stream].reset

    def stream_error(self, stream: int, timeout: float = 10.0) -> int:
        """The code of a stream error: its RST_STREAM, or the GOAWAY of a server that made
        it a connection error (RFC 9113 5.4.1 allows that)."""
        try:
            return self.reset_code(stream, timeout)
        except AssertionError:
            return self.goaway_code(timeout)

    def ping(self, timeout: float = 10.0) -> bool:
        """Whether the connection still answers a PING."""
        p = PingFrame(0)
        p.opaque_data = b"pingpong"
        self.send(p.serialize())
        try:
            self.until(lambda: any(isinstance(f, PingFrame) and "ACK" in f.flags
                                   and f.opaque_data == b"pingpong" for f in self.frames),
                       timeout)
        except AssertionError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def window_update(stream: int, increment: int) -> bytes:
    return frame(0x8, 0, stream, struct.pack(">I", increment))


def settings(*pairs: tuple[int, int], ack: bool = False) -> bytes:
    return frame(0x4, 0x1 if ack else 0, 0, b"".join(struct.pack(">HI", k, v)
                                                      for k, v in pairs))


def rst_stream(stream: int, code: int = CANCEL) -> bytes:
    return frame(0x3, 0, stream, struct.pack(">I", code))


__all__ = ["RawH2", "Answer", "frame", "grpc_message", "window_update", "settings",
           "rst_stream", "WindowUpdateFrame", "RstStreamFrame", "GoAwayFrame"]
