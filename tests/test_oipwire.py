"""The compiled binary form of the Open Inference Protocol (csrc/worker/oipwire.pyx) against
the full Python codec (gateway/codec/oip.py): what the fast path takes it decodes exactly
as the codec does, what it answers parses as the protocol says, and what it does not take
it leaves to the codec (None), never misreads."""
import json

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import given, settings, strategies as st
from wire_mutations import DIMS, field, mixed, varint

from gateway._native.oipwire import Answer, Datatypes, decode_binary, decode_grpc, encode_binary
from gateway.codec import oip
from gateway.codec.tensors import CodecError
from gateway.protos import oip_pb2 as pb

TYPES = Datatypes(oip.DTYPES)
FIXED = [name for name, dtype in oip.DTYPES.items() if dtype.kind in "biuf"]

names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1,
                max_size=8)
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


def tensors():
    return st.tuples(names, st.sampled_from(FIXED), shapes).map(
        lambda t: (t[0], oip.DTYPES[t[1]], t[2]))


def array_of(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    return np.asarray(rng.random(shape) * 100).astype(dtype)


def body_of(inputs, outputs=None, binary_output=True, request_id=None):
    header = {"inputs": [{"name": n, "datatype": oip.DATATYPES[a.dtype], "shape": list(a.shape),
                          "parameters": {"binary_data_size": a.nbytes}} for n, a in inputs]}
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    if binary_output:
        header["parameters"] = {"binary_data_output": True}
    if request_id is not None:
        header["id"] = request_id
    head = json.dumps(header).encode()
    return head + b"".join(a.tobytes() for _, a in inputs), len(head)


@settings(max_examples=150, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3, unique_by=lambda t: t[0]),
       st.integers(0, 2 ** 31), st.one_of(st.none(), names))
def test_fast_decode_equals_the_codec(specs, seed, request_id):
    inputs = [(n, array_of(d, s, seed)) for n, d, s in specs]
    body, length = body_of(inputs, request_id=request_id)
    feeds, wanted, rid = decode_binary(body, length, TYPES)
    slow = oip.parse_http_infer(body, str(length))
    assert wanted == () and rid == request_id == slow.id
    assert list(feeds) == list(slow.feeds)
    for name, array in inputs:
        assert feeds[name].dtype == array.dtype and feeds[name].shape == array.shape
        np.testing.assert_array_equal(feeds[name], array)
        np.testing.assert_array_equal(slow.feeds[name], array)


@settings(max_examples=150, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=2, unique_by=lambda t: t[0]),
       st.integers(0, 2 ** 31), st.integers(1, 40), st.binary(min_size=1, max_size=3))
def test_what_the_fast_path_refuses_it_leaves_to_the_codec(specs, seed, cut, junk):
    """Cut, padded or mislabelled bodies: the fast path says None (the codec words the
    400), or decodes exactly what the codec decodes."""
    inputs = [(n, array_of(d, s, seed)) for n, d, s in specs]
    body, length = body_of(inputs)
    for mutated, mutated_length in ((body[:-cut] if cut < len(body) else b"", length),
                                    (body + junk, length), (body, length - 1),
                                    (body, length + cut)):
        fast = decode_binary(mutated, mutated_length, TYPES)
        try:
            slow = oip.parse_http_infer(mutated, str(mutated_length))
        except CodecError:
            assert fast is None
            continue
        if fast is not None:
            assert list(fast[0]) == list(slow.feeds)
            for name in slow.feeds:
                np.testing.assert_array_equal(fast[0][name], slow.feeds[name])


def test_forms_the_fast_path_leaves_to_the_codec():
    images = np.zeros((1, 4), np.float32)
    cases = [
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                "data": [0, 0, 0, 0]}]}).encode(),  # JSON data
        body_of([("x", images)], binary_output=False)[0],            # JSON answers wanted
    ]
    for body in cases:
        assert decode_binary(body, len(body), TYPES) is None
    text, length = body_of([("x", images)])
    assert decode_binary(text.replace(b'"FP32"', b'"BYTES"'), length, TYPES) is None


@settings(max_examples=150, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3, unique_by=lambda t: t[0]),
       st.integers(0, 2 ** 31), st.one_of(st.none(), names))
def test_fast_answer_parses_as_the_protocol_says(specs, seed, request_id):
    outputs = [(n, array_of(d, s, seed)) for n, d, s in specs]
    answer = Answer("model \"x\"", "v1", [n for n, _ in outputs], TYPES)
    body, length = encode_binary(answer, tuple(n for n, _ in outputs),
                                 [a for _, a in outputs], request_id)
    header = json.loads(body[:length])
    assert header["model_name"] == 'model "x"' and header["model_version"] == "v1"
    assert header.get("id") == request_id
    at = length
    for tensor, (name, array) in zip(header["outputs"], outputs):
        assert tensor["name"] == name and tensor["shape"] == list(array.shape)
        size = tensor["parameters"]["binary_data_size"]
        got = oip.from_raw(body[at:at + size], oip.DTYPES[tensor["datatype"]],
                           tuple(tensor["shape"]), name, "binary data")
        np.testing.assert_array_equal(got, array)
        at += size
    assert at == len(body)


def test_answers_it_cannot_write_are_left_to_the_codec():
    answer = Answer("m", "m", ["text"], TYPES)
    assert encode_binary(answer, ("text",), [np.array(["a"], dtype=object)], None) is None
    assert encode_binary(answer, ("other",), [np.zeros(2, np.float32)], None) is None
    strided = np.zeros((4, 4), np.float32)[:, ::2]
    assert encode_binary(Answer("m", "m", ["x"], TYPES), ("x",), [strided], None) is None


# -- gRPC: hostile wire forms, held to protobuf's parser ---------------------------------------


@st.composite
def hostile_infer_requests(draw) -> bytes:
    """ModelInferRequest wire bytes of one input (edge dimensions, a raw payload of the
    size its shape needs or another) with hostile fields at both levels."""
    dims = draw(st.lists(DIMS, max_size=3))
    datatype = draw(st.sampled_from(["FP32", "INT8", "FP64"]))
    count = 1
    for d in dims:
        count *= d
    size = count * oip.DTYPES[datatype].itemsize if 0 <= count < 64 else draw(st.integers(0, 64))
    shape = b"".join(varint(d) for d in dims)
    tensor = mixed(draw, [field(1, b"x"), field(2, datatype.encode()), field(3, shape)])
    return mixed(draw, [field(1, b"m"), field(5, tensor), field(7, bytes(size))])


@settings(max_examples=400, deadline=None)
@given(hostile_infer_requests())
def test_hostile_grpc_requests_are_refused_as_protobuf_refuses_them(message):
    """What protobuf refuses (a field number past 32 bits, 0, an 11-byte varint, a length
    past the message) decode_grpc refuses; what it takes it reads as protobuf and the
    codec do; no input raises."""
    fast = decode_grpc(message, TYPES)
    try:
        parsed = pb.ModelInferRequest.FromString(message)
    except DecodeError:
        assert fast is None
        return
    if fast is None:
        return
    model, version, request_id, feeds, wanted = fast
    assert (model, version, request_id) == (parsed.model_name, parsed.model_version, parsed.id)
    slow = oip.feeds_from_grpc(parsed)  # the codec takes it too, without a CodecError
    assert list(feeds) == list(slow) and wanted == tuple(o.name for o in parsed.outputs)
    for name, array in slow.items():
        assert feeds[name].dtype == array.dtype and feeds[name].shape == array.shape
        np.testing.assert_array_equal(feeds[name], array)


def test_known_overflows_go_to_the_full_path():
    """Each overflow the compiled reader had: a field number past 32 bits truncated to 7
    (raw_input_contents), shapes whose product wraps around 2^64 to the payload's size, and
    a zero beside dimensions numpy cannot multiply (a ValueError, a 500)."""
    def message(shape, field_number=7, size=0):
        request = pb.ModelInferRequest(model_name="m")
        request.inputs.add(name="x", datatype="FP32", shape=shape)
        return request.SerializeToString() + field(field_number, bytes(size))

    assert decode_grpc(message([1], size=4), TYPES) is not None
    assert decode_grpc(message([1], (1 << 32) + 7, 4), TYPES) is None
    for shape in ([1 << 32, 1 << 32], [1 << 61, 8], [0, (1 << 62) - 1], [0, 1 << 40, 1 << 40]):
        assert decode_grpc(message(shape), TYPES) is None, shape
        header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape,
                                         "parameters": {"binary_data_size": 0}}],
                             "parameters": {"binary_data_output": True}}).encode()
        assert decode_binary(header, len(header), TYPES) is None, shape
    assert decode_binary(b"{}", 1 << 64, TYPES) is None  # a header length past 2^63
