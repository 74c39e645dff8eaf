"""Request and response types of the SDK, wire-compatible with ``eas-prediction``.

Each request serializes itself with ``to_string()`` (bytes) and turns the
server's answer into its response type with ``parse_response(data)``; the
client only moves bytes. Beyond the reference SDK:

* numpy in: ``TFRequest.add_feed(name, array)`` / ``TorchRequest.add_feed(index,
  array)`` / ``CaffeRequest.add_feed(name, array)`` take the shape and dtype from
  the array, and the 4-argument form accepts a numpy array as ``values``;
* numpy out: ``get_array(name)`` (shaped, of the tensor's dtype) and
  ``to_numpy()`` (every output);
* ``get_values`` returns a plain list of the flat values and raises ``KeyError``
  naming the outputs there are for an output the response does not have;
* ``add_feed``, ``add_fetch``, ``add_input`` and ``add_output`` return the request,
  so that calls chain: ``InferRequest().add_input("images", x).add_output("scores")``.
"""
from __future__ import annotations

import json
import math

import numpy as np

from ..codec import oip as _oip
from ..codec import tensors as _t
from ..codec.tensors import DTYPE_BY_ENUM, decode_array, decode_caffe, encode_array, encode_caffe
from ..protos import caffe_predict_pb2 as _caffe_pb
from ..protos import pytorch_predict_pb2 as _torch_pb
from ..protos import tf_predict_pb2 as _tf_pb

__all__ = [
    "Request", "Response", "StringRequest", "StringResponse", "TFRequest", "TFResponse",
    "TorchRequest", "TorchResponse", "CaffeRequest", "CaffeResponse", "InferRequest",
    "InferResponse",
]

DEFAULT_CONTENT_TYPE = "application/octet-stream"


class Request:
    """Base of the request types: ``to_string()`` -> body bytes, ``parse_response(bytes)``."""

    content_type: str | None = None  # None: the client's (application/octet-stream by default)

    def to_string(self) -> bytes:
        raise NotImplementedError

    def parse_response(self, response_data: bytes):
        raise NotImplementedError


class Response:
    pass


class _ProtoResponse(Response):
    """A response body parsed as `message_type`; `get_values` flattens `get_array`."""

    message_type = None

    def __init__(self, response_data: bytes | None = None):
        self.response = self.message_type()
        if response_data:
            self.response.ParseFromString(bytes(response_data))

    def __str__(self) -> str:
        return str(self.response)

    to_string = __str__

    def get_values(self, output) -> list:
        return _flat_list(self.get_array(output))


# --- raw bytes / strings ------------------------------------------------------------------
class StringRequest(Request):
    """A raw body (str is sent UTF-8 encoded): for JSON and custom processors."""

    def __init__(self, request_data: str | bytes | None = None, content_type: str | None = None):
        self.request_data = "" if request_data is None else request_data
        self.content_type = content_type

    def __str__(self) -> str:
        data = self.request_data
        return data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")

    def to_string(self) -> bytes:
        data = self.request_data
        return data.encode("utf-8") if isinstance(data, str) else bytes(data)

    def parse_response(self, response_data: bytes) -> "StringResponse":
        return StringResponse(response_data)


class StringResponse(Response):
    """The raw answer: ``response_data`` (bytes), ``to_string()`` (text), ``json()``."""

    def __init__(self, response_data: bytes | None = None):
        self.response_data = b"" if response_data is None else response_data

    def __str__(self) -> str:
        return self.to_string()

    def to_string(self) -> str:
        data = self.response_data
        return data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")

    def json(self):
        return json.loads(self.response_data)


# --- helpers shared by the tensor requests -------------------------------------------------
def _fill(proto, name, shape, dtype, values) -> None:
    """Fill a TF/PyTorch ArrayProto from either an array (shape is the array, dtype and
    values None) or the reference form (shape, ArrayDataType enum, flat values)."""
    if dtype is None and values is None:
        arr = np.asarray(shape)
        if arr.dtype.kind == "U" or arr.dtype.kind == "S":
            arr = arr.astype(object)
        encode_array(arr, proto, name)
        return
    if dtype is None or values is None:
        raise TypeError("add_feed takes (name, array) or (name, shape, dtype, values)")
    enum = int(dtype)
    np_dtype = DTYPE_BY_ENUM.get(enum)
    if np_dtype is None:
        raise ValueError(f"input {name!r}: dtype {_t.dtype_name(enum)} is not supported")
    shape = [int(d) for d in shape]
    if enum == _t.DT_STRING:
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
    else:
        arr = np.asarray(values, dtype=np_dtype)
    count = math.prod(shape)
    if arr.size != count:
        raise ValueError(f"input {name!r}: shape {shape} needs {count} values, got {arr.size}")
    encode_array(arr.reshape(shape), proto, name)
    proto.dtype = enum  # keeps the quantized enums (DT_QINT8 ...) the caller asked for


def _flat_list(arr: np.ndarray) -> list:
    return arr.ravel().tolist()


def _missing(kind: str, key, have) -> KeyError:
    return KeyError(f"the response has no {kind} {key!r}; it has {sorted(have) if have else 'none'}")


class _TensorDtypes:
    DT_FLOAT = _t.DT_FLOAT
    DT_DOUBLE = _t.DT_DOUBLE
    DT_INT8 = _t.DT_INT8
    DT_INT16 = _t.DT_INT16
    DT_INT32 = _t.DT_INT32
    DT_INT64 = _t.DT_INT64
    DT_UINT8 = _t.DT_UINT8
    DT_UINT16 = _t.DT_UINT16
    DT_QINT8 = _t.DT_QINT8
    DT_QUINT8 = _t.DT_QUINT8
    DT_QINT16 = _t.DT_QINT16
    DT_QUINT16 = _t.DT_QUINT16
    DT_QINT32 = _t.DT_QINT32
    DT_STRING = _t.DT_STRING
    DT_BOOL = _t.DT_BOOL
    DT_HALF = _t.DT_HALF
    DT_COMPLEX64 = _t.DT_COMPLEX64
    DT_COMPLEX128 = _t.DT_COMPLEX128


# --- TensorFlow ---------------------------------------------------------------------------
class TFRequest(_TensorDtypes, Request):
    """EAS TensorFlow request: named inputs, optional ``signature_name`` and fetches."""

    def __init__(self, signature_name: str | None = None):
        self.request_data = _tf_pb.PredictRequest()
        self.signature_name = signature_name

    def __str__(self) -> str:
        return str(self.request_data)

    def set_signature_name(self, signature_name: str) -> None:
        self.signature_name = signature_name

    def add_feed(self, input_name: str, shape, content_type=None, content=None):
        """``add_feed(name, [1, 784], TFRequest.DT_FLOAT, flat_values)`` as in eas-prediction
        (values: a list or a numpy array), or ``add_feed(name, ndarray)``."""
        _fill(self.request_data.inputs[input_name], input_name, shape, content_type, content)
        return self

    def add_fetch(self, output_name: str):
        self.request_data.output_filter.append(output_name)
        return self

    def to_string(self) -> bytes:
        if self.signature_name:
            self.request_data.signature_name = self.signature_name
        return self.request_data.SerializeToString()

    def parse_response(self, response_data: bytes) -> "TFResponse":
        return TFResponse(response_data)


class TFResponse(_ProtoResponse):
    message_type = _tf_pb.PredictResponse

    def _output(self, name: str):
        outputs = self.response.outputs
        if name not in outputs:
            raise _missing("output", name, list(outputs.keys()))
        return outputs[name]

    def keys(self) -> list[str]:
        return list(self.response.outputs.keys())

    def get_tensor_shape(self, output_name: str) -> list[int]:
        return list(self._output(output_name).array_shape.dim)

    def get_array(self, output_name: str) -> np.ndarray:
        return decode_array(self._output(output_name), output_name)

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {name: decode_array(proto, name) for name, proto in self.response.outputs.items()}


# --- PyTorch ------------------------------------------------------------------------------
class TorchRequest(_TensorDtypes, Request):
    """EAS PyTorch request: positional inputs (``add_feed(index, ...)``) or named ones
    (``add_feed_map(name, ...)``); ``flag=True`` snappy-compresses the body."""

    def __init__(self, flag: bool = False):
        self.request_data = _torch_pb.PredictRequest()
        self.flag = flag

    def __str__(self) -> str:
        return str(self.request_data)

    def set_debug_level(self, dbg_lvl: int = 0) -> None:
        self.request_data.debug_level = dbg_lvl

    def add_feed(self, index: int, shape, content_type=None, content=None):
        inputs = self.request_data.inputs
        while len(inputs) < index + 1:
            inputs.add()
        _fill(inputs[index], f"#{index}", shape, content_type, content)
        return self

    def add_feed_map(self, name: str, shape, content_type=None, content=None):
        _fill(self.request_data.map_inputs[name], name, shape, content_type, content)
        return self

    def add_fetch(self, output_index: int):
        self.request_data.output_filter.append(int(output_index))
        return self

    def to_string(self) -> bytes:
        data = self.request_data.SerializeToString()
        if self.flag:
            import cramjam
            data = bytes(cramjam.snappy.compress_raw(data))
        return data

    def parse_response(self, response_data: bytes) -> "TorchResponse":
        return TorchResponse(response_data)


class TorchResponse(_ProtoResponse):
    """Positional outputs (``get_values(0)``) or, for ``add_feed_map`` requests, named ones
    (``get_values_map(name)``; ``get_array``/``get_values`` accept a name too)."""

    message_type = _torch_pb.PredictResponse

    def _output(self, key):
        if isinstance(key, str):
            outputs = self.response.map_outputs
            if key not in outputs:
                raise _missing("named output", key, list(outputs.keys()))
            return outputs[key]
        outputs = self.response.outputs
        if not 0 <= key < len(outputs):
            raise _missing("output index", key, list(range(len(outputs))))
        return outputs[key]

    def get_tensor_shape(self, output_index) -> list[int]:
        return list(self._output(output_index).array_shape.dim)

    def get_tensor_shape_map(self, output_name: str) -> list[int]:
        return self.get_tensor_shape(str(output_name))

    def get_values_map(self, output_name: str) -> list:
        return self.get_values(str(output_name))

    def get_array(self, output) -> np.ndarray:
        return decode_array(self._output(output), str(output))

    def to_numpy(self):
        """A list of arrays (positional outputs) or a dict (named outputs)."""
        if self.response.map_outputs:
            return {k: decode_array(v, k) for k, v in self.response.map_outputs.items()}
        return [decode_array(v, str(i)) for i, v in enumerate(self.response.outputs)]


# --- Caffe --------------------------------------------------------------------------------
class CaffeRequest(Request):
    """EAS Caffe request: named float32 inputs."""

    DT_FLOAT = _t.DT_FLOAT

    def __init__(self):
        self.request_data = _caffe_pb.PredictRequest()

    def __str__(self) -> str:
        return str(self.request_data)

    def add_feed(self, input_name: str, shape, *rest):
        """``add_feed(name, shape, values)``, ``add_feed(name, shape, DT_FLOAT, values)``
        or ``add_feed(name, ndarray)``; values are sent as float32."""
        if not rest:
            arr = np.asarray(shape, dtype=np.float32)
        else:
            if len(rest) == 2:
                if int(rest[0]) != _t.DT_FLOAT:
                    raise ValueError(f"input {input_name!r}: the Caffe format carries DT_FLOAT only")
                values = rest[1]
            elif len(rest) == 1:
                values = rest[0]
            else:
                raise TypeError("add_feed takes (name, array), (name, shape, values) or "
                                "(name, shape, dtype, values)")
            shape = [int(d) for d in shape]
            arr = np.asarray(values, dtype=np.float32)
            if arr.size != math.prod(shape):
                raise ValueError(f"input {input_name!r}: shape {shape} needs "
                                 f"{math.prod(shape)} values, got {arr.size}")
            arr = arr.reshape(shape)
        self.request_data.input_name.append(input_name)
        encode_caffe(arr, self.request_data.input_data.add(), input_name)
        return self

    def add_fetch(self, output_name: str):
        self.request_data.output_filter.append(output_name)
        return self

    def to_string(self) -> bytes:
        return self.request_data.SerializeToString()

    def parse_response(self, response_data: bytes) -> "CaffeResponse":
        return CaffeResponse(response_data)


class CaffeResponse(_ProtoResponse):
    message_type = _caffe_pb.PredictResponse

    def _output(self, name: str):
        names = list(self.response.output_name)
        try:
            return self.response.output_data[names.index(name)]
        except (ValueError, IndexError):
            raise _missing("output", name, names) from None

    def keys(self) -> list[str]:
        return list(self.response.output_name)

    def get_tensor_shape(self, output_name: str) -> list[int]:
        return list(self._output(output_name).shape.dim)

    def get_array(self, output_name: str) -> np.ndarray:
        return decode_caffe(self._output(output_name), output_name)

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {name: decode_caffe(data, name)
                for name, data in zip(self.response.output_name, self.response.output_data)}


# --- Open Inference Protocol (KServe v2) ------------------------------------------------------
class InferRequest(Request):
    """A v2 infer request: named numpy inputs, sent in binary (the binary tensor
    extension), answered in binary. The client sends it to
    /api/predict/<service>/v2/models/<service>[/versions/<v>]/infer, through the
    gateway or straight to an instance."""

    content_type = "application/octet-stream"

    def __init__(self, model_version: str = "", request_id: str = ""):
        self.model_version = model_version
        self.request_id = request_id
        self.inputs: list[tuple[str, np.ndarray]] = []
        self.outputs: list[str] = []
        self._header_length = 0

    def add_input(self, name: str, values, shape=None, datatype: str | None = None):
        """A tensor from an array (its dtype, or the v2 `datatype`: FP32, INT64, BYTES...)."""
        dtype = _oip.dtype_of(datatype, f"input {name!r}") if datatype else None
        array = np.asarray(values, dtype=dtype)
        if shape is not None:
            array = array.reshape(shape)
        _oip.datatype_name(array.dtype)  # a dtype the protocol has
        self.inputs.append((name, array))
        return self

    def add_output(self, name: str):
        """Fetch only the outputs named (all when none is)."""
        self.outputs.append(name)
        return self

    def subpath(self, service: str) -> str:
        version = f"/versions/{self.model_version}" if self.model_version else ""
        return f"/v2/models/{service}{version}/infer"

    def to_string(self) -> bytes:
        raw = [_oip.to_raw(array) for _, array in self.inputs]
        header = {"inputs": [{"name": name, "datatype": _oip.datatype_name(array.dtype),
                              "shape": list(array.shape),
                              "parameters": {"binary_data_size": len(data)}}
                             for (name, array), data in zip(self.inputs, raw)]}
        if self.request_id:
            header["id"] = self.request_id
        if self.outputs:
            header["outputs"] = [{"name": n, "parameters": {"binary_data": True}}
                                 for n in self.outputs]
        else:
            header["parameters"] = {"binary_data_output": True}
        head = json.dumps(header).encode()
        self._header_length = len(head)
        return b"".join([head, *raw])

    def extra_headers(self) -> dict:
        return {"Inference-Header-Content-Length": str(self._header_length)}

    def parse_response(self, response_data: bytes) -> "InferResponse":
        return InferResponse(response_data)


class InferResponse(Response):
    """A v2 infer answer: `get_array(name)`, `to_numpy()`, `model_name`, `model_version`."""

    def __init__(self, response_data: bytes):
        # The JSON header's size travels in a response header the client does not keep:
        # the JSON is read as the body's prefix (binary data decoded losslessly).
        text = bytes(response_data).decode("utf-8", "surrogateescape")
        document, end = json.JSONDecoder().raw_decode(text)
        at = len(text[:end].encode("utf-8", "surrogateescape"))
        self.model_name = document.get("model_name", "")
        self.model_version = document.get("model_version", "")
        self.id = document.get("id", "")
        self.outputs: dict[str, np.ndarray] = {}
        for tensor in document.get("outputs", []):
            name, shape = tensor["name"], tuple(tensor["shape"])
            dtype = _oip.dtype_of(tensor["datatype"], f"output {name!r}")
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is None:
                self.outputs[name] = _oip.from_json(tensor["data"], dtype, shape,
                                                    f"output {name!r}")
            else:
                self.outputs[name] = _oip.from_raw(response_data[at:at + size], dtype, shape,
                                                   f"output {name!r}", "binary data")
                at += size

    def keys(self) -> list[str]:
        return list(self.outputs)

    def get_array(self, output_name: str) -> np.ndarray:
        try:
            return self.outputs[output_name]
        except KeyError:
            raise _missing("output", output_name, self.outputs) from None

    def get_tensor_shape(self, output_name: str) -> list[int]:
        return list(self.get_array(output_name).shape)

    def get_values(self, output_name: str) -> list:
        return _flat_list(self.get_array(output_name))

    def to_numpy(self) -> dict[str, np.ndarray]:
        return dict(self.outputs)
