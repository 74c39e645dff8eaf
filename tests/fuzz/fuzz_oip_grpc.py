"""Fuzz the ModelInferRequest readers: the compiled wire reader
(csrc/worker/oipwire.pyx `decode_grpc`) and the protobuf one
(gateway/codec/oip.py `parse_infer_request` + `feeds_from_grpc`), and the
gateway's translation of a request to HTTP (`http_from_grpc`).

Refusals: None from `decode_grpc` (the worker then takes the protobuf path),
CodecError from the rest. What the compiled reader accepts, the protobuf path
accepts with the same model, version, id, feeds and outputs; what the gateway
translates, the HTTP reader reads back to the same feeds; the feeds, answered
as outputs by `encode_grpc`, parse back as a ModelInferResponse holding them.
"""
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["gateway"]):
    from gateway._native.oipwire import Datatypes, GrpcAnswer, decode_grpc, encode_grpc
    from gateway.codec import oip
    from gateway.codec.tensors import CodecError
    from gateway.protos import oip_pb2 as pb

COVERS = ("gateway/codec/oip.py", "csrc/worker/oipwire.pyx")
TYPES = Datatypes(oip.DTYPES)


def same_feeds(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and
        np.array_equal(a[n], b[n], equal_nan=a[n].dtype.kind == "f") for n in a)


def check_answer(model: str, feeds: dict, request_id: str) -> None:
    names = tuple(feeds)
    answer = encode_grpc(GrpcAnswer(model, model, names, TYPES), names,
                         list(feeds.values()), request_id)
    response = pb.ModelInferResponse.FromString(answer)
    assert (response.model_name, response.id) == (model, request_id)
    assert [o.name for o in response.outputs] == list(names)
    for output, raw in zip(response.outputs, response.raw_output_contents):
        array = feeds[output.name]
        assert list(output.shape) == list(array.shape)
        assert output.datatype == oip.datatype_name(array.dtype)
        assert raw == array.tobytes()


def TestOneInput(data: bytes) -> None:
    fast = decode_grpc(data, TYPES)
    try:
        request = oip.parse_infer_request(data)
        feeds = oip.feeds_from_grpc(request)
    except CodecError as exc:
        assert fast is None, f"the compiled reader took what the protobuf path refuses: {exc}"
        return
    if fast is not None:
        model, version, request_id, fast_feeds, wanted = fast
        assert (model, version, request_id) == (
            request.model_name, request.model_version, request.id)
        assert same_feeds(fast_feeds, feeds)
        assert wanted == tuple(o.name for o in request.outputs)
        check_answer(model, fast_feeds, request_id)
    if not feeds:  # no inputs: the HTTP form needs one, the worker answers it 400
        return
    body, header_length = oip.http_from_grpc(request)
    assert same_feeds(oip.parse_http_infer(body, str(header_length)).feeds, feeds)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
