# cython: language_level=3
"""The Open Inference Protocol's binary tensor form, compiled: the common case.

tritonclient's default infer request is a small JSON header naming each input
with its `binary_data_size`, then the tensors' bytes, and asks for binary
outputs. `decode_binary` takes exactly that form (fixed-size datatypes, sizes
that match, nothing else in the header) and `encode_binary` writes the answer
(header and bytes in one allocation); `OipServe` runs a request from body to
answer in one call, as csrc/worker/tfwire.pyx's TFServe does for EAS.

Anything else (JSON data, BYTES, an output asked for as JSON, any mistake)
gives None: gateway/codec/oip.py's full path takes it and words the 400s. This
module imports nothing of the Python above it: datatypes are handed in.
"""
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

import numpy as np
import orjson

cnp.import_array()

cdef extern from "stdio.h" nogil:
    int snprintf(char*, size_t, const char*, ...)

cdef object _loads = orjson.loads
cdef object _dumps = orjson.dumps
cdef object _ndarray = np.ndarray
cdef frozenset _REQUEST_KEYS = frozenset(("inputs", "outputs", "parameters", "id"))
cdef frozenset _INPUT_KEYS = frozenset(("name", "datatype", "shape", "parameters"))


cdef class Datatypes:
    """The protocol's fixed-size datatypes: name <-> numpy dtype (handed in)."""
    cdef dict dtype_of    # str name -> np.dtype
    cdef dict name_of     # np.dtype -> bytes name

    def __init__(self, dict names_to_dtypes):
        self.dtype_of = {n: d for n, d in names_to_dtypes.items() if d.kind in "biuf"}
        self.name_of = {d: n.encode() for n, d in self.dtype_of.items()}


cpdef object decode_binary(bytes body, Py_ssize_t header_length, Datatypes types):
    """(feeds, output names asked for, request id or None) of a request in the common
    binary form, or None for anything else."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), at, size, count, d
    if header_length <= 0 or header_length > n:
        return None
    try:
        document = _loads(memoryview(body)[:header_length])
    except orjson.JSONDecodeError:
        return None
    if type(document) is not dict or not _REQUEST_KEYS.issuperset(<dict>document):
        return None
    parameters = (<dict>document).get("parameters")
    if parameters is not None and (type(parameters) is not dict or
                                   parameters != {"binary_data_output": True}):
        return None
    request_id = (<dict>document).get("id")
    if request_id is not None and type(request_id) is not str:
        return None
    inputs = (<dict>document).get("inputs")
    if type(inputs) is not list or not inputs:
        return None
    cdef dict feeds = {}
    at = header_length
    for tensor in <list>inputs:
        if type(tensor) is not dict or not _INPUT_KEYS.issuperset(<dict>tensor):
            return None
        name = (<dict>tensor).get("name")
        dtype = types.dtype_of.get((<dict>tensor).get("datatype"))
        shape = (<dict>tensor).get("shape")
        parameters = (<dict>tensor).get("parameters")
        if type(name) is not str or dtype is None or type(shape) is not list or \
                type(parameters) is not dict or len(<dict>parameters) != 1 or name in feeds:
            return None
        size_value = (<dict>parameters).get("binary_data_size")
        if type(size_value) is not int:
            return None
        size = size_value
        count = 1
        for dim in <list>shape:
            if type(dim) is not int:
                return None
            d = dim
            if d < 0:
                return None
            count *= d
        if size != count * (<cnp.dtype>dtype).itemsize or at + size > n:
            return None
        feeds[name] = _ndarray(tuple(shape), dtype, body, at)
        at += size
    if at != n:
        return None
    outputs = (<dict>document).get("outputs")
    cdef list wanted = []
    if outputs is not None:
        if type(outputs) is not list:
            return None
        for tensor in <list>outputs:
            if type(tensor) is not dict:
                return None
            name = (<dict>tensor).get("name")
            parameters = (<dict>tensor).get("parameters")
            if type(name) is not str or len(<dict>tensor) > 2 or (
                    len(<dict>tensor) == 2 and parameters != {"binary_data": True}):
                return None
            wanted.append(name)
    elif parameters is None:  # neither outputs nor binary_data_output: JSON answers
        return None
    return feeds, tuple(wanted), request_id


cdef class Answer:
    """How an answer's header begins: the model's name and version, as JSON."""
    cdef bytes start
    cdef dict output_starts  # output name -> b'{"name":"..","datatype":"' (JSON-escaped)
    cdef Datatypes types

    def __init__(self, str model, str version, output_names, Datatypes types):
        self.start = b'{"model_name":' + _dumps(model) + b',"model_version":' + \
            _dumps(version)
        self.output_starts = {n: b'{"name":' + _dumps(n) + b',"datatype":"'
                              for n in output_names}
        self.types = types


cpdef object encode_binary(Answer answer, tuple names, list arrays, request_id):
    """(body, header length) of an all-binary answer, or None when an output is not a
    C-contiguous array of a fixed-size datatype."""
    cdef list parts = [answer.start]
    if request_id is not None:
        parts.append(b',"id":' + _dumps(request_id))
    parts.append(b',"outputs":[')
    cdef char number[64]
    cdef Py_ssize_t i, k, data_size = 0, sizes[64]
    cdef cnp.ndarray array
    if len(arrays) > 64:
        return None
    for i in range(len(arrays)):
        value = arrays[i]
        if type(value) is not cnp.ndarray:
            return None
        array = <cnp.ndarray>value
        datatype = answer.types.name_of.get(array.dtype)
        start = answer.output_starts.get(names[i])
        if datatype is None or start is None or not cnp.PyArray_IS_C_CONTIGUOUS(array):
            return None
        if i:
            parts.append(b",")
        parts.append(start)
        parts.append(datatype)
        parts.append(b'","shape":[')
        for k in range(array.ndim):
            snprintf(number, 64, b"%lld" if k == 0 else b",%lld",
                     <long long>cnp.PyArray_DIM(array, k))
            parts.append(<bytes>number)
        sizes[i] = cnp.PyArray_NBYTES(array)
        data_size += sizes[i]
        snprintf(number, 64, b'],"parameters":{"binary_data_size":%lld}}', <long long>sizes[i])
        parts.append(<bytes>number)
    parts.append(b"]}")
    cdef bytes header = b"".join(parts)
    cdef Py_ssize_t header_size = PyBytes_GET_SIZE(header)
    cdef bytes body = PyBytes_FromStringAndSize(NULL, header_size + data_size)
    cdef char* out = PyBytes_AS_STRING(body)
    memcpy(out, PyBytes_AS_STRING(header), header_size)
    out += header_size
    for i in range(len(arrays)):
        memcpy(out, cnp.PyArray_DATA(<cnp.ndarray>arrays[i]), sizes[i])
        out += sizes[i]
    return body, header_size


cdef class OipServe:
    """One v2 infer request from body to answer, for the common binary form: decode,
    check, run, encode. (body, header line, rows) or None: the caller's full path
    takes what this does not."""
    cdef Answer answer
    cdef Datatypes types
    cdef tuple output_names
    cdef frozenset known_outputs
    cdef object check_feeds, run

    def __init__(self, Answer answer, Datatypes types, tuple output_names, check_feeds, run):
        self.answer = answer
        self.types = types
        self.output_names = output_names
        self.known_outputs = frozenset(output_names)
        self.check_feeds = check_feeds  # the model's FeedCheck: passes, casts or raises
        self.run = run                  # the model's run(feeds, names) -> list of arrays

    def __call__(self, bytes body, Py_ssize_t header_length):
        decoded = decode_binary(body, header_length, self.types)
        if decoded is None:
            return None
        feeds, wanted, request_id = <tuple>decoded
        if wanted:
            for name in <tuple>wanted:
                if name not in self.known_outputs:
                    return None
            names = wanted
        else:
            names = self.output_names
        feeds = self.check_feeds(feeds)
        encoded = encode_binary(self.answer, names, self.run(feeds, names), request_id)
        if encoded is None:
            return None
        answer, size = <tuple>encoded
        rows = 1
        for first in (<dict>feeds).values():  # rows as Call counts them
            rows = first.shape[0] if first.ndim else 1
            break
        return answer, b"Inference-Header-Content-Length: %d\r\n" % size, rows
