# cython: language_level=3
"""gRPC's unary calls over HTTP/2 on libnghttp2: the worker's and the gateway's gRPC server.

Why libnghttp2: HTTP/2 is where servers had their worst bugs of recent years
(Rapid Reset, CONTINUATION floods, HPACK bombs), and a core of our own had a
pre-authentication crash in its HPACK decoder (issue 21, C1). nghttp2 is the
library curl, Apache httpd and Node.js use: its server session does the
framing, HPACK, stream states, flow control, SETTINGS and PING, and carries the
flood and rapid-reset limits. Why not grpcio's server: its Python layer costs
about 350 us a call (a no-op ServerLive at 2.8k calls/s on one core), against
10k+ whole inferences/s over HTTP/1.1. What is ours here: gRPC's message
framing (the 5-byte prefix), its trailers, the budgets and timeouts, and the
handler interface, on the worker's own event loop like httpcore's HTTP/1.1.
Streaming calls, compression and TLS are not served (UNIMPLEMENTED).

A call is handed to `handler(path, metadata, message, peer)` once its request
has arrived whole: metadata is {lower-cased name: value} (str; `-bin` entries
left out, a repeated entry joined with ", ", a repeated single-valued one such
as `authorization` refused with INVALID_ARGUMENT), message the request's bytes,
peer the client's (ip, port). It returns the answer's bytes, a `GrpcStatus`
(an error), or a Future of either; an exception there is INTERNAL.
"""
import asyncio
from collections import OrderedDict
import logging

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcmp, memcpy

from gateway._native.httpcore cimport MAX_HEAD, MAX_HEADERS
from gateway._native.nghttp2 cimport *

log = logging.getLogger("infergate.grpc")

# gRPC status codes (grpc/status.h).
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 7, 8, 12, 13, 14
UNAUTHENTICATED = 16

# What we tell every client in our SETTINGS, and why:
# - 100 streams at once: a unary call needs one; more only multiplies what one
#   connection can make us hold (RFC 9113 recommends no fewer than 100).
DEF MAX_CONCURRENT_STREAMS = 100
# - a header list of MAX_HEAD (64 KiB) and MAX_HEADERS (100) metadata entries at most, as
#   HTTP/1 heads (httpcore.pxd); past either the call gets RESOURCE_EXHAUSTED (nghttp2 also
#   caps one field at 64 KiB and a header block at 8 CONTINUATION frames).
# - HPACK's default dynamic table (4 KiB) for what the client sends: more buys a client
#   nothing but our memory.
DEF HEADER_TABLE = 4096
# - a 1 MiB window per stream and 16 MiB for the connection: a large message streams at
#   loopback speed in 1 MiB rounds, and a client can have at most that much in flight
#   beyond what we have taken into a stream's buffer (windows open only as we do:
#   no_auto_window_update and nghttp2_session_consume below).
DEF STREAM_WINDOW = 1 << 20
DEF CONNECTION_WINDOW = 16 << 20
# - frames of the protocol's default size (16 KiB): larger frames save little on a
#   message and make every frame nghttp2 buffers larger.
DEF MAX_FRAME = 16384
# Options of the session itself:
# - SETTINGS frames of at most 16 entries (clients send fewer than 10; the protocol has 6);
# - the rapid-reset limit (CVE-2023-44487): 200 RST_STREAM at once, 50 a second after;
# - 256 SETTINGS and PING acks waiting at most: past that the client is flooding
#   (it sends and never reads) and the session ends;
# - our own HPACK table for answers capped at the default 4 KiB.
# (nghttp2 keeps a bounded record of closed streams: frames on them get STREAM_CLOSED.)
DEF MAX_SETTINGS = 16
DEF RESET_BURST = 200
DEF RESET_RATE = 50
DEF MAX_OUTBOUND_ACK = 256
DEF MAX_CONTINUATIONS = 8
# A server never pushes: we submit no PUSH_PROMISE, and nghttp2 refuses a client's.

DEF OUT_CHUNK = 65536        # what one transport.write() carries at most (but one frame)

cdef char OUT[OUT_CHUNK]     # the write buffer, shared: the loop runs one flush at a time


class GrpcStatus(Exception):
    """A call's error: a gRPC status code and its message (raise or return it)."""

    def __init__(self, int code, str message=""):
        super().__init__(message)
        self.code = code
        self.message = message


# Metadata of which one value is meaningful: a second one is refused rather than joined,
# so that "wrong, right" can never pass for "right" (issue 21, L7).
SINGLE_VALUED = frozenset(("authorization", "x-request-id", "grpc-timeout", "grpc-encoding",
                           "content-type", "te"))


cdef bytes _percent(str message):
    """grpc-message: percent-encoded UTF-8, as gRPC's wire format says."""
    cdef bytes raw = message.encode("utf-8")
    return b"".join(b"%%%02X" % c if c < 0x20 or c > 0x7e or c == 0x25 else bytes((c,))
                    for c in raw)


# --- header fields of our answers (static, never copied by nghttp2) ---------------------------

cdef bytes N_STATUS = b":status", V_200 = b"200", N_TYPE = b"content-type"
cdef bytes V_GRPC = b"application/grpc", N_GRPC_STATUS = b"grpc-status", V_ZERO = b"0"
cdef bytes N_GRPC_MESSAGE = b"grpc-message"
cdef nghttp2_nv RESPONSE[2]
cdef nghttp2_nv TRAILERS_OK[1]


cdef void _static(nghttp2_nv* nv, bytes name, bytes value):
    nv.name = <uint8_t*>PyBytes_AS_STRING(name)
    nv.namelen = PyBytes_GET_SIZE(name)
    nv.value = <uint8_t*>PyBytes_AS_STRING(value)
    nv.valuelen = PyBytes_GET_SIZE(value)
    nv.flags = NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE


_static(&RESPONSE[0], N_STATUS, V_200)
_static(&RESPONSE[1], N_TYPE, V_GRPC)
_static(&TRAILERS_OK[0], N_GRPC_STATUS, V_ZERO)


# --- the session's callbacks: each hands over to its GrpcConnection ----------------------------

cdef nghttp2_session_callbacks* CALLBACKS = NULL
cdef nghttp2_option* OPTIONS = NULL


cdef int _on_begin_frame(nghttp2_session* session, const nghttp2_frame_hd* hd,
                         void* user_data) noexcept:
    """HEADERS on a stream id at or below the last one opened, of which nghttp2 has no
    record (open, or among the recently closed it keeps): a lower id never opened, or one
    long closed, which RFC 9113 5.1.1 makes a PROTOCOL_ERROR (nghttp2 would ignore it).
    Those it has a record of it judges itself: a stream we reset gets its header blocks
    decoded and ignored, as HPACK needs."""
    cdef GrpcConnection conn = <GrpcConnection>user_data
    if hd.type == NGHTTP2_HEADERS and hd.stream_id <= conn.last_stream and \
            nghttp2_session_find_stream(session, hd.stream_id) == NULL:
        nghttp2_session_terminate_session(session, NGHTTP2_PROTOCOL_ERROR)
    return 0


cdef int _on_begin_headers(nghttp2_session* session, const nghttp2_frame* frame,
                           void* user_data) noexcept:
    if frame.hd.type != NGHTTP2_HEADERS or frame.headers.cat != NGHTTP2_HCAT_REQUEST:
        return 0
    try:
        (<GrpcConnection>user_data)._begin(frame.hd.stream_id)
    except BaseException:
        log.exception("gRPC: a stream failed to begin")
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_header(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name,
                    size_t namelen, const uint8_t* value, size_t valuelen, uint8_t flags,
                    void* user_data) noexcept:
    # Trailers of a request (HCAT_HEADERS) are decoded by nghttp2, keeping HPACK's table in
    # step, and not read: a unary call has nothing in them.
    if frame.hd.type != NGHTTP2_HEADERS or frame.headers.cat != NGHTTP2_HCAT_REQUEST:
        return 0
    try:
        if (<GrpcConnection>user_data)._header(frame.hd.stream_id, name, namelen, value,
                                               valuelen):
            # An HPACK bomb (one table entry named again and again): nghttp2 resets the
            # stream and decodes the rest of the block without calling us per field.
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
    except BaseException:
        log.exception("gRPC: a header field failed")
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_frame_recv(nghttp2_session* session, const nghttp2_frame* frame,
                        void* user_data) noexcept:
    cdef GrpcConnection conn = <GrpcConnection>user_data
    try:
        if frame.hd.type == NGHTTP2_HEADERS and frame.headers.cat == NGHTTP2_HCAT_REQUEST:
            conn._headers_done(frame.hd.stream_id)
        if (frame.hd.type == NGHTTP2_HEADERS or frame.hd.type == NGHTTP2_DATA) and \
                frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
            conn._request_done(frame.hd.stream_id)
    except BaseException:
        log.exception("gRPC: a call failed")
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_frame_send(nghttp2_session* session, const nghttp2_frame* frame,
                        void* user_data) noexcept:
    if frame.hd.type == NGHTTP2_HEADERS and frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
        try:
            (<GrpcConnection>user_data)._answer_sent(frame.hd.stream_id)
        except BaseException:
            log.exception("gRPC: an answer failed")
            return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_data_chunk(nghttp2_session* session, uint8_t flags, int32_t stream_id,
                        const uint8_t* data, size_t n, void* user_data) noexcept:
    try:
        (<GrpcConnection>user_data)._data(stream_id, data, n)
    except BaseException:
        log.exception("gRPC: a DATA frame failed")
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _on_stream_close(nghttp2_session* session, int32_t stream_id, uint32_t error_code,
                          void* user_data) noexcept:
    try:
        (<GrpcConnection>user_data)._stream_closed(stream_id)
    except BaseException:
        log.exception("gRPC: closing a stream failed")
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef ssize_t _read_answer(nghttp2_session* session, int32_t stream_id, uint8_t* buf,
                          size_t length, uint32_t* data_flags, nghttp2_data_source* source,
                          void* user_data) noexcept:
    """DATA of an answer: the 5-byte prefix, then the message; the trailers at its end."""
    cdef Stream stream = <Stream>source.ptr
    cdef Py_ssize_t total = 5 + PyBytes_GET_SIZE(stream.answer)
    cdef Py_ssize_t n = min(<Py_ssize_t>length, total - stream.answer_at), at = 0, head
    if stream.answer_at < 5:
        head = min(n, 5 - stream.answer_at)
        memcpy(buf, stream.prefix + stream.answer_at, head)
        at = head
    if n > at:
        memcpy(buf + at, PyBytes_AS_STRING(stream.answer) + stream.answer_at + at - 5, n - at)
    stream.answer_at += n
    if stream.answer_at == total:
        data_flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
        if nghttp2_submit_trailer(session, stream_id, TRAILERS_OK, 1) != 0:
            return NGHTTP2_ERR_CALLBACK_FAILURE
    return n


cdef void _setup() except *:
    global CALLBACKS, OPTIONS
    if nghttp2_session_callbacks_new(&CALLBACKS) or nghttp2_option_new(&OPTIONS):
        raise MemoryError()
    nghttp2_session_callbacks_set_on_begin_frame_callback(CALLBACKS, _on_begin_frame)
    nghttp2_session_callbacks_set_on_begin_headers_callback(CALLBACKS, _on_begin_headers)
    nghttp2_session_callbacks_set_on_header_callback(CALLBACKS, _on_header)
    nghttp2_session_callbacks_set_on_frame_recv_callback(CALLBACKS, _on_frame_recv)
    nghttp2_session_callbacks_set_on_frame_send_callback(CALLBACKS, _on_frame_send)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(CALLBACKS, _on_data_chunk)
    nghttp2_session_callbacks_set_on_stream_close_callback(CALLBACKS, _on_stream_close)
    nghttp2_option_set_no_auto_window_update(OPTIONS, 1)
    nghttp2_option_set_max_settings(OPTIONS, MAX_SETTINGS)
    nghttp2_option_set_stream_reset_rate_limit(OPTIONS, RESET_BURST, RESET_RATE)
    nghttp2_option_set_max_outbound_ack(OPTIONS, MAX_OUTBOUND_ACK)
    nghttp2_option_set_max_deflate_dynamic_table_size(OPTIONS, HEADER_TABLE)
    nghttp2_option_set_max_continuations(OPTIONS, MAX_CONTINUATIONS)


_setup()

cdef nghttp2_settings_entry SETTINGS[5]
SETTINGS[0].settings_id, SETTINGS[0].value = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, \
    MAX_CONCURRENT_STREAMS
SETTINGS[1].settings_id, SETTINGS[1].value = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW
SETTINGS[2].settings_id, SETTINGS[2].value = NGHTTP2_SETTINGS_MAX_FRAME_SIZE, MAX_FRAME
SETTINGS[3].settings_id, SETTINGS[3].value = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEAD
SETTINGS[4].settings_id, SETTINGS[4].value = NGHTTP2_SETTINGS_HEADER_TABLE_SIZE, HEADER_TABLE


# --- one call and one connection ---------------------------------------------------------------

cdef class Stream:
    cdef int32_t id
    cdef str path
    cdef dict metadata
    cdef bytearray data          # the request's DATA so far (None once handed on or refused)
    cdef Py_ssize_t header_bytes
    cdef Py_ssize_t entries      # metadata entries so far (a key sent twice counts twice)
    cdef list repeated           # keys sent more than once: their values are lists till joined
    cdef Py_ssize_t held         # bytes of the server's shared body budget, until it closes
    cdef object refused          # a GrpcStatus to answer instead of calling the handler
    cdef bint headers_done, request_done, answered
    cdef double deadline         # when the request must have arrived, or its answer left
    cdef object working          # the handler's Future, while it runs
    cdef bytes message           # the request's message, from its end until dispatched
    cdef bytes answer            # the answer's message while it is being sent
    cdef Py_ssize_t answer_at
    cdef uint8_t prefix[5]


cdef class GrpcConnection:
    """asyncio Protocol of one HTTP/2 connection of gRPC calls."""
    cdef nghttp2_session* session
    cdef object server, transport, handler, answer_error, peer, loop
    cdef object budget           # the server's shared body budget, or None
    cdef dict streams
    cdef list ready              # calls completed by the bytes being read, to dispatch after
    cdef int32_t last_stream     # the highest stream id opened
    cdef Py_ssize_t max_message, max_buffered, buffered
    cdef double read_timeout, paused_since
    cdef readonly double idle_since   # when its last call ended (or it opened)
    cdef bint write_paused
    cdef readonly bint closed

    def __init__(self, server):
        self.server = server
        self.handler = server.handler
        self.answer_error = server.answer_error
        self.max_message = server.max_message
        self.max_buffered = server.max_buffered
        self.budget = server.budget
        self.read_timeout = server.read_timeout
        self.loop = server.loop
        self.streams = {}
        self.ready = []

    def __dealloc__(self):
        if self.session != NULL:
            nghttp2_session_del(self.session)

    # asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        self.idle_since = self.loop.time()
        if not self.server.admit(self):
            self.closed = True
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else None
        self.server.connections.add(self)
        self.server.idle[self] = None
        if nghttp2_session_server_new2(&self.session, CALLBACKS, <void*>self, OPTIONS) != 0:
            raise MemoryError()
        nghttp2_submit_settings(self.session, NGHTTP2_FLAG_NONE, SETTINGS, 5)
        nghttp2_session_set_local_window_size(self.session, NGHTTP2_FLAG_NONE, 0,
                                              CONNECTION_WINDOW)
        self._flush()

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        self.server.idle.pop(self, None)
        for stream in self.streams.values():
            self._release(<Stream>stream)
            if (<Stream>stream).working is not None:
                (<Stream>stream).working.cancel()
        self.streams.clear()
        if self.session != NULL:
            nghttp2_session_del(self.session)
            self.session = NULL

    def data_received(self, bytes data):
        if self.session == NULL:
            return
        cdef ssize_t rv = nghttp2_session_mem_recv(
            self.session, <const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if rv < 0:
            log.info("gRPC connection from %s refused: %s", self.peer,
                     nghttp2_strerror(<int>rv).decode())
            nghttp2_session_terminate_session(self.session, NGHTTP2_PROTOCOL_ERROR)
            self.ready.clear()
        elif self.ready:
            self._dispatch()
        self._flush()

    def eof_received(self):
        return False

    def pause_writing(self):
        """The client reads slower than we answer: read nothing more from it (its PINGs and
        SETTINGS would each queue an ack) until what we wrote has gone out."""
        self.write_paused = True
        self.paused_since = self.loop.time()
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()
            self._flush()

    @property
    def idle(self) -> bool:
        return not self.streams

    def close_gracefully(self):
        """GOAWAY now (no new calls); the transport closes once the calls in flight end."""
        if self.session != NULL:
            nghttp2_submit_goaway(self.session, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(self.session),
                                  NGHTTP2_NO_ERROR, NULL, 0)
            self._flush()

    def close(self):
        """GOAWAY, and close once it is written (calls in flight are cut)."""
        self.close_gracefully()
        if self.transport is not None:
            self.transport.close()

    def abort(self):
        if self.transport is not None:
            self.transport.abort()

    def expire(self, double now, double idle_timeout):
        """The timeouts: an idle connection, a request that does not arrive whole, an
        answer the client does not read, all within read_timeout of their start."""
        cdef Stream stream
        if self.session == NULL:
            return
        if self.write_paused:
            if now - self.paused_since > self.read_timeout:
                log.info("gRPC connection from %s closed: it reads nothing", self.peer)
                self.transport.abort()
            return
        if not self.streams:
            if now - self.idle_since > idle_timeout:
                self.close_gracefully()
            return
        for value in list(self.streams.values()):
            stream = <Stream>value
            if stream.deadline == 0 or now < stream.deadline:
                continue
            stream.deadline = 0
            if not stream.headers_done:  # a header block left unfinished holds the connection
                nghttp2_session_terminate_session(self.session, NGHTTP2_PROTOCOL_ERROR)
                break
            if not stream.request_done:
                self._answer(stream, GrpcStatus(DEADLINE_EXCEEDED, f"the request was not "
                                                f"received within {self.read_timeout:g}s"))
            else:  # the answer waits on a window the client does not open
                nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, stream.id,
                                          NGHTTP2_CANCEL)
        self._flush()

    # writing
    cdef void _flush(self) except *:
        """Send what the session has to send, as far as the transport takes it; close
        once the session is done (GOAWAY both ways, or a connection error)."""
        cdef const uint8_t* data
        cdef ssize_t n
        cdef Py_ssize_t filled = 0
        if self.session == NULL or self.closed:
            return
        while not self.write_paused:
            n = nghttp2_session_mem_send(self.session, &data)
            if n < 0:
                log.info("gRPC connection from %s failed: %s", self.peer,
                         nghttp2_strerror(<int>n).decode())
                self.transport.abort()
                return
            if n == 0:
                break
            if filled + n > OUT_CHUNK:
                if filled:
                    self.transport.write(PyBytes_FromStringAndSize(OUT, filled))
                    filled = 0
                if n > OUT_CHUNK:
                    self.transport.write(PyBytes_FromStringAndSize(<const char*>data, n))
                    continue
            memcpy(OUT + filled, data, n)
            filled += n
        if filled:
            self.transport.write(PyBytes_FromStringAndSize(OUT, filled))
        if not nghttp2_session_want_read(self.session) and \
                not nghttp2_session_want_write(self.session):
            self.transport.close()

    # what the session's callbacks hand over
    cdef void _begin(self, int32_t stream_id) except *:
        cdef Stream stream = Stream()
        stream.id = stream_id
        stream.metadata = {}
        stream.data = bytearray()
        stream.deadline = self.loop.time() + self.read_timeout
        if not self.streams:
            self.server.idle.pop(self, None)
        self.streams[stream_id] = stream
        if stream_id > self.last_stream:
            self.last_stream = stream_id

    cdef bint _header(self, int32_t stream_id, const uint8_t* name, size_t namelen,
                      const uint8_t* value, size_t valuelen) except -1:
        """Take one metadata entry; True: the block decodes to far more than any client
        sends (4x the limit), reset the stream rather than hear of each field."""
        cdef Stream stream = self.streams.get(stream_id)
        if stream is None:
            return False
        stream.header_bytes += namelen + valuelen + 32
        if namelen and name[0] != 0x3a:
            stream.entries += 1
        if stream.header_bytes > MAX_HEAD or stream.entries > MAX_HEADERS:
            if stream.refused is None:  # answered RESOURCE_EXHAUSTED once the block ends
                stream.refused = GrpcStatus(RESOURCE_EXHAUSTED, f"the metadata is larger than "
                                            f"{MAX_HEAD} bytes or {MAX_HEADERS} entries")
            return stream.header_bytes > 4 * MAX_HEAD
        if namelen and name[0] == 0x3a:  # ':', a pseudo-header
            if namelen == 5 and memcmp(name, b":path", 5) == 0:
                stream.path = PyUnicode_DecodeLatin1(<const char*>value, valuelen, NULL)
            return False
        if namelen > 4 and memcmp(name + namelen - 4, b"-bin", 4) == 0:
            return False
        key = PyUnicode_DecodeLatin1(<const char*>name, namelen, NULL)
        text = PyUnicode_DecodeLatin1(<const char*>value, valuelen, NULL)
        before = stream.metadata.get(key)
        if before is None:
            stream.metadata[key] = text
        elif key in SINGLE_VALUED:
            if stream.refused is None:
                stream.refused = GrpcStatus(INVALID_ARGUMENT, f"two {key} metadata entries")
        elif type(before) is list:  # joined once the block ends: a key sent n times
            (<list>before).append(text)  # costs n copies, not n squared
        else:
            stream.metadata[key] = [before, text]
            if stream.repeated is None:
                stream.repeated = []
            stream.repeated.append(key)
        return False

    cdef void _headers_done(self, int32_t stream_id) except *:
        cdef Stream stream = self.streams.get(stream_id)
        if stream is not None:
            stream.headers_done = True
            if stream.repeated is not None:
                for key in stream.repeated:
                    stream.metadata[key] = ", ".join(stream.metadata[key])
                stream.repeated = None

    cdef void _data(self, int32_t stream_id, const uint8_t* data, size_t n) except *:
        cdef Stream stream = self.streams.get(stream_id)
        cdef Py_ssize_t have
        # The window opens again for whatever arrived: taken into a buffer below, or
        # dropped (a refused or answered stream).
        nghttp2_session_consume(self.session, stream_id, n)
        if stream is None or stream.data is None:
            return
        have = PyByteArray_GET_SIZE(stream.data)
        if have + <Py_ssize_t>n > self.max_message + 5:
            self._refuse(stream, f"the message is larger than {self.max_message} bytes")
            return
        if self.buffered + <Py_ssize_t>n > self.max_buffered:
            self._refuse(stream, f"this connection's unfinished requests hold more than "
                                 f"{self.max_buffered} bytes")
            return
        if self.budget is not None:
            if not self.budget.take_body_budget(n):
                self._refuse(stream, f"the gateway's request bodies already hold "
                                     f"{self.budget.body_budget >> 20} MB "
                                     f"(--max-buffered-body-mb): retry later")
                return
            stream.held += n
        PyByteArray_Resize(stream.data, have + n)
        memcpy(PyByteArray_AS_STRING(stream.data) + have, data, n)
        self.buffered += n

    cdef void _refuse(self, Stream stream, str why) except *:
        """RESOURCE_EXHAUSTED before the request has arrived whole; its bytes let go."""
        self._drop(stream)
        self._answer(stream, GrpcStatus(RESOURCE_EXHAUSTED, why))

    cdef void _release(self, Stream stream):
        """Hand back the shared body budget the stream held (until its call ended)."""
        if stream.held:
            self.budget.give_body_budget(stream.held)
            stream.held = 0

    cdef void _drop(self, Stream stream):
        if stream.data is not None:
            self.buffered -= PyByteArray_GET_SIZE(stream.data)
            stream.data = None

    cdef void _stream_closed(self, int32_t stream_id) except *:
        cdef Stream stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        self._drop(stream)
        self._release(stream)
        if stream.working is not None:
            stream.working.cancel()
        if not self.streams:
            self.idle_since = self.loop.time()
            self.server.idle[self] = None  # the newest idle one

    # calls
    cdef void _request_done(self, int32_t stream_id) except *:
        """The request is complete: hand the call to the handler."""
        cdef Stream stream = self.streams.get(stream_id)
        cdef bytearray data
        cdef Py_ssize_t n, declared
        if stream is None or stream.request_done:
            return
        stream.request_done = True
        stream.deadline = 0
        data = stream.data
        self._drop(stream)
        if stream.answered:
            return
        if stream.refused is not None:
            self._answer(stream, stream.refused)
            return
        if stream.path is None:
            self._answer(stream, GrpcStatus(INVALID_ARGUMENT, "the request has no :path"))
            return
        if stream.metadata.get("grpc-encoding", "identity") != "identity":
            self._answer(stream, GrpcStatus(UNIMPLEMENTED, "compressed messages are not "
                                                           "supported"))
            return
        n = PyByteArray_GET_SIZE(data)
        declared = int.from_bytes(data[1:5], "big") if n >= 5 else -1
        if n < 5 or declared > n - 5 or data[0] > 1:
            self._answer(stream, GrpcStatus(INVALID_ARGUMENT, f"the request is not one gRPC "
                                            f"message: {n} bytes" + (
                                                f", its prefix says {declared}" if n >= 5
                                                else "")))
            return
        if data[0] == 1:
            self._answer(stream, GrpcStatus(UNIMPLEMENTED, "compressed messages are not "
                                                           "supported"))
            return
        if declared < n - 5:
            self._answer(stream, GrpcStatus(UNIMPLEMENTED, "a unary call carries exactly one "
                                                           "message; streaming is not served"))
            return
        stream.message = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(data) + 5, declared)
        self.ready.append(stream)

    cdef void _dispatch(self) except *:
        """Hand the calls that the bytes just read completed to the handler, but for those
        the same bytes reset: a rapid-reset client's calls never reach it (each cost a
        task and a trip through the filter chain, a third of the gateway's time)."""
        cdef Stream stream
        try:
            if not nghttp2_session_want_read(self.session):  # it ended: nobody will hear back
                return
            for value in self.ready:  # (handlers answer or return a Future: none reads)
                stream = <Stream>value
                if self.streams.get(stream.id) is stream and not stream.answered:
                    self._call(stream)
        finally:
            self.ready.clear()

    cdef void _call(self, Stream stream) except *:
        message, stream.message = stream.message, None
        try:
            result = self.handler(stream.path, stream.metadata, message, self.peer)
        except GrpcStatus as status:
            result = status
        except Exception:
            log.exception("gRPC handler failed on %s", stream.path)
            result = GrpcStatus(INTERNAL, "internal error")
        if isinstance(result, (bytes, GrpcStatus)):
            self._answer(stream, result)
        elif isinstance(result, asyncio.Future):
            stream.working = result
            result.add_done_callback(_Done(self, stream))
        else:
            log.error("gRPC handler for %s returned %r, not bytes, a GrpcStatus or a Future",
                      stream.path, type(result))
            self._answer(stream, GrpcStatus(INTERNAL, "internal error"))

    cdef void _done(self, Stream stream, future) except *:
        stream.working = None
        if future.cancelled() or self.session == NULL or \
                self.streams.get(stream.id) is not stream:
            return
        exc = future.exception()
        if exc is None:
            result = future.result()
        elif isinstance(exc, GrpcStatus):
            result = exc
        else:
            result = self.answer_error(exc)
            if result is None:
                log.error("gRPC call failed", exc_info=exc)
                result = GrpcStatus(INTERNAL, "internal error")
        self._answer(stream, result)
        self._flush()

    cdef void _answer(self, Stream stream, result) except *:
        cdef nghttp2_nv nva[4]
        cdef nghttp2_data_provider provider
        cdef Py_ssize_t n
        cdef bytes code, text
        if stream.answered or self.session == NULL or self.streams.get(stream.id) is not stream:
            return
        stream.answered = True
        if not isinstance(result, (bytes, GrpcStatus)):
            log.error("gRPC handler answered %r on %s", type(result), stream.path)
            result = GrpcStatus(INTERNAL, "internal error")
        if isinstance(result, GrpcStatus):  # trailers only
            nva[0], nva[1] = RESPONSE[0], RESPONSE[1]
            code = str((<object>result).code).encode()
            text = _percent((<object>result).message)
            _field(&nva[2], N_GRPC_STATUS, code)
            _field(&nva[3], N_GRPC_MESSAGE, text)
            nghttp2_submit_response(self.session, stream.id, nva, 4 if text else 3, NULL)
        else:
            stream.answer = result
            n = PyBytes_GET_SIZE(stream.answer)
            stream.prefix[0] = 0
            stream.prefix[1], stream.prefix[2] = (n >> 24) & 0xff, (n >> 16) & 0xff
            stream.prefix[3], stream.prefix[4] = (n >> 8) & 0xff, n & 0xff
            provider.source.ptr = <void*>stream
            provider.read_callback = _read_answer
            nghttp2_submit_response(self.session, stream.id, RESPONSE, 2, &provider)
            stream.deadline = self.loop.time() + self.read_timeout

    cdef void _answer_sent(self, int32_t stream_id) except *:
        """The answer's last frame is out. If the request has not ended, the client may stop
        sending it (RFC 9113 8.1): RST_STREAM NO_ERROR. (Not sooner: nghttp2 drops what
        is still queued on a stream once a reset is submitted.)"""
        cdef Stream stream = self.streams.get(stream_id)
        if stream is not None and not stream.request_done:
            nghttp2_submit_rst_stream(self.session, NGHTTP2_FLAG_NONE, stream_id,
                                      NGHTTP2_NO_ERROR)


cdef void _field(nghttp2_nv* nv, bytes name, bytes value):
    """A header field nghttp2 copies (value lives only as long as the call)."""
    nv.name = <uint8_t*>PyBytes_AS_STRING(name)
    nv.namelen = PyBytes_GET_SIZE(name)
    nv.value = <uint8_t*>PyBytes_AS_STRING(value)
    nv.valuelen = PyBytes_GET_SIZE(value)
    nv.flags = NGHTTP2_NV_FLAG_NO_COPY_NAME


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

    `answer_error(exc)` turns a Future's exception into a GrpcStatus (None: INTERNAL).
    Limits: a message of `max_message` bytes at most, `max_buffered` bytes of unfinished
    requests on one connection (past either, RESOURCE_EXHAUSTED); a request arrives whole
    and an answer leaves within `read_timeout` seconds; a connection with no call for
    `idle_timeout` seconds is closed. `max_connections` connections at most, counting
    `others()` (the gateway's HTTP clients): past it the longest idle one is closed, or
    the new one if none is idle. `budget` (the gateway's data plane) is a body budget
    shared with other servers: `take_body_budget(n)` -> bool, `give_body_budget(n)`, and
    `body_budget`; a stream holds what its request brought until it closes, and a stream
    whose DATA finds the budget spent gets RESOURCE_EXHAUSTED."""

    def __init__(self, handler, max_message: int = 64 << 20, answer_error=None, *,
                 max_buffered: int | None = None, read_timeout: float = 30.0,
                 idle_timeout: float = 75.0, max_connections: int = 10000, others=None,
                 budget=None):
        self.handler = handler
        self.max_message = max_message
        self.max_buffered = max_buffered if max_buffered is not None else 2 * (max_message + 5)
        self.answer_error = answer_error or (lambda exc: None)
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.others = others or (lambda: 0)
        self.budget = budget
        self.connections = set()
        self.idle = OrderedDict()  # connections without a call, longest idle first
        self.loop = None
        self._servers = []
        self._sweeper = None

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> int:
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_server(lambda: GrpcConnection(self), host, port,
                                               reuse_port=reuse_port or None, backlog=1024)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep())
        return server.sockets[0].getsockname()[1]

    def admit(self, conn) -> bool:
        """Whether a new connection may stay (closing an idle one to make room)."""
        return len(self.connections) + self.others() < self.max_connections or \
            self.evict_idle()

    def evict_idle(self) -> bool:
        """Close the connection that has been without a call longest; False if none is.
        `idle` holds the connections without a call, longest idle first (O(1) a pick)."""
        while self.idle:
            oldest, _ = self.idle.popitem(last=False)
            if oldest.closed:
                continue
            oldest.close()
            self.connections.discard(oldest)
            return True
        return False

    async def _sweep(self) -> None:
        # One timer for every connection, as gateway/server/http.py does for HTTP/1.
        interval = max(0.05, min(self.idle_timeout, self.read_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for conn in list(self.connections):
                try:
                    conn.expire(now, self.idle_timeout)
                except Exception:
                    log.exception("gRPC: a timeout failed")

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
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
