# cython: language_level=3
"""Token buckets per key for the gateway's local rate limits, compiled.

One `TokenBuckets` holds the buckets of one limit (one rate and burst) for
every key seen, at most `max_keys` of them: when a new key arrives and the
table is full, the least recently used key is forgotten (its next request
finds a full bucket again). Per bucket two C doubles (tokens, last refill
time) and the links of an intrusive LRU list; time is CLOCK_MONOTONIC read
in C. A bucket starts full (`burst` tokens), gains `rate` tokens a second up
to `burst`, and a request takes one token or is refused.

`take()` answers with one double: >= 0 when the request may pass (the tokens
left after it), < 0 when it is refused (minus the seconds until one token
is there again), so the caller needs no tuple.

Also here: `parse_reply`, the RESP (Redis protocol) reply parser of the
global limits' pipelined Redis connection.
"""
from libc.stdlib cimport malloc, realloc, free
from libc.math cimport isfinite
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef double EPSILON = 1e-9

cdef struct Slot:
    double tokens
    double stamp
    int prev      # towards the most recently used end
    int next      # towards the least recently used end


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


def monotonic():
    """CLOCK_MONOTONIC in seconds, the clock `take()` uses."""
    return _monotonic()


cdef class TokenBuckets:
    """The buckets of one limit (rate tokens/s, at most burst), keyed by any hashable."""

    cdef readonly double rate
    cdef readonly double burst
    cdef readonly int max_keys
    cdef Slot* slots
    cdef int cap
    cdef int used
    cdef int head       # most recently used, -1 when empty
    cdef int tail       # least recently used
    cdef dict index     # key -> slot number
    cdef list keys      # slot number -> key

    def __cinit__(self, double rate, double burst, int max_keys=100000):
        if not (rate > 0 and isfinite(rate)):
            raise ValueError(f"rate must be a positive finite number, got {rate}")
        if not (burst >= 1 and isfinite(burst)):
            raise ValueError(f"burst must be a finite number >= 1, got {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.cap = 16 if max_keys > 16 else max_keys
        self.slots = <Slot*>malloc(self.cap * sizeof(Slot))
        if self.slots == NULL:
            raise MemoryError()
        self.used = 0
        self.head = -1
        self.tail = -1
        self.index = {}
        self.keys = []

    def __dealloc__(self):
        free(self.slots)

    def __len__(self):
        return self.used

    # --- the LRU list -------------------------------------------------------------------
    cdef inline void _unlink(self, int i) noexcept:
        cdef Slot* s = &self.slots[i]
        if s.prev >= 0:
            self.slots[s.prev].next = s.next
        else:
            self.head = s.next
        if s.next >= 0:
            self.slots[s.next].prev = s.prev
        else:
            self.tail = s.prev

    cdef inline void _push_front(self, int i) noexcept:
        cdef Slot* s = &self.slots[i]
        s.prev = -1
        s.next = self.head
        if self.head >= 0:
            self.slots[self.head].prev = i
        self.head = i
        if self.tail < 0:
            self.tail = i

    cdef int _grow(self) except -1:
        cdef int cap = self.cap * 2
        if cap > self.max_keys:
            cap = self.max_keys
        cdef Slot* grown = <Slot*>realloc(self.slots, cap * sizeof(Slot))
        if grown == NULL:
            raise MemoryError()
        self.slots = grown
        self.cap = cap
        return 0

    cdef int _slot(self, object key, double now) except -1:
        """The slot of key, made most recently used; a new key gets a full bucket."""
        cdef int i
        found = self.index.get(key)
        if found is not None:
            i = <int>found
            if i != self.head:
                self._unlink(i)
                self._push_front(i)
            return i
        if self.used < self.max_keys:
            if self.used == self.cap:
                self._grow()
            i = self.used
            self.used += 1
            self.keys.append(key)
        else:
            i = self.tail                   # evict the least recently used key
            self._unlink(i)
            del self.index[self.keys[i]]
            self.keys[i] = key
        self.index[key] = i
        self.slots[i].tokens = self.burst
        self.slots[i].stamp = now
        self._push_front(i)
        return i

    cdef inline void _refill(self, Slot* s, double now) noexcept:
        cdef double elapsed = now - s.stamp
        cdef double t
        if elapsed > 0:
            t = s.tokens + elapsed * self.rate
            s.tokens = self.burst if t > self.burst else t
            s.stamp = now

    # --- decisions ----------------------------------------------------------------------
    cdef double _take(self, object key, double now) except? -1e300:
        cdef Slot* s = &self.slots[self._slot(key, now)]
        self._refill(s, now)
        # EPSILON: a token that is "almost" there after float rounding (0.4 + 0.6) counts.
        if s.tokens >= 1.0 - EPSILON:
            s.tokens -= 1.0
            if s.tokens < 0:
                s.tokens = 0
            return s.tokens
        return -(1.0 - s.tokens) / self.rate

    cpdef double take(self, object key) except? -1e300:
        """Take one token of key's bucket now: tokens left (>= 0), or -seconds to wait (< 0)."""
        return self._take(key, _monotonic())

    cpdef double take_at(self, object key, double now) except? -1e300:
        """take() at a given time (seconds on any clock that never goes back), for tests."""
        return self._take(key, now)

    cpdef void refund(self, object key):
        """Give back the token a request took (another limit refused that request)."""
        found = self.index.get(key)
        if found is None:
            return
        cdef Slot* s = &self.slots[<int>found]
        s.tokens += 1.0
        if s.tokens > self.burst:
            s.tokens = self.burst

    def tokens(self, key, now=None):
        """Tokens in key's bucket (burst for an unknown key), without taking or touching it."""
        found = self.index.get(key)
        if found is None:
            return self.burst
        cdef Slot s = self.slots[<int>found]
        cdef double t = _monotonic() if now is None else now
        cdef double elapsed = t - s.stamp
        if elapsed > 0:
            s.tokens += elapsed * self.rate
        return self.burst if s.tokens > self.burst else s.tokens

    def __contains__(self, key):
        return key in self.index

    def keys_by_recency(self):
        """Tracked keys, most recently used first."""
        out = []
        cdef int i = self.head
        while i >= 0:
            out.append(self.keys[i])
            i = self.slots[i].next
        return out

    def clear(self):
        self.index.clear()
        self.keys = []
        self.used = 0
        self.head = -1
        self.tail = -1


# --- RESP replies ---------------------------------------------------------------------------

class ReplyError(Exception):
    """An error reply (-ERR ...) from Redis, handed over as a value, never raised by the parser."""


cdef object _INCOMPLETE = object()


cdef inline Py_ssize_t _line_end(const unsigned char[:] buf, Py_ssize_t pos, Py_ssize_t n) noexcept:
    """Index of the \\r of the \\r\\n ending the line that starts at pos, or -1."""
    cdef Py_ssize_t i = pos
    while i + 1 < n:
        if buf[i] == 13 and buf[i + 1] == 10:
            return i
        i += 1
    return -1


cdef inline long long _int_of(const unsigned char[:] buf, Py_ssize_t start,
                              Py_ssize_t end) except? -1:
    cdef long long v = 0
    cdef bint negative = False
    cdef Py_ssize_t i = start
    if i < end and buf[i] == 45:  # '-'
        negative = True
        i += 1
    if i >= end:
        raise ValueError("bad integer in redis reply")
    while i < end:
        if buf[i] < 48 or buf[i] > 57:
            raise ValueError("bad integer in redis reply")
        v = v * 10 + (buf[i] - 48)
        i += 1
    return -v if negative else v


cdef object _parse(const unsigned char[:] buf, Py_ssize_t pos, Py_ssize_t n, Py_ssize_t* out):
    cdef Py_ssize_t end, count, k, sub
    cdef long long length
    if pos >= n:
        return _INCOMPLETE
    end = _line_end(buf, pos + 1, n)
    if end < 0:
        return _INCOMPLETE
    cdef unsigned char kind = buf[pos]
    if kind == 58:  # ':' integer
        out[0] = end + 2
        return _int_of(buf, pos + 1, end)
    if kind == 43:  # '+' simple string
        out[0] = end + 2
        return bytes(buf[pos + 1:end])
    if kind == 45:  # '-' error
        out[0] = end + 2
        return ReplyError(bytes(buf[pos + 1:end]).decode("utf-8", "replace"))
    if kind == 36:  # '$' bulk string
        length = _int_of(buf, pos + 1, end)
        if length < 0:
            out[0] = end + 2
            return None
        if end + 2 + length + 2 > n:
            return _INCOMPLETE
        out[0] = end + 2 + length + 2
        return bytes(buf[end + 2:end + 2 + length])
    if kind == 42:  # '*' array
        count = _int_of(buf, pos + 1, end)
        if count < 0:
            out[0] = end + 2
            return None
        items = []
        sub = end + 2
        for k in range(count):
            item = _parse(buf, sub, n, &sub)
            if item is _INCOMPLETE:
                return _INCOMPLETE
            items.append(item)
        out[0] = sub
        return items
    raise ValueError(f"unexpected redis reply type byte {kind!r}")


def parse_replies(buf, Py_ssize_t pos=0):
    """(complete replies parsed from buf[pos:], position after the last complete one).

    Integers, simple and bulk strings (bytes), nil (None), arrays (lists);
    error replies come back as ReplyError instances.
    """
    cdef const unsigned char[:] view = buf
    cdef Py_ssize_t n = view.shape[0]
    cdef Py_ssize_t nxt = pos
    replies = []
    while True:
        item = _parse(view, pos, n, &nxt)
        if item is _INCOMPLETE:
            return replies, pos
        replies.append(item)
        pos = nxt
