from __future__ import annotations

from ...codec.tensors import CodecError, decode_caffe, encode_caffe
from ...protos import caffe_predict_pb2 as pb
from .base import BadInput, Call, Processor, parse_message


class CaffeProcessor(Processor):
    """EAS Caffe format: parallel `input_name` / `input_data` lists, float data."""

    def decode(self, body: bytes) -> Call:
        request = parse_message(pb.PredictRequest, body, "caffe PredictRequest")
        if len(request.input_name) != len(request.input_data):
            raise BadInput(f"{len(request.input_name)} input names but "
                           f"{len(request.input_data)} input arrays")
        names = list(request.input_name)
        if len(set(names)) != len(names):
            twice = next(name for name in names if names.count(name) > 1)
            raise BadInput(f"input {twice!r} is given twice")
        try:
            feeds = {name: decode_caffe(proto, name)
                     for name, proto in zip(names, request.input_data)}
        except CodecError as exc:
            raise BadInput(str(exc)) from None
        return self._call(feeds, tuple(request.output_filter))

    def encode(self, call: Call, outputs: list) -> bytes:
        response = pb.PredictResponse()
        for name, array in zip(call.output_names, outputs):
            response.output_name.append(name)
            encode_caffe(array, response.output_data.add())
        return response.SerializeToString()
