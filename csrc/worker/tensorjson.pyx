# cython: language_level=3
# distutils: language = c++
"""JSON request bodies with their numeric arrays read straight into ndarrays.

Why: a JSON tensor costs orjson a Python float (24 bytes) and a list slot (8)
for each number, often four bytes of text ("0.0,"): a 63 MB body took a worker
past a gigabyte before numpy saw it. Here a rectangular array of numbers
becomes one float64 ndarray (int64 when every number is an integer that a double
holds exactly), 8 bytes a number; everything else (objects, strings, other
arrays) becomes what orjson makes of it.

One pass: an array's numbers go into one buffer as they are read, and its shape
is checked as its sub-arrays close. An array that turns out to be no tensor
(ragged, or holding something else) is read again as a list from its start,
once: its sub-arrays read so far were tensors, so no byte is read more than
twice, however deep the nesting (reading every level again cost seconds).

What this reader does not take (a syntax error, an integer past 2**53 in a
tensor, nesting past MAX_DEPTH) it leaves to orjson, which reads the whole body
once more and gives the error: the document read is always the one orjson reads.

Numbers are converted by C++'s std::from_chars (libstdc++ 12: the Eisel-Lemire
algorithm, correctly rounded, locale-free), four times as fast as strtod.
"""
cimport cython
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.math cimport HUGE_VAL, NAN
from libc.stdlib cimport free, realloc, strtod
from libc.string cimport memcpy

import orjson

cnp.import_array()

cdef extern from "<charconv>" namespace "std" nogil:
    cdef cppclass from_chars_result:
        const char* ptr
    from_chars_result from_chars(const char* first, const char* last, double& value)

DEF MAX_DEPTH = 32
DEF EXACT = 9007199254740992.0  # 2**53: integers below it a double holds exactly

# What array() answers for an array of numbers: its values are the buffer's last ones,
# its shape and kind in the reader's block_* fields.
cdef object _TENSOR = object()


class _Unread(Exception):
    """Not read here: orjson reads the body."""


def loads(bytes body):
    """The document in `body`, as orjson.loads gives it, but with each non-empty
    rectangular array of numbers an ndarray (raises orjson.JSONDecodeError)."""
    cdef _Reader reader = _Reader(body)
    try:
        document = reader.value(0)
        reader.space()
        if reader.i != reader.n:
            raise _Unread()
        return document
    except _Unread:
        return orjson.loads(body)


cdef inline bint is_digit(unsigned char c) noexcept:
    return b"0" <= c <= b"9"


cdef inline Py_ssize_t digits_end(const unsigned char* p, Py_ssize_t i,
                                  Py_ssize_t n) noexcept:
    while i < n and is_digit(p[i]):
        i += 1
    return i


@cython.final
cdef class _Reader:
    cdef bytes src
    cdef const unsigned char* p
    cdef Py_ssize_t n, i
    cdef double* values    # the numbers of the tensors being read
    cdef Py_ssize_t count, capacity
    # The tensor array() read last: its rank, shape and whether all its numbers are integers.
    cdef int block_rank
    cdef cnp.npy_intp block_dims[MAX_DEPTH]
    cdef bint block_integers

    def __cinit__(self, bytes src):
        self.src = src
        self.p = <const unsigned char*>PyBytes_AS_STRING(src)
        self.n = PyBytes_GET_SIZE(src)

    def __dealloc__(self):
        free(self.values)

    cdef inline void space(self) noexcept:
        cdef const unsigned char* p = self.p
        cdef Py_ssize_t i = self.i, n = self.n
        while i < n and (p[i] == b" " or p[i] == b"\n" or p[i] == b"\r" or p[i] == b"\t"):
            i += 1
        self.i = i

    cdef object value(self, int depth):
        self.space()
        if self.i >= self.n or depth > MAX_DEPTH:
            raise _Unread()
        cdef unsigned char c = self.p[self.i]
        cdef Py_ssize_t first = self.count
        if c == b"{":
            return self.object_(depth)
        if c == b"[":
            result = self.array(depth)
            return self.tensor(first) if result is _TENSOR else result
        if c == b'"':
            return self.string()
        if c == b"-" or is_digit(c):
            return self.scalar()
        for word, result in ((b"true", True), (b"false", False), (b"null", None)):
            if self.src.startswith(word, self.i):
                self.i += len(word)
                return result
        raise _Unread()

    cdef object scalar(self):
        """The number at i as orjson gives it: an int when it is one that 64 bits hold
        (signed or not), else a float."""
        cdef Py_ssize_t start = self.i
        cdef bint integer
        cdef double number = self.number(&integer)
        if integer:
            exact = int(self.src[start:self.i])
            if -2**63 <= exact < 2**64:
                return exact
        return number

    cdef double number(self, bint* integer) except? -1.0:
        """The JSON number at i (its grammar, strictly), i moved past it; `integer` says
        whether it has neither fraction nor exponent."""
        cdef const unsigned char* p = self.p
        cdef Py_ssize_t i = self.i, n = self.n, start = self.i
        cdef double number = NAN  # (from_chars leaves it so when out of range)
        integer[0] = True
        if p[i] == b"-":
            i += 1
        if i < n and p[i] == b"0":
            i += 1
        elif i < n and is_digit(p[i]):
            i = digits_end(p, i, n)
        else:
            raise _Unread()
        if i < n and p[i] == b".":
            integer[0] = False
            if i + 1 >= n or not is_digit(p[i + 1]):
                raise _Unread()
            i = digits_end(p, i + 1, n)
        if i < n and (p[i] == b"e" or p[i] == b"E"):
            integer[0] = False
            i += 1
            if i < n and (p[i] == b"+" or p[i] == b"-"):
                i += 1
            if i >= n or not is_digit(p[i]):
                raise _Unread()
            i = digits_end(p, i, n)
        self.i = i
        from_chars(<const char*>p + start, <const char*>p + i, number)
        if number != number:  # past the doubles, or below them: strtod tells which
            number = strtod(<const char*>p + start, NULL)
            if not -HUGE_VAL < number < HUGE_VAL:
                raise _Unread()  # orjson refuses a number past the doubles
        return number

    cdef dict object_(self, int depth):
        cdef dict result = {}
        self.i += 1
        self.space()
        if self.i < self.n and self.p[self.i] == b"}":
            self.i += 1
            return result
        while True:
            self.space()
            if self.i >= self.n or self.p[self.i] != b'"':
                raise _Unread()
            key = self.string()
            self.space()
            if self.i >= self.n or self.p[self.i] != b":":
                raise _Unread()
            self.i += 1
            result[key] = self.value(depth + 1)
            self.space()
            if self.i < self.n and self.p[self.i] == b",":
                self.i += 1
            elif self.i < self.n and self.p[self.i] == b"}":
                self.i += 1
                return result
            else:
                raise _Unread()

    cdef str string(self):
        cdef Py_ssize_t start = self.i
        cdef bint plain = True
        cdef unsigned char c
        self.i += 1
        while self.i < self.n:
            c = self.p[self.i]
            if c == b'"':
                self.i += 1
                if plain:
                    try:
                        return self.src[start + 1:self.i - 1].decode("utf-8")
                    except UnicodeDecodeError:
                        raise _Unread()
                try:
                    return orjson.loads(self.src[start:self.i])
                except orjson.JSONDecodeError:
                    raise _Unread()
            if c == b"\\":
                plain = False
                self.i += 1
            elif c < 0x20:
                raise _Unread()
            self.i += 1
        raise _Unread()

    cdef object array(self, int depth):
        """The array at i: _TENSOR when it is a non-empty rectangular array of numbers
        (its values pushed, its shape in block_*), else a list."""
        cdef Py_ssize_t start = self.i, first = self.count, read = 0
        cdef int child_rank = -1, k  # of its elements: -1 none yet, 0 numbers, else tensors
        cdef cnp.npy_intp child_dims[MAX_DEPTH]
        cdef bint integers = True, integer
        cdef unsigned char c
        cdef double number
        self.i += 1
        self.space()
        if self.i < self.n and self.p[self.i] == b"]":
            self.i += 1
            return []
        while True:
            self.space()
            if self.i >= self.n:
                raise _Unread()
            c = self.p[self.i]
            if c == b"-" or is_digit(c):
                if child_rank > 0:
                    return self.as_list(start, first, depth)
                child_rank = 0
                number = self.number(&integer)
                if integer:
                    if not -EXACT < number < EXACT:
                        raise _Unread()  # orjson keeps such an integer exact
                else:
                    integers = False
                self.push(number)
            elif c == b"[" and child_rank != 0 and depth < MAX_DEPTH:
                at = self.count
                element = self.array(depth + 1)
                if element is not _TENSOR:
                    return self.as_list_after(start, first, read, element, depth)
                if child_rank < 0:
                    child_rank = self.block_rank
                    for k in range(child_rank):
                        child_dims[k] = self.block_dims[k]
                elif not self.block_shape_is(child_rank, child_dims):
                    return self.as_list_after(start, first, read, self.tensor(at), depth)
                integers = integers and self.block_integers
            else:
                return self.as_list(start, first, depth)
            read += 1
            self.space()
            if self.i < self.n and self.p[self.i] == b",":
                self.i += 1
            elif self.i < self.n and self.p[self.i] == b"]":
                self.i += 1
                break
            else:
                raise _Unread()
        self.block_rank = child_rank + 1
        self.block_dims[0] = read
        for k in range(child_rank):
            self.block_dims[k + 1] = child_dims[k]
        self.block_integers = integers
        return _TENSOR

    cdef bint block_shape_is(self, int rank, cnp.npy_intp* dims) noexcept:
        cdef int k
        if self.block_rank != rank:
            return False
        for k in range(rank):
            if self.block_dims[k] != dims[k]:
                return False
        return True

    cdef list as_list(self, Py_ssize_t start, Py_ssize_t first, int depth):
        """The array at `start`, found to be no tensor before an element was read: read
        again as a list (its numbers so far drop out of the buffer)."""
        self.count = first
        self.i = start
        return self.list_(depth)

    cdef list as_list_after(self, Py_ssize_t start, Py_ssize_t first, Py_ssize_t read,
                            element, int depth):
        """The array at `start`, found to be no tensor by its element after the `read`
        first ones (tensors or numbers): those read again, `element` kept as it is."""
        cdef Py_ssize_t after = self.i
        cdef list result = []
        self.count = first
        self.i = start + 1
        for _ in range(read):
            result.append(self.value(depth + 1))
            self.space()
            self.i += 1  # the ',' read before
        result.append(element)
        self.i = after
        return self.rest(result, depth)

    cdef list list_(self, int depth):
        cdef list result = []
        self.i += 1
        self.space()
        if self.i < self.n and self.p[self.i] == b"]":
            self.i += 1
            return result
        result.append(self.value(depth + 1))
        return self.rest(result, depth)

    cdef list rest(self, list result, int depth):
        """The elements after the last one read, appended to `result`, and the ']'."""
        while True:
            self.space()
            if self.i < self.n and self.p[self.i] == b",":
                self.i += 1
                result.append(self.value(depth + 1))
            elif self.i < self.n and self.p[self.i] == b"]":
                self.i += 1
                return result
            else:
                raise _Unread()

    cdef inline int push(self, double number) except -1:
        cdef double* grown
        if self.count == self.capacity:
            self.capacity = max(1024, self.capacity + self.capacity // 2)
            grown = <double*>realloc(self.values, self.capacity * sizeof(double))
            if grown == NULL:
                raise MemoryError()
            self.values = grown
        self.values[self.count] = number
        self.count += 1
        return 0

    cdef object tensor(self, Py_ssize_t first):
        """The tensor array() read last (values from `first` on) as an ndarray, its
        values dropped from the buffer."""
        cdef cnp.ndarray result
        cdef Py_ssize_t k, size = self.count - first
        cdef long long* target
        cdef double* source = self.values + first
        if self.block_integers:
            result = cnp.PyArray_SimpleNew(self.block_rank, self.block_dims, cnp.NPY_INT64)
            target = <long long*>cnp.PyArray_DATA(result)
            for k in range(size):
                target[k] = <long long>source[k]
        else:
            result = cnp.PyArray_SimpleNew(self.block_rank, self.block_dims, cnp.NPY_FLOAT64)
            memcpy(cnp.PyArray_DATA(result), source, size * sizeof(double))
        self.count = first
        if first == 0 and self.capacity > 1 << 16:  # a big one: give the memory back now
            free(self.values)
            self.values = NULL
            self.capacity = 0
        return result
