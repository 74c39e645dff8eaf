"""The gRPC server core (csrc/server/grpcwire.pyx, on libnghttp2) over a real socket, with
a handler of the test's own and small limits: HPACK through nghttp2 on RFC 7541's own
examples, gRPC's message framing, metadata, the buffer budgets and the timeouts. (The
protocol's conformance is test_h2_conformance.py; whole workers and gateways under
attack are test_hostile_h2.py; tritonclient against both is test_oip.py.)"""
import asyncio
import threading

import pytest

from gateway._native.grpcwire import (DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT, OK,
                                      RESOURCE_EXHAUSTED, UNIMPLEMENTED, GrpcServer,
                                      GrpcStatus)
from h2_raw import CANCEL, NO_ERROR, PROTOCOL_ERROR, RawH2, frame, grpc_message, rst_stream


class Served:
    """A GrpcServer on its own loop in a thread; `calls` holds what the handler saw."""

    def __init__(self, **limits):
        self.calls = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def handler(path, metadata, message, peer):
            self.calls.append((path, metadata, message))
            if message == b"later":
                future = self.loop.create_future()
                self.loop.call_later(0.05, future.set_result, b"done later")
                return future
            if message == b"fail":
                return GrpcStatus(INVALID_ARGUMENT, "told to fail: 100%")
            if message == b"nothing":  # a handler's bug
                return None
            return b"echo:" + message

        async def start():
            self.server = GrpcServer(handler, **limits)
            self.port = await self.server.listen("127.0.0.1", 0)
            started.set()

        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _run(self, start):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.drain(1.0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def served():
    servers = []

    def start(**limits):
        s = Served(**limits)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_a_call_and_its_answer(served):
    s = served()
    c = RawH2(s.port)
    c.call(1, "/svc/Echo", b"hello", [("x-custom", "v")])
    answer = c.answer(1)
    assert answer.status == OK and answer.data == grpc_message(b"echo:hello")
    path, metadata, message = s.calls[0]
    assert (path, metadata["x-custom"], message) == ("/svc/Echo", "v", b"hello")
    c.call(3, "/svc/Echo", b"later")
    assert c.answer(3).data == grpc_message(b"done later")
    c.call(5, "/svc/Echo", b"fail")
    assert (c.answer(5).status, c.answer(5).message) == (INVALID_ARGUMENT, "told to fail: 100%25")


@pytest.mark.parametrize("blocks", [
    # RFC 7541 Appendix C.4: three requests with Huffman strings, each reusing the table.
    ("828684418cf1e3c2e5f23a6ba0ab90f4ff", "828684be5886a8eb10649cbf",
     "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
    # Appendix C.3: the same requests with literal strings.
    ("828684410f7777772e6578616d706c652e636f6d", "828684be58086e6f2d6361636865",
     "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
], ids=["huffman", "literal"])
def test_rfc7541_examples_decode_through_nghttp2(served, blocks):
    """The examples' header blocks, as three calls on one connection: the dynamic table
    carries cache-control and custom-key from one block to the next."""
    s = served()
    c = RawH2(s.port)
    for stream, block in zip((1, 3, 5), blocks):
        c.send(frame(0x1, 0x4, stream, bytes.fromhex(block)) +
               frame(0x0, 0x1, stream, grpc_message(b"")))
        assert c.answer(stream).status == OK
    assert [(path, metadata) for path, metadata, _ in s.calls] == [
        ("/", {}), ("/", {"cache-control": "no-cache"}),
        ("/index.html", {"custom-key": "custom-value"})]


@pytest.mark.parametrize("body, code", [
    (b"", INVALID_ARGUMENT),                                  # no message at all
    (b"\x00\x00\x00", INVALID_ARGUMENT),                      # a prefix cut short
    (b"\x00\x00\x00\x00\x09short", INVALID_ARGUMENT),         # fewer bytes than the prefix
    (b"\x07\x00\x00\x00\x00", INVALID_ARGUMENT),              # a flag byte gRPC has not
    (b"\x01\x00\x00\x00\x01z", UNIMPLEMENTED),                # compressed
    (grpc_message(b"a") + grpc_message(b"b"), UNIMPLEMENTED),  # two messages: streaming
], ids=["empty", "short-prefix", "short-message", "bad-flag", "compressed", "two"])
def test_grpc_framing_errors(served, body, code):
    s = served()
    c = RawH2(s.port)
    c.send(c.headers_frame(1, "/svc/Echo") + frame(0x0, 0x1, 1, body))
    assert c.answer(1).status == code, c.answer(1).message
    assert s.calls == []


def test_metadata_repeats_and_binary(served):
    """Repeated metadata is joined as HTTP joins headers, but a second authorization is
    refused (L7: "wrong, right" must not pass as "right"); -bin entries are left out."""
    s = served()
    c = RawH2(s.port)
    c.call(1, "/svc/Echo", b"", [("x-tag", "a"), ("x-tag", "b"), ("trace-bin", "AAE=")])
    assert c.answer(1).status == OK
    assert s.calls[-1][1]["x-tag"] == "a, b" and "trace-bin" not in s.calls[-1][1]
    c.call(3, "/svc/Echo", b"", [("authorization", "wrong"), ("authorization", "right")])
    answer = c.answer(3)
    assert answer.status == INVALID_ARGUMENT and "authorization" in answer.message
    assert len(s.calls) == 1


def test_metadata_entries_count_each_repeat(served):
    """100 metadata entries at most (content-type and te among them), a key sent again
    counting again: 98 of one key are joined in order, 99 are RESOURCE_EXHAUSTED. (Each
    repeat was once a copy of all the values before it, and only distinct keys counted: a
    CONTINUATION flood of one key cost a server quadratic time.)"""
    s = served()
    c = RawH2(s.port)
    c.call(1, "/svc/Echo", b"", [("x-tag", str(i)) for i in range(98)])
    assert c.answer(1).status == OK
    assert s.calls[-1][1]["x-tag"] == ", ".join(str(i) for i in range(98))
    c.call(3, "/svc/Echo", b"", [("x-tag", str(i)) for i in range(99)])
    answer = c.answer(3)
    assert answer.status == RESOURCE_EXHAUSTED and "100 entries" in answer.message
    assert len(s.calls) == 1


def test_calls_reset_in_the_same_read_never_reach_the_handler(served):
    """Rapid reset: calls that end and are reset in the bytes of one read are dropped
    before the handler sees them; a call that is not reset is served."""
    s = served()
    c = RawH2(s.port)
    burst = b"".join(c.headers_frame(stream, "/svc/Echo") +
                     frame(0x0, 0x1, stream, grpc_message(b"x")) + rst_stream(stream, CANCEL)
                     for stream in range(1, 200, 2))
    c.send(burst + c.headers_frame(201, "/svc/Echo") + frame(0x0, 0x1, 201, grpc_message(b"y")))
    assert c.answer(201).data == grpc_message(b"echo:y")
    assert [message for _, _, message in s.calls] == [b"y"]


def test_a_handler_that_answers_nothing_costs_only_its_call(served):
    """A handler returning neither bytes, a GrpcStatus nor a Future: that call is INTERNAL,
    the next one in the same read is served (hostile review: the error escaped the read,
    and asyncio closed the connection without a GOAWAY)."""
    s = served()
    c = RawH2(s.port)
    c.send(c.headers_frame(1, "/svc/Echo") + frame(0x0, 0x1, 1, grpc_message(b"nothing")) +
           c.headers_frame(3, "/svc/Echo") + frame(0x0, 0x1, 3, grpc_message(b"z")))
    assert c.answer(1).status == INTERNAL
    assert c.answer(3).data == grpc_message(b"echo:z")


def test_message_over_max_message_is_refused_early(served):
    """Past max_message: RESOURCE_EXHAUSTED before the request ends, RST_STREAM NO_ERROR
    (the client may stop sending), and the connection goes on."""
    s = served(max_message=1000)
    c = RawH2(s.port)
    c.send(c.headers_frame(1, "/svc/Echo") + frame(0x0, 0, 1, grpc_message(b"x" * 2000)[:1500]))
    answer = c.answer(1)
    assert answer.status == RESOURCE_EXHAUSTED and "1000 bytes" in answer.message
    assert c.reset_code(1) == NO_ERROR
    c.call(3, "/svc/Echo", b"small")
    assert c.answer(3).data == grpc_message(b"echo:small")


def test_unfinished_requests_share_a_connection_budget(served):
    """Each stream under max_message, together over max_buffered: the stream that would
    pass it gets RESOURCE_EXHAUSTED; once others are done there is room again."""
    s = served(max_message=10000, max_buffered=28000)
    c = RawH2(s.port)
    body = grpc_message(b"m" * 8995)  # 9000 bytes
    for stream in (1, 3, 5, 7):
        c.send(c.headers_frame(stream, "/svc/Echo") + frame(0x0, 0, stream, body))
    answer = c.answer(7)  # 3 x 9000 fit in 28000; the fourth does not
    assert answer.status == RESOURCE_EXHAUSTED and "28000 bytes" in answer.message
    assert [stream for stream in (1, 3, 5) if stream in c.answers] == []
    c.send(frame(0x0, 0x1, 1, b""))  # stream 1 ends: its call runs, its bytes are let go
    assert c.answer(1).status == OK
    c.send(c.headers_frame(9, "/svc/Echo") + frame(0x0, 0, 9, body) + frame(0x0, 0x1, 3, b""))
    assert c.answer(3).status == OK
    assert 9 not in c.answers  # its 9000 bytes fitted in the room stream 1 left


def test_a_request_that_does_not_end_times_out(served):
    s = served(read_timeout=0.3)
    c = RawH2(s.port)
    c.send(c.headers_frame(1, "/svc/Echo") + frame(0x0, 0, 1, b"\x00\x00"))
    answer = c.answer(1)
    assert answer.status == DEADLINE_EXCEEDED and "0.3s" in answer.message
    assert c.ping()


def test_a_header_block_that_does_not_end_closes_the_connection(served):
    s = served(read_timeout=0.3)
    c = RawH2(s.port)
    c.send(c.headers_frame(1, "/svc/Echo", end_headers=False))
    assert c.goaway_code() == PROTOCOL_ERROR


def test_an_idle_connection_is_closed(served):
    s = served(idle_timeout=0.3)
    c = RawH2(s.port)
    c.call(1, "/svc/Echo", b"x")
    assert c.answer(1).status == OK
    assert c.goaway_code() == NO_ERROR
