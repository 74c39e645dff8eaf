# The gateway's HTTP/1.1 codec (http1.pyx): buffers, request and response heads, and an
# incremental chunked decoder, over bytes, for the data plane to cimport.
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from gateway._native.httpcore cimport MAX_HEAD, MAX_HEADERS

cdef extern from "string.h" nogil:
    int strncasecmp(const char*, const char*, size_t)

# The most interim (1xx) answers an upstream may send before its real one: past it, a 502.
cdef enum:
    MAX_INTERIM = 32
    # A chunk-size line (size and extensions) at most: past it, a 400.
    MAX_CHUNK_LINE = 4096

# Why parse_head refused a head (negative), or how far it got.
cdef enum:
    HEAD_DONE = 1
    HEAD_MORE = 0
    E_MALFORMED = -1
    E_TOO_LARGE = -2          # 431
    E_UPGRADE = -3
    E_BARE_LF = -4
    E_CONTROL = -5
    E_METHOD = -6
    E_TARGET = -7
    E_VERSION = -8
    E_HEADER_NAME = -9
    E_OBS_FOLD = -10
    E_TOO_MANY_HEADERS = -11  # 431
    E_CONTENT_LENGTH = -12
    E_DUP_CONTENT_LENGTH = -13
    E_TRANSFER_ENCODING = -14
    E_BOTH_FRAMINGS = -15
    E_CHUNKED_HTTP10 = -16
    E_NO_HOST = -17
    E_DUP_HOST = -18
    E_DUP_AUTHORIZATION = -19
    E_STATUS = -20
    E_CONNECT = -21
    E_LEADING_EMPTY = -22

# What dechunk says: done, more bytes needed, or why it refused (negative).
cdef enum:
    CHUNKS_DONE = 1
    CHUNKS_MORE = 0
    E_CHUNK_SIZE = -1
    E_CHUNK_TOO_LARGE = -2    # 413
    E_CHUNK_EXTENSION = -3
    E_CHUNK_END = -4
    E_CHUNK_LINE = -5
    E_TRAILER = -6
    E_TRAILERS_TOO_LARGE = -7


cdef struct Buf:
    char* p
    size_t n, cap

cdef struct Span:
    const char* p
    size_t n

cdef struct Head:
    Span method, target, reason
    int minor            # HTTP/1.<minor>
    int status           # responses
    int count
    Span names[MAX_HEADERS]
    Span values[MAX_HEADERS]
    long long content_length   # -1: none
    bint chunked, conn_close, conn_keep_alive, expect_continue
    size_t size          # bytes of the head, blank line included

# Where a chunked body's decoding stands between reads. It decodes in place: the data of
# each chunk moves down over the framing before it, so the body is p[0:write_at] and the
# encoded message was p[0:read_at] once done.
cdef struct Chunks:
    size_t read_at, write_at
    long long left       # data bytes of the current chunk not yet here
    size_t trailers      # bytes of trailer lines so far
    int state


cdef int parse_head(const char* p, size_t n, Head* h, bint response) noexcept
cdef str head_refusal(int code)
cdef int head_refusal_status(int code) noexcept

cdef void chunks_start(Chunks* c) noexcept
cdef int dechunk(char* p, size_t n, Chunks* c, long long max_size) noexcept
cdef str chunks_refusal(int code)


cdef inline int buf_need(Buf* b, size_t extra) except -1:
    cdef size_t cap
    cdef char* grown
    if b.n + extra > b.cap:
        cap = max(b.n + extra, b.cap * 2, <size_t>4096)
        grown = <char*>realloc(b.p, cap)
        if grown == NULL:
            raise MemoryError()
        b.p = grown
        b.cap = cap
    return 0

cdef inline int buf_add(Buf* b, const char* s, size_t n) except -1:
    buf_need(b, n)
    memcpy(b.p + b.n, s, n)
    b.n += n
    return 0

cdef inline int buf_bytes(Buf* b, bytes s) except -1:
    return buf_add(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))

cdef inline void buf_consume(Buf* b, size_t n) noexcept:
    if n >= b.n:
        b.n = 0
        if b.cap > (1 << 20):  # a large body came through: do not keep its room
            free(b.p)
            b.p = NULL
            b.cap = 0
    else:
        memmove(b.p, b.p + n, b.n - n)
        b.n -= n

cdef inline bint span_is(Span s, const char* lower, size_t n) noexcept:
    return s.n == n and strncasecmp(s.p, lower, n) == 0
