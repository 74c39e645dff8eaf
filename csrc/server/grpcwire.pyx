# cython: language_level=3
"""gRPC's unary calls over HTTP/2, compiled: the worker's gRPC server core.

Why not grpcio's server: its Python layer costs about 350 us a call on this
machine. A no-op ServerLive reached 2.8k calls/s on one core (grpc.aio on
uvloop; 2.4k on asyncio; 4.4k with the thread-pool server), against 10k+ for a
whole inference over HTTP/1.1 (bench/oip numbers in README.md). This is what
a unary gRPC call needs of HTTP/2, on the worker's own event loop like
httpcore's HTTP/1.1 connections: frames, HPACK (RFC 7541, Huffman included),
flow control both ways, PING, GOAWAY, RST_STREAM, and gRPC's message framing
and trailers. Streaming calls, compression and TLS are not served (the client
gets UNIMPLEMENTED); grpcio stays the client side and the gateway's front.

A call is handed to `handler(path, metadata, message, peer)` once its request
has arrived whole: metadata is {lower-cased name: value} (str), message the
request's bytes, peer the client's (ip, port). It returns the answer's bytes, a `GrpcStatus` (an error), or
a Future of either; an exception there is INTERNAL. Answers go out in the
order they are ready, each as HEADERS, DATA and trailers in one write.
"""
import asyncio
import logging

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcmp

log = logging.getLogger("infergate.grpc")

DEF FRAME_DATA = 0
DEF FRAME_HEADERS = 1
DEF FRAME_PRIORITY = 2
DEF FRAME_RST_STREAM = 3
DEF FRAME_SETTINGS = 4
DEF FRAME_PUSH_PROMISE = 5
DEF FRAME_PING = 6
DEF FRAME_GOAWAY = 7
DEF FRAME_WINDOW_UPDATE = 8
DEF FRAME_CONTINUATION = 9
DEF FLAG_END_STREAM = 0x1
DEF FLAG_ACK = 0x1
DEF FLAG_END_HEADERS = 0x4
DEF FLAG_PADDED = 0x8
DEF FLAG_PRIORITY = 0x20
DEF MAX_WINDOW = 0x7fffffff
DEF OUR_MAX_FRAME = 16384      # what we accept (the protocol's default)
DEF HEADER_TABLE = 4096        # the protocol's default dynamic table size, which we keep
DEF MAX_HEADER_BLOCK = 65536

cdef bytes PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# gRPC status codes (grpc/status.h).
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 7, 8, 12, 13, 14
UNAUTHENTICATED = 16


class GrpcStatus(Exception):
    """A call's error: a gRPC status code and its message (raise or return it)."""

    def __init__(self, int code, str message=""):
        super().__init__(message)
        self.code = code
        self.message = message


# --- HPACK ---------------------------------------------------------------------------------

cdef tuple STATIC = (
    (b':authority', b''), (b':method', b'GET'), (b':method', b'POST'), (b':path', b'/'),
    (b':path', b'/index.html'), (b':scheme', b'http'), (b':scheme', b'https'),
    (b':status', b'200'), (b':status', b'204'), (b':status', b'206'), (b':status', b'304'),
    (b':status', b'400'), (b':status', b'404'), (b':status', b'500'),
    (b'accept-charset', b''), (b'accept-encoding', b'gzip, deflate'),
    (b'accept-language', b''), (b'accept-ranges', b''), (b'accept', b''),
    (b'access-control-allow-origin', b''), (b'age', b''), (b'allow', b''),
    (b'authorization', b''), (b'cache-control', b''), (b'content-disposition', b''),
    (b'content-encoding', b''), (b'content-language', b''), (b'content-length', b''),
    (b'content-location', b''), (b'content-range', b''), (b'content-type', b''),
    (b'cookie', b''), (b'date', b''), (b'etag', b''), (b'expect', b''), (b'expires', b''),
    (b'from', b''), (b'host', b''), (b'if-match', b''), (b'if-modified-since', b''),
    (b'if-none-match', b''), (b'if-range', b''), (b'if-unmodified-since', b''),
    (b'last-modified', b''), (b'link', b''), (b'location', b''), (b'max-forwards', b''),
    (b'proxy-authenticate', b''), (b'proxy-authorization', b''), (b'range', b''),
    (b'referer', b''), (b'refresh', b''), (b'retry-after', b''), (b'server', b''),
    (b'set-cookie', b''), (b'strict-transport-security', b''), (b'transfer-encoding', b''),
    (b'user-agent', b''), (b'vary', b''), (b'via', b''), (b'www-authenticate', b''))

# Bit lengths of the canonical Huffman code of RFC 7541 Appendix B, symbols 0..256 (EOS):
# the codes follow from the lengths (assigned in order of length, then symbol).
cdef tuple HUFFMAN_LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30,
    28, 28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5,
    7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22,
    22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23,
    22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22,
    21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26,
    26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20,
    24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27,
    27, 28, 27, 27, 27, 27, 27, 26, 30)

# The decoding tree: node i's children are TREE[i][0] and TREE[i][1]; a child >= 0 is a
# node, -1 - symbol a leaf.
cdef int TREE[600][2]
cdef int TREE_NODES = 1


cdef void _build_tree():
    global TREE_NODES
    cdef int symbol, length, bit, node, code = 0, previous = 0, i, child
    order = sorted(range(257), key=lambda s: (HUFFMAN_LENGTHS[s], s))
    TREE[0][0] = TREE[0][1] = 0
    for i in range(257):
        symbol = order[i]
        length = HUFFMAN_LENGTHS[symbol]
        if i:
            code = (code + 1) << (length - previous)
        previous = length
        node = 0
        for bit in range(length - 1, -1, -1):
            child = (code >> bit) & 1
            if bit == 0:
                TREE[node][child] = -1 - symbol
            else:
                if TREE[node][child] == 0:
                    TREE[TREE_NODES][0] = TREE[TREE_NODES][1] = 0
                    TREE[node][child] = TREE_NODES
                    TREE_NODES += 1
                node = TREE[node][child]


_build_tree()


cdef bytes huffman_decode(const uint8_t* p, Py_ssize_t n):
    cdef bytearray out = bytearray()
    cdef int node = 0, child, bits_since_symbol = 0
    cdef bint all_ones = True
    cdef Py_ssize_t i
    cdef int bit
    for i in range(n):
        for bit in range(7, -1, -1):
            child = TREE[node][(p[i] >> bit) & 1]
            bits_since_symbol += 1
            all_ones = all_ones and ((p[i] >> bit) & 1)
            if child < 0:
                if child == -257:
                    raise ValueError("Huffman string contains EOS")
                out.append(-1 - child)
                node, bits_since_symbol, all_ones = 0, 0, True
            elif child == 0:
                raise ValueError("invalid Huffman code")
            else:
                node = child
    if bits_since_symbol > 7 or not all_ones:
        raise ValueError("invalid Huffman padding")
    return bytes(out)


cdef class HpackDecoder:
    """One connection's header-block decoder (the dynamic table lives across blocks)."""
    cdef list table   # newest first: (name, value)
    cdef Py_ssize_t size, max_size

    def __init__(self):
        self.table = []
        self.size = 0
        self.max_size = HEADER_TABLE

    cdef Py_ssize_t _integer(self, const uint8_t* p, Py_ssize_t n, Py_ssize_t* at,
                             int prefix) except -1:
        cdef Py_ssize_t value = p[at[0]] & ((1 << prefix) - 1)
        cdef int shift = 0
        at[0] += 1
        if value < (1 << prefix) - 1:
            return value
        while True:
            if at[0] >= n or shift > 28:
                raise ValueError("bad HPACK integer")
            value += (p[at[0]] & 0x7f) << shift
            shift += 7
            at[0] += 1
            if not (p[at[0] - 1] & 0x80):
                return value

    cdef bytes _string(self, const uint8_t* p, Py_ssize_t n, Py_ssize_t* at):
        if at[0] >= n:
            raise ValueError("HPACK string missing")
        cdef bint huffman = p[at[0]] & 0x80
        cdef Py_ssize_t length = self._integer(p, n, at, 7)
        cdef Py_ssize_t start = at[0]
        if start + length > n:
            raise ValueError("HPACK string overruns the block")
        at[0] += length
        if huffman:
            return huffman_decode(p + start, length)
        return PyBytes_FromStringAndSize(<const char*>p + start, length)

    cdef tuple _indexed(self, Py_ssize_t index):
        if index <= 0:
            raise ValueError("HPACK index 0")
        if index <= 61:
            return STATIC[index - 1]
        if index - 62 < len(self.table):
            return self.table[index - 62]
        raise ValueError(f"HPACK index {index} is past the table")

    cdef void _add(self, bytes name, bytes value):
        cdef Py_ssize_t entry = len(name) + len(value) + 32
        self.table.insert(0, (name, value))
        self.size += entry
        self._evict()

    cdef void _evict(self):
        cdef tuple last
        while self.size > self.max_size and self.table:
            last = self.table.pop()
            self.size -= len(<bytes>last[0]) + len(<bytes>last[1]) + 32

    def headers(self, bytes block) -> list:
        """[(name, value)] of one header block (ValueError if it is not valid HPACK)."""
        return self.decode(<const uint8_t*>PyBytes_AS_STRING(block), len(block))

    cdef list decode(self, const uint8_t* p, Py_ssize_t n):
        cdef list headers = []
        cdef Py_ssize_t at = 0, index
        cdef uint8_t b
        while at < n:
            b = p[at]
            if b & 0x80:                       # indexed field
                headers.append(self._indexed(self._integer(p, n, &at, 7)))
            elif b & 0x40:                     # literal, incremental indexing
                index = self._integer(p, n, &at, 6)
                name = self._indexed(index)[0] if index else self._string(p, n, &at)
                value = self._string(p, n, &at)
                self._add(name, value)
                headers.append((name, value))
            elif b & 0x20:                     # dynamic table size update
                index = self._integer(p, n, &at, 5)
                if index > HEADER_TABLE:
                    raise ValueError("HPACK table size above the SETTINGS value")
                self.max_size = index
                self._evict()
            else:                              # literal without indexing / never indexed
                index = self._integer(p, n, &at, 4)
                name = self._indexed(index)[0] if index else self._string(p, n, &at)
                headers.append((name, self._string(p, n, &at)))
        return headers


# --- answers ---------------------------------------------------------------------------------

# :status 200 (static index 8) and content-type (static name 31) as literals without
# indexing: our encoder keeps no dynamic table.
cdef bytes RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"
cdef bytes STATUS_OK = b"\x00\x0bgrpc-status\x010"


cdef bytes frame(int kind, int flags, uint32_t stream, bytes payload):
    cdef Py_ssize_t n = len(payload)
    return bytes((n >> 16 & 0xff, n >> 8 & 0xff, n & 0xff, kind, flags,
                  stream >> 24 & 0x7f, stream >> 16 & 0xff, stream >> 8 & 0xff,
                  stream & 0xff)) + payload


cdef bytes literal(bytes name, bytes value):
    """A header field as a literal without indexing, new name (lengths < 127 or longer)."""
    return b"\x00" + _length(len(name)) + name + _length(len(value)) + value


cdef bytes _length(Py_ssize_t n):
    if n < 127:
        return bytes((n,))
    cdef list out = [127]
    n -= 127
    while n >= 128:
        out.append((n & 0x7f) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


cdef bytes _percent(str message):
    """grpc-message: percent-encoded UTF-8, as gRPC's wire format says."""
    cdef bytes raw = message.encode("utf-8")
    return b"".join(b"%%%02X" % c if c < 0x20 or c > 0x7e or c == 0x25 else bytes((c,))
                    for c in raw)


cdef bytes trailers(int code, str message):
    if code == 0:
        return STATUS_OK
    return literal(b"grpc-status", str(code).encode()) + (
        literal(b"grpc-message", _percent(message)) if message else b"")


# --- the connection ----------------------------------------------------------------------------

cdef class Stream:
    cdef uint32_t id
    cdef bytearray block       # header block fragments until END_HEADERS
    cdef list headers
    cdef bytearray data
    cdef bint ended            # the client's END_STREAM arrived
    cdef bint headers_ended    # this stream's header block (CONTINUATION) is complete
    cdef long send_window
    cdef bytes pending         # DATA payload bytes waiting for window
    cdef bytes pending_trailers
    cdef object working        # the handler's Future, while it runs

    def __init__(self, uint32_t id, long send_window):
        self.id = id
        self.block = bytearray()
        self.data = bytearray()
        self.send_window = send_window
        self.pending = None


cdef class GrpcConnection:
    """asyncio Protocol of one HTTP/2 connection of gRPC calls."""
    cdef object server, transport, handler, peer
    cdef bytearray inbuf
    cdef bint preface_seen, settings_seen, closed, goaway
    cdef HpackDecoder hpack
    cdef dict streams
    cdef list blocked          # streams with data waiting for window, in order
    cdef uint32_t last_stream, continuing
    cdef long send_window, initial_window, received
    cdef Py_ssize_t peer_max_frame, max_message

    def __init__(self, server):
        self.server = server
        self.handler = server.handler
        self.max_message = server.max_message
        self.inbuf = bytearray()
        self.hpack = HpackDecoder()
        self.streams = {}
        self.blocked = []
        self.send_window = 65535
        self.initial_window = 65535
        self.peer_max_frame = 16384
        self.received = 0
        self.continuing = 0
        self.last_stream = 0

    # asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else None
        self.server.connections.add(self)
        # Our settings: no server push, a receive window as large as allowed for every
        # stream (a message is read whole before it is handled), and the same for the
        # connection (WINDOW_UPDATE below, topped up as data arrives).
        settings = (b"\x00\x02\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x04\x00" +
                    b"\x00\x04\x7f\xff\xff\xff")
        transport.write(frame(FRAME_SETTINGS, 0, 0, settings) +
                        frame(FRAME_WINDOW_UPDATE, 0, 0, int(MAX_WINDOW - 65535).to_bytes(4, "big")))

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        for stream in self.streams.values():
            if (<Stream>stream).working is not None:
                (<Stream>stream).working.cancel()
        self.streams.clear()

    def data_received(self, data):
        self.inbuf += data
        try:
            self._frames()
        except ValueError as exc:
            self._fail(1, str(exc))  # PROTOCOL_ERROR
        except _Compression as exc:
            self._fail(9, str(exc))  # COMPRESSION_ERROR

    def eof_received(self):
        return False

    @property
    def idle(self) -> bool:
        return not self.streams

    def close_gracefully(self):
        """GOAWAY now (no new calls); the transport closes once the calls in flight end."""
        if not self.closed and not self.goaway:
            self.goaway = True
            self.transport.write(frame(FRAME_GOAWAY, 0, 0,
                                       int(self.last_stream).to_bytes(4, "big") + bytes(4)))
        if not self.streams and not self.closed:
            self.transport.close()

    cdef void _fail(self, int code, str reason):
        log.info("gRPC connection error: %s", reason)
        if not self.closed:
            self.transport.write(frame(FRAME_GOAWAY, 0, 0, int(self.last_stream).to_bytes(4, "big")
                                       + int(code).to_bytes(4, "big") + reason.encode()[:200]))
            self.transport.close()
            self.closed = True

    # frames
    cdef void _frames(self) except *:
        cdef bytearray buf = self.inbuf
        cdef Py_ssize_t at = 0, n = len(buf), length
        cdef const uint8_t* p
        cdef int kind, flags
        cdef uint32_t stream_id
        if not self.preface_seen:
            if n < 24:
                if bytes(buf) != PREFACE[:n]:
                    raise ValueError("not an HTTP/2 connection preface")
                return
            if bytes(buf[:24]) != PREFACE:
                raise ValueError("not an HTTP/2 connection preface")
            self.preface_seen = True
            at = 24
        while n - at >= 9 and not self.closed:
            p = <const uint8_t*>(<char*>buf) + at
            length = (p[0] << 16) | (p[1] << 8) | p[2]
            if length > OUR_MAX_FRAME:
                raise ValueError(f"a frame of {length} bytes, above SETTINGS_MAX_FRAME_SIZE")
            if n - at < 9 + length:
                break
            kind, flags = p[3], p[4]
            stream_id = ((p[5] & 0x7f) << 24) | (p[6] << 16) | (p[7] << 8) | p[8]
            payload = bytes(buf[at + 9:at + 9 + length])
            at += 9 + length
            self._frame(kind, flags, stream_id, payload)
        del buf[:at]

    cdef void _frame(self, int kind, int flags, uint32_t stream_id, bytes payload) except *:
        cdef Stream stream
        if self.continuing and kind != FRAME_CONTINUATION:
            raise ValueError("a header block was interrupted")
        if not self.settings_seen:
            if kind != FRAME_SETTINGS:
                raise ValueError("the client's first frame is not SETTINGS")
            self.settings_seen = True
        if stream_id and kind in (FRAME_SETTINGS, FRAME_PING, FRAME_GOAWAY) or \
                not stream_id and kind in (FRAME_DATA, FRAME_HEADERS, FRAME_PRIORITY,
                                           FRAME_RST_STREAM, FRAME_CONTINUATION):
            raise ValueError(f"frame type {kind} on stream {stream_id}")
        if kind == FRAME_DATA:
            self._data(flags, stream_id, payload)
        elif kind == FRAME_HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == FRAME_CONTINUATION:
            if stream_id != self.continuing:
                raise ValueError("CONTINUATION on another stream")
            stream = self.streams[stream_id]
            stream.block += payload
            if len(stream.block) > MAX_HEADER_BLOCK:
                raise ValueError("header block too large")
            if flags & FLAG_END_HEADERS:
                self.continuing = 0
                self._headers_done(stream)
        elif kind == FRAME_SETTINGS:
            if flags & FLAG_ACK:
                return
            self._settings(payload)
            self.transport.write(frame(FRAME_SETTINGS, FLAG_ACK, 0, b""))
        elif kind == FRAME_PING:
            if not flags & FLAG_ACK:
                self.transport.write(frame(FRAME_PING, FLAG_ACK, 0, payload))
        elif kind == FRAME_WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == FRAME_RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None and stream.working is not None:
                stream.working.cancel()
            if stream is not None and stream in self.blocked:
                self.blocked.remove(stream)
        elif kind == FRAME_GOAWAY:
            self.goaway = True
            if not self.streams:
                self.transport.close()
        elif kind == FRAME_PUSH_PROMISE:
            raise ValueError("a client may not push")
        # PRIORITY and unknown frame types are ignored, as the protocol says.

    cdef void _settings(self, bytes payload) except *:
        cdef Py_ssize_t i
        cdef int key
        cdef long value, delta
        if len(payload) % 6:
            raise ValueError("SETTINGS of a length not a multiple of 6")
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i:i + 2], "big")
            value = int.from_bytes(payload[i + 2:i + 6], "big")
            if key == 4:  # INITIAL_WINDOW_SIZE: every stream's send window moves with it
                if value > MAX_WINDOW:
                    raise ValueError("INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.initial_window
                self.initial_window = value
                for stream in self.streams.values():
                    (<Stream>stream).send_window += delta
                if delta > 0:
                    self._flush_blocked()
            elif key == 5:  # MAX_FRAME_SIZE
                if value < 16384 or value > 16777215:
                    raise ValueError("MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value

    cdef void _window_update(self, uint32_t stream_id, bytes payload) except *:
        if len(payload) != 4:
            raise ValueError("WINDOW_UPDATE of the wrong length")
        cdef long increment = int.from_bytes(payload, "big") & 0x7fffffff
        if stream_id == 0:
            self.send_window += increment
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            (<Stream>stream).send_window += increment
        self._flush_blocked()

    cdef void _headers(self, int flags, uint32_t stream_id, bytes payload) except *:
        cdef Py_ssize_t start = 0, end = len(payload), pad = 0
        if stream_id == 0 or stream_id % 2 == 0:
            raise ValueError("HEADERS on an invalid stream")
        if flags & FLAG_PADDED:
            if not payload:
                raise ValueError("padded HEADERS without a pad length")
            pad = payload[0]
            start = 1
        if flags & FLAG_PRIORITY:
            start += 5
        if start + pad > end:
            raise ValueError("HEADERS padding overruns the frame")
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id <= self.last_stream:
                return  # trailers of a stream we are done with, or a reused id: ignore
            if self.goaway:
                self.transport.write(frame(FRAME_RST_STREAM, 0, stream_id,
                                           (7).to_bytes(4, "big")))  # REFUSED_STREAM
                return
            self.last_stream = stream_id
            stream = Stream(stream_id, self.initial_window)
            self.streams[stream_id] = stream
        elif (<Stream>stream).headers_ended:  # trailers from the client: nothing we read
            if flags & FLAG_END_STREAM:
                self._ended(<Stream>stream)
            return
        (<Stream>stream).block += payload[start:end - pad]
        (<Stream>stream).ended = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._headers_done(<Stream>stream)
        else:
            self.continuing = stream_id

    cdef void _headers_done(self, Stream stream) except *:
        cdef bytes block = bytes(stream.block)
        stream.block = None
        stream.headers_ended = True
        try:
            stream.headers = self.hpack.decode(<const uint8_t*>PyBytes_AS_STRING(block),
                                               len(block))
        except ValueError as exc:
            raise _Compression(str(exc))
        if stream.ended:
            self._ended(stream)

    cdef void _data(self, int flags, uint32_t stream_id, bytes payload) except *:
        cdef Py_ssize_t start = 0, end = len(payload), pad
        self.received += end
        if self.received > (1 << 30):  # top the connection's window up again
            self.transport.write(frame(FRAME_WINDOW_UPDATE, 0, 0,
                                       int(self.received).to_bytes(4, "big")))
            self.received = 0
        if flags & FLAG_PADDED:
            if not payload or payload[0] >= end:
                raise ValueError("DATA padding overruns the frame")
            pad = payload[0]
            start, end = 1, end - pad
        stream = self.streams.get(stream_id)
        if stream is None or (<Stream>stream).ended:
            return  # a stream reset or answered already
        (<Stream>stream).data += payload[start:end]
        if len((<Stream>stream).data) > self.max_message + 5:
            self._answer(<Stream>stream, GrpcStatus(
                RESOURCE_EXHAUSTED, f"the message is larger than {self.max_message} bytes"))
            (<Stream>stream).ended = True
            return
        if flags & FLAG_END_STREAM:
            (<Stream>stream).ended = True
            if (<Stream>stream).headers_ended:
                self._ended(<Stream>stream)

    # calls
    cdef void _ended(self, Stream stream) except *:
        """The request is complete: hand the call to the handler."""
        cdef dict metadata = {}
        path = None
        for name, value in stream.headers:
            if name == b":path":
                path = (<bytes>value).decode("latin-1")
            elif name[:1] != b":" and not (<bytes>name).endswith(b"-bin"):
                metadata[(<bytes>name).decode("latin-1")] = (<bytes>value).decode("latin-1")
        data = stream.data
        stream.data = None
        if path is None:
            self._answer(stream, GrpcStatus(INTERNAL, "the request has no :path"))
            return
        if metadata.get("grpc-encoding", "identity") != "identity":
            self._answer(stream, GrpcStatus(UNIMPLEMENTED, "compressed messages are not "
                                                           "supported"))
            return
        if len(data) < 5 or data[0] != 0 or \
                int.from_bytes(data[1:5], "big") != len(data) - 5:
            self._answer(stream, GrpcStatus(
                UNIMPLEMENTED if len(data) > 5 and data[0] == 0 else INTERNAL,
                "a unary call carries exactly one uncompressed message"))
            return
        message = bytes(data[5:])
        try:
            result = self.handler(path, metadata, message, self.peer)
        except GrpcStatus as status:
            result = status
        except Exception:
            log.exception("gRPC handler failed on %s", path)
            result = GrpcStatus(INTERNAL, "internal error")
        if isinstance(result, (bytes, GrpcStatus)):
            self._answer(stream, result)
        else:
            stream.working = result
            result.add_done_callback(_Done(self, stream))

    cdef void _done(self, Stream stream, future) except *:
        stream.working = None
        if future.cancelled() or self.closed or self.streams.get(stream.id) is not stream:
            return
        exc = future.exception()
        if exc is None:
            result = future.result()
        elif isinstance(exc, GrpcStatus):
            result = exc
        else:
            result = self.server.answer_error(exc)
            if result is None:
                log.error("gRPC call failed", exc_info=exc)
                result = GrpcStatus(INTERNAL, "internal error")
        self._answer(stream, result)

    cdef void _answer(self, Stream stream, result) except *:
        cdef bytes message
        if isinstance(result, GrpcStatus):  # trailers only
            self.transport.write(frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM,
                                       stream.id, RESPONSE_HEADERS + trailers(
                                           (<object>result).code, (<object>result).message)))
            self._finished(stream)
            return
        message = result
        stream.pending = int(len(message)).to_bytes(5, "big") + message
        stream.pending_trailers = STATUS_OK
        self._send(stream, frame(FRAME_HEADERS, FLAG_END_HEADERS, stream.id,
                                 RESPONSE_HEADERS))

    cdef void _send(self, Stream stream, bytes before) except *:
        """Write what the windows allow of the stream's answer (and trailers once done)."""
        cdef list out = [before] if before else []
        cdef bytes pending = stream.pending
        cdef Py_ssize_t at = 0, n = len(pending), chunk
        while at < n:
            chunk = min(n - at, self.peer_max_frame, self.send_window, stream.send_window)
            if chunk <= 0:
                break
            out.append(frame(FRAME_DATA, 0, stream.id, pending[at:at + chunk]))
            at += chunk
            self.send_window -= chunk
            stream.send_window -= chunk
        if at < n:
            stream.pending = pending[at:]
            if stream not in self.blocked:
                self.blocked.append(stream)
        else:
            out.append(frame(FRAME_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, stream.id,
                             stream.pending_trailers))
            stream.pending = None
        if out:
            self.transport.write(b"".join(out))
        if stream.pending is None:
            self._finished(stream)

    cdef void _flush_blocked(self) except *:
        cdef list waiting = self.blocked
        self.blocked = []
        for stream in waiting:
            if self.streams.get((<Stream>stream).id) is stream:
                self._send(<Stream>stream, None)

    cdef void _finished(self, Stream stream) except *:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        if stream in self.blocked:
            self.blocked.remove(stream)
        if self.goaway and not self.streams and not self.closed:
            self.transport.close()


class _Compression(Exception):
    pass


cdef class _Done:
    cdef GrpcConnection conn
    cdef Stream stream

    def __init__(self, GrpcConnection conn, Stream stream):
        self.conn = conn
        self.stream = stream

    def __call__(self, future):
        self.conn._done(self.stream, future)


class GrpcServer:
    """Serves `handler(path, metadata, message, peer)` on host:port (see the module
    docstring).

    `answer_error(exc)` turns a Future's exception into a GrpcStatus (None: INTERNAL)."""

    def __init__(self, handler, max_message: int = 64 << 20, answer_error=None):
        self.handler = handler
        self.max_message = max_message
        self.answer_error = answer_error or (lambda exc: None)
        self.connections = set()
        self._servers = []

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: GrpcConnection(self), host, port,
                                          reuse_port=reuse_port or None, backlog=1024)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def drain(self, timeout: float) -> None:
        """Stop accepting; GOAWAY every connection; wait for the calls in flight."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close_gracefully()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.abort()
