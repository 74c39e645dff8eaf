from __future__ import annotations

from ..._native.tfwire import TFServe, decode_request, encode_response
from ...codec.tensors import CodecError, decode_array, encode_array
from ...protos import tf_predict_pb2 as pb
from .base import BadInput, Call, Processor, parse_message


class TFProcessor(Processor):
    """EAS TensorFlow format: named inputs, `output_filter` by name.

    Float and double tensors take the compiled wire path (csrc/worker/tfwire.pyx), and
    unbatched, `serve` runs them from body to body in C; every other request, and
    every malformed one, the full protobuf path.
    """

    def __init__(self, model, max_body_size: int = 64 << 20):
        super().__init__(model, max_body_size)
        self.serve = TFServe(model.declared_signature, model.output_names, model.check_feeds,
                             model.run, super().serve)

    def decode(self, body: bytes) -> Call:
        fast = decode_request(body)
        if fast is not None:
            signature, feeds, output_filter = fast
        else:
            request = parse_message(pb.PredictRequest, body, "tensorflow PredictRequest")
            signature, output_filter = request.signature_name, tuple(request.output_filter)
            try:
                feeds = {name: decode_array(proto, name) for name, proto in request.inputs.items()}
            except CodecError as exc:
                raise BadInput(str(exc)) from None
        declared = self.model.declared_signature
        if signature and declared is not None and signature != declared:
            raise BadInput(f"unknown signature_name {signature!r}; the model serves "
                           f"{self.model.signature_name!r}")
        return self._call(feeds, output_filter)

    def encode(self, call: Call, outputs: list) -> bytes:
        fast = encode_response(call.output_names, outputs)
        if fast is not None:
            return fast
        response = pb.PredictResponse()
        for name, array in zip(call.output_names, outputs):
            encode_array(array, response.outputs[name])
        return response.SerializeToString()
