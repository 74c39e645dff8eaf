"""Open Inference Protocol (KServe v2) tensors <-> numpy, for HTTP and gRPC.

HTTP. An infer request is a JSON header, optionally followed by binary tensor
data (the binary tensor extension, tritonclient's default): the header's size
is the request's `Inference-Header-Content-Length`, and each input that has
`"parameters": {"binary_data_size": n}` takes the next n bytes, in input order.
Other inputs carry `"data"`: a flat or nested list in row-major order. An
output is answered in binary when the request asks (`binary_data_output`, or
the output's own `binary_data`), as JSON `data` otherwise.

gRPC. Inputs come in `raw_input_contents` (one entry per input, in order) or
in the typed `contents` fields; answers always go in `raw_output_contents`,
the only place tritonclient reads them from.

BYTES elements are each a 4-byte little-endian length and that many bytes, in
raw form; JSON strings in `data`. They reach the model as text (onnxruntime's
string tensors hold UTF-8 text). Every problem with the client's data raises
`CodecError` naming the field and the tensor: the worker answers it 400 (gRPC
INVALID_ARGUMENT).
"""
from __future__ import annotations

import math

import numpy as np
import orjson

from .. import __version__
from ..protos import health_pb2, oip_pb2 as pb
from .._native.tensorjson import loads
from .tensors import CodecError

OBJECT = np.dtype(object)

DTYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": OBJECT,
}
DATATYPES = {dtype: name for name, dtype in DTYPES.items()}
# Triton's model-configuration names (ModelConfig.input[].data_type).
CONFIG_TYPES = {name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in DTYPES}

# InferTensorContents fields by datatype (the typed, non-raw gRPC form).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

# The gRPC service's name on the wire (our messages live in our own proto package).
GRPC_SERVICE = "inference.GRPCInferenceService"


def parse_infer_request(data: bytes):
    """A ModelInferRequest from its bytes (handlers take them raw, so that a message that
    does not parse is the client's INVALID_ARGUMENT, not the server's INTERNAL)."""
    try:
        return pb.ModelInferRequest.FromString(data)
    except Exception as exc:  # DecodeError, and others on odd bytes
        raise CodecError(f"the ModelInferRequest does not parse: {exc}") from None


GRPC_METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata",
                "ModelConfig", "ModelInfer")
# The calls about a model (the service's token guards them); liveness and the like not.
GRPC_MODEL_METHODS = frozenset(f"/{GRPC_SERVICE}/{name}" for name in GRPC_METHODS
                               if name.startswith("Model"))


def grpc_routes(face) -> dict:
    """{gRPC path: face's method}: ServerLive -> face.server_live, ..., and grpc.health.v1's
    Check -> face.health_check."""
    routes = {f"/{GRPC_SERVICE}/{name}": getattr(face, "".join(
        "_" + c.lower() if c.isupper() else c for c in name).lstrip("_"))
        for name in GRPC_METHODS}
    routes["/grpc.health.v1.Health/Check"] = face.health_check
    return routes


# The gRPC answers that never change, serialized once (the worker's and the gateway's),
# by whether the server, model or service is ready.
SERVER_LIVE = pb.ServerLiveResponse(live=True).SerializeToString()
SERVER_READY = {ready: pb.ServerReadyResponse(ready=ready).SerializeToString()
                for ready in (True, False)}
MODEL_READY = {ready: pb.ModelReadyResponse(ready=ready).SerializeToString()
               for ready in (True, False)}
HEALTH = {serving: health_pb2.HealthCheckResponse(
    status=health_pb2.HealthCheckResponse.SERVING if serving
    else health_pb2.HealthCheckResponse.NOT_SERVING).SerializeToString()
    for serving in (True, False)}


def grpc_options(max_message: int) -> list:
    """gRPC messages past the 4 MB default: as large as the HTTP side's body limit."""
    return [("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message)]


# What GET /v2 answers, on workers and on the gateway.
EXTENSIONS = ["binary_tensor_data", "model_configuration"]


def server_metadata() -> dict:
    return {"name": "infergate", "version": __version__, "extensions": EXTENSIONS}


def datatype_name(dtype: np.dtype) -> str:
    """The protocol's name of a numpy dtype (str arrays are BYTES)."""
    name = DATATYPES.get(dtype)
    if name is None:
        if dtype.kind in "US":
            return "BYTES"
        raise CodecError(f"the model's dtype {dtype} has no Open Inference Protocol datatype")
    return name


def dtype_of(datatype, what: str) -> np.dtype:
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise CodecError(f"{what}: unknown datatype {datatype!r}; expected one of "
                         f"{', '.join(DTYPES)}")
    return dtype


def checked_shape(shape, what: str) -> tuple:
    if isinstance(shape, np.ndarray):  # as the JSON reader gives a list of numbers
        shape = shape.tolist()
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise CodecError(f"{what}: \"shape\" must be a list of integers, got {shape!r}")
    for d in shape:
        if d < 0:
            raise CodecError(f"{what}: \"shape\" {list(shape)} has a negative dimension")
    return tuple(shape)


def shaped(flat: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    """`flat` in `shape`; a shape numpy cannot make (too many dimensions, or too large
    with a zero among them) is the client's error."""
    try:
        return flat.reshape(shape)
    except ValueError as exc:
        raise CodecError(f"{what}: \"shape\" {list(shape)} is not usable: {exc}") from None


def from_raw(raw, dtype: np.dtype, shape: tuple, what: str, field: str) -> np.ndarray:
    """An array of `shape` from the protocol's raw bytes (a `field` of the request)."""
    count = math.prod(shape)
    if dtype is OBJECT:
        check_bytes_size(len(raw), count, shape, what, field)
        return shaped(_bytes_elements(raw, count, what, field), shape, what)
    need = count * dtype.itemsize
    if len(raw) != need:
        raise CodecError(f"{what}: {field} is {len(raw)} bytes, but shape {list(shape)} of "
                         f"{DATATYPES[dtype]} needs {need}")
    return shaped(np.frombuffer(raw, dtype.newbyteorder("<")), shape, what)


def check_bytes_size(size: int, count: int, shape: tuple, what: str, field: str) -> None:
    """Each raw BYTES element takes at least its 4-byte length: checked before anything
    is allocated for `count` elements (a shape is cheap to claim, objects are not)."""
    if size < 4 * count:
        raise CodecError(f"{what}: {field} is {size} bytes, but shape {list(shape)} of BYTES "
                         f"needs at least {4 * count} (a 4-byte length per element)")


def _bytes_elements(raw, count: int, what: str, field: str) -> np.ndarray:
    view = memoryview(raw)
    out = np.empty(count, dtype=object)
    at, end = 0, len(view)
    for i in range(count):
        if at + 4 > end:
            raise CodecError(f"{what}: {field} ends after {i} of {count} BYTES elements")
        size = int.from_bytes(view[at:at + 4], "little")
        at += 4
        if at + size > end:
            raise CodecError(f"{what}: {field}: BYTES element {i} claims {size} bytes, "
                             f"{end - at} remain")
        try:
            out[i] = str(view[at:at + size], "utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{what}: {field}: BYTES element {i} is not UTF-8 text (the "
                             f"model's string tensors hold text)") from None
        at += size
    if at != end:
        raise CodecError(f"{what}: {field} has {end - at} bytes after its {count} BYTES "
                         f"elements")
    return out


def to_raw(array: np.ndarray) -> bytes:
    """The protocol's raw bytes of an array (little-endian; BYTES length-prefixed)."""
    if array.dtype is OBJECT or array.dtype.kind in "US":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(len(data).to_bytes(4, "little"))
            parts.append(data)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def from_json(data, dtype: np.dtype, shape: tuple, what: str) -> np.ndarray:
    count = math.prod(shape)
    try:
        if dtype is OBJECT:
            flat = _flatten(data)  # counted before any object array is made for the shape
            if len(flat) == count and not all(isinstance(item, str) for item in flat):
                raise ValueError("BYTES data must be strings")
        else:
            flat = np.asarray(data, dtype=dtype).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CodecError(f"{what}: \"data\" is not a list of {DATATYPES[dtype]} values: "
                         f"{exc}") from None
    if len(flat) != count:
        raise CodecError(f"{what}: \"data\" has {len(flat)} values, but shape {list(shape)} "
                         f"needs {count}")
    if dtype is OBJECT:
        items, flat = flat, np.empty(count, dtype=object)
        flat[:] = items
    return shaped(flat, shape, what)


def _flatten(data) -> list:
    """The leaves of nested lists, row-major (a loop: nesting as deep as the JSON reader
    allows must not reach Python's recursion limit)."""
    if not isinstance(data, list):
        return [data]
    leaves, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            leaves.append(item)
        else:
            stack.pop()
    return leaves


def to_json(array: np.ndarray) -> list:
    """Row-major flat values (BYTES as strings, undecodable ones as latin-1)."""
    flat = array.reshape(-1)
    if array.dtype is OBJECT or array.dtype.kind == "S":
        return [_text(item) for item in flat]
    if array.dtype.kind == "f" and array.dtype.itemsize == 2:
        flat = flat.astype(np.float32)
    return flat.tolist()


def _text(item) -> str:
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return item.decode("latin-1")
    return str(item)


# -- HTTP ------------------------------------------------------------------------------------


class HttpInfer:
    """A decoded HTTP infer request: feeds, the outputs asked for, and how to answer them."""

    __slots__ = ("id", "feeds", "outputs", "binary", "binary_default")

    def __init__(self, id, feeds: dict, outputs: tuple, binary: dict, binary_default: bool):
        self.id = id
        self.feeds = feeds
        self.outputs = outputs              # names asked for, () for all
        self.binary = binary                # output name -> binary_data, where the output says
        self.binary_default = binary_default


def _parameter(params, key: str, what: str, kind=bool):
    if params is None:
        return None
    if not isinstance(params, dict):
        raise CodecError(f"{what}: \"parameters\" must be an object")
    value = params.get(key)
    if value is not None and (not isinstance(value, kind) or
                              (kind is int and isinstance(value, bool))):
        raise CodecError(f"{what}: parameter {key!r} must be "
                         f"{'true or false' if kind is bool else 'an integer'}, got {value!r}")
    return value


def parse_http_infer(body: bytes, header_length: str | None) -> HttpInfer:
    """Decode an infer request body; `header_length` is its Inference-Header-Content-Length."""
    if header_length is None:
        header, rest = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if size < 0 or size > len(body):
            raise CodecError(f"Inference-Header-Content-Length is {header_length!r}, but the "
                             f"body has {len(body)} bytes")
        header, rest = body[:size], memoryview(body)[size:]
    try:
        request = loads(bytes(header))
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"the inference request header is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise CodecError("the inference request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise CodecError("\"inputs\" must be a non-empty list of tensors")
    feeds = {}
    at = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise CodecError(f"inputs[{i}] must be an object with a \"name\"")
        name = tensor["name"]
        what = f"input {name!r}"
        if name in feeds:
            raise CodecError(f"{what} appears twice")
        dtype = dtype_of(tensor.get("datatype"), what)
        shape = checked_shape(tensor.get("shape"), what)
        size = _parameter(tensor.get("parameters"), "binary_data_size", what, int)
        if size is not None:
            if "data" in tensor:
                raise CodecError(f"{what} has both \"data\" and binary_data_size")
            if size < 0 or at + size > len(rest):
                raise CodecError(f"{what}: binary_data_size {size} goes past the end of the "
                                 f"body ({len(rest) - at} bytes of binary data left)")
            feeds[name] = from_raw(rest[at:at + size], dtype, shape, what,
                                   f"binary_data_size {size}")
            at += size
        elif "data" in tensor:
            feeds[name] = from_json(tensor["data"], dtype, shape, what)
        else:
            raise CodecError(f"{what} has neither \"data\" nor binary_data_size")
    if at != len(rest):
        raise CodecError(f"the body has {len(rest) - at} bytes of binary data that no input's "
                         f"binary_data_size claims")
    binary_default = bool(_parameter(request.get("parameters"), "binary_data_output",
                                     "the request"))
    names, binary = [], {}
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise CodecError("\"outputs\" must be a list")
        for i, tensor in enumerate(outputs):
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise CodecError(f"outputs[{i}] must be an object with a \"name\"")
            what = f"output {tensor['name']!r}"
            if _parameter(tensor.get("parameters"), "classification", what, int):
                raise CodecError(f"{what}: the classification extension is not supported")
            flag = _parameter(tensor.get("parameters"), "binary_data", what)
            names.append(tensor["name"])
            if flag is not None:
                binary[tensor["name"]] = flag
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise CodecError(f"\"id\" must be a string, got {request_id!r}")
    return HttpInfer(request_id, feeds, tuple(names), binary, binary_default)


def render_http_infer(model: str, version: str, infer: HttpInfer, names, arrays) -> tuple:
    """(body, header length or None) answering `infer` with the model's outputs."""
    described = []
    chunks = []
    for name, array in zip(names, arrays):
        tensor = {"name": name, "datatype": datatype_name(array.dtype), "shape": array.shape}
        if infer.binary.get(name, infer.binary_default):
            raw = to_raw(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = to_json(array)
        described.append(tensor)
    answer = {"model_name": model, "model_version": version, "outputs": described}
    if infer.id is not None:
        answer["id"] = infer.id
    header = orjson.dumps(answer)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


# -- gRPC ------------------------------------------------------------------------------------


def feeds_from_grpc(request) -> dict:
    """The feeds of a ModelInferRequest (raw_input_contents, or typed contents)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise CodecError(f"raw_input_contents has {len(raw)} entries for "
                         f"{len(request.inputs)} inputs")
    feeds = {}
    for i, tensor in enumerate(request.inputs):
        what = f"input {tensor.name!r}"
        if tensor.name in feeds:
            raise CodecError(f"{what} appears twice")
        dtype = dtype_of(tensor.datatype, what)
        shape = checked_shape(list(tensor.shape), what)
        if raw:
            feeds[tensor.name] = from_raw(raw[i], dtype, shape, what, f"raw_input_contents[{i}]")
            continue
        field = CONTENTS_FIELDS.get(tensor.datatype)
        if field is None:
            raise CodecError(f"{what}: {tensor.datatype} data must come in raw_input_contents")
        values = getattr(tensor.contents, field)
        count = math.prod(shape)
        if len(values) != count:
            raise CodecError(f"{what}: contents.{field} has {len(values)} values, but shape "
                             f"{list(shape)} needs {count}")
        if dtype is OBJECT:
            array = np.empty(count, dtype=object)
            try:
                array[:] = [bytes(v).decode("utf-8") for v in values]
            except UnicodeDecodeError:
                raise CodecError(f"{what}: contents.{field} holds bytes that are not UTF-8 "
                                 f"text") from None
        else:
            try:
                array = np.asarray(values, dtype=dtype)
            except OverflowError as exc:  # INT8/16, UINT8/16 come in 32-bit fields
                raise CodecError(f"{what}: contents.{field} holds a value out of range for "
                                 f"{tensor.datatype}: {exc}") from None
        feeds[tensor.name] = shaped(array, shape, what)
    return feeds


def fill_grpc_response(response, names, arrays) -> None:
    """Outputs into a ModelInferResponse, their data in raw_output_contents."""
    for name, array in zip(names, arrays):
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = datatype_name(array.dtype)
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(to_raw(array))


# -- gRPC <-> HTTP, for the gateway's gRPC port ------------------------------------------


def http_from_grpc(request) -> tuple:
    """(body, header length) of the HTTP infer request that says what a ModelInferRequest
    says, every tensor in binary."""
    raw = list(request.raw_input_contents)
    if not raw:  # typed contents: decoded once, to raw bytes
        feeds = feeds_from_grpc(request)
        raw = [to_raw(feeds[tensor.name]) for tensor in request.inputs]
    elif len(raw) != len(request.inputs):
        raise CodecError(f"raw_input_contents has {len(raw)} entries for "
                         f"{len(request.inputs)} inputs")
    else:  # checked here, so that errors name the gRPC fields
        for i, (tensor, data) in enumerate(zip(request.inputs, raw)):
            what = f"input {tensor.name!r}"
            dtype = dtype_of(tensor.datatype, what)
            shape = checked_shape(list(tensor.shape), what)
            if dtype is OBJECT:
                check_bytes_size(len(data), math.prod(shape), shape, what,
                                 f"raw_input_contents[{i}]")
            elif len(data) != math.prod(shape) * dtype.itemsize:
                raise CodecError(f"{what}: raw_input_contents[{i}] is {len(data)} bytes, but "
                                 f"shape {list(shape)} of {tensor.datatype} needs "
                                 f"{math.prod(shape) * dtype.itemsize}")
    header = {"inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                          "parameters": {"binary_data_size": len(data)}}
                         for t, data in zip(request.inputs, raw)]}
    if request.id:
        header["id"] = request.id
    if request.outputs:
        header["outputs"] = [{"name": o.name, "parameters": {"binary_data": True}}
                             for o in request.outputs]
    else:
        header["parameters"] = {"binary_data_output": True}
    head = orjson.dumps(header)
    return b"".join([head, *raw]), len(head)


def grpc_from_http(body: bytes, header_length, response) -> None:
    """Fill a ModelInferResponse from an HTTP infer answer (binary or JSON outputs)."""
    size = int(header_length) if header_length is not None else len(body)
    document = orjson.loads(body[:size])
    rest = memoryview(body)[size:]
    at = 0
    response.model_name = document.get("model_name", "")
    response.model_version = document.get("model_version", "")
    response.id = document.get("id") or ""
    for tensor in document.get("outputs", []):
        out = response.outputs.add()
        out.name = tensor["name"]
        out.datatype = tensor["datatype"]
        out.shape.extend(tensor["shape"])
        length = (tensor.get("parameters") or {}).get("binary_data_size")
        if length is not None:
            response.raw_output_contents.append(bytes(rest[at:at + length]))
            at += length
        else:
            dtype = dtype_of(tensor["datatype"], f"output {out.name!r}")
            response.raw_output_contents.append(to_raw(from_json(
                tensor["data"], dtype, tuple(tensor["shape"]), f"output {out.name!r}")))


def metadata_message(document: dict):
    """A ModelMetadataResponse from the JSON an HTTP model-metadata GET answers."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=document.get("name", ""), versions=document.get("versions", []),
        platform=document.get("platform", ""),
        inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in document.get("inputs", [])],
        outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                 for t in document.get("outputs", [])])


def config_message(document: dict):
    """A ModelConfigResponse from the JSON an HTTP model-config GET answers."""
    config = pb.ModelConfig(
        name=document.get("name", ""), platform=document.get("platform", ""),
        backend=document.get("backend", ""), max_batch_size=document.get("max_batch_size", 0),
        input=[pb.ModelInput(name=t["name"], data_type=t["data_type"], dims=t["dims"])
               for t in document.get("input", [])],
        output=[pb.ModelOutput(name=t["name"], data_type=t["data_type"], dims=t["dims"])
                for t in document.get("output", [])])
    batching = document.get("dynamic_batching")
    if batching is not None:
        config.dynamic_batching.CopyFrom(pb.ModelDynamicBatching(**batching))
    return pb.ModelConfigResponse(config=config)
