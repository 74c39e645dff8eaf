"""The worker's Open Inference Protocol (KServe v2) face, beside its EAS routes.

Routes (also under /api/predict/<service>, where the service, not the model name
in the path, says which model): GET /v2 (server metadata), /v2/health/live, /v2/health/ready,
/v2/models/<m>[/versions/<v>] (model metadata), .../ready, .../config (what
perf_analyzer reads: max_batch_size, the tensors, dynamic_batching); POST
.../infer with JSON data or the binary tensor extension, gzip or deflate
bodies. The model's name is the service's, and so is its one version's.

A v2 infer request runs on the same model, runner and batcher as EAS
requests: it joins the same batches. As with EAS, the loop only queues it: an
`HttpInferJob` (or, from gRPC, a `GrpcInferJob`) is decoded, run and answered
on an inference thread. The runner and the batcher take it as a job source
(`decode()`, `finish()`, and `serve()` when it runs alone).

The documents the metadata routes answer are built once, at start-up.
"""
from __future__ import annotations

import time

from .. import auth
from ..codec import oip
from ..codec.tensors import CodecError
from .._native.oipwire import (Answer, Datatypes, GrpcAnswer, OipServe, decode_binary,
                               encode_binary)
from ..server import Response, error_response, json_response
from . import metrics
from .model import BadInput
from .processors.base import Call, inflate

PLATFORM = "onnxruntime_onnx"
_JSON = "application/json"
_BINARY = "application/octet-stream"
_EMPTY_OK = Response(200, b"", None, "text/plain")


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate (zlib) request body, inflated within gateway/codec/decompress.py's
    bounds (`limit`: the body limit)."""
    encoding = encoding.strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadInput(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    return inflate(body, encoding, limit)


class HttpInferJob:
    """One HTTP infer request for an inference thread: tritonclient's common binary form
    through the compiled path (csrc/worker/oipwire.pyx), anything else through
    gateway/codec/oip.py."""

    __slots__ = ("face", "body", "header_length", "encoding")

    def __init__(self, face, body: bytes, header_length, encoding):
        self.face = face
        self.body = body
        self.header_length = header_length
        self.encoding = encoding

    def _binary_length(self) -> int:
        """The header's length when the body may be in the common binary form, else 0."""
        if self.encoding is not None or self.header_length is None:
            return 0
        try:
            return int(self.header_length)
        except ValueError:
            return 0

    def decode(self) -> Call:
        face, model = self.face, self.face.model
        length = self._binary_length()
        if length:
            fast = decode_binary(self.body, length, face.types)
            if fast is not None:
                feeds, wanted, request_id = fast
                return Call(model.check_feeds(feeds), model.check_outputs(wanted),
                            oip.HttpInfer(request_id, feeds, wanted, {}, True))
        body = self.body
        if self.encoding is not None:
            body = _decompress(body, self.encoding, face.max_body_size)
        try:
            infer = oip.parse_http_infer(body, self.header_length)
        except CodecError as exc:
            raise BadInput(str(exc)) from None
        return Call(model.check_feeds(infer.feeds), model.check_outputs(infer.outputs), infer)

    def finish(self, call: Call, outputs: list, started: float) -> Response:
        face, infer = self.face, call.context
        encoded = None
        if infer.binary_default and not infer.binary:  # every output in binary
            encoded = encode_binary(face.answer, call.output_names, outputs, infer.id)
        if encoded is None:
            try:
                encoded = oip.render_http_infer(face.name, face.name, infer, call.output_names,
                                                outputs)
            except CodecError as exc:
                raise BadInput(str(exc)) from None
        body, header_length = encoded
        metrics.observe(200, time.perf_counter() - started)
        if header_length is None:
            return Response(200, body, None, _JSON)
        return Response(200, body, b"Inference-Header-Content-Length: %d\r\n" % header_length,
                        _BINARY)

    def serve(self, started: float) -> tuple:
        """(answer, rows) of the request run alone."""
        length = self._binary_length()
        if length and self.face.serve_binary is not None:
            fast = self.face.serve_binary.http(self.body, length)
            if fast is not None:
                body, header_line, rows = fast
                metrics.observe(200, time.perf_counter() - started)
                return Response(200, body, header_line, _BINARY), rows
        call = self.decode()
        return self.finish(call, self.face.model.run(call.feeds, call.output_names),
                           started), call.rows

    def answer(self, started: float) -> Response:
        """The response to the request run alone (serve()'s fast path, inlined: this is
        every unbatched binary request's)."""
        serve = self.face.serve_binary
        if serve is not None and self.encoding is None and self.header_length is not None:
            try:
                fast = serve.http(self.body, int(self.header_length))
            except ValueError:
                fast = None
            if fast is not None:
                metrics.observe(200, time.perf_counter() - started)
                return Response(200, fast[0], fast[1], _BINARY)
        return self.serve(started)[0]


class OipFace:
    """The v2 routes of a worker (`app`: gateway/worker/app.py's WorkerApp)."""

    def __init__(self, app, max_body_size: int):
        self.app = app
        self.name = app.service
        self.model = app.model
        self.max_body_size = max_body_size
        self.infer_path = f"/v2/models/{self.name}/infer"
        self._server = json_response(oip.server_metadata())
        self.serve_binary = None
        if self.model is not None:
            model = self.model
            self.types = Datatypes(oip.DTYPES)
            self.answer = Answer(self.name, self.name, model.output_names, self.types)
            self.grpc_answer = GrpcAnswer(self.name, self.name, model.output_names, self.types)
            if all(s.dtype.kind in "biuf" for s in model.outputs):  # answers binary can be
                self.serve_binary = OipServe(self.name, self.types, model.output_names,
                                             model.check_feeds, model.run)
            self.metadata = self._metadata()
            self.config = self._config()
            self._metadata_answer = json_response(self.metadata)
            self._config_answer = json_response(self.config)

    # -- documents, built once ---------------------------------------------------------------

    def _metadata(self) -> dict:
        def tensors(specs):
            return [{"name": s.name, "datatype": oip.datatype_name(s.dtype),
                     "shape": list(s.shape)} for s in specs]
        return {"name": self.name, "versions": [self.name], "platform": PLATFORM,
                "inputs": tensors(self.model.inputs), "outputs": tensors(self.model.outputs)}

    def _config(self) -> dict:
        """Triton's model configuration: with a dynamic first dimension everywhere, that
        dimension is the batch (max_batch_size > 0, dims without it)."""
        model, settings = self.model, self.app.settings
        specs = list(model.inputs) + list(model.outputs)
        batched = all(len(s.shape) and s.shape[0] == -1 for s in specs)
        max_batch = max(1, int(settings.max_batch_size)) if batched else 0

        def tensors(specs):
            return [{"name": s.name, "data_type": oip.CONFIG_TYPES[oip.datatype_name(s.dtype)],
                     "dims": list(s.shape[1:] if batched else s.shape)} for s in specs]
        config = {"name": self.name, "platform": PLATFORM, "backend": "onnxruntime",
                  "max_batch_size": max_batch, "input": tensors(model.inputs),
                  "output": tensors(model.outputs)}
        batcher = self.app.batcher
        if batcher is not None and batched:
            config["dynamic_batching"] = {
                "preferred_batch_size": list(batcher.pad_sizes or (batcher.max_rows,)),
                "max_queue_delay_microseconds": int(batcher.window * 1e6)}
        return config

    # -- state -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.app.server.draining and self.app.warm_up.done

    def model_error(self, name: str | None, version: str) -> str | None:
        """Why (name, version) is not this worker's model, or None when it is (name None:
        any, the path named the service already)."""
        if self.model is None:
            return "a python processor does not serve the Open Inference Protocol"
        if name is not None and name != self.name:
            return f"unknown model {name!r}; this worker serves {self.name!r}"
        if version and version != self.name:
            return f"model {name!r} has no version {version!r}; its version is {self.name!r}"
        return None

    # -- HTTP --------------------------------------------------------------------------------

    def handle(self, request, path: str, named: bool = True):
        """A Response, or a Future of one, for a v2 `path` (/v2...): the request's own, or
        what follows /api/predict/<service> (then `named` is False: the model's name in
        the path is the client's, and the service is this one)."""
        if path == "/v2" or path == "/v2/":
            return self._get(request, self._server)
        if path == "/v2/health/live":
            return self._get(request, _EMPTY_OK)
        if path == "/v2/health/ready":
            return self._get(request, _EMPTY_OK if self.ready else
                             error_response(503, "not ready"))
        if not path.startswith("/v2/models/"):
            return error_response(404, f"no route for {path}")
        parts = path[len("/v2/models/"):].split("/")
        name, version, rest = parts[0], "", parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else "" if not rest else None
        wrong = self.model_error(name if named else None, version)
        if wrong is not None:
            return error_response(404, wrong)
        refused = self._refused(request)
        if refused is not None:
            return refused
        if action == "infer":
            if request.method != "POST":
                return error_response(405, f"{request.method} is not allowed on {path}")
            started = time.perf_counter()
            return self._submit(request, started)
        if action == "":
            return self._get(request, self._metadata_answer)
        if action == "ready":
            return self._get(request, _EMPTY_OK if self.ready else
                             error_response(503, f"model {name!r} is not ready"))
        if action == "config":
            return self._get(request, self._config_answer)
        return error_response(404, f"no route for {path}")

    @staticmethod
    def _get(request, response):
        if request.method != "GET":
            return error_response(405, f"{request.method} is not allowed on {request.path}")
        return response

    def _refused(self, request):
        """401 unless the request carries the service's token (raw or signed), if any."""
        token = self.app.token
        if token:
            reason = auth.verify(request.headers, request.method, request.path, request.body,
                                 token, self.name, query=request.query)
            if reason:
                metrics.observe(401, None)
                return error_response(401, reason)
        return None

    def infer(self, request):
        started = time.perf_counter()
        if self.app.token:
            refused = self._refused(request)
            if refused is not None:
                return refused
        return self._submit(request, started)

    def _submit(self, request, started: float):
        app = self.app
        headers = request.headers
        job = HttpInferJob(self, request.body, headers.get("inference-header-content-length"),
                           headers.get("content-encoding"))
        deadline = app.runner.deadline()
        if app.batcher is not None:
            return app.batcher.submit(deadline, job, job.finish, started)
        return app.runner.submit(deadline, job.answer, started)
