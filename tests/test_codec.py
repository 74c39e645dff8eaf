"""ArrayProto <-> numpy codec (gateway.codec.tensors)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.codec import tensors as T
from gateway.codec.tensors import (DTYPE_BY_ENUM, ENUM_BY_DTYPE, CodecError, decode_array,
                                   decode_caffe, encode_array, encode_caffe)
from gateway.protos import caffe_predict_pb2 as caffe_pb
from gateway.protos import pytorch_predict_pb2 as torch_pb
from gateway.protos import tf_predict_pb2 as tf_pb

PROTOS = [pytest.param(tf_pb.ArrayProto, id="tf"), pytest.param(torch_pb.ArrayProto, id="torch")]

NUMERIC = [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8,
           np.uint16, np.complex64, np.complex128, np.bool_]


def wire_roundtrip(proto):
    """Serialize and parse again, as the network would."""
    again = type(proto)()
    again.ParseFromString(proto.SerializeToString())
    return again


def assert_same(a: np.ndarray, b: np.ndarray):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.dtype == object:
        assert a.tolist() == b.tolist()
    else:  # bit-exact: NaN payloads, -0.0, everything
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def roundtrip(arr, cls=tf_pb.ArrayProto, name="x"):
    proto = cls()
    encode_array(arr, proto)
    return decode_array(wire_roundtrip(proto), name)


# --- dtype tables -------------------------------------------------------------------------

def test_dtype_tables():
    assert DTYPE_BY_ENUM[tf_pb.DT_FLOAT] == np.float32
    assert DTYPE_BY_ENUM[tf_pb.DT_HALF] == np.float16
    assert DTYPE_BY_ENUM[tf_pb.DT_STRING] == np.dtype(object)
    assert DTYPE_BY_ENUM[tf_pb.DT_QINT8] == np.int8
    assert DTYPE_BY_ENUM[tf_pb.DT_QUINT8] == np.uint8
    assert DTYPE_BY_ENUM[tf_pb.DT_QINT16] == np.int16
    assert DTYPE_BY_ENUM[tf_pb.DT_QUINT16] == np.uint16
    assert DTYPE_BY_ENUM[tf_pb.DT_QINT32] == np.int32
    for bad in (tf_pb.DT_INVALID, tf_pb.DT_BFLOAT16, tf_pb.DT_RESOURCE, tf_pb.DT_VARIANT):
        assert bad not in DTYPE_BY_ENUM
    for dtype, enum in ENUM_BY_DTYPE.items():
        assert DTYPE_BY_ENUM[enum] == dtype
        assert "Q" not in tf_pb.ArrayDataType.Name(enum)  # never a quantized type
    assert ENUM_BY_DTYPE[np.dtype(np.float16)] == tf_pb.DT_HALF
    assert ENUM_BY_DTYPE[np.dtype(np.int8)] == tf_pb.DT_INT8
    assert ENUM_BY_DTYPE[np.dtype(np.uint8)] == tf_pb.DT_UINT8
    # the codec's enum values are the protos' enum values
    for enum, name in T.ENUM_NAMES.items():
        assert tf_pb.ArrayDataType.Value(name) == enum
        assert torch_pb.ArrayDataType.Value(name) == enum


# --- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("cls", PROTOS)
@pytest.mark.parametrize("dtype", [d for d in NUMERIC if d is not np.bool_])
@pytest.mark.parametrize("shape", [(), (1,), (3,), (2, 3), (2, 1, 4), (0,), (3, 0, 2)])
def test_roundtrip_numeric(cls, dtype, shape):
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        arr = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    elif np.issubdtype(dtype, np.complexfloating):
        arr = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    else:
        arr = rng.standard_normal(shape).astype(dtype)
    out = roundtrip(arr, cls)
    assert_same(out, arr)
    assert out.flags.writeable


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_roundtrip_bool(shape):
    arr = np.random.default_rng(3).random(shape) > 0.5
    proto = tf_pb.ArrayProto()
    encode_array(arr, proto)
    assert proto.dtype == tf_pb.DT_BOOL
    assert_same(decode_array(wire_roundtrip(proto), "flags"), arr)


@pytest.mark.parametrize("cls", PROTOS)
def test_roundtrip_strings(cls):
    values = [b"", b"\x00", b"a\x00b\x00", b"\xff\xfe binary", "héllo".encode(), b"x" * 1000]
    arr = np.empty(6, dtype=object)
    arr[:] = values
    for shape in [(6,), (2, 3), (3, 1, 2)]:
        a = arr.reshape(shape)
        proto = cls()
        encode_array(a, proto)
        assert proto.dtype == tf_pb.DT_STRING
        assert list(proto.string_val) == values
        assert_same(decode_array(wire_roundtrip(proto), "s"), a)
    scalar = np.empty((), dtype=object)
    scalar[()] = b"\x00only"
    assert_same(roundtrip(scalar, cls), scalar)


def test_encode_text_arrays_as_utf8():
    proto = tf_pb.ArrayProto()
    encode_array(np.array(["héllo", "", "b"]), proto)
    assert list(proto.string_val) == ["héllo".encode(), b"", b"b"]
    proto = tf_pb.ArrayProto()
    encode_array(np.array([b"ab", b"c"]), proto)  # numpy bytes_ ('S')
    assert list(proto.string_val) == [b"ab", b"c"]
    mixed = np.array(["é", b"\x00", bytearray(b"z")], dtype=object)
    proto = tf_pb.ArrayProto()
    encode_array(mixed, proto)
    assert list(proto.string_val) == ["é".encode(), b"\x00", b"z"]
    assert decode_array(proto, "s").tolist() == ["é".encode(), b"\x00", b"z"]


def test_scalar_has_one_value_and_no_dims():
    proto = tf_pb.ArrayProto()
    encode_array(np.float32(2.5), proto)
    assert list(proto.array_shape.dim) == [] and list(proto.float_val) == [2.5]
    out = decode_array(proto, "x")
    assert out.shape == () and out.dtype == np.float32 and out == 2.5
    bare = tf_pb.ArrayProto(dtype=tf_pb.DT_INT64, int64_val=[-5])  # no array_shape at all
    assert decode_array(bare, "x").shape == ()


@pytest.mark.parametrize("cls", PROTOS)
def test_encode_non_contiguous_and_foreign_byte_order(cls):
    base = np.arange(48, dtype=np.float32).reshape(6, 8)
    for arr in (base.T, base[::2, 1::3], base[:, ::-1], np.asfortranarray(base)):
        assert_same(roundtrip(arr, cls), np.ascontiguousarray(arr))
    big = np.arange(6, dtype=">f8").reshape(2, 3)
    out = roundtrip(big, cls)
    assert out.dtype == np.float64 and out.dtype.isnative
    np.testing.assert_array_equal(out, big)
    ints = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(roundtrip(ints, cls), ints)


def test_encode_clears_the_message():
    proto = tf_pb.ArrayProto()
    encode_array(np.ones((2, 2), np.float32), proto)
    encode_array(np.arange(3, dtype=np.int64), proto)
    assert list(proto.float_val) == [] and list(proto.array_shape.dim) == [3]
    np.testing.assert_array_equal(decode_array(proto, "x"), [0, 1, 2])


def test_values_land_in_the_fields_of_the_spec():
    cases = {
        np.float32: ("float_val", tf_pb.DT_FLOAT),
        np.float64: ("double_val", tf_pb.DT_DOUBLE),
        np.int32: ("int_val", tf_pb.DT_INT32),
        np.int16: ("int_val", tf_pb.DT_INT16),
        np.int8: ("int_val", tf_pb.DT_INT8),
        np.uint8: ("int_val", tf_pb.DT_UINT8),
        np.uint16: ("int_val", tf_pb.DT_UINT16),
        np.int64: ("int64_val", tf_pb.DT_INT64),
        np.bool_: ("bool_val", tf_pb.DT_BOOL),
    }
    for dtype, (field, enum) in cases.items():
        arr = np.array([[1, 0, 1]], dtype=dtype)
        proto = tf_pb.ArrayProto()
        encode_array(arr, proto)
        assert proto.dtype == enum
        assert list(proto.array_shape.dim) == [1, 3]
        assert [f.name for f, _ in proto.ListFields()] == ["dtype", "array_shape", field]
        assert list(getattr(proto, field)) == [1, 0, 1]


def test_half_travels_as_bit_patterns_in_int_val():
    arr = np.array([1.5, -0.0, np.inf, 65504], dtype=np.float16)
    proto = tf_pb.ArrayProto()
    encode_array(arr, proto)
    assert proto.dtype == tf_pb.DT_HALF
    assert list(proto.int_val) == arr.view(np.uint16).tolist()
    # as TensorFlow clients send it
    sent = tf_pb.ArrayProto(dtype=tf_pb.DT_HALF, int_val=[0x3E00, 0xBC00])
    sent.array_shape.dim.append(2)
    out = decode_array(sent, "h")
    assert out.dtype == np.float16 and out.tolist() == [1.5, -1.0]


def test_complex_travels_as_interleaved_pairs():
    proto = tf_pb.ArrayProto()
    encode_array(np.array([1 + 2j, 3 - 4j], dtype=np.complex64), proto)
    assert proto.dtype == tf_pb.DT_COMPLEX64 and list(proto.float_val) == [1, 2, 3, -4]
    sent = torch_pb.ArrayProto(dtype=torch_pb.DT_COMPLEX128, double_val=[0.5, -1, 2, 0])
    sent.array_shape.dim.extend([1, 2])
    out = decode_array(sent, "c")
    assert out.dtype == np.complex128 and out.tolist() == [[0.5 - 1j, 2 + 0j]]


@pytest.mark.parametrize("enum,dtype,values", [
    (tf_pb.DT_QINT8, np.int8, [-128, 0, 127]),
    (tf_pb.DT_QUINT8, np.uint8, [0, 7, 255]),
    (tf_pb.DT_QINT16, np.int16, [-32768, 1, 32767]),
    (tf_pb.DT_QUINT16, np.uint16, [0, 1, 65535]),
    (tf_pb.DT_QINT32, np.int32, [-2**31, 0, 2**31 - 1]),
    (tf_pb.DT_UINT16, np.uint16, [0, 40000, 65535]),
])
def test_quantized_and_narrow_ints_decode(enum, dtype, values):
    proto = tf_pb.ArrayProto(dtype=enum, int_val=values)
    proto.array_shape.dim.append(3)
    out = decode_array(proto, "q")
    assert out.dtype == dtype and out.tolist() == values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), use_torch=st.booleans())
def test_property_any_supported_array_roundtrips(data, use_torch):
    dtype = data.draw(st.sampled_from(NUMERIC + [object]))
    if use_torch and dtype is np.bool_:
        dtype = np.int64
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    if dtype is object:
        arr = data.draw(hnp.arrays(dtype=object, shape=shape, elements=st.binary(max_size=12)))
    else:
        arr = data.draw(hnp.arrays(dtype=dtype, shape=shape))
    cls = torch_pb.ArrayProto if use_torch else tf_pb.ArrayProto
    assert_same(roundtrip(arr, cls), arr)


@settings(max_examples=50, deadline=None)
@given(arr=hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0)))
def test_property_caffe_roundtrips(arr):
    proto = caffe_pb.ArrayProto()
    encode_caffe(arr, proto)
    assert_same(decode_caffe(wire_roundtrip(proto), "data"), arr)


# --- errors -------------------------------------------------------------------------------

def make(cls=tf_pb.ArrayProto, dtype=tf_pb.DT_FLOAT, shape=(), **values):
    proto = cls(dtype=dtype, **values)
    proto.array_shape.dim.extend(shape)
    return proto


def raises(proto, *fragments, name="images"):
    with pytest.raises(CodecError) as info:
        decode_array(proto, name)
    msg = str(info.value)
    assert f"input '{name}'" in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@pytest.mark.parametrize("cls", PROTOS)
def test_value_count_must_match_shape(cls):
    msg = raises(make(cls, shape=[1, 784], float_val=[0.5] * 783))
    assert msg.startswith("input 'images': shape [1, 784] needs 784 values, got 783"), msg
    raises(make(cls, shape=[2, 2], float_val=[0.5] * 5), "needs 4 values, got 5")
    raises(make(cls, shape=[], float_val=[]), "shape [] needs 1 value, got 0")
    raises(make(cls, dtype=tf_pb.DT_INT64, shape=[3], int64_val=[1, 2]), "int64_val")
    raises(make(cls, dtype=tf_pb.DT_STRING, shape=[2], string_val=[b"a"]), "needs 2 values")
    raises(make(cls, dtype=tf_pb.DT_COMPLEX64, shape=[2], float_val=[1, 2, 3]),
           "needs 4 values", "real, imaginary")
    raises(make(cls, dtype=tf_pb.DT_DOUBLE, shape=[3], double_val=[1, 2]), "double_val")
    # values in the wrong field do not count
    raises(make(cls, dtype=tf_pb.DT_FLOAT, shape=[2], double_val=[1, 2]),
           "got 0 in float_val (DT_FLOAT)")


@pytest.mark.parametrize("cls", PROTOS)
def test_negative_dims(cls):
    raises(make(cls, shape=[-1, 784], float_val=[0.0] * 784), "[-1, 784]", "negative")


@pytest.mark.parametrize("enum,bad", [
    (tf_pb.DT_UINT8, 300), (tf_pb.DT_UINT8, -1), (tf_pb.DT_INT8, 128), (tf_pb.DT_INT8, -129),
    (tf_pb.DT_INT16, 40000), (tf_pb.DT_UINT16, -5), (tf_pb.DT_QUINT8, 256),
    (tf_pb.DT_QINT16, -40000), (tf_pb.DT_HALF, 70000), (tf_pb.DT_HALF, -1),
])
def test_values_out_of_range(enum, bad):
    name = tf_pb.ArrayDataType.Name(enum)
    raises(make(dtype=enum, shape=[3], int_val=[1, bad, 2]), str(bad), name, "out of range")


@pytest.mark.parametrize("cls", PROTOS)
@pytest.mark.parametrize("enum", ["DT_INVALID", "DT_BFLOAT16", "DT_RESOURCE", "DT_VARIANT"])
def test_unsupported_dtypes(cls, enum):
    raises(make(cls, dtype=tf_pb.ArrayDataType.Value(enum), shape=[1], int_val=[1]),
           enum, "not supported")


def test_unknown_dtype_value():
    proto = make(shape=[1], float_val=[1])
    proto.dtype = 99  # proto3 enums are open: a client can send any number
    raises(proto, "unknown dtype 99")


def test_bool_needs_bool_val():
    raises(make(torch_pb.ArrayProto, dtype=torch_pb.DT_BOOL, shape=[2], int_val=[1, 0]),
           "DT_BOOL", "bool_val")
    with pytest.raises(CodecError, match="bool_val"):
        encode_array(np.array([True]), torch_pb.ArrayProto(), name="mask")


def test_too_many_dims():
    raises(make(shape=[1] * 40, float_val=[1.0]), "40 dimensions")


def test_huge_dims_with_no_values():
    # 0 values is the right count, but numpy cannot make such an array
    msg = raises(make(shape=[0, 2**62, 2**62], float_val=[]), "shape [0,")
    assert "not usable" in msg


def test_error_without_a_name():
    with pytest.raises(CodecError, match=r"^input: shape \[2\] needs 2 values, got 1"):
        decode_array(make(shape=[2], float_val=[1.0]), "")


def test_encode_errors():
    with pytest.raises(CodecError, match="uint32"):
        encode_array(np.arange(3, dtype=np.uint32), tf_pb.ArrayProto(), name="ids")
    with pytest.raises(CodecError, match="output 'objs'.*int"):
        encode_array(np.array([1, 2], dtype=object), tf_pb.ArrayProto(), name="objs")
    with pytest.raises(CodecError, match="float32 only"):
        encode_caffe(np.array([b"x"]), caffe_pb.ArrayProto())
    assert issubclass(CodecError, ValueError)


# --- caffe --------------------------------------------------------------------------------

def test_caffe_roundtrip_and_cast():
    arr = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7
    proto = caffe_pb.ArrayProto()
    encode_caffe(arr, proto)
    assert list(proto.shape.dim) == [2, 3, 4] and len(proto.data) == 24
    out = decode_caffe(wire_roundtrip(proto), "data")
    assert out.dtype == np.float32 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr.astype(np.float32))
    ints = np.arange(6, dtype=np.int64).reshape(3, 2).T  # non-contiguous ints
    proto = caffe_pb.ArrayProto()
    encode_caffe(ints, proto)
    np.testing.assert_array_equal(decode_caffe(proto, "d"), ints)


def test_caffe_errors():
    proto = caffe_pb.ArrayProto(data=[1.0, 2.0, 3.0])
    proto.shape.dim.extend([2, 2])
    with pytest.raises(CodecError, match=r"^input 'data': shape \[2, 2\] needs 4 values, got 3"):
        decode_caffe(proto, "data")
    proto = caffe_pb.ArrayProto(data=[1.0])
    proto.shape.dim.extend([1, -1])
    with pytest.raises(CodecError, match="input 'data'.*negative"):
        decode_caffe(proto, "data")


def test_caffe_request_on_the_wire():
    req = caffe_pb.PredictRequest(input_name=["data"], output_filter=["prob"])
    arr = np.random.default_rng(0).random((1, 3, 2, 2), dtype=np.float32)
    encode_caffe(arr, req.input_data.add())
    again = caffe_pb.PredictRequest.FromString(req.SerializeToString())
    assert list(again.input_name) == ["data"] and list(again.output_filter) == ["prob"]
    assert_same(decode_caffe(again.input_data[0], "data"), arr)


# --- wire compatibility -------------------------------------------------------------------

def test_tf_request_bytes_parse_with_fields_intact():
    images = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    keys = np.array([b"k1", b""], dtype=object)
    req = tf_pb.PredictRequest(signature_name="predict_images", output_filter=["scores"])
    encode_array(images, req.inputs["images"])
    encode_array(keys, req.inputs["keys"])
    encode_array(np.array([[True, False]]), req.inputs["mask"])
    body = req.SerializeToString()

    again = tf_pb.PredictRequest()
    again.ParseFromString(body)
    assert again.signature_name == "predict_images"
    assert list(again.output_filter) == ["scores"]
    assert sorted(again.inputs) == ["images", "keys", "mask"]
    assert again.inputs["images"].dtype == tf_pb.DT_FLOAT
    assert list(again.inputs["images"].array_shape.dim) == [2, 784]
    assert_same(decode_array(again.inputs["images"], "images"), images)
    assert_same(decode_array(again.inputs["keys"], "keys"), keys)
    assert decode_array(again.inputs["mask"], "mask").tolist() == [[True, False]]
    assert again == req


@pytest.mark.parametrize("cls", PROTOS)
@pytest.mark.parametrize("arr", [
    np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
    np.arange(6, dtype=np.float64).reshape(3, 2),
    np.array([[-3, 0, 2**31 - 1]], dtype=np.int32),
    np.array([-(2**40), 5], dtype=np.int64),
    np.array([[1 + 1j]], dtype=np.complex64),
    np.array([[200, 3]], dtype=np.uint8),
], ids=lambda a: str(a.dtype))
def test_encoding_is_byte_identical_to_the_plain_protobuf_api(cls, arr):
    ours = cls()
    encode_array(arr, ours)
    ref = cls(dtype=ENUM_BY_DTYPE[arr.dtype])
    ref.array_shape.dim.extend(arr.shape)
    flat = arr.ravel()
    if arr.dtype == np.float32:
        ref.float_val.extend(flat.tolist())
    elif arr.dtype == np.float64:
        ref.double_val.extend(flat.tolist())
    elif arr.dtype == np.complex64:
        ref.float_val.extend(flat.view(np.float32).tolist())
    elif arr.dtype == np.int64:
        ref.int64_val.extend(flat.tolist())
    else:
        ref.int_val.extend(flat.tolist())
    assert ours.SerializeToString() == ref.SerializeToString()
    assert ours == ref


def test_decodes_unpacked_values_from_old_serializers():
    # float_val = 3 sent unpacked (wire type 5, one tag per value), dims unpacked too
    import struct
    body = b"\x08\x01" + b"\x12\x04\x08\x01\x08\x02"
    for v in (1.5, -2.0):
        body += b"\x1d" + struct.pack("<f", v)
    proto = tf_pb.ArrayProto.FromString(body)
    out = decode_array(proto, "x")
    assert out.tolist() == [[1.5, -2.0]] and out.dtype == np.float32


def test_torch_request_positional_and_named():
    x = np.random.default_rng(1).random((3, 4), dtype=np.float32)
    req = torch_pb.PredictRequest(output_filter=[0])
    encode_array(x, req.inputs.add())
    encode_array(x[:1], req.map_inputs["input0"])
    again = torch_pb.PredictRequest.FromString(req.SerializeToString())
    assert_same(decode_array(again.inputs[0], "0"), x)
    assert_same(decode_array(again.map_inputs["input0"], "input0"), x[:1])
    assert list(again.output_filter) == [0]


def test_fallback_without_the_wire_fast_path(monkeypatch):
    """decode_array reads fixed-width fields from the serialized bytes; the plain
    np.asarray(field) path it falls back to must give the same results."""
    monkeypatch.setattr(T, "_read_packed", lambda *a: None)
    for arr in (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1 - 2j], np.complex128),
                np.array([[True], [False]]), np.float64(-0.0)):
        assert_same(roundtrip(arr), arr)
    raises(make(dtype=tf_pb.DT_COMPLEX64, shape=[2], float_val=[1, 2, 3]), "needs 4 values")
    caffe = caffe_pb.ArrayProto()
    encode_caffe(np.ones((2, 2)), caffe)
    assert_same(decode_caffe(caffe, "d"), np.ones((2, 2), np.float32))


# -- gateway.codec.decompress: bounded by a size and by a ratio ------------------------------

def _packed(encoding: str, plain: bytes) -> bytes:
    import gzip
    import zlib

    import cramjam

    return {"gzip": gzip.compress, "deflate": zlib.compress,
            "snappy": lambda b: bytes(cramjam.snappy.compress_raw(b))}[encoding](plain)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "snappy"])
@settings(max_examples=40, deadline=None)
@given(plain=st.binary(max_size=4096))
def test_decompress_round_trips_within_the_limits(encoding, plain):
    from gateway.codec.decompress import decompress

    assert decompress(_packed(encoding, plain), encoding, 1 << 20) == plain


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "snappy"])
def test_decompress_stops_at_the_size_limit(encoding):
    from gateway.codec.decompress import TooLarge, decompress

    plain = bytes(range(256)) * 64  # 16 KiB that compresses a little
    assert decompress(_packed(encoding, plain), encoding, len(plain)) == plain
    with pytest.raises(TooLarge, match=f"past the {len(plain) - 1}-byte body limit"):
        decompress(_packed(encoding, plain), encoding, len(plain) - 1)


def test_decompress_stops_at_100_times_the_body_beyond_1_mib():
    from gateway.codec.decompress import MAX_RATIO, RATIO_FLOOR, TooLarge, decompress

    floor = bytes(RATIO_FLOOR)  # 1 MiB of zeros: about 1000:1, allowed (the floor)
    assert decompress(_packed("gzip", floor), "gzip", 64 << 20) == floor
    bomb = _packed("gzip", bytes(4 * RATIO_FLOOR))
    assert len(bomb) * MAX_RATIO < 4 * RATIO_FLOOR
    with pytest.raises(TooLarge, match="100 times its size"):
        decompress(bomb, "gzip", 64 << 20)


def test_decompress_refuses_what_does_not_inflate():
    from gateway.codec.decompress import DecompressError, TooLarge, decompress

    good = _packed("gzip", b"abc" * 100)
    for body, why in ((good[:-9], "truncated"), (good + good, "after its end"),
                      (b"not gzip", "not valid gzip"), (b"", "truncated")):
        with pytest.raises(DecompressError, match=why):
            decompress(body, "gzip", 1 << 20)
    with pytest.raises(DecompressError, match="not valid snappy"):
        decompress(b"\x05abc", "snappy", 1 << 20)  # declares 5 bytes, holds fewer
    with pytest.raises(DecompressError, match="no length header"):
        decompress(b"\xff\xff\xff\xff\xff\x01", "snappy", 1 << 20)  # past 32 bits
    with pytest.raises(TooLarge):  # declared 4 GiB: refused before anything is allocated
        decompress(b"\xff\xff\xff\xff\x0f" + b"\x00" * 10, "snappy", 1 << 40)
    with pytest.raises(DecompressError, match="unknown encoding"):
        decompress(good, "br", 1 << 20)


# -- gateway.codec.oip: BYTES payloads checked before allocation ------------------------------

def test_bytes_shapes_are_checked_against_the_payload_first():
    from gateway.codec import oip
    from gateway.protos import oip_pb2

    obj = oip.DTYPES["BYTES"]
    with pytest.raises(CodecError, match="needs at least 4000000000"):
        oip.from_raw(b"\x01\x00\x00\x00a", obj, (10 ** 9,), "input 'x'", "raw")
    with pytest.raises(CodecError, match="has 1 values, but shape"):
        oip.from_json(["a"], obj, (10 ** 9,), "input 'x'")
    request = oip_pb2.ModelInferRequest()
    request.inputs.add(name="x", datatype="BYTES", shape=[10 ** 9])
    request.raw_input_contents.append(b"\x01\x00\x00\x00a")
    with pytest.raises(CodecError, match="needs at least"):
        oip.http_from_grpc(request)
    assert oip.from_raw(b"\x01\x00\x00\x00a", obj, (1,), "x", "raw").tolist() == ["a"]
    deep = ["a"]
    for _ in range(5000):
        deep = [deep]
    assert oip.from_json(deep, obj, (1,), "x").tolist() == ["a"]  # flattened by a loop


@pytest.mark.parametrize("datatype, field, value", [
    ("INT16", "int_contents", -524290), ("INT8", "int_contents", 128),
    ("UINT8", "uint_contents", 256), ("UINT16", "uint_contents", 70000),
])
def test_typed_contents_out_of_range_are_a_codec_error(datatype, field, value):
    """INT8/16 and UINT8/16 come in 32-bit contents fields: a value outside the type is a
    400 naming it (found by fuzz_oip_grpc in CI: it was an OverflowError, a 500)."""
    from gateway.codec import oip
    from gateway.protos import oip_pb2

    request = oip_pb2.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend([1, value])
    with pytest.raises(CodecError, match=f"out of range for {datatype}"):
        oip.feeds_from_grpc(request)
    getattr(tensor.contents, field)[1] = 2
    assert oip.feeds_from_grpc(request)["x"].tolist() == [1, 2]
