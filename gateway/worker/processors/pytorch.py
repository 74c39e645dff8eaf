"""The EAS PyTorch format; the SDK may snappy-compress a body (TorchRequest(flag=True)),
so a body that is not a request with inputs is tried as raw snappy, inflated within
gateway/codec/decompress.py's bounds."""
from __future__ import annotations

from ...codec.tensors import CodecError, decode_array, encode_array
from ...protos import pytorch_predict_pb2 as pb
from .base import BadInput, BodyTooLarge, Call, Processor, inflate, parse_message


class TorchProcessor(Processor):
    """EAS PyTorch format: positional `inputs` or named `map_inputs`; snappy bodies accepted."""

    def _snappy(self, body: bytes):
        """The request a snappy body holds; None when the body is not snappy data."""
        try:
            plain = inflate(body, "snappy", self.max_body_size)
        except BodyTooLarge:
            raise
        except BadInput:
            return None
        return parse_message(pb.PredictRequest, plain, "pytorch PredictRequest")

    def decode(self, body: bytes) -> Call:
        try:
            request = parse_message(pb.PredictRequest, body, "pytorch PredictRequest")
        except BadInput:
            unpacked = self._snappy(body) if body else None
            if unpacked is None:
                raise
            request = unpacked
        else:
            if not request.inputs and not request.map_inputs and body:
                unpacked = self._snappy(body)
                if unpacked is not None:
                    request = unpacked
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
