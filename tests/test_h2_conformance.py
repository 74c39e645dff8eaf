"""HTTP/2 conformance of a worker's gRPC port, RFC 9113 section by section (and RFC 7541
for HPACK), with a raw client over a real socket (tests/h2_raw.py: the h2 package's
hyperframe and hpack). Each malformed input gets the RST_STREAM or GOAWAY error code the
RFC names, and the worker stays up for the next client."""
import struct

import pytest

from conftest import Proc, free_port, infergate_cmd
from h2_raw import (CANCEL, COMPRESSION_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, NO_ERROR,
                    PROTOCOL_ERROR, REFUSED_STREAM, SERVER_LIVE, STREAM_CLOSED, RawH2, frame,
                    grpc_message, rst_stream, settings, wait_listening, window_update)
from hyperframe.frame import SettingsFrame

OK = 0
RESOURCE_EXHAUSTED = 8


@pytest.fixture(scope="module")
def port():
    from gateway.models import DIGITS_MODEL

    http_port, grpc_port = free_port(), free_port()
    worker = Proc(infergate_cmd("worker", "--service", "digits", "--model", str(DIGITS_MODEL),
                                "--processor", "tensorflow", "--host", "127.0.0.1", "--port",
                                str(http_port), "--grpc-port", str(grpc_port)), http_port)
    wait_listening(grpc_port)
    yield grpc_port
    worker.stop()


@pytest.fixture
def client(port):
    opened = []

    def connect(**kw):
        c = RawH2(port, **kw)
        opened.append(c)
        return c

    yield connect
    for c in opened:
        c.close()
    # The worker is still there for the next client.
    c = RawH2(port)
    c.call(1)
    assert c.answer(1).status == OK
    c.close()


def assert_goaway(c: RawH2, code: int) -> None:
    assert c.goaway_code() == code


# --- 3.4 the connection preface; 6.5 SETTINGS -----------------------------------------------

def test_our_settings_and_their_ack(client):
    c = client()
    c.until(lambda: any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in c.frames))
    ours = next(f for f in c.frames if isinstance(f, SettingsFrame) and "ACK" not in f.flags)
    assert ours.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 100
    assert ours.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == 65536
    assert ours.settings[SettingsFrame.MAX_FRAME_SIZE] == 16384
    assert SettingsFrame.ENABLE_PUSH not in ours.settings or \
        ours.settings[SettingsFrame.ENABLE_PUSH] == 0


def test_a_wrong_preface_ends_the_connection(port):
    c = RawH2(port, handshake=False)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(24))
    with pytest.raises(AssertionError):  # closed, at most after a GOAWAY
        c.until(lambda: False)
    assert c.goaway is None or c.goaway.error_code == PROTOCOL_ERROR


@pytest.mark.parametrize("bad, code", [
    (settings((0x2, 2)), PROTOCOL_ERROR),                 # ENABLE_PUSH neither 0 nor 1
    (settings((0x4, 1 << 31)), FLOW_CONTROL_ERROR),       # INITIAL_WINDOW_SIZE over 2^31-1
    (settings((0x5, 16383)), PROTOCOL_ERROR),             # MAX_FRAME_SIZE under 2^14
    (settings((0x5, 1 << 24)), PROTOCOL_ERROR),           # MAX_FRAME_SIZE over 2^24-1
    (frame(0x4, 0, 1, b""), PROTOCOL_ERROR),              # SETTINGS on a stream
    (frame(0x4, 0, 0, b"\x00\x01\x00"), FRAME_SIZE_ERROR),  # length not a multiple of 6
    (frame(0x4, 0x1, 0, bytes(6)), FRAME_SIZE_ERROR),     # an ACK with a payload
], ids=["enable-push", "window", "frame-small", "frame-large", "on-stream", "length", "ack"])
def test_bad_settings(client, bad, code):
    c = client()
    c.send(bad)
    assert_goaway(c, code)


def test_too_many_settings_entries_end_the_connection(client):
    c = client()
    c.send(settings(*[(0x3, 100)] * 40))
    assert c.goaway_code() != NO_ERROR


# --- 4.2 frame size -----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    frame(0x6, 0, 0, bytes(7)),                 # PING of 7 bytes
    frame(0x8, 0, 0, bytes(3)),                 # WINDOW_UPDATE of 3 bytes
    frame(0x3, 0, 1, bytes(3)),                 # RST_STREAM of 3 bytes
    frame(0x0, 0, 1, bytes(16385)),             # DATA over our MAX_FRAME_SIZE
], ids=["ping", "window-update", "rst-stream", "data"])
def test_frame_size_errors(client, bad):
    c = client()
    if bad[3] in (0x0, 0x3):  # a frame of stream 1: open the stream first
        c.send(c.headers_frame(1))
    c.send(bad)
    assert_goaway(c, FRAME_SIZE_ERROR)


# --- 5.1 stream states --------------------------------------------------------------------

def test_data_on_an_idle_stream(client):
    c = client()
    c.send(frame(0x0, 0x1, 1, grpc_message()))
    assert_goaway(c, PROTOCOL_ERROR)


def test_data_on_a_closed_stream(client):
    c = client()
    c.call(1)
    assert c.answer(1).status == OK
    c.send(frame(0x0, 0x1, 1, grpc_message()))
    assert_goaway(c, STREAM_CLOSED)


def test_headers_on_an_even_stream(client):
    c = client()
    c.send(c.headers_frame(2, end_stream=True))
    assert_goaway(c, PROTOCOL_ERROR)


def test_a_reused_stream_id(client):
    c = client()
    c.call(1)
    assert c.answer(1).status == OK
    c.call(1)
    assert c.goaway_code() in (PROTOCOL_ERROR, STREAM_CLOSED)


def test_a_lower_stream_id(client):
    c = client()
    c.call(5)
    assert c.answer(5).status == OK
    c.call(3)
    assert_goaway(c, PROTOCOL_ERROR)


def test_frames_after_the_client_reset_a_stream(client):
    c = client()
    c.send(c.headers_frame(1) + rst_stream(1))
    c.send(frame(0x0, 0x1, 1, grpc_message()))
    assert c.stream_error(1) == STREAM_CLOSED


def test_a_client_goaway_naming_a_client_stream(client):
    """A client's GOAWAY names the last stream the server opened: an odd id is wrong."""
    c = client()
    c.send(frame(0x7, 0, 0, struct.pack(">II", 1, NO_ERROR)))
    assert_goaway(c, PROTOCOL_ERROR)


def test_more_streams_than_max_concurrent_streams(client):
    """Our SETTINGS say 100: the 101st open stream is refused (nghttp2 makes it a
    connection error), and none of the 100 was answered meanwhile."""
    c = client()
    c.until(lambda: any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in c.frames))
    c.send(b"".join(c.headers_frame(2 * i + 1) for i in range(101)))
    assert c.stream_error(201) in (REFUSED_STREAM, PROTOCOL_ERROR)
    assert all(c.answers.get(2 * i + 1) is None for i in range(100))


def test_push_promise_from_a_client(client):
    c = client()
    c.send(c.headers_frame(1) + frame(0x5, 0x4, 1, struct.pack(">I", 2) + c.block(
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "x")])))
    assert_goaway(c, PROTOCOL_ERROR)


# --- 5.2 and 6.9 flow control -------------------------------------------------------------

def test_zero_window_update_on_the_connection(client):
    c = client()
    c.send(window_update(0, 0))
    assert_goaway(c, PROTOCOL_ERROR)


def test_zero_window_update_on_a_stream(client):
    c = client()
    c.send(c.headers_frame(1) + window_update(1, 0))
    assert c.stream_error(1) == PROTOCOL_ERROR


def test_overflowing_connection_window(client):
    c = client()
    c.send(window_update(0, (1 << 31) - 1))
    assert_goaway(c, FLOW_CONTROL_ERROR)


def test_overflowing_stream_window(client):
    c = client()
    c.send(c.headers_frame(1) + window_update(1, (1 << 31) - 1))
    assert c.stream_error(1) == FLOW_CONTROL_ERROR


def test_an_answer_waits_for_window(client):
    """A client whose window is 0 gets the answer's HEADERS, and its DATA once it opens it."""
    c = client(settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    c.call(1)
    c.until(lambda: 1 in c.answers and c.answers[1].headers)
    assert c.answers[1].data == b"" and not c.answers[1].ended
    c.send(window_update(1, 1 << 16))
    answer = c.answer(1)
    assert answer.status == OK and len(answer.data) >= 5


# --- 6.8 GOAWAY ---------------------------------------------------------------------------

def test_a_client_goaway_lets_calls_in_flight_finish(client):
    c = client()
    c.call(1)
    c.send(frame(0x7, 0, 0, struct.pack(">II", 0, NO_ERROR)))  # (no stream of ours)
    assert c.answer(1).status == OK
    with pytest.raises(AssertionError):
        c.until(lambda: False)  # then the server closes


# --- RFC 7541 HPACK -----------------------------------------------------------------------

@pytest.mark.parametrize("block", [
    "be",                         # an index past the dynamic table
    "00",                         # a literal without its name
    "000a6b6579",                 # a name longer than the block
    "0003616263" + "84ffffffff",  # a Huffman string holding EOS
    "3fe21f",                     # a table size above the SETTINGS value (4096)
    "82" + "20",                  # a table size update after a field (4.2)
    "ff8080808080",               # an integer that never ends
    "00ff8080808008",             # issue 21 C1: a negative string length
    "000161fff8feffff0f",         # C1's looping variant
], ids=["index", "no-name", "long-name", "eos", "table-size", "late-update", "integer",
        "c1", "c1-loop"])
def test_hpack_errors_are_compression_errors(client, block):
    c = client()
    c.send(frame(0x1, 0x5, 1, bytes.fromhex(block)))
    assert_goaway(c, COMPRESSION_ERROR)


# --- 6.10 CONTINUATION --------------------------------------------------------------------

def test_continuation_without_headers(client):
    c = client()
    c.send(frame(0x9, 0x4, 1, c.block([("x-a", "b")])))
    assert_goaway(c, PROTOCOL_ERROR)


def test_another_frame_inside_a_header_block(client):
    c = client()
    c.send(c.headers_frame(1, end_headers=False) + window_update(0, 1))
    assert_goaway(c, PROTOCOL_ERROR)


def test_continuation_on_another_stream(client):
    c = client()
    c.send(c.headers_frame(1, end_headers=False) + frame(0x9, 0x4, 3, b""))
    assert_goaway(c, PROTOCOL_ERROR)


def test_a_header_block_split_over_continuations(client):
    c = client()
    block = frame(0x1, 0, 1, b"")[9:]  # (empty)
    whole = c.headers_frame(1)
    payload = whole[9:]
    c.send(frame(0x1, 0, 1, payload[:5]) + frame(0x9, 0, 1, payload[5:10]) +
           frame(0x9, 0x4, 1, payload[10:]) + frame(0x0, 0x1, 1, grpc_message()) + block)
    assert c.answer(1).status == OK


def test_a_continuation_flood_ends_the_connection(client):
    """CVE-2024-27316 and friends: endless CONTINUATION frames are not buffered."""
    c = client()
    c.send(c.headers_frame(1, end_headers=False))
    c.send(b"".join(frame(0x9, 0, 1, c.block([("x-flood", "y" * 100)]))
                    for _ in range(100)))
    assert c.goaway_code() != NO_ERROR


REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", SERVER_LIVE),
           (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")]


def _split_headers(c: RawH2, metadata, stream: int = 1, frame_size: int = 16000) -> list[bytes]:
    """One call's header block (literal, no Huffman: its length is what it decodes to)
    in HEADERS and CONTINUATION frames of `frame_size` bytes, fewer than nghttp2's 8."""
    block = c.encoder.encode(REQUEST + metadata, huffman=False)
    parts = [block[at:at + frame_size] for at in range(0, len(block), frame_size)]
    assert len(parts) < 8
    return [frame(0x1 if i == 0 else 0x9, 0x4 if i == len(parts) - 1 else 0, stream, part)
            for i, part in enumerate(parts)]


def test_a_header_list_over_64_kib_in_continuations_costs_only_its_stream(client):
    """A list past the 64 KiB we advertise is RESOURCE_EXHAUSTED on its stream; the
    connection and a call in flight on it go on."""
    c = client()
    c.send(c.headers_frame(1))
    c.send(b"".join(_split_headers(c, [(f"x-pad-{i}", "v" * 1000) for i in range(70)], 3)) +
           frame(0x0, 0x1, 3, grpc_message()))
    assert c.answer(3).status == RESOURCE_EXHAUSTED
    c.send(frame(0x0, 0x1, 1, grpc_message()))
    assert c.answer(1).status == OK


def test_a_huffman_block_over_64_kib_that_decodes_under_it_is_answered(client):
    """HPACK's Huffman codes of some printable bytes are longer than a byte (a backslash
    is 19 bits): a block longer than 64 KiB as sent can hold a list well within 64 KiB,
    and is served (hostile review: a cap on the block as sent closed such connections)."""
    c = client()
    fields = REQUEST + [(f"x-v{i}", "\\" * 9500) for i in range(3)]
    assert sum(len(k) + len(v) + 32 for k, v in fields) < 30000
    block = c.encoder.encode(fields)
    assert len(block) > 65536
    parts = [block[at:at + 16000] for at in range(0, len(block), 16000)]
    c.send(b"".join(frame(0x1 if i == 0 else 0x9, 0x4 if i == len(parts) - 1 else 0, 1, part)
                    for i, part in enumerate(parts)) + frame(0x0, 0x1, 1, grpc_message()))
    assert c.answer(1).status == OK


def test_a_header_block_under_64_kib_in_continuations_is_answered(client):
    c = client()
    c.send(b"".join(_split_headers(c, [(f"x-pad-{i}", "v" * 1000) for i in range(50)])) +
           frame(0x0, 0x1, 1, grpc_message()))
    assert c.answer(1).status == OK


def test_a_cancelled_call_is_reset(client):
    """RST_STREAM CANCEL from the client: nothing comes back on that stream, the
    connection goes on."""
    c = client()
    c.send(c.headers_frame(1) + rst_stream(1, CANCEL))
    c.call(3)
    assert c.answer(3).status == OK
    assert c.answers.get(1) is None
