from __future__ import annotations

import numpy as np
import orjson

from ..._native.tensorjson import loads
from .base import BadInput, Call, Processor


class JsonProcessor(Processor):
    """Named inputs as nested lists: {"inputs": {"images": [[...]]}, "output_filter": [...]}.

    A bare object of input name -> nested list is accepted too. Answers
    {"outputs": {"scores": [[...]]}}. Nested lists of numbers are read straight into
    arrays (csrc/worker/tensorjson.pyx), not into a Python float each.
    """

    content_type = "application/json"

    def decode(self, body: bytes) -> Call:
        if not body:
            raise BadInput("empty request body: expected a JSON object of inputs")
        try:
            document = loads(bytes(body))
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise BadInput("request body must be a JSON object")
        inputs = document.get("inputs", document)
        if not isinstance(inputs, dict):
            raise BadInput("\"inputs\" must be an object of input name -> nested list")
        wanted = document.get("output_filter", []) if "inputs" in document else []
        if not isinstance(wanted, list) or not all(isinstance(n, str) for n in wanted):
            raise BadInput("\"output_filter\" must be a list of output names")
        feeds = {}
        for name, values in inputs.items():
            spec = self.model.input_by_name.get(name)
            if spec is None:
                raise BadInput(f"unknown input {name!r}; the model takes "
                               f"{', '.join(repr(s.name) for s in self.model.inputs)}")
            try:
                feeds[name] = np.asarray(values, dtype=spec.dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise BadInput(f"input {name!r} is not a rectangular array of numbers: {exc}") from None
        return self._call(feeds, tuple(wanted))

    def encode(self, call: Call, outputs: list) -> bytes:
        return orjson.dumps({"outputs": dict(zip(call.output_names, outputs))},
                            option=orjson.OPT_SERIALIZE_NUMPY)
