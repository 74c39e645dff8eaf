# cython: language_level=3
"""JSON request bodies with their numeric arrays read straight into ndarrays.

Why: a JSON tensor costs orjson a Python float (24 bytes) and a list slot (8)
for each number, often four bytes of text ("0.0,"): a 63 MB body took a worker
past a gigabyte before numpy saw it. Here a rectangular array of numbers
becomes one float64 ndarray (int64 when every number is an integer that a double
holds exactly), 8 bytes a number; everything else (objects, strings, other
arrays) becomes what orjson makes of it.

What this reader does not take (a syntax error, an integer past 2**53 in an
array, nesting past MAX_DEPTH) it leaves to orjson, which reads the whole body
again and gives the error: the document read is always the one orjson reads.
"""
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.math cimport HUGE_VAL
from libc.stdlib cimport free, realloc, strtod
from libc.string cimport memcpy

import orjson

cnp.import_array()

DEF MAX_DEPTH = 32
DEF EXACT = 9007199254740992.0  # 2**53: integers below it a double holds exactly


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


cdef class _Reader:
    cdef bytes src
    cdef const unsigned char* p
    cdef Py_ssize_t n, i
    cdef double* values    # the numbers of the array being read
    cdef Py_ssize_t count, capacity
    cdef bint integers     # every number so far is an integer literal

    def __cinit__(self, bytes src):
        self.src = src
        self.p = <const unsigned char*>PyBytes_AS_STRING(src)
        self.n = PyBytes_GET_SIZE(src)

    def __dealloc__(self):
        free(self.values)

    cdef inline void space(self) noexcept:
        while self.i < self.n and self.p[self.i] in b" \t\n\r":
            self.i += 1

    cdef object value(self, int depth):
        self.space()
        if self.i >= self.n or depth > MAX_DEPTH:
            raise _Unread()
        cdef unsigned char c = self.p[self.i]
        if c == b"{":
            return self.object_(depth)
        if c == b"[":
            return self.array(depth)
        if c == b'"':
            return self.string()
        if c == b"-" or b"0" <= c <= b"9":
            start = self.i
            integer = self.number()
            text = self.src[start:self.i]
            if integer:
                return int(text)
            number = float(text)
            if not -HUGE_VAL < number < HUGE_VAL:
                raise _Unread()  # orjson refuses a number past the doubles
            return number
        for word, result in ((b"true", True), (b"false", False), (b"null", None)):
            if self.src.startswith(word, self.i):
                self.i += len(word)
                return result
        raise _Unread()

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

    cdef bint number(self) except -1:
        """Step over a JSON number (its grammar, strictly); True when it is an integer."""
        cdef bint integer = True
        if self.p[self.i] == b"-":
            self.i += 1
        if self.i >= self.n:
            raise _Unread()
        if self.p[self.i] == b"0":
            self.i += 1
        elif b"1" <= self.p[self.i] <= b"9":
            while self.i < self.n and b"0" <= self.p[self.i] <= b"9":
                self.i += 1
        else:
            raise _Unread()
        if self.i < self.n and self.p[self.i] == b".":
            integer = False
            self.i += 1
            self.digits()
        if self.i < self.n and self.p[self.i] in b"eE":
            integer = False
            self.i += 1
            if self.i < self.n and self.p[self.i] in b"+-":
                self.i += 1
            self.digits()
        return integer

    cdef void digits(self) except *:
        if self.i >= self.n or not b"0" <= self.p[self.i] <= b"9":
            raise _Unread()
        while self.i < self.n and b"0" <= self.p[self.i] <= b"9":
            self.i += 1

    cdef object array(self, int depth):
        cdef Py_ssize_t start = self.i
        cdef cnp.npy_intp dims[MAX_DEPTH]
        cdef int rank = self.numeric_rank(), k
        if rank:
            for k in range(rank):
                dims[k] = -1
            self.count = 0
            self.integers = True
            if self.numbers(0, rank, dims):
                return self.ndarray(rank, dims)
            self.i = start
        return self.list_(depth)

    cdef int numeric_rank(self) noexcept:
        """How many '[' open here before a number (0: the first element is no number)."""
        cdef Py_ssize_t at = self.i
        cdef int rank = 0
        cdef unsigned char c
        while at < self.n:
            c = self.p[at]
            if c == b"[":
                rank += 1
                if rank > MAX_DEPTH:
                    return 0
            elif c not in b" \t\n\r":
                return rank if c == b"-" or b"0" <= c <= b"9" else 0
            at += 1
        return 0

    cdef bint numbers(self, int level, int rank, cnp.npy_intp* dims) except -1:
        """Read one array at `level` of a rank-`rank` array of numbers into `values`;
        False when it is not one (ragged, empty, or holding something else)."""
        cdef cnp.npy_intp length = 0
        cdef Py_ssize_t start
        cdef char* end
        cdef double number
        cdef bint integer
        self.i += 1  # '['
        while True:
            self.space()
            if self.i >= self.n:
                return False
            if level + 1 < rank:
                if self.p[self.i] != b"[" or not self.numbers(level + 1, rank, dims):
                    return False
            else:
                start = self.i
                if not (self.p[start] == b"-" or b"0" <= self.p[start] <= b"9"):
                    return False
                integer = self.number()
                number = strtod(<const char*>self.p + start, &end)
                if <const unsigned char*>end != self.p + self.i or \
                        not -HUGE_VAL < number < HUGE_VAL:
                    raise _Unread()  # (orjson refuses a number past the doubles)
                if integer:
                    if not -EXACT < number < EXACT:
                        raise _Unread()  # orjson keeps such an integer exact
                else:
                    self.integers = False
                self.push(number)
            length += 1
            self.space()
            if self.i < self.n and self.p[self.i] == b",":
                self.i += 1
                continue
            if self.i < self.n and self.p[self.i] == b"]":
                self.i += 1
                break
            return False
        if dims[level] < 0:
            dims[level] = length
        return dims[level] == length

    cdef void push(self, double number) except *:
        cdef double* grown
        if self.count == self.capacity:
            self.capacity = max(1024, self.capacity + self.capacity // 2)
            grown = <double*>realloc(self.values, self.capacity * sizeof(double))
            if grown == NULL:
                raise MemoryError()
            self.values = grown
        self.values[self.count] = number
        self.count += 1

    cdef object ndarray(self, int rank, cnp.npy_intp* dims):
        cdef cnp.ndarray result
        cdef Py_ssize_t k
        cdef long long* target
        if self.integers:
            result = cnp.PyArray_SimpleNew(rank, dims, cnp.NPY_INT64)
            target = <long long*>cnp.PyArray_DATA(result)
            for k in range(self.count):
                target[k] = <long long>self.values[k]
        else:
            result = cnp.PyArray_SimpleNew(rank, dims, cnp.NPY_FLOAT64)
            memcpy(cnp.PyArray_DATA(result), self.values, self.count * sizeof(double))
        if self.capacity > 1 << 16:  # a big one: give the memory back now
            free(self.values)
            self.values = NULL
            self.capacity = 0
        return result

    cdef list list_(self, int depth):
        cdef list result = []
        self.i += 1
        self.space()
        if self.i < self.n and self.p[self.i] == b"]":
            self.i += 1
            return result
        while True:
            result.append(self.value(depth + 1))
            self.space()
            if self.i < self.n and self.p[self.i] == b",":
                self.i += 1
            elif self.i < self.n and self.p[self.i] == b"]":
                self.i += 1
                return result
            else:
                raise _Unread()
