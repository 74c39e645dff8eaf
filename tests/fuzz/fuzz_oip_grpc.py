"""Fuzz the ModelInferRequest readers: the compiled wire reader
(csrc/worker/oipwire.pyx `decode_grpc`) and the protobuf one
(gateway/codec/oip.py `parse_infer_request` + `feeds_from_grpc`), and the
gateway's translation of a request to HTTP (`http_from_grpc`).

Refusals: None from `decode_grpc` (the worker then takes the protobuf path),
CodecError from the rest. What the compiled reader accepts, the protobuf path
accepts with the same model, version, id, feeds and outputs; what the gateway
translates, the HTTP reader reads back to the same feeds.
"""
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["gateway"]):
    from gateway._native.oipwire import Datatypes, decode_grpc
    from gateway.codec import oip
    from gateway.codec.tensors import CodecError

COVERS = ("gateway/codec/oip.py", "csrc/worker/oipwire.pyx")
TYPES = Datatypes(oip.DTYPES)


def same_feeds(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and
        np.array_equal(a[n], b[n], equal_nan=a[n].dtype.kind == "f") for n in a)


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
    if not feeds:  # no inputs: the HTTP form needs one, the worker answers it 400
        return
    body, header_length = oip.http_from_grpc(request)
    assert same_feeds(oip.parse_http_infer(body, str(header_length)).feeds, feeds)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
