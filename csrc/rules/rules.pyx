# cython: language_level=3, cdivision=True, boundscheck=False, wraparound=False
"""Evaluator for compiled header-rule conditions (gateway/rules/compiler.py).

A program is a flat array of (opcode, argument) pairs in postfix order. The
VM keeps its value stack in a C array on the C stack (so one Condition can be
evaluated re-entrantly from several threads), holds its own references to the
strings on it, and calls back into Python only for the header dict lookup and
for regex `fullmatch`. Values: a string (owned PyObject*), an integer
(long long holding a Java int) or a boolean; a string or integer may be
"missing" (absent header/built-in, or a hashCode/% of one), and any comparison
or match involving a missing value is false.
"""
from cpython.object cimport PyObject, PyObject_RichCompareBool, Py_EQ
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.dict cimport PyDict_GetItem
from libc.stdint cimport uint32_t, int32_t, uint8_t, uint16_t
from libc.stdlib cimport malloc, free

cdef extern from "Python.h":
    int PyUnicode_KIND(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    int PyUnicode_1BYTE_KIND
    int PyUnicode_2BYTE_KIND

cdef enum:
    _OP_HEADER = 1
    _OP_BUILTIN
    _OP_STR
    _OP_INT
    _OP_BOOL
    _OP_HASH
    _OP_MOD
    _OP_EQ_STR
    _OP_NE_STR
    _OP_EQ_INT
    _OP_NE_INT
    _OP_LT
    _OP_LE
    _OP_GT
    _OP_GE
    _OP_MATCH
    _OP_NOT
    _OP_JUMP_IF_FALSE
    _OP_JUMP_IF_TRUE
    _MAX_STACK = 64

# The compiler imports these; keep them in step with the enum above.
OP_HEADER = _OP_HEADER
OP_BUILTIN = _OP_BUILTIN
OP_STR = _OP_STR
OP_INT = _OP_INT
OP_BOOL = _OP_BOOL
OP_HASH = _OP_HASH
OP_MOD = _OP_MOD
OP_EQ_STR = _OP_EQ_STR
OP_NE_STR = _OP_NE_STR
OP_EQ_INT = _OP_EQ_INT
OP_NE_INT = _OP_NE_INT
OP_LT = _OP_LT
OP_LE = _OP_LE
OP_GT = _OP_GT
OP_GE = _OP_GE
OP_MATCH = _OP_MATCH
OP_NOT = _OP_NOT
OP_JUMP_IF_FALSE = _OP_JUMP_IF_FALSE
OP_JUMP_IF_TRUE = _OP_JUMP_IF_TRUE
MAX_STACK = _MAX_STACK

cdef struct Val:
    PyObject* s        # owned reference to an exact str, or NULL
    long long i        # integer value, or 0/1 for booleans
    bint missing


cdef int32_t java_hash_str(object s):
    """Java String.hashCode over the UTF-16 code units of a str."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s), k
    cdef int kind = PyUnicode_KIND(s)
    cdef void* data = PyUnicode_DATA(s)
    cdef uint32_t h = 0, c
    cdef const uint8_t* d1
    cdef const uint16_t* d2
    cdef const uint32_t* d4
    if kind == PyUnicode_1BYTE_KIND:
        d1 = <const uint8_t*>data
        for k in range(n):
            h = 31u * h + d1[k]
    elif kind == PyUnicode_2BYTE_KIND:
        d2 = <const uint16_t*>data
        for k in range(n):
            h = 31u * h + d2[k]
    else:
        d4 = <const uint32_t*>data
        for k in range(n):
            c = d4[k]
            if c >= 0x10000u:
                c -= 0x10000u
                h = 31u * h + (0xD800u + (c >> 10))
                h = 31u * h + (0xDC00u + (c & 0x3FFu))
            else:
                h = 31u * h + c
    return <int32_t>h


def java_hash(str s):
    """Java String.hashCode of s (exposed for tests and tools)."""
    return java_hash_str(s)


cdef inline object _as_str(object v):
    """A header/built-in value as an exact str, or None when missing."""
    if v is None or type(v) is str:
        return v
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("latin-1")
    return str(v)


cdef inline object _lookup(object mapping, object key):
    cdef PyObject* p
    if mapping is None:
        return None
    if type(mapping) is dict:
        p = PyDict_GetItem(mapping, key)
        if p == NULL:
            return None
        v = <object>p
    else:
        v = mapping.get(key)
    if v is None or type(v) is str:
        return v
    return _as_str(v)


_STACK_EFFECT = {
    # opcode: (operand types popped, type pushed); S string, I integer, B boolean
    _OP_HEADER: ("", "S"), _OP_BUILTIN: ("", "S"), _OP_STR: ("", "S"),
    _OP_INT: ("", "I"), _OP_BOOL: ("", "B"), _OP_HASH: ("S", "I"), _OP_MOD: ("II", "I"),
    _OP_EQ_STR: ("SS", "B"), _OP_NE_STR: ("SS", "B"), _OP_EQ_INT: ("II", "B"),
    _OP_NE_INT: ("II", "B"), _OP_LT: ("II", "B"), _OP_LE: ("II", "B"), _OP_GT: ("II", "B"),
    _OP_GE: ("II", "B"), _OP_MATCH: ("S", "B"), _OP_NOT: ("B", "B"),
}


def _verify(tuple code, tuple constants, tuple patterns, int stack_size):
    """Check a program once, so that the hot loop can trust it: operand indices,
    forward jump targets, and the type and depth of the value stack everywhere."""
    n = len(code)
    if n == 0 or n % 2 or not 1 <= stack_size <= _MAX_STACK:
        raise ValueError("malformed rule program")
    at_target = {}              # pc -> stack state a jump brings there
    stack = ""                  # types on the stack; None after an unconditional end
    for pc in range(0, n, 2):
        op, arg = code[pc], code[pc + 1]
        if type(op) is not int or type(arg) is not int:
            raise ValueError(f"malformed rule program: non-integer at {pc}")
        if pc in at_target and at_target[pc] != stack:
            raise ValueError(f"malformed rule program: stack mismatch at {pc}")
        if op in (_OP_HEADER, _OP_BUILTIN, _OP_STR):
            if not 0 <= arg < len(constants) or type(constants[arg]) is not str:
                raise ValueError(f"malformed rule program: bad constant at {pc}")
        elif op == _OP_MATCH:
            if not 0 <= arg < len(patterns) or not callable(getattr(patterns[arg], "fullmatch", None)):
                raise ValueError(f"malformed rule program: bad pattern at {pc}")
        elif op == _OP_INT and not -(1 << 31) <= arg < (1 << 31):
            raise ValueError(f"malformed rule program: integer out of range at {pc}")
        if op in (_OP_JUMP_IF_FALSE, _OP_JUMP_IF_TRUE):
            if not stack.endswith("B"):
                raise ValueError(f"malformed rule program: jump without a boolean at {pc}")
            if arg <= pc or arg > n or arg % 2:
                raise ValueError(f"malformed rule program: bad jump at {pc}")
            if at_target.setdefault(arg, stack) != stack:
                raise ValueError(f"malformed rule program: stack mismatch at {arg}")
            stack = stack[:len(stack) - 1]
            continue
        if op not in _STACK_EFFECT:
            raise ValueError(f"malformed rule program: bad opcode at {pc}")
        pops, push = _STACK_EFFECT[op]
        if pops and not stack.endswith(pops):
            raise ValueError(f"malformed rule program: operand types at {pc}")
        stack = stack[:len(stack) - len(pops)] + push
        if len(stack) > stack_size:
            raise ValueError(f"malformed rule program: stack deeper than {stack_size}")
    if n in at_target and at_target[n] != stack:
        raise ValueError("malformed rule program: stack mismatch at the end")
    if stack != "B":
        raise ValueError("malformed rule program: it must leave one boolean")


cdef class Condition:
    """A compiled condition. Build with gateway.rules.compile_condition()."""

    cdef long long* prog
    cdef Py_ssize_t nprog
    cdef readonly str source
    cdef readonly tuple code
    cdef readonly tuple constants
    cdef readonly tuple patterns
    cdef readonly int stack_size
    cdef tuple matchers

    def __cinit__(self, str source, tuple code, tuple constants, tuple patterns, int stack_size):
        cdef Py_ssize_t k
        _verify(code, constants, patterns, stack_size)
        self.nprog = len(code)
        self.prog = <long long*>malloc(max(self.nprog, 1) * sizeof(long long))
        if self.prog == NULL:
            raise MemoryError()
        for k in range(self.nprog):
            self.prog[k] = code[k]
        self.source = source
        self.code = code
        self.constants = constants
        self.patterns = patterns
        self.matchers = tuple([p.fullmatch for p in patterns])
        self.stack_size = stack_size

    def __dealloc__(self):
        free(self.prog)

    cdef int _eval(self, object headers, object builtins) except -1:
        cdef Val stack[_MAX_STACK]
        cdef int sp = 0
        cdef Py_ssize_t pc = 0
        cdef long long op, arg, a, b
        cdef bint r
        cdef Val* x
        cdef Val* y
        cdef object v
        stack[0].i = 0
        try:
            while pc < self.nprog:
                op = self.prog[pc]
                arg = self.prog[pc + 1]
                pc += 2
                if op == _OP_HEADER or op == _OP_BUILTIN:
                    v = _lookup(headers if op == _OP_HEADER else builtins, self.constants[arg])
                    x = &stack[sp]
                    sp += 1
                    x.i = 0
                    if v is None:
                        x.s = NULL
                        x.missing = True
                    else:
                        Py_INCREF(v)
                        x.s = <PyObject*>v
                        x.missing = False
                elif op == _OP_STR:
                    v = self.constants[arg]
                    x = &stack[sp]
                    sp += 1
                    Py_INCREF(v)
                    x.s = <PyObject*>v
                    x.i = 0
                    x.missing = False
                elif op == _OP_INT or op == _OP_BOOL:
                    x = &stack[sp]
                    sp += 1
                    x.s = NULL
                    x.i = arg
                    x.missing = False
                elif op == _OP_HASH:
                    x = &stack[sp - 1]
                    if not x.missing:
                        x.i = java_hash_str(<object>x.s)
                    Py_XDECREF(x.s)
                    x.s = NULL
                elif op == _OP_MOD:
                    sp -= 1
                    y = &stack[sp]
                    x = &stack[sp - 1]
                    if y.missing or y.i == 0:
                        x.missing = True
                    elif not x.missing:
                        x.i = x.i % y.i     # C99 '%' truncates: Java's sign rule
                elif op == _OP_EQ_STR or op == _OP_NE_STR:
                    sp -= 1
                    y = &stack[sp]
                    x = &stack[sp - 1]
                    if x.missing or y.missing:
                        r = False
                    else:
                        r = PyObject_RichCompareBool(<object>x.s, <object>y.s, Py_EQ)
                        if op == _OP_NE_STR:
                            r = not r
                    Py_XDECREF(x.s)
                    Py_XDECREF(y.s)
                    x.s = NULL
                    y.s = NULL
                    x.i = r
                    x.missing = False
                elif op == _OP_MATCH:
                    x = &stack[sp - 1]
                    if x.missing:
                        r = False
                    else:
                        r = self.matchers[arg](<object>x.s) is not None
                    Py_XDECREF(x.s)
                    x.s = NULL
                    x.i = r
                    x.missing = False
                elif op == _OP_NOT:
                    x = &stack[sp - 1]
                    x.i = not x.i
                elif op == _OP_JUMP_IF_FALSE:
                    if stack[sp - 1].i == 0:
                        pc = arg
                    else:
                        sp -= 1
                elif op == _OP_JUMP_IF_TRUE:
                    if stack[sp - 1].i != 0:
                        pc = arg
                    else:
                        sp -= 1
                else:
                    # integer comparisons
                    sp -= 1
                    y = &stack[sp]
                    x = &stack[sp - 1]
                    if x.missing or y.missing:
                        r = False
                    else:
                        a = x.i
                        b = y.i
                        if op == _OP_EQ_INT:
                            r = a == b
                        elif op == _OP_NE_INT:
                            r = a != b
                        elif op == _OP_LT:
                            r = a < b
                        elif op == _OP_LE:
                            r = a <= b
                        elif op == _OP_GT:
                            r = a > b
                        else:
                            r = a >= b
                    x.i = r
                    x.missing = False
            return stack[0].i != 0
        finally:
            while sp > 0:
                sp -= 1
                Py_XDECREF(stack[sp].s)

    cpdef bint evaluate(self, headers, builtins=None) except? -1:
        """True when the condition holds.

        headers: dict of lower-cased header name -> value (any mapping with .get
        works); builtins: dict like {"DOMAIN_NAME": ...} or None.
        """
        return self._eval(headers, builtins)

    def __repr__(self):
        return f"Condition({self.source!r})"

    def __reduce__(self):
        from gateway.rules import compile_condition
        return (compile_condition, (self.source,))


cdef class ConditionSet:
    """Ordered conditions; match() gives the index of the first that holds, or -1."""

    cdef tuple _conditions

    def __cinit__(self, *args, **kwargs):
        self._conditions = ()

    def _set_conditions(self, conditions):
        conditions = tuple(conditions)
        for c in conditions:
            if not isinstance(c, Condition):
                raise TypeError("ConditionSet holds compiled Condition objects")
        self._conditions = conditions

    cpdef int match(self, headers, builtins=None) except? -2:
        cdef tuple conds = self._conditions
        cdef Py_ssize_t k, n = len(conds)
        for k in range(n):
            if (<Condition>conds[k])._eval(headers, builtins):
                return <int>k
        return -1
