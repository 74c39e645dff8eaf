# cython: language_level=3
"""The gateway's HTTP/1.1 codec: request and response heads, and chunked bodies, over bytes.

Why its own module: the data plane (dataplane.pyx) cimports it, so each call is a C call
on its buffers, while tests, the differential test against llhttp and the fuzz harnesses
reach the same code through the small `def` entry points at the end.

Strict on purpose: the gateway sits in front of other HTTP parsers (the workers', and
whatever a service runs), so anything two parsers could read two ways (bare LF, obs-fold,
two lengths, Transfer-Encoding on HTTP/1.0, two Hosts) is refused, with a reason a
client can act on. Chunked bodies are decoded incrementally: a body that arrives in many
reads is decoded once, not again from its first chunk on every read.
"""
from libc.stdlib cimport free, malloc, strtoll
from libc.string cimport memchr, memcmp, memcpy, memmove
from cpython.bytes cimport PyBytes_FromStringAndSize

cdef extern from "string.h" nogil:
    void* memmem(const void*, size_t, const void*, size_t)

cdef enum:
    SIZE_LINE = 0
    DATA = 1
    DATA_END = 2
    TRAILERS = 3
    DONE = 4


cdef inline bint is_tchar(unsigned char ch) noexcept:
    """A token character (RFC 9110 5.6.2)."""
    return ch > 32 and ch < 127 and not (
        ch == b'"' or ch == b'(' or ch == b')' or ch == b',' or ch == b'/' or ch == b':' or
        ch == b';' or ch == b'<' or ch == b'=' or ch == b'>' or ch == b'?' or ch == b'@' or
        ch == b'[' or ch == b'\\' or ch == b']' or ch == b'{' or ch == b'}')


cdef inline bint token(const char* p, size_t n) noexcept:
    """Only token characters, at least one: what a method or a header name may be."""
    cdef size_t i
    if n == 0:
        return False
    for i in range(n):
        if not is_tchar(<unsigned char>p[i]):
            return False
    return True


cdef inline bint has_token(Span s, const char* token, size_t n) noexcept:
    """A comma-separated header value holds `token` (case-insensitive)."""
    cdef size_t i = 0, start, end
    while i < s.n:
        while i < s.n and (s.p[i] == b' ' or s.p[i] == b','):
            i += 1
        start = i
        while i < s.n and s.p[i] != b',':
            i += 1
        end = i
        while end > start and s.p[end - 1] == b' ':
            end -= 1
        if end - start == n and strncasecmp(s.p + start, token, n) == 0:
            return True
    return False


cdef inline bint bare_lf(const char* p, size_t n) noexcept:
    """A LF not after a CR in p[0:n]."""
    cdef const char* lf = <const char*>memchr(p, b'\n', n)
    while lf != NULL:
        if lf == p or lf[-1] != b'\r':
            return True
        lf = <const char*>memchr(lf + 1, b'\n', n - (lf + 1 - p))
    return False


cdef int parse_head(const char* p, size_t n, Head* h, bint response) noexcept:
    """HEAD_DONE: a complete head parsed into h; HEAD_MORE: more bytes needed; else why it
    is refused (E_*, see head_refusal)."""
    if n and (p[0] == b'\r' or p[0] == b'\n') and not response:
        return E_LEADING_EMPTY
    cdef const char* end = <const char*>memmem(p, n, b"\r\n\r\n", 4)
    if end == NULL:
        # A bare LF never ends a head here: refuse it now, not at the read timeout.
        if bare_lf(p, n if n < MAX_HEAD else MAX_HEAD):
            return E_BARE_LF
        return E_TOO_LARGE if n > MAX_HEAD else HEAD_MORE
    h.size = end - p + 4
    if h.size > MAX_HEAD:
        return E_TOO_LARGE
    cdef size_t i
    cdef unsigned char ch
    for i in range(<size_t>(end - p)):  # no bare CR or LF, no NUL: no line may hide another
        ch = <unsigned char>p[i]
        if ch < 32 or ch == 127:
            if ch == b'\r':
                if p[i + 1] != b'\n':
                    return E_CONTROL
            elif ch == b'\n':
                if i == 0 or p[i - 1] != b'\r':
                    return E_BARE_LF
            elif ch != b'\t':
                return E_CONTROL
    cdef const char* line_end = <const char*>memmem(p, end - p + 2, b"\r\n", 2)
    cdef const char* sp1 = <const char*>memchr(p, b' ', line_end - p)
    if sp1 == NULL:
        return E_MALFORMED
    cdef const char* sp2
    cdef const char* version
    if response:
        # HTTP/1.x SSS reason
        if sp1 - p != 8 or line_end - sp1 < 4 or (line_end - sp1 > 4 and sp1[4] != b' '):
            return E_STATUS
        for i in range(1, 4):
            if not b'0' <= sp1[i] <= b'9':
                return E_STATUS
        version = p
        h.status = (sp1[1] - 48) * 100 + (sp1[2] - 48) * 10 + (sp1[3] - 48)
        if h.status < 100:
            return E_STATUS
    else:
        if not token(p, sp1 - p):
            return E_METHOD
        h.method.p = p
        h.method.n = sp1 - p
        if h.method.n == 7 and memcmp(p, b"CONNECT", 7) == 0:
            return E_CONNECT  # a tunnel: what an upstream would do with it is anyone's guess
        h.target.p = sp1 + 1
        sp2 = <const char*>memchr(sp1 + 1, b' ', line_end - sp1 - 1)
        if sp2 == NULL:
            return E_MALFORMED
        h.target.n = sp2 - sp1 - 1
        if h.target.n == 0:
            return E_MALFORMED  # two spaces
        if h.target.p[0] != b'/':
            return E_TARGET
        for i in range(h.target.n):  # visible ASCII: what a client may send unencoded
            if not 32 < <unsigned char>h.target.p[i] < 127:
                return E_TARGET
        version = sp2 + 1
        if line_end - version != 8:
            return E_VERSION
    if memcmp(version, b"HTTP/1.", 7) != 0 or not (b'0' <= version[7] <= b'1'):
        return E_VERSION
    h.minor = version[7] - 48
    h.count = 0
    h.content_length = -1
    h.chunked = h.conn_close = h.conn_keep_alive = h.expect_continue = False
    cdef int hosts = 0, authorizations = 0
    cdef const char* line = line_end + 2
    cdef const char* colon
    cdef const char* v
    cdef const char* ve
    cdef char* num_end
    cdef long long cl
    while line < end + 2:
        line_end = <const char*>memmem(line, end + 2 - line, b"\r\n", 2)
        if line[0] == b' ' or line[0] == b'\t':
            return E_OBS_FOLD
        if h.count == MAX_HEADERS:
            return E_TOO_MANY_HEADERS
        colon = <const char*>memchr(line, b':', line_end - line)
        if colon == NULL or not token(line, colon - line):
            return E_HEADER_NAME
        v = colon + 1
        while v < line_end and (v[0] == b' ' or v[0] == b'\t'):
            v += 1
        ve = line_end
        while ve > v and (ve[-1] == b' ' or ve[-1] == b'\t'):
            ve -= 1
        h.names[h.count].p = line
        h.names[h.count].n = colon - line
        h.values[h.count].p = v
        h.values[h.count].n = ve - v
        if span_is(h.names[h.count], b"content-length", 14):
            if h.content_length >= 0:
                return E_DUP_CONTENT_LENGTH
            if ve == v or not (b'0' <= v[0] <= b'9'):
                return E_CONTENT_LENGTH
            cl = strtoll(v, &num_end, 10)  # saturates: past the body limit anyway
            if num_end != ve or cl < 0:
                return E_CONTENT_LENGTH
            h.content_length = cl
        elif span_is(h.names[h.count], b"transfer-encoding", 17):
            if h.chunked or not span_is(h.values[h.count], b"chunked", 7):
                return E_TRANSFER_ENCODING  # only chunked alone is spoken
            h.chunked = True
        elif span_is(h.names[h.count], b"connection", 10):
            if has_token(h.values[h.count], b"close", 5):
                h.conn_close = True
            if has_token(h.values[h.count], b"keep-alive", 10):
                h.conn_keep_alive = True
            if has_token(h.values[h.count], b"upgrade", 7) and not response:
                return E_UPGRADE
        elif not response:
            if span_is(h.names[h.count], b"host", 4):
                hosts += 1
                if hosts > 1:
                    return E_DUP_HOST
            elif span_is(h.names[h.count], b"authorization", 13):
                authorizations += 1
                if authorizations > 1:
                    return E_DUP_AUTHORIZATION  # else one of two could be checked, the other used
            elif span_is(h.names[h.count], b"expect", 6):
                h.expect_continue = span_is(h.values[h.count], b"100-continue", 12)
        h.count += 1
        line = line_end + 2
    if h.chunked and h.content_length >= 0:
        return E_BOTH_FRAMINGS  # request smuggling
    if not response:
        if h.chunked and h.minor == 0:
            return E_CHUNKED_HTTP10  # an HTTP/1.0 hop would read the body by the connection
        if h.minor == 1 and hosts == 0:
            return E_NO_HOST
    return HEAD_DONE


cdef dict _REASONS = {
    E_MALFORMED: "the request line is not one method, target and version, one space apart",
    E_LEADING_EMPTY: "an empty line (or a CR) before the request line",
    E_BARE_LF: "a line ends in a bare LF (CRLF required)",
    E_CONTROL: "a control character or a bare CR in the head",
    E_METHOD: "the method is not a token",
    E_TARGET: "the request target is not a path of visible ASCII characters",
    E_VERSION: "the version is not HTTP/1.0 or HTTP/1.1",
    E_HEADER_NAME: "a header line is not a token name followed by a colon",
    E_OBS_FOLD: "a header line is folded (obs-fold)",
    E_CONTENT_LENGTH: "Content-Length is not a decimal number",
    E_DUP_CONTENT_LENGTH: "more than one Content-Length",
    E_TRANSFER_ENCODING: "Transfer-Encoding other than one 'chunked'",
    E_BOTH_FRAMINGS: "both Content-Length and Transfer-Encoding",
    E_CHUNKED_HTTP10: "Transfer-Encoding in an HTTP/1.0 request",
    E_NO_HOST: "an HTTP/1.1 request without a Host header",
    E_DUP_HOST: "more than one Host header",
    E_DUP_AUTHORIZATION: "more than one Authorization header",
    E_STATUS: "malformed status line",
}


cdef int head_refusal_status(int code) noexcept:
    return 431 if code == E_TOO_LARGE or code == E_TOO_MANY_HEADERS else 400


cdef str head_refusal(int code):
    """What a client is told of a head parse_head refused."""
    if code == E_TOO_LARGE:
        return f"request head is too large (over {MAX_HEAD} bytes)"
    if code == E_TOO_MANY_HEADERS:
        return f"request head is too large (over {MAX_HEADERS} headers)"
    if code == E_UPGRADE:
        return "protocol upgrades are not supported"
    if code == E_CONNECT:
        return "CONNECT is not supported: the gateway is no tunnel"
    return "malformed HTTP request: " + _REASONS.get(code, "unreadable head")




# --- chunked bodies ---------------------------------------------------------------------

cdef void chunks_start(Chunks* c) noexcept:
    c.read_at = c.write_at = c.trailers = 0
    c.left = 0
    c.state = SIZE_LINE


cdef inline int quoted_end(const char* p, const char* eol, const char** after) noexcept:
    """A quoted-string at p (its opening quote): 0 with *after past its closing quote."""
    cdef unsigned char ch
    p += 1
    while p < eol:
        ch = <unsigned char>p[0]
        if ch == b'"':
            after[0] = p + 1
            return 0
        if ch == b'\\':
            p += 1
            if p == eol:
                return -1
            ch = <unsigned char>p[0]
        if (ch < 32 and ch != b'\t') or ch == 127:
            return -1
        p += 1
    return -1


cdef int chunk_size(const char* p, const char* end, long long room, long long* size,
                    const char** after) noexcept:
    """The hex digits of a chunk size at p, judged on what is there up to `end` (the line's
    LF, or where the bytes end for now): E_CHUNK_TOO_LARGE as soon as they pass `room`,
    E_CHUNK_SIZE if anything but ';' or CR follows them; else 0, with *after past them.
    Judged the same whatever part of the line has come, so that a body decodes the same
    in any pieces."""
    cdef long long n = 0
    cdef const char* q = p
    cdef char ch
    while q < end:
        ch = q[0]
        if b'0' <= ch <= b'9':
            n = n * 16 + (ch - 48)
        elif b'a' <= ch <= b'f':
            n = n * 16 + (ch - 87)
        elif b'A' <= ch <= b'F':
            n = n * 16 + (ch - 55)
        else:
            if q == p or (ch != b';' and ch != b'\r'):
                return E_CHUNK_SIZE
            break
        if n > room:
            return E_CHUNK_TOO_LARGE  # at once: no need to wait for the data
        q += 1
    size[0] = n
    after[0] = q
    return 0


cdef int chunk_extensions(const char* q, const char* eol) noexcept:
    """What follows a chunk size up to its line's CR: nothing, or ;name[=token|quoted]..."""
    cdef const char* start
    while q < eol:
        if q[0] != b';':
            return E_CHUNK_EXTENSION
        q += 1
        start = q
        while q < eol and is_tchar(<unsigned char>q[0]):
            q += 1
        if q == start:
            return E_CHUNK_EXTENSION
        if q < eol and q[0] == b'=':
            q += 1
            if q < eol and q[0] == b'"':
                if quoted_end(q, eol, &q) != 0:
                    return E_CHUNK_EXTENSION
            else:
                start = q
                while q < eol and is_tchar(<unsigned char>q[0]):
                    q += 1
                if q == start:
                    return E_CHUNK_EXTENSION
    return 0


cdef inline bint trailer_line(const char* p, size_t n) noexcept:
    """A trailer field line (without its CRLF): a token name, a colon, a clean value."""
    cdef const char* colon = <const char*>memchr(p, b':', n)
    cdef size_t i
    cdef unsigned char ch
    if colon == NULL or not token(p, colon - p):
        return False
    for i in range(<size_t>(colon - p) + 1, n):
        ch = <unsigned char>p[i]
        if (ch < 32 and ch != b'\t') or ch == 127:
            return False
    return True


cdef int dechunk(char* p, size_t n, Chunks* c, long long max_size) noexcept:
    """Decode more of the chunked body at p[0:n] (the bytes after the head, so far), going
    on from where `c` stands: CHUNKS_DONE (the body is p[0:c.write_at], the message took
    p[0:c.read_at]), CHUNKS_MORE, or why it is refused (E_CHUNK_*). The body grows past
    max_size: E_CHUNK_TOO_LARGE, as soon as a chunk's size says so."""
    cdef const char* eol
    cdef const char* digits_end
    cdef size_t k, avail
    cdef long long size
    cdef int rc
    if max_size > (1LL << 56):
        max_size = 1LL << 56  # so that a size never overflows
    while True:
        avail = n - c.read_at
        if c.state == SIZE_LINE:
            eol = <const char*>memchr(p + c.read_at, b'\n', avail)
            k = eol - (p + c.read_at) if eol != NULL else avail  # the line so far, CR included
            rc = chunk_size(p + c.read_at, p + c.read_at + k, max_size - <long long>c.write_at,
                            &size, &digits_end)
            if rc < 0:
                return rc
            if k > MAX_CHUNK_LINE:
                return E_CHUNK_LINE
            if eol == NULL:
                return CHUNKS_MORE
            if k == 0 or eol[-1] != b'\r':
                return E_CHUNK_SIZE  # a bare LF
            if chunk_extensions(digits_end, eol - 1) < 0:
                return E_CHUNK_EXTENSION
            c.read_at += k + 1
            if size == 0:
                c.state = TRAILERS
            else:
                c.left = size
                c.state = DATA
        elif c.state == DATA:
            k = avail if <long long>avail < c.left else <size_t>c.left
            if k and c.read_at != c.write_at:
                memmove(p + c.write_at, p + c.read_at, k)
            c.read_at += k
            c.write_at += k
            c.left -= k
            if c.left:
                return CHUNKS_MORE
            c.state = DATA_END
        elif c.state == DATA_END:
            if avail < 2:
                return E_CHUNK_END if avail == 1 and p[c.read_at] != b'\r' else CHUNKS_MORE
            if p[c.read_at] != b'\r' or p[c.read_at + 1] != b'\n':
                return E_CHUNK_END
            c.read_at += 2
            c.state = SIZE_LINE
        elif c.state == TRAILERS:
            eol = <const char*>memchr(p + c.read_at, b'\n', avail)
            if eol == NULL:
                return E_TRAILERS_TOO_LARGE if c.trailers + avail > MAX_HEAD else CHUNKS_MORE
            k = eol - (p + c.read_at)
            if c.trailers + k + 1 > MAX_HEAD:
                return E_TRAILERS_TOO_LARGE
            if k == 0 or eol[-1] != b'\r':
                return E_TRAILER
            if k == 1:  # the blank line: the end
                c.read_at += 2
                c.state = DONE
                return CHUNKS_DONE
            c.trailers += k + 1
            if not trailer_line(p + c.read_at, k - 1):
                return E_TRAILER
            c.read_at += k + 1
        else:
            return CHUNKS_DONE


cdef dict _CHUNK_REASONS = {
    E_CHUNK_SIZE: "malformed chunk size",
    E_CHUNK_EXTENSION: "malformed chunk extension",
    E_CHUNK_END: "malformed chunk: its data is not followed by CRLF",
    E_CHUNK_LINE: f"a chunk size line longer than {MAX_CHUNK_LINE} bytes",
    E_TRAILER: "malformed trailer line",
    E_TRAILERS_TOO_LARGE: f"trailers larger than {MAX_HEAD} bytes",
}


cdef str chunks_refusal(int code):
    """What is wrong with a chunked body dechunk refused (but E_CHUNK_TOO_LARGE, a 413 the
    caller words with its limit)."""
    return _CHUNK_REASONS.get(code, "malformed chunked body")




# --- entry points for tests and fuzzing -------------------------------------------------

class Refused(ValueError):
    """Input the codec refuses, with the HTTP status the gateway answers it with."""

    def __init__(self, int status, str message):
        super().__init__(message)
        self.status = status


def parse_request_head(bytes data, bint response=False):
    """(method, target, minor, [(name, value)], content_length, chunked, size) of the head
    at the start of `data` (for an answer: method b"", target the status), None if it is
    not complete, or Refused."""
    cdef Head h
    cdef int rc = parse_head(data, len(data), &h, response)
    if rc == HEAD_MORE:
        return None
    if rc < 0:
        raise Refused(head_refusal_status(rc), head_refusal(rc))
    cdef int i
    headers = []
    for i in range(h.count):
        headers.append((PyBytes_FromStringAndSize(h.names[i].p, h.names[i].n),
                        PyBytes_FromStringAndSize(h.values[i].p, h.values[i].n)))
    if response:
        return b"", h.status, h.minor, headers, h.content_length, h.chunked, h.size
    return (PyBytes_FromStringAndSize(h.method.p, h.method.n),
            PyBytes_FromStringAndSize(h.target.p, h.target.n), h.minor, headers,
            h.content_length, h.chunked, h.size)


def decode_chunked(bytes data, long long max_size=64 << 20, Py_ssize_t step=0):
    """(body, bytes the message took) of the chunked body at the start of `data`, None if
    it is not complete, or Refused. With `step`, the bytes arrive `step` at a time (the
    decoder keeps its state between them, as between a connection's reads)."""
    cdef Py_ssize_t n = len(data), have
    cdef char* p = <char*>malloc(n + 1)
    cdef Chunks c
    cdef int rc = CHUNKS_MORE
    if p == NULL:
        raise MemoryError()
    try:
        memcpy(p, <const char*>data, n)
        chunks_start(&c)
        have = step if 0 < step < n else n
        while True:
            rc = dechunk(p, have, &c, max_size)
            if rc != CHUNKS_MORE or have == n:
                break
            have = min(n, have + step)
        if rc == CHUNKS_MORE:
            return None
        if rc < 0:
            if rc == E_CHUNK_TOO_LARGE:
                raise Refused(413, f"request body is larger than the limit of {max_size} bytes")
            raise Refused(400, "malformed HTTP request: " + chunks_refusal(rc))
        return PyBytes_FromStringAndSize(p, c.write_at), c.read_at
    finally:
        free(p)
