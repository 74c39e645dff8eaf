"""An ONNX Runtime session and the signature it declares.

CUDA is preferred when onnxruntime offers it (the `gpu` extra installs
onnxruntime-gpu), the CPU otherwise; `device="cpu"` keeps a service off the GPU
(`metadata.gpu: 0`). A service's `metadata.onnxruntime` sets execution-provider
options: `{"cuda": {"cudnn_conv_algo_search": "HEURISTIC", ...}}`, and
`"tensorrt": {...}` (or true) puts TensorRT first where onnxruntime has it. The
model's declared inputs and outputs are the signature every request is checked
against.

On an accelerator a batching worker keeps one session per batch size
(`pin_batch_sizes`). onnxruntime's CUDA convolutions keep the cuDNN plan of the
last input shape they saw, per kernel: one session fed batches of 1, 2, 4 and
8 rows in turn rebuilds every convolution's plan on each change, tens of
milliseconds a batch (measured on an H200: resnet18 at 130 req/s batched
against 2,300 unbatched). With a session per size each keeps its one shape,
for the cost of one copy of the weights per size on the device.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from .._native.feeds import FeedCheck
from ..serviceconfig import PROVIDER_KEYS

log = logging.getLogger("infergate.model")

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64),
    "tensor(int32)": np.dtype(np.int32), "tensor(int64)": np.dtype(np.int64),
    "tensor(int16)": np.dtype(np.int16), "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8), "tensor(uint16)": np.dtype(np.uint16),
    "tensor(bool)": np.dtype(np.bool_), "tensor(string)": np.dtype(object),
    "tensor(float16)": np.dtype(np.float16),
}

# Names the EAS signature JSON uses for each numpy dtype.
_DT_NAMES = {
    np.dtype(np.float32): "DT_FLOAT", np.dtype(np.float64): "DT_DOUBLE",
    np.dtype(np.int32): "DT_INT32", np.dtype(np.int64): "DT_INT64",
    np.dtype(np.int16): "DT_INT16", np.dtype(np.int8): "DT_INT8",
    np.dtype(np.uint8): "DT_UINT8", np.dtype(np.uint16): "DT_UINT16",
    np.dtype(np.bool_): "DT_BOOL", np.dtype(object): "DT_STRING",
    np.dtype(np.float16): "DT_HALF",
}


class BadInput(ValueError):
    """The request does not fit the model: a 400 naming what is wrong."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, -1 for a dynamic dimension
    dtype: np.dtype

    def as_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "type": _DT_NAMES.get(self.dtype, str(self.dtype))}




def _option_strings(options) -> dict:
    # onnxruntime takes provider options as strings; JSON true/false become "1"/"0".
    if options is True or options is None:
        return {}
    return {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in options.items()}


def choose_providers(available: list[str], device: str = "auto",
                     options: dict | None = None) -> list:
    """Providers in order of preference, with their options.

    device "auto" or "cuda": CUDA when onnxruntime has it (TensorRT before it when
    `options` asks for it and onnxruntime has it); "cpu": the CPU only. The CPU is
    always the last fallback.
    """
    options = options or {}
    chosen = []
    if device != "cpu":
        for key in ("tensorrt", "cuda"):
            name = PROVIDER_KEYS[key]
            wanted = key == "cuda" or options.get(key) not in (None, False)
            if wanted and name in available:
                chosen.append((name, _option_strings(options.get(key))))
    chosen.append(("CPUExecutionProvider", _option_strings(options.get("cpu"))))
    return chosen


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ValueError(f"model tensor {arg.name!r} has unsupported type {arg.type}")
    return TensorSpec(arg.name, shape, dtype)


class OnnxModel:
    def __init__(self, path: str, intra_op_threads: int = 1, device: str = "auto",
                 provider_options: dict | None = None, signature_name: str | None = None):
        """`signature_name` (the service's metadata.signature_name) overrides the model's."""
        options = ort.SessionOptions()
        # Concurrency comes from rpc.worker_threads running sessions side by side;
        # intra-op threads per call would fight them for the same cores.
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = choose_providers(ort.get_available_providers(), device, provider_options)
        self.path = path
        self._session_args = (options, [name for name, _ in providers],
                              [opts for _, opts in providers])
        self.session = self._new_session()
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider == "CPUExecutionProvider":
            log.warning("model %s: CUDA was asked for but onnxruntime has %s; running on the CPU "
                        "(install infergate[gpu] for onnxruntime-gpu)", path,
                        ", ".join(ort.get_available_providers()))
        log.info("model %s loaded on %s (devices visible: %s)", path, self.provider,
                 os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]
        self.input_by_name = {s.name: s for s in self.inputs}
        self.output_names = tuple(s.name for s in self.outputs)
        self.check_feeds = FeedCheck([s.name for s in self.inputs], [s.dtype for s in self.inputs],
                                     [s.shape for s in self.inputs], self._check_feeds)
        # The binding's run, without InferenceSession.run's Python checks (about 11 us a
        # call, as much as a small model's inference): check_feeds has done them.
        self._run = self._binding_run(self.session)
        self._run_by_rows: dict = {}  # batch size -> the run of its own session
        # A model converted from TensorFlow or PyTorch declares no signature: it serves any
        # name a client sends (and shows "serving_default"). One that declares one, or
        # whose service names one, refuses the others.
        meta = self.session.get_modelmeta().custom_metadata_map
        self.declared_signature = signature_name or meta.get("signature_name") or None
        self.signature_name = self.declared_signature or "serving_default"

    def _new_session(self):
        options, names, provider_options = self._session_args
        return ort.InferenceSession(self.path, options, providers=names,
                                    provider_options=provider_options)

    @staticmethod
    def _binding_run(session):
        binding = getattr(session, "_sess", None)
        return binding.run if hasattr(binding, "run") else session.run

    def pin_batch_sizes(self, sizes) -> None:
        """A session of its own for each batch size but the smallest (which, with every
        other shape, stays on the first session): see the module's docstring."""
        for rows in sorted(sizes)[1:]:
            self._run_by_rows[rows] = self._binding_run(self._new_session())
        if self._run_by_rows:
            log.info("model %s: one session per batch size (%s) on %s", self.path,
                     ",".join(map(str, sorted(sizes))), self.provider)

    @property
    def batch_sessions(self) -> tuple:
        """The batch sizes that run on a session of their own."""
        return tuple(self._run_by_rows)

    def signature(self) -> dict:
        return {"signature_name": self.signature_name,
                "inputs": [s.as_json() for s in self.inputs],
                "outputs": [s.as_json() for s in self.outputs]}

    def _check_feeds(self, feeds: dict) -> dict:
        """Validate names, dtypes and shapes; cast numeric dtypes the model can take safely.

        `check_feeds` (compiled) takes the requests that need nothing of this."""
        for name in feeds:
            if name not in self.input_by_name:
                raise BadInput(f"unknown input {name!r}; the model takes "
                               f"{', '.join(repr(s.name) for s in self.inputs)}")
        checked = {}
        for spec in self.inputs:
            array = feeds.get(spec.name)
            if array is None:
                raise BadInput(f"missing input {spec.name!r} (shape {list(spec.shape)}, "
                               f"{_DT_NAMES.get(spec.dtype, spec.dtype)})")
            if array.dtype != spec.dtype and not (
                    spec.dtype.kind in "fiu" and array.dtype.kind in "fiu"
                    and np.can_cast(array.dtype, spec.dtype, "same_kind")
                    and not (spec.dtype.kind in "iu" and array.dtype.kind == "f")):
                raise BadInput(f"input {spec.name!r} must be {_DT_NAMES.get(spec.dtype, spec.dtype)}, "
                               f"got {_DT_NAMES.get(array.dtype, array.dtype)}")
            shape = array.shape
            if len(shape) != len(spec.shape) or any(
                    want >= 0 and got != want for want, got in zip(spec.shape, shape)):
                raise BadInput(f"input {spec.name!r} expects shape {list(spec.shape)}, "
                               f"got {list(shape)}")
            if array.dtype != spec.dtype:
                try:
                    array = array.astype(spec.dtype)
                except ValueError:  # an empty array whose other dims overflow once wider
                    raise BadInput(f"input {spec.name!r}: shape {list(shape)} is too large "
                                   f"as {_DT_NAMES.get(spec.dtype, spec.dtype)}") from None
            if len(shape) and shape[0] == 0:
                raise BadInput(f"input {spec.name!r} has an empty batch (shape {list(shape)})")
            checked[spec.name] = array
        return checked

    def check_outputs(self, names) -> tuple:
        """The outputs asked for, each once (a name repeated 10,000 times must not make an
        answer 10,000 times as large), or all of them when none is named."""
        for name in names:
            if name not in self.output_names:
                raise BadInput(f"unknown output {name!r} in output_filter; the model gives "
                               f"{', '.join(repr(n) for n in self.output_names)}")
        return tuple(dict.fromkeys(names)) or self.output_names

    def run(self, feeds: dict, output_names: tuple) -> list:
        run = self._run
        if self._run_by_rows:
            for array in feeds.values():
                if array.ndim:
                    run = self._run_by_rows.get(array.shape[0], run)
                break
        try:
            return run(list(output_names), feeds, None)
        except InvalidArgument as exc:  # shapes the declared signature let through
            raise BadInput(f"the model refused the input: {exc}") from None
