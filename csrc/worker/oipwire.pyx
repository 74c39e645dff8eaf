# cython: language_level=3
"""The Open Inference Protocol's binary tensor form, compiled: the common case.

tritonclient's default infer request is a small JSON header naming each input
with its `binary_data_size`, then the tensors' bytes, and asks for binary
outputs. `decode_binary` takes exactly that form (fixed-size datatypes, sizes
that match, nothing else in the header) and `encode_binary` writes the answer
(header and bytes in one allocation). Over gRPC, `decode_grpc` and
`encode_grpc` read and write ModelInferRequest and ModelInferResponse straight
from and to protobuf's wire form, for requests with raw_input_contents and no
parameters. `OipServe` runs a request from body to answer in one call, as
csrc/worker/tfwire.pyx's TFServe does for EAS.

Anything else (JSON data, BYTES, an output asked for as JSON, any mistake)
gives None: gateway/codec/oip.py's full path takes it and words the 400s. This
module imports nothing of the Python above it: datatypes are handed in.
"""
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t
from libc.string cimport memcpy

from gateway._native.protowire cimport array_nbytes, take_tag, take_varint, varint

import numpy as np
import orjson

cnp.import_array()

cdef extern from "stdio.h" nogil:
    int snprintf(char*, size_t, const char*, ...)

cdef object _loads = orjson.loads
cdef object _dumps = orjson.dumps
cdef frozenset _REQUEST_KEYS = frozenset(("inputs", "outputs", "parameters", "id"))
cdef frozenset _INPUT_KEYS = frozenset(("name", "datatype", "shape", "parameters"))


cdef class Datatypes:
    """The protocol's fixed-size datatypes: name <-> numpy dtype (handed in)."""
    cdef dict dtype_of    # str name -> np.dtype
    cdef dict name_of     # np.dtype -> bytes name

    def __init__(self, dict names_to_dtypes):
        self.dtype_of = {n: d for n, d in names_to_dtypes.items() if d.kind in "biuf"}
        self.name_of = {d: n.encode() for n, d in self.dtype_of.items()}


cdef object _array(list shape, cnp.dtype dtype, const char* data, Py_ssize_t size):
    """A new (aligned, writable) array of `shape` holding a copy of `data`."""
    cdef cnp.npy_intp dims[32]
    cdef int i, ndim = len(shape)
    if ndim > 32:
        return None
    for i in range(ndim):
        dims[i] = <cnp.npy_intp>shape[i]
    array = cnp.PyArray_EMPTY(ndim, dims, dtype.type_num, 0)
    memcpy(cnp.PyArray_DATA(<cnp.ndarray>array), data, size)
    return array


cpdef object decode_binary(bytes body, object header_length, Datatypes types):
    """(feeds, output names asked for, request id or None) of a request in the common
    binary form, or None for anything else (`header_length`: an int of any size)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), at, size, count
    if type(header_length) is not int or not 0 < header_length <= n:
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
        # (JSON numbers can be any size: compared as Python ints before C takes them)
        if type(size_value) is not int or not 0 <= size_value <= n - at:
            return None
        size = size_value
        for dim in <list>shape:
            if type(dim) is not int or not 0 <= dim <= n:
                return None
        if not array_nbytes(<list>shape, (<cnp.dtype>dtype).itemsize, &count) or size != count:
            return None
        array = _array(<list>shape, <cnp.dtype>dtype, PyBytes_AS_STRING(body) + at, size)
        if array is None:
            return None
        feeds[name] = array
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


# --- gRPC: ModelInferRequest and ModelInferResponse on the wire -------------------------------
# (protos/oip.proto's field numbers; every field taken here is length-delimited)

cdef inline bint _varint(const uint8_t* p, Py_ssize_t n, Py_ssize_t* at,
                         unsigned long long* out) noexcept:
    cdef const uint8_t* q = p + at[0]
    cdef bint ok = take_varint(&q, p + n, out)
    at[0] = q - p
    return ok


cdef inline bint _field(const uint8_t* p, Py_ssize_t n, Py_ssize_t* at, int* number,
                        Py_ssize_t* start, Py_ssize_t* length) noexcept:
    """The next length-delimited field; False at anything else (or a malformed one)."""
    cdef const uint8_t* q = p + at[0]
    cdef unsigned long long tag, size
    if not take_tag(&q, p + n, &tag) or (tag & 7) != 2 or not take_varint(&q, p + n, &size) \
            or size > <unsigned long long>(p + n - q):
        return False
    number[0] = <int>(tag >> 3)  # (at most 2^29 - 1)
    start[0] = q - p
    length[0] = <Py_ssize_t>size
    at[0] = start[0] + length[0]
    return True


cdef object _text(const uint8_t* p, Py_ssize_t n):
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError:
        return None


cdef object _input_tensor(const uint8_t* p, Py_ssize_t n):
    """[name, datatype, shape] of an InferInputTensor without parameters or contents."""
    cdef Py_ssize_t at = 0, start, length, k
    cdef int number
    cdef unsigned long long dim
    name = datatype = None
    cdef list shape = []
    while at < n:
        if not _field(p, n, &at, &number, &start, &length):
            return None
        if number == 1 or number == 2:
            text = _text(p + start, length)
            if text is None:
                return None  # not UTF-8, which protobuf refuses (though a later one were)
            if number == 1:
                name = text
            else:
                datatype = text
        elif number == 3:  # packed int64
            k = start
            while k < start + length:
                if not _varint(p, start + length, &k, &dim) or dim >> 62:
                    return None  # negative (or absurd): the full path words it
                shape.append(<long long>dim)
        else:
            return None
    if name is None or datatype is None:
        return None
    return [name, datatype, shape]


cdef object _output_name(const uint8_t* p, Py_ssize_t n):
    """The name of an InferRequestedOutputTensor without parameters."""
    cdef Py_ssize_t at = 0, start, length
    cdef int number
    name = None
    while at < n:
        if not _field(p, n, &at, &number, &start, &length) or number != 1:
            return None
        name = _text(p + start, length)
        if name is None:
            return None
    return name


cpdef object decode_grpc(bytes message, Datatypes types):
    """(model name, version, request id, feeds, output names asked for) of a
    ModelInferRequest in the common form (raw_input_contents, no parameters), or None."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(message)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(message), at = 0, start, length, size
    cdef int number
    cdef list inputs = [], raws = [], wanted = []
    model = version = request_id = ""
    while at < n:
        if not _field(p, n, &at, &number, &start, &length):
            return None
        if number == 7:
            raws.append((start, length))
        elif number == 5:
            tensor = _input_tensor(p + start, length)
            if tensor is None:
                return None
            inputs.append(tensor)
        elif number == 6:
            name = _output_name(p + start, length)
            if name is None:
                return None
            wanted.append(name)
        elif number in (1, 2, 3):
            text = _text(p + start, length)
            if text is None:
                return None
            if number == 1:
                model = text
            elif number == 2:
                version = text
            else:
                request_id = text
        else:
            return None
    if not inputs or len(raws) != len(inputs):
        return None
    cdef dict feeds = {}
    for i in range(len(inputs)):
        name, datatype, shape = inputs[i]
        dtype = types.dtype_of.get(datatype)
        if dtype is None or name in feeds:
            return None
        start, length = raws[i]
        if not array_nbytes(shape, (<cnp.dtype>dtype).itemsize, &size) or size != length:
            return None
        array = _array(shape, <cnp.dtype>dtype, <const char*>p + start, size)
        if array is None:
            return None
        feeds[name] = array
    return model, version, request_id, feeds, tuple(wanted)


cdef class GrpcAnswer:
    """What every ModelInferResponse of a model begins with, and its outputs' names."""
    cdef bytes start
    cdef dict output_names   # name -> the InferOutputTensor's name field
    cdef dict datatypes      # np.dtype -> the datatype field

    def __init__(self, str model, str version, output_names, Datatypes types):
        def text(int number, str value):
            data = value.encode()
            return varint(number << 3 | 2) + varint(len(data)) + data
        self.start = text(1, model) + text(2, version)
        self.output_names = {n: text(1, n) for n in output_names}
        self.datatypes = {d: text(2, name.decode()) for d, name in types.name_of.items()}


cpdef object encode_grpc(GrpcAnswer answer, tuple names, list arrays, str request_id):
    """A ModelInferResponse's bytes, the data in raw_output_contents; None when an output
    is not a C-contiguous array of a fixed-size datatype."""
    cdef list parts = [answer.start]
    cdef Py_ssize_t i, k, total, data_size = 0
    cdef cnp.ndarray array
    if request_id:
        data = request_id.encode()
        parts += [b"\x1a", varint(len(data)), data]
    for i in range(len(arrays)):
        value = arrays[i]
        if type(value) is not cnp.ndarray:
            return None
        array = <cnp.ndarray>value
        name = answer.output_names.get(names[i])
        datatype = answer.datatypes.get(array.dtype)
        if name is None or datatype is None or not cnp.PyArray_IS_C_CONTIGUOUS(array):
            return None
        shape = b"".join([varint(<unsigned long long>cnp.PyArray_DIM(array, k))
                          for k in range(array.ndim)])
        tensor = name + datatype + (b"\x1a" + varint(len(shape)) + shape
                                    if array.ndim else b"")
        parts += [b"\x2a", varint(len(tensor)), tensor]
    for i in range(len(arrays)):
        parts += [b"\x32", varint(cnp.PyArray_NBYTES(<cnp.ndarray>arrays[i]))]
        data_size += cnp.PyArray_NBYTES(<cnp.ndarray>arrays[i])
    cdef bytes head = b"".join(parts[:-2 * len(arrays)] if arrays else parts)
    # The raw contents go last, each after its tag and length: lay everything out once.
    cdef list prefixes = parts[len(parts) - 2 * len(arrays):] if arrays else []
    total = PyBytes_GET_SIZE(head) + data_size
    for prefix in prefixes:
        total += PyBytes_GET_SIZE(prefix)
    cdef bytes body = PyBytes_FromStringAndSize(NULL, total)
    cdef char* out = PyBytes_AS_STRING(body)
    memcpy(out, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
    out += PyBytes_GET_SIZE(head)
    for i in range(len(arrays)):
        for k in range(2):
            prefix = prefixes[2 * i + k]
            memcpy(out, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix))
            out += PyBytes_GET_SIZE(prefix)
        memcpy(out, cnp.PyArray_DATA(<cnp.ndarray>arrays[i]),
               cnp.PyArray_NBYTES(<cnp.ndarray>arrays[i]))
        out += cnp.PyArray_NBYTES(<cnp.ndarray>arrays[i])
    return body


cdef class OipServe:
    """One v2 infer request from body to answer, for the common forms: decode, check, run,
    encode (`http`: the binary form, `grpc`: a ModelInferRequest with raw contents).
    None for anything else: the caller's full path takes it."""
    cdef Answer answer
    cdef GrpcAnswer grpc_answer
    cdef str model
    cdef Datatypes types
    cdef tuple output_names
    cdef frozenset known_outputs
    cdef object check_feeds, run

    def __init__(self, str model, Datatypes types, tuple output_names, check_feeds, run):
        self.model = model
        self.answer = Answer(model, model, output_names, types)
        self.grpc_answer = GrpcAnswer(model, model, output_names, types)
        self.types = types
        self.output_names = output_names
        self.known_outputs = frozenset(output_names)
        self.check_feeds = check_feeds  # the model's FeedCheck: passes, casts or raises
        self.run = run                  # the model's run(feeds, names) -> list of arrays

    cdef object _names(self, tuple wanted):
        """The outputs to run: those asked for, each once, or all."""
        if not wanted:
            return self.output_names
        for name in wanted:
            if name not in self.known_outputs:
                return None
        return wanted if len(wanted) == 1 else tuple(dict.fromkeys(wanted))

    def http(self, bytes body, header_length):
        """(answer body, its header line, rows run) or None."""
        decoded = decode_binary(body, header_length, self.types)
        if decoded is None:
            return None
        feeds, wanted, request_id = <tuple>decoded
        names = self._names(wanted)
        if names is None:
            return None
        feeds = self.check_feeds(feeds)
        encoded = encode_binary(self.answer, names, self.run(feeds, names), request_id)
        if encoded is None:
            return None
        answer, size = <tuple>encoded
        return answer, b"Inference-Header-Content-Length: %d\r\n" % size, _rows(feeds)

    def grpc(self, bytes message):
        """(ModelInferResponse bytes, rows run) or None."""
        decoded = decode_grpc(message, self.types)
        if decoded is None:
            return None
        model, version, request_id, feeds, wanted = <tuple>decoded
        if model != self.model or (version and version != self.model):
            return None
        names = self._names(wanted)
        if names is None:
            return None
        feeds = self.check_feeds(feeds)
        answer = encode_grpc(self.grpc_answer, names, self.run(feeds, names), request_id)
        if answer is None:
            return None
        return answer, _rows(feeds)


cdef Py_ssize_t _rows(dict feeds):
    """Rows as Call counts them."""
    for first in feeds.values():
        return first.shape[0] if first.ndim else 1
    return 1
