# cython: language_level=3, boundscheck=False, wraparound=False
"""The TensorFlow PredictRequest / PredictResponse wire format, read and written in C.

The common request carries DT_FLOAT or DT_DOUBLE inputs as packed values: it is
parsed here straight from the body, one copy per input and no protobuf message
objects. Anything else (other dtypes, values split over several chunks, a shape
that does not match its values, invalid UTF-8, an empty body) makes `decode_request` return
None, and the caller takes the full protobuf path, which also words the errors.
Little-endian hosts only (the wire is little-endian; so are x86 and arm64).
"""
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t

from gateway._native.protowire cimport array_nbytes, take_tag, take_varint, varint

import numpy as np

cdef uint64_t DT_FLOAT = 1
cdef uint64_t DT_DOUBLE = 2
cdef object _F4 = np.dtype("<f4")
cdef object _F8 = np.dtype("<f8")
cdef int _MAX_NDIM = 32
cdef uint64_t _MAX_DIM = 1ULL << 48


cdef struct Cursor:
    const uint8_t* p
    const uint8_t* end
    bint bad


cdef inline uint64_t read_varint(Cursor* c) noexcept:
    cdef uint64_t value
    if not take_varint(&c.p, c.end, &value):
        c.bad = True
        return 0
    return value


cdef inline uint64_t read_tag(Cursor* c) noexcept:
    """The next field's tag (protowire.pxd's checks: a malformed one sets `bad`)."""
    cdef uint64_t tag
    if not take_tag(&c.p, c.end, &tag):
        c.bad = True
        return 0
    return tag


cdef inline bint skip_field(Cursor* c, uint64_t wire_type) noexcept:
    """Skip an unknown field's value; False on a wire type that cannot be skipped."""
    cdef uint64_t n
    if wire_type == 0:
        read_varint(c)
    elif wire_type == 2:
        n = read_varint(c)
        if c.bad or n > <uint64_t>(c.end - c.p):
            return False
        c.p += n
    elif wire_type == 1 or wire_type == 5:
        n = 8 if wire_type == 1 else 4
        if n > <uint64_t>(c.end - c.p):
            return False
        c.p += n
    else:
        return False
    return not c.bad


cdef inline bint sub_cursor(Cursor* c, Cursor* inner) noexcept:
    """`inner` spans the length-delimited value at `c`, which moves past it."""
    cdef uint64_t n = read_varint(c)
    if c.bad or n > <uint64_t>(c.end - c.p):
        return False
    inner.p = c.p
    inner.end = c.p + n
    inner.bad = False
    c.p += n
    return True


cdef object read_str(Cursor* c):
    cdef Cursor s
    if not sub_cursor(c, &s):
        return None
    try:
        return (<char*>s.p)[:s.end - s.p].decode("utf-8")
    except UnicodeDecodeError:
        return None


cdef object read_shape(Cursor* c):
    """ArrayShape's dims (packed or not) as a tuple, or None."""
    cdef Cursor m, packed
    cdef uint64_t tag, dim
    cdef list dims = []
    if not sub_cursor(c, &m):
        return None
    while m.p < m.end:
        tag = read_tag(&m)
        if m.bad:
            return None
        if tag == (1 << 3 | 2):
            if not sub_cursor(&m, &packed):
                return None
            while packed.p < packed.end:
                dim = read_varint(&packed)
                if packed.bad or dim > _MAX_DIM:
                    return None
                dims.append(<long long>dim)
        elif tag == (1 << 3 | 0):
            dim = read_varint(&m)
            if m.bad or dim > _MAX_DIM:
                return None
            dims.append(<long long>dim)
        elif not skip_field(&m, tag & 7):
            return None
        if len(dims) > _MAX_NDIM:
            return None
    return tuple(dims)


cdef object read_array(Cursor* c):
    """An ArrayProto of DT_FLOAT or DT_DOUBLE values as a numpy array, or None."""
    cdef Cursor m, values
    cdef uint64_t tag, dtype = 0
    cdef object shape = None
    cdef const uint8_t* start = NULL
    cdef Py_ssize_t length = 0, itemsize, nbytes
    cdef int field = 0
    if not sub_cursor(c, &m):
        return None
    while m.p < m.end:
        tag = read_tag(&m)
        if m.bad:
            return None
        if tag == (1 << 3 | 0):
            dtype = read_varint(&m)
            if m.bad:
                return None
        elif tag == (2 << 3 | 2):
            if shape is not None:  # a second ArrayShape merges into the first
                return None
            shape = read_shape(&m)
            if shape is None:
                return None
        elif tag == (3 << 3 | 2) or tag == (4 << 3 | 2):
            if start != NULL:  # values in several chunks
                return None
            if not sub_cursor(&m, &values):
                return None
            start = values.p
            length = values.end - values.p
            field = tag >> 3
        elif tag >> 3 <= 8:  # another value field: not the fast case
            return None
        elif not skip_field(&m, tag & 7):
            return None
    if dtype == DT_FLOAT and field in (0, 3):
        wire, itemsize = _F4, 4
    elif dtype == DT_DOUBLE and field in (0, 4):
        wire, itemsize = _F8, 8
    else:
        return None
    if shape is None:
        shape = ()
    if not array_nbytes(shape, itemsize, &nbytes) or length != nbytes:
        return None
    return np.frombuffer(PyByteArray_FromStringAndSize(<char*>start, length), wire).reshape(shape)


cdef object read_input(Cursor* c):
    """One entry of the inputs map: (name, array), or None."""
    cdef Cursor entry
    cdef uint64_t tag
    if not sub_cursor(c, &entry):
        return None
    name, array = "", None
    while entry.p < entry.end:
        tag = read_tag(&entry)
        if entry.bad:
            return None
        if tag == (1 << 3 | 2):
            name = read_str(&entry)
            if name is None:
                return None
        elif tag == (2 << 3 | 2):
            if array is not None:
                return None
            array = read_array(&entry)
            if array is None:
                return None
        else:  # protobuf keeps an entry with anything else whole, as an unknown field
            return None
    if array is None:  # an empty value: the full path says what is missing
        return None
    return name, array


cpdef object decode_request(bytes body):
    """(signature_name, {input: array}, output_filter tuple) of a PredictRequest, or None."""
    cdef Cursor c
    cdef uint64_t tag
    cdef str signature = ""
    cdef dict inputs = {}
    cdef list output_filter = []
    if not body:
        return None
    c.p = <const uint8_t*>PyBytes_AS_STRING(body)
    c.end = c.p + PyBytes_GET_SIZE(body)
    c.bad = False
    while c.p < c.end:
        tag = read_tag(&c)
        if c.bad:
            return None
        if tag == (1 << 3 | 2):
            signature = read_str(&c)
            if signature is None:
                return None
        elif tag == (2 << 3 | 2):
            entry = read_input(&c)
            if entry is None:
                return None
            inputs[entry[0]] = entry[1]
        elif tag == (3 << 3 | 2):
            name = read_str(&c)
            if name is None:
                return None
            output_filter.append(name)
        elif not skip_field(&c, tag & 7):
            return None
    return signature, inputs, tuple(output_filter)


cpdef object encode_response(tuple names, list arrays):
    """PredictResponse bytes for float32 / float64 outputs, or None for anything else.

    The values go from each array into the message in one copy (the final join).
    """
    cdef list parts = []
    cdef bytes key, shape_field, values_head
    cdef Py_ssize_t nbytes, array_len
    for name, array in zip(names, arrays):
        dtype = array.dtype
        if dtype == _F4:
            enum, tag = DT_FLOAT, 3 << 3 | 2
        elif dtype == _F8:
            enum, tag = DT_DOUBLE, 4 << 3 | 2
        else:
            return None
        if not array.flags.c_contiguous:  # (ascontiguousarray would make a 0-d array 1-d)
            array = np.ascontiguousarray(array)
        dims = b"".join([varint(d) for d in array.shape])
        shape_field = (b"\x12" + varint(len(dims) + 1 + len(varint(len(dims))))
                       + b"\x0a" + varint(len(dims)) + dims) if dims else b"\x12\x00"
        nbytes = array.nbytes
        values_head = bytes((tag,)) + varint(nbytes) if nbytes else b""
        array_len = 2 + len(shape_field) + len(values_head) + nbytes
        key = (<str>name).encode("utf-8")
        key = b"\x0a" + varint(len(key)) + key
        array_head = b"\x12" + varint(array_len)
        parts += [b"\x0a", varint(len(key) + len(array_head) + array_len), key, array_head,
                  bytes((1 << 3, enum)), shape_field, values_head, array]
    return b"".join(parts)


cdef class TFServe:
    """One TF request from body to answer body: decode, check, run and encode, for the
    common case without a Python frame of its own.

    A request this path does not take (not decoded here, another signature, an output
    filter naming what the model lacks, outputs it cannot write) goes to `slow(body)`,
    the processor's full path, which also words the 400s.
    """
    cdef str signature_name
    cdef tuple output_names
    cdef frozenset known_outputs
    cdef object check_feeds, run, slow

    def __init__(self, signature_name, tuple output_names, check_feeds, run, slow):
        """`signature_name`: the one the model serves, None when it serves any."""
        self.signature_name = signature_name
        self.output_names = output_names
        self.known_outputs = frozenset(output_names)
        self.check_feeds = check_feeds  # the model's FeedCheck: passes, casts or raises
        self.run = run                  # the model's run(feeds, names) -> list of arrays
        self.slow = slow

    def __call__(self, bytes body):
        """(answer body, rows run)."""
        fast = decode_request(body)
        if fast is None:
            return self.slow(body)
        signature, feeds, wanted = <tuple>fast
        if signature and self.signature_name is not None and signature != self.signature_name:
            return self.slow(body)
        if wanted:
            for name in <tuple>wanted:
                if name not in self.known_outputs:
                    return self.slow(body)
            names = wanted if len(<tuple>wanted) == 1 else tuple(dict.fromkeys(wanted))
        else:
            names = self.output_names
        feeds = self.check_feeds(feeds)
        answer = encode_response(names, self.run(feeds, names))
        if answer is None:
            return self.slow(body)
        for first in (<dict>feeds).values():  # rows as Call counts them
            return answer, (first.shape[0] if first.ndim else 1)
        return answer, 1
