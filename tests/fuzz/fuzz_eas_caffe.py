"""Fuzz the EAS Caffe request reader (gateway/worker/processors/caffe.py, with
gateway/codec/tensors.py `decode_caffe`) through a real model (the digits one
the package ships), so that the model's input check runs as in a worker.

Refusal: BadInput (the worker's 400). Invariant: an accepted call fits the
model, and what it read is the body's float data in the body's shape.
"""
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["gateway"]):
    from gateway.models import DIGITS_MODEL
    from gateway.protos import caffe_predict_pb2 as pb
    from gateway.worker.model import BadInput, OnnxModel
    from gateway.worker.processors.caffe import CaffeProcessor

COVERS = ("gateway/worker/processors/caffe.py", "gateway/codec/tensors.py",
          "csrc/worker/feeds.pyx")
MODEL = OnnxModel(str(DIGITS_MODEL), device="cpu")
PROCESSOR = CaffeProcessor(MODEL)


def TestOneInput(data: bytes) -> None:
    try:
        call = PROCESSOR.decode(data)
    except BadInput:
        return
    images = call.feeds["images"]
    assert list(call.feeds) == ["images"]
    assert images.dtype == np.float32 and images.ndim == 2 and images.shape[1] == 784
    request = pb.PredictRequest.FromString(data)
    sent = request.input_data[list(request.input_name).index("images")]
    assert list(images.shape) == list(sent.shape.dim)
    assert np.array_equal(images.reshape(-1), np.asarray(sent.data, np.float32), equal_nan=True)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
