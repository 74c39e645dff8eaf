from __future__ import annotations

from ...codec.tensors import CodecError, decode_array, encode_array
from ...protos import tf_predict_pb2 as pb
from .base import BadInput, Call, Processor, parse_message


class TFProcessor(Processor):
    """EAS TensorFlow format: named inputs, `output_filter` by name."""

    def decode(self, body: bytes) -> Call:
        request = parse_message(pb.PredictRequest, body, "tensorflow PredictRequest")
        signature = request.signature_name
        if signature and signature != self.model.signature_name:
            raise BadInput(f"unknown signature_name {signature!r}; the model serves "
                           f"{self.model.signature_name!r}")
        try:
            feeds = {name: decode_array(proto, name) for name, proto in request.inputs.items()}
        except CodecError as exc:
            raise BadInput(str(exc)) from None
        return self._call(feeds, tuple(request.output_filter))

    def encode(self, call: Call, outputs: list) -> bytes:
        response = pb.PredictResponse()
        for name, array in zip(call.output_names, outputs):
            encode_array(array, response.outputs[name])
        return response.SerializeToString()
