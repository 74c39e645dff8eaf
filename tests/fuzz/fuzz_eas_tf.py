"""Fuzz the EAS TensorFlow request reader: the compiled wire reader
(csrc/worker/tfwire.pyx `decode_request`) and the protobuf path
(gateway/codec/tensors.py `decode_array`), through the worker's processor
(gateway/worker/processors/tensorflow.py) and a real model (the digits one the
package ships), so that the model's input check runs as it does in a worker.

Refusal: BadInput (the worker's 400). Invariants: what the compiled reader
accepts, the protobuf path reads to the same arrays; its arrays written by
`encode_response` read back equal; an accepted call fits the model.
"""
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["gateway"]):
    from gateway._native.tfwire import decode_request, encode_response
    from gateway.codec.tensors import CodecError, decode_array
    from gateway.models import DIGITS_MODEL
    from gateway.protos import tf_predict_pb2 as pb
    from gateway.worker.model import BadInput, OnnxModel
    from gateway.worker.processors.base import parse_message
    from gateway.worker.processors.tensorflow import TFProcessor

COVERS = ("csrc/worker/tfwire.pyx", "gateway/codec/tensors.py",
          "gateway/worker/processors/tensorflow.py", "csrc/worker/feeds.pyx")
MODEL = OnnxModel(str(DIGITS_MODEL), device="cpu")
PROCESSOR = TFProcessor(MODEL)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def check_fast_against_protobuf(body: bytes) -> None:
    fast = decode_request(body)
    if fast is None:
        return
    signature, feeds, output_filter = fast
    try:
        request = parse_message(pb.PredictRequest, body, "tensorflow PredictRequest")
    except BadInput as exc:
        raise AssertionError(f"the compiled reader took a body protobuf refuses: {exc}") from None
    assert signature == request.signature_name
    assert output_filter == tuple(request.output_filter)
    assert set(feeds) == set(request.inputs)
    for name, array in feeds.items():
        try:
            slow = decode_array(request.inputs[name], name)
        except CodecError as exc:
            raise AssertionError(f"the compiled reader took input {name!r}: {exc}") from None
        assert same(array, slow), name
    names = tuple(feeds)
    answer = pb.PredictResponse.FromString(encode_response(names, [feeds[n] for n in names]))
    assert all(same(feeds[n], decode_array(answer.outputs[n], n)) for n in names)


def TestOneInput(data: bytes) -> None:
    check_fast_against_protobuf(data)
    try:
        call = PROCESSOR.decode(data)
    except BadInput:
        return
    assert list(call.feeds) == ["images"]
    images = call.feeds["images"]
    assert images.dtype == np.float32 and images.ndim == 2 and images.shape[1] == 784
    assert set(call.output_names) <= set(MODEL.output_names)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
