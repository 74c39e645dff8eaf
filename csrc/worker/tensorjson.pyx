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
algorithm, correctly rounded, locale-free), four times as fast as strtod. A long
run of numbers (a tensor's row) is read without the GIL: the worker reads
bodies on its inference threads, and the event loop and the other threads go on
meanwhile instead of queueing for the GIL behind a body.
"""
cimport cython
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.math cimport HUGE_VAL, NAN
from libc.stdlib cimport free, realloc, strtod
from libc.string cimport memchr, memcpy

import orjson

cnp.import_array()

cdef extern from "<charconv>" namespace "std" nogil:
    cdef cppclass from_chars_result:
        const char* ptr
    from_chars_result from_chars(const char* first, const char* last, double& value)

DEF MAX_DEPTH = 32
DEF EXACT = 9007199254740992.0  # 2**53: integers below it a double holds exactly
DEF NOGIL_ROW = 2048  # bytes of numbers from which a row is read without the GIL

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


cdef inline bint is_digit(unsigned char c) noexcept nogil:
    return b"0" <= c <= b"9"


cdef inline Py_ssize_t digits_end(const unsigned char* p, Py_ssize_t i,
                                  Py_ssize_t n) noexcept nogil:
    while i < n and is_digit(p[i]):
        i += 1
    return i


cdef inline bint is_space(unsigned char c) noexcept nogil:
    return c == b" " or c == b"\n" or c == b"\r" or c == b"\t"


cdef struct Numbers:  # the numbers of the tensors being read
    double* values
    Py_ssize_t count, capacity


cdef enum:  # how read_row() ended
    CLOSED = 1  # at the ']' of its array (read)
    OTHER       # at an element that is no number
    BAD         # at something orjson refuses, or an integer a double does not hold
    NO_MEMORY


cdef int push(Numbers* numbers, double number) noexcept nogil:
    cdef double* grown
    if numbers.count == numbers.capacity:
        numbers.capacity = max(1024, numbers.capacity + numbers.capacity // 2)
        grown = <double*>realloc(numbers.values, numbers.capacity * sizeof(double))
        if grown == NULL:
            return NO_MEMORY
        numbers.values = grown
    numbers.values[numbers.count] = number
    numbers.count += 1
    return 0


cdef int read_number(const unsigned char* p, Py_ssize_t n, Py_ssize_t* at, double* number,
                     bint* integer) noexcept nogil:
    """The JSON number at p[at] (its grammar, strictly) into `number`, `at` moved past it,
    and 0; BAD when it is none, or past the doubles. `integer`: it has neither fraction
    nor exponent."""
    cdef Py_ssize_t i = at[0], start = at[0]
    integer[0] = True
    if i < n and p[i] == b"-":
        i += 1
    if i < n and p[i] == b"0":
        i += 1
    elif i < n and is_digit(p[i]):
        i = digits_end(p, i, n)
    else:
        return BAD
    if i < n and p[i] == b".":
        integer[0] = False
        if i + 1 >= n or not is_digit(p[i + 1]):
            return BAD
        i = digits_end(p, i + 1, n)
    if i < n and (p[i] == b"e" or p[i] == b"E"):
        integer[0] = False
        i += 1
        if i < n and (p[i] == b"+" or p[i] == b"-"):
            i += 1
        if i >= n or not is_digit(p[i]):
            return BAD
        i = digits_end(p, i, n)
    at[0] = i
    number[0] = NAN  # (from_chars leaves it so when out of range)
    from_chars(<const char*>p + start, <const char*>p + i, number[0])
    if number[0] != number[0]:  # past the doubles, or below them: strtod tells which
        number[0] = strtod(<const char*>p + start, NULL)
        if not -HUGE_VAL < number[0] < HUGE_VAL:
            return BAD  # orjson refuses a number past the doubles
    if integer[0] and number[0] == 0:
        number[0] = 0.0  # the integer -0 is 0, as orjson and Python read it, not -0.0
    return 0


cdef int read_row(const unsigned char* p, Py_ssize_t n, Py_ssize_t* at, Numbers* numbers,
                  Py_ssize_t* read, bint* integers) noexcept nogil:
    """The numbers (and commas) of an array from its first one at p[at] on, pushed, `at`
    moved past them and `read` counting them: see the enum above for the answers."""
    cdef Py_ssize_t i
    cdef double number
    cdef bint integer
    while True:
        if read_number(p, n, at, &number, &integer):
            return BAD
        if integer:
            if not -EXACT < number < EXACT:
                return BAD  # orjson keeps such an integer exact
        else:
            integers[0] = False
        if push(numbers, number):
            return NO_MEMORY
        read[0] += 1
        i = at[0]
        while i < n and is_space(p[i]):
            i += 1
        if i < n and p[i] == b"]":
            at[0] = i + 1
            return CLOSED
        if i >= n or p[i] != b",":
            return BAD
        i += 1
        while i < n and is_space(p[i]):
            i += 1
        at[0] = i
        if i >= n or not (p[i] == b"-" or is_digit(p[i])):
            return OTHER


@cython.final
cdef class _Reader:
    cdef bytes src
    cdef const unsigned char* p
    cdef Py_ssize_t n, i
    cdef Numbers numbers
    # The tensor array() read last: its rank, shape and whether all its numbers are integers.
    cdef int block_rank
    cdef cnp.npy_intp block_dims[MAX_DEPTH]
    cdef bint block_integers

    def __cinit__(self, bytes src):
        self.src = src
        self.p = <const unsigned char*>PyBytes_AS_STRING(src)
        self.n = PyBytes_GET_SIZE(src)

    def __dealloc__(self):
        free(self.numbers.values)

    cdef inline void space(self) noexcept:
        cdef const unsigned char* p = self.p
        cdef Py_ssize_t i = self.i, n = self.n
        while i < n and is_space(p[i]):
            i += 1
        self.i = i

    cdef object value(self, int depth):
        self.space()
        if self.i >= self.n or depth > MAX_DEPTH:
            raise _Unread()
        cdef unsigned char c = self.p[self.i]
        cdef Py_ssize_t first = self.numbers.count
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
        cdef Py_ssize_t start = self.i, end = self.i
        cdef bint integer
        cdef double number
        if read_number(self.p, self.n, &end, &number, &integer):
            raise _Unread()
        self.i = end
        if integer:
            exact = int(self.src[start:end])
            if -2**63 <= exact < 2**64:
                return exact
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
        cdef Py_ssize_t start = self.i, first = self.numbers.count, read = 0
        cdef int child_rank = -1, k  # of its elements: -1 none yet, 0 numbers, else tensors
        cdef cnp.npy_intp child_dims[MAX_DEPTH]
        cdef bint integers = True
        cdef unsigned char c
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
                if child_rank > 0 or self.row(&read, &integers) == OTHER:
                    return self.as_list(start, first, depth)
                child_rank = 0
                break
            elif c == b"[" and depth < MAX_DEPTH:
                at = self.numbers.count
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
        self.numbers.count = first
        self.i = start
        return self.list_(depth)

    cdef list as_list_after(self, Py_ssize_t start, Py_ssize_t first, Py_ssize_t read,
                            element, int depth):
        """The array at `start`, found to be no tensor by its element after the `read`
        first ones (tensors or numbers): those read again, `element` kept as it is."""
        cdef Py_ssize_t after = self.i
        cdef list result = []
        self.numbers.count = first
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

    cdef int row(self, Py_ssize_t* read, bint* integers) except -1:
        """read_row() at i, without the GIL when the row is long; CLOSED or OTHER."""
        cdef const unsigned char* p = self.p
        cdef Py_ssize_t at = self.i, n = self.n
        cdef const void* close = memchr(p + at, b"]", n - at)
        cdef int answer
        if close != NULL and <const unsigned char*>close - (p + at) < NOGIL_ROW:
            answer = read_row(p, n, &at, &self.numbers, read, integers)
        else:
            with nogil:
                answer = read_row(p, n, &at, &self.numbers, read, integers)
        self.i = at
        if answer == BAD:
            raise _Unread()
        if answer == NO_MEMORY:
            raise MemoryError()
        return answer

    cdef object tensor(self, Py_ssize_t first):
        """The tensor array() read last (values from `first` on) as an ndarray, its
        values dropped from the buffer."""
        cdef cnp.ndarray result
        cdef Py_ssize_t k, size = self.numbers.count - first
        cdef long long* target
        cdef double* source = self.numbers.values + first
        if self.block_integers:
            result = cnp.PyArray_SimpleNew(self.block_rank, self.block_dims, cnp.NPY_INT64)
            target = <long long*>cnp.PyArray_DATA(result)
            for k in range(size):
                target[k] = <long long>source[k]
        else:
            result = cnp.PyArray_SimpleNew(self.block_rank, self.block_dims, cnp.NPY_FLOAT64)
            memcpy(cnp.PyArray_DATA(result), source, size * sizeof(double))
        self.numbers.count = first
        if first == 0 and self.numbers.capacity > 1 << 16:  # a big one: give it back now
            free(self.numbers.values)
            self.numbers.values = NULL
            self.numbers.capacity = 0
        return result
