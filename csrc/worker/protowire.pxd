# Protocol buffers' wire form, as the compiled codecs (tfwire, oipwire) read and write it.
# Every reader here is checked: a varint past 64 bits, a tag past 32 bits or with field
# number 0, or an array size that overflows is refused (False), never wrapped: the
# codecs then hand the message to protobuf's own parser, which words the error.
from libc.stdint cimport uint8_t, uint64_t


cdef extern from *:
    bint mul_overflows "__builtin_mul_overflow"(Py_ssize_t a, Py_ssize_t b,
                                                Py_ssize_t* product) nogil


cdef inline bytes varint(uint64_t n):
    # n as a base-128 varint, low groups first
    cdef unsigned char buf[10]
    cdef int i = 0
    while n >= 0x80:
        buf[i] = (n & 0x7F) | 0x80
        n >>= 7
        i += 1
    buf[i] = n
    return (<char*>buf)[:i + 1]


cdef inline bint take_varint(const uint8_t** p, const uint8_t* end, uint64_t* out) noexcept:
    """The varint at *p (moved past it); False when it runs past `end` or past 64 bits
    (ten bytes, the last of them 0 or 1)."""
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef uint8_t b
    while p[0] < end:
        b = p[0][0]
        p[0] += 1
        if shift == 63 and b > 1:
            return False
        value |= <uint64_t>(b & 0x7F) << shift
        if b < 0x80:
            out[0] = value
            return True
        shift += 7
    return False


cdef inline bint take_tag(const uint8_t** p, const uint8_t* end, uint64_t* tag) noexcept:
    """A field's tag (number << 3 | wire type): at most 5 bytes and 32 bits, a field
    number from 1 to 2^29 - 1 and a wire type protobuf defines, as protobuf requires."""
    cdef const uint8_t* start = p[0]
    if not take_varint(p, end, tag) or p[0] - start > 5 or tag[0] >> 32 or tag[0] >> 3 == 0:
        return False
    return (tag[0] & 7) <= 5


cdef inline bint array_nbytes(dims, Py_ssize_t itemsize, Py_ssize_t* size) except -1:
    """The bytes a numpy array of `dims` (ints >= 0, below 2^63) holds; False when numpy
    could not make it: the product of its non-zero dimensions overflows, zeros or not."""
    cdef Py_ssize_t span = itemsize, d
    cdef bint empty = False
    for dim in dims:
        d = dim
        if d == 0:
            empty = True
        elif mul_overflows(span, d, &span):
            return False
    size[0] = 0 if empty else span
    return True
