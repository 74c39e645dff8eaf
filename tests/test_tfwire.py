"""The compiled TF wire path (csrc/worker/tfwire.pyx) against the protobuf library's own reading.

Whatever the fast path accepts it must read exactly as protobuf does; whatever
it cannot read exactly it must hand back (None) to the full path.
"""
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from wire_mutations import DIMS, field, mixed, tag, varint

from gateway._native.tfwire import decode_request, encode_response
from gateway.codec.tensors import decode_array, encode_array
from gateway.protos import tf_predict_pb2 as pb

FLOATS = st.sampled_from([np.float32, np.float64])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
NAMES = st.text(min_size=0, max_size=12)


def bits(a):
    return a.dtype, a.shape, a.tobytes()  # C order whatever the layout


@settings(max_examples=150, deadline=None)
@given(data=st.data(), signature=NAMES, output_filter=st.lists(NAMES, max_size=3))
def test_requests_read_exactly_as_protobuf_reads_them(data, signature, output_filter):
    names = data.draw(st.lists(NAMES, max_size=4, unique=True))
    request = pb.PredictRequest(signature_name=signature, output_filter=output_filter)
    for name in names:
        arr = data.draw(hnp.arrays(data.draw(FLOATS), SHAPES))
        encode_array(arr, request.inputs[name])
    body = request.SerializeToString()
    if not body:
        assert decode_request(body) is None  # the full path words "empty body"
        return
    got_signature, inputs, got_filter = decode_request(body)
    parsed = pb.PredictRequest.FromString(body)
    assert got_signature == parsed.signature_name
    assert got_filter == tuple(parsed.output_filter)
    assert sorted(inputs) == sorted(parsed.inputs)
    for name, proto in parsed.inputs.items():
        assert bits(inputs[name]) == bits(decode_array(proto, name))
        assert inputs[name].flags.writeable  # a copy, not a view into the body


def tensor(dtype=pb.DT_FLOAT, dims=(2,), **values):
    return pb.ArrayProto(dtype=dtype, array_shape=pb.ArrayShape(dim=list(dims)), **values)


def one_input(proto) -> bytes:
    request = pb.PredictRequest()
    request.inputs["x"].CopyFrom(proto)
    return request.SerializeToString()


def test_what_it_cannot_read_exactly_goes_to_the_full_path():
    fine = one_input(tensor(float_val=[1.0, 2.0]))
    assert decode_request(fine)[1]["x"].tolist() == [1.0, 2.0]
    handed_back = {
        "int32 values": one_input(tensor(pb.DT_INT32, int_val=[1, 2])),
        "strings": one_input(tensor(pb.DT_STRING, string_val=[b"a", b"b"])),
        "no dtype": one_input(tensor(pb.DT_INVALID, float_val=[1.0, 2.0])),
        "float dtype, double values": one_input(tensor(double_val=[1.0, 2.0])),
        "count does not match the shape": one_input(tensor(float_val=[1.0, 2.0, 3.0])),
        "negative dimension": one_input(tensor(dims=(-1,), float_val=[1.0])),
        # Two chunks of the same packed field concatenate in protobuf.
        "values in two chunks": _two_chunks(),
        "invalid UTF-8 name": b"\x12\x05\x0a\x01\xff\x12\x00",
        "truncated": fine[:-3],
        "map entry without a value": b"\x12\x03\x0a\x01x",
        "empty body": b"",
    }
    for what, body in handed_back.items():
        assert decode_request(body) is None, what


def _two_chunks() -> bytes:
    # ArrayProto{dtype: DT_FLOAT, shape [2], float_val [1.0] twice}: protobuf reads [1.0, 1.0]
    array = b"\x08\x01\x12\x03\x0a\x01\x02" + b"\x1a\x04\x00\x00\x80\x3f" * 2
    entry = b"\x0a\x01y" + b"\x12" + bytes([len(array)]) + array
    parsed = pb.PredictRequest.FromString(b"\x12" + bytes([len(entry)]) + entry)
    assert list(parsed.inputs["y"].float_val) == [1.0, 1.0]
    return b"\x12" + bytes([len(entry)]) + entry


def test_unknown_fields_are_skipped_as_protobuf_skips_them():
    body = one_input(tensor(float_val=[1.0, 2.0])) + b"\x48\x05" + b"\x52\x02hi"  # fields 9, 10
    assert pb.PredictRequest.FromString(body).inputs["x"].float_val == [1.0, 2.0]
    assert decode_request(body)[1]["x"].tolist() == [1.0, 2.0]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_responses_are_what_protobuf_would_send(data):
    names = tuple(data.draw(st.lists(NAMES, max_size=4, unique=True)))
    arrays = [data.draw(hnp.arrays(data.draw(FLOATS), SHAPES)) for _ in names]
    if arrays and data.draw(st.booleans()):
        arrays[0] = np.asfortranarray(arrays[0]).T  # a non-contiguous view
    body = encode_response(names, arrays)
    expected = pb.PredictResponse()
    for name, arr in zip(names, arrays):
        encode_array(arr, expected.outputs[name])
    got = pb.PredictResponse.FromString(body)
    assert got == expected
    for name, arr in zip(names, arrays):
        assert bits(decode_array(got.outputs[name])) == bits(arr)


def test_other_output_dtypes_go_to_the_full_path():
    assert encode_response(("a", "b"), [np.zeros(2, np.float32), np.zeros(2, np.int64)]) is None


@st.composite
def hostile_requests(draw) -> bytes:
    """PredictRequest wire bytes of one float or double input (edge dimensions, values of
    the size its shape needs or another) with hostile fields at every level."""
    dims = draw(st.lists(DIMS, max_size=3))
    double = draw(st.booleans())
    count = 1
    for d in dims:
        count *= d
    size = count * (8 if double else 4) if 0 <= count < 64 else draw(st.integers(0, 64))
    shape = mixed(draw, [field(1, b"".join(varint(d) for d in dims))], 1)
    array = mixed(draw, [tag(1, 0) + varint(pb.DT_DOUBLE if double else pb.DT_FLOAT),
                         field(2, shape), field(4 if double else 3, bytes(size))])
    entry = mixed(draw, [field(1, b"x"), field(2, array)], 1)
    return mixed(draw, [field(1, b"sig"), field(2, entry)])


@settings(max_examples=400, deadline=None)
@given(hostile_requests())
def test_hostile_requests_are_refused_as_protobuf_refuses_them(body):
    """What protobuf refuses (a field number past 32 bits, 0, an 11-byte varint, a length
    past the message) decode_request refuses; what it takes it reads as protobuf does."""
    fast = decode_request(body)
    try:
        parsed = pb.PredictRequest.FromString(body)
    except DecodeError:
        assert fast is None
        return
    if fast is None:
        return
    signature, inputs, output_filter = fast
    assert signature == parsed.signature_name and output_filter == tuple(parsed.output_filter)
    assert sorted(inputs) == sorted(parsed.inputs)
    for name, proto in parsed.inputs.items():
        assert bits(inputs[name]) == bits(decode_array(proto, name))


@pytest.mark.parametrize("overlong", ["928080808000", "92808080808080808000", "9280808010"])
def test_overlong_tags_go_to_protobuf_which_refuses_them(overlong):
    """A tag of 6 or 10 bytes (protobuf takes 5 at most) or one past 32 bits is not read
    by the compiled reader (found by fuzz_eas_tf): it leaves the body to protobuf."""
    request = pb.PredictRequest(signature_name="s")
    encode_array(np.zeros((1, 784), np.float32), request.inputs["images"])
    body = request.SerializeToString()
    at = body.index(b"\x12")  # field 2 (inputs), length-delimited
    spoiled = body[:at] + bytes.fromhex(overlong) + body[at + 1:]
    assert decode_request(spoiled) is None
    with pytest.raises(DecodeError):
        pb.PredictRequest.FromString(spoiled)
