"""Request formats a worker speaks: EAS protobuf (tensorflow, pytorch, caffe), JSON, user code.

A processor turns a body into a `Call` (model feeds + wanted outputs) and the
model's outputs back into a body. Decoding errors are `BadInput` (400).
"""
from __future__ import annotations

from ...serviceconfig import processor_kind
from .base import Call, Processor
from .caffe import CaffeProcessor
from .json import JsonProcessor
from .pytorch import TorchProcessor
from .tensorflow import TFProcessor

_BY_KIND = {"tensorflow": TFProcessor, "pytorch": TorchProcessor, "caffe": CaffeProcessor,
            "json": JsonProcessor}


def make_processor(name: str, model, max_body_size: int) -> Processor:
    kind = processor_kind(name)
    if kind == "python":
        raise ValueError("the python processor runs user code, not a model processor")
    return _BY_KIND[kind](model, max_body_size)


__all__ = ["Call", "Processor", "make_processor"]
