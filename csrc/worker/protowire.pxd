# Protocol buffers' wire form, as the compiled codecs (tfwire, oipwire) write it.
from libc.stdint cimport uint64_t


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
