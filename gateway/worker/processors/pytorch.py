from __future__ import annotations

import cramjam

from ...codec.tensors import CodecError, decode_array, encode_array
from ...protos import pytorch_predict_pb2 as pb
from .base import BadInput, Call, Processor, parse_message


def _snappy(body: bytes):
    try:
        return bytes(cramjam.snappy.decompress_raw(body))
    except Exception:
        return None


class TorchProcessor(Processor):
    """EAS PyTorch format: positional `inputs` or named `map_inputs`; snappy bodies accepted."""

    def decode(self, body: bytes) -> Call:
        try:
            request = parse_message(pb.PredictRequest, body, "pytorch PredictRequest")
        except BadInput:
            # The SDK may snappy-compress the body (TorchRequest(flag=True)).
            plain = _snappy(body) if body else None
            if plain is None:
                raise
            request = parse_message(pb.PredictRequest, plain, "pytorch PredictRequest")
        else:
            if not request.inputs and not request.map_inputs and body:
                plain = _snappy(body)
                if plain is not None:
                    request = parse_message(pb.PredictRequest, plain, "pytorch PredictRequest")
        model_inputs = self.model.inputs
        if request.inputs and request.map_inputs:
            raise BadInput("use either positional inputs or map_inputs, not both")
        try:
            if request.map_inputs:
                feeds = {name: decode_array(proto, name) for name, proto in request.map_inputs.items()}
            else:
                if len(request.inputs) > len(model_inputs):
                    raise BadInput(f"{len(request.inputs)} positional inputs given; the model "
                                   f"takes {len(model_inputs)}")
                feeds = {spec.name: decode_array(proto, f"{i} ({spec.name})")
                         for i, (spec, proto) in enumerate(zip(model_inputs, request.inputs))}
        except CodecError as exc:
            raise BadInput(str(exc)) from None
        names = self.model.output_names
        wanted = []
        for index in request.output_filter:
            if not 0 <= index < len(names):
                raise BadInput(f"output_filter index {index} is out of range: the model has "
                               f"{len(names)} outputs")
            wanted.append(names[index])
        return self._call(feeds, tuple(wanted), bool(request.map_inputs))

    def encode(self, call: Call, outputs: list) -> bytes:
        response = pb.PredictResponse()
        named = call.context
        for name, array in zip(call.output_names, outputs):
            encode_array(array, response.map_outputs[name] if named else response.outputs.add())
        return response.SerializeToString()
