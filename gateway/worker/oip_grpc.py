"""The worker's Open Inference Protocol over gRPC: inference.GRPCInferenceService.

Served by the compiled gRPC core (csrc/server/grpcwire.pyx: HTTP/2 and HPACK on
the worker's own event loop, beside the HTTP server), over the same `OipFace`
(gateway/worker/oip.py): ServerLive, ServerReady, ModelReady, ServerMetadata,
ModelMetadata, ModelConfig, ModelInfer, and grpc.health.v1's Check (SERVING
once warmed up, NOT_SERVING while draining). Streaming calls (ModelStreamInfer,
Health.Watch) are not served here: the gateway's gRPC port takes them. An infer
request is queued on the same runner or batcher as HTTP ones, and parsed, run
and answered on an inference thread (`GrpcInferJob`); answers carry their data
in `raw_output_contents`.

The service token, when the worker has one, is the `authorization` metadata.
Errors map to gRPC codes as the HTTP statuses they stand for: bad input
INVALID_ARGUMENT, queue full UNAVAILABLE (try another instance), the
service's keepalive passed DEADLINE_EXCEEDED.
"""
from __future__ import annotations

import logging
import time


from .._native.grpcwire import (DEADLINE_EXCEEDED, INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED,
                                UNAVAILABLE, UNIMPLEMENTED, GrpcServer, GrpcStatus)
from .._native.oipwire import decode_grpc, encode_grpc
from ..auth import raw_token_refusal
from ..codec import oip
from ..codec.tensors import CodecError
from ..protos import oip_pb2 as pb
from ..server.limits import default_max_connections
from . import metrics
from .model import BadInput
from .processors.base import Call
from .runner import DeadlineExceeded, QueueFull

log = logging.getLogger("infergate.worker")


class GrpcInferJob:
    """One ModelInferRequest (its bytes) for an inference thread."""

    __slots__ = ("face", "message")

    def __init__(self, face, message: bytes):
        self.face = face
        self.message = message

    def decode(self) -> Call:
        face, model = self.face, self.face.model
        fast = decode_grpc(self.message, face.types)
        if fast is not None and fast[0] == face.name and fast[1] in ("", face.name):
            _, _, request_id, feeds, wanted = fast
            return Call(model.check_feeds(feeds), model.check_outputs(wanted), request_id)
        try:
            request = oip.parse_infer_request(self.message)
            wrong = face.model_error(request.model_name, request.model_version)
            if wrong is not None:
                raise GrpcStatus(NOT_FOUND, wrong)
            feeds = oip.feeds_from_grpc(request)
        except CodecError as exc:
            raise BadInput(str(exc)) from None
        return Call(model.check_feeds(feeds),
                    model.check_outputs([o.name for o in request.outputs]), request.id)

    def finish(self, call: Call, outputs: list, started: float) -> bytes:
        face = self.face
        answer = encode_grpc(face.grpc_answer, call.output_names, outputs, call.context)
        if answer is None:
            response = pb.ModelInferResponse(model_name=face.name, model_version=face.name,
                                             id=call.context)
            try:
                oip.fill_grpc_response(response, call.output_names, outputs)
            except CodecError as exc:
                raise BadInput(str(exc)) from None
            answer = response.SerializeToString()
        metrics.observe(200, time.perf_counter() - started)
        return answer

    def serve(self, started: float) -> tuple:
        serve = self.face.serve_binary
        fast = serve.grpc(self.message) if serve is not None else None
        if fast is not None:
            metrics.observe(200, time.perf_counter() - started)
            return fast
        call = self.decode()
        return self.finish(call, self.face.model.run(call.feeds, call.output_names),
                           started), call.rows

    def answer(self, started: float) -> bytes:
        return self.serve(started)[0]


class GrpcFace:
    """inference.GRPCInferenceService and grpc.health.v1's Check over a worker's OipFace."""

    def __init__(self, face, max_message: int):
        self.face = face
        self.app = face.app
        http = self.app.server  # the same timeouts as the worker's HTTP/1.1 connections
        # Connections: the gateway's cap (below the descriptor limit), counting the HTTP
        # ones; past it the longest idle gRPC connection makes room.
        self.server = GrpcServer(self.call, max_message, self.status_of,
                                 read_timeout=http.read_timeout, idle_timeout=http.idle_timeout,
                                 max_connections=default_max_connections(),
                                 others=lambda: len(http.connections))
        self.serving = False
        self.methods = oip.grpc_routes(self)
        self._server_metadata = pb.ServerMetadataResponse(
            **oip.server_metadata()).SerializeToString()
        self._metadata = self._config = None
        if face.model is not None:
            self._metadata = oip.metadata_message(face.metadata).SerializeToString()
            self._config = oip.config_message(face.config).SerializeToString()

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> int:
        return await self.server.listen(host, port, reuse_port)

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving

    async def stop(self, grace: float) -> None:
        self.serving = False
        await self.server.drain(grace)

    # -- calls: (metadata, message bytes) -> bytes, a GrpcStatus, or a Future of bytes -----

    def call(self, path: str, metadata: dict, message: bytes, peer):
        method = self.methods.get(path)
        if method is None:
            return GrpcStatus(UNIMPLEMENTED, f"method {path} is not served here")
        token = self.app.token
        if token and path in oip.GRPC_MODEL_METHODS:
            reason = raw_token_refusal(metadata.get("authorization", ""), (token,),
                                       self.face.name)
            if reason is not None:
                metrics.observe(401, None)
                return GrpcStatus(UNAUTHENTICATED, reason)
        return method(message)

    def _model(self, message: bytes, message_type, answer: bytes):
        """`answer` if the request names this worker's model (and version)."""
        try:
            request = message_type.FromString(message)
        except Exception as exc:
            return GrpcStatus(INVALID_ARGUMENT, f"the request does not parse: {exc}")
        wrong = self.face.model_error(request.name, request.version)
        return GrpcStatus(NOT_FOUND, wrong) if wrong is not None else answer

    def server_live(self, message):
        return oip.SERVER_LIVE

    def server_ready(self, message):
        return oip.SERVER_READY[self.face.ready]

    def server_metadata(self, message):
        return self._server_metadata

    def model_ready(self, message):
        return self._model(message, pb.ModelReadyRequest,
                           oip.MODEL_READY[self.face.ready])

    def model_metadata(self, message):
        return self._model(message, pb.ModelMetadataRequest, self._metadata)

    def model_config(self, message):
        return self._model(message, pb.ModelConfigRequest, self._config)

    def health_check(self, message):
        serving = self.serving and self.face.ready
        return oip.HEALTH[serving]

    def model_infer(self, message: bytes):
        started = time.perf_counter()
        job = GrpcInferJob(self.face, message)
        app = self.app
        deadline = app.runner.deadline()
        try:
            if app.batcher is not None:
                return app.batcher.submit(deadline, job, job.finish, started)
            return app.runner.submit(deadline, job.answer, started)
        except QueueFull as exc:
            return self.status_of(exc)

    def status_of(self, exc: BaseException) -> GrpcStatus | None:
        """The gRPC status of an infer job's exception (None: unexpected, INTERNAL)."""
        if isinstance(exc, BadInput):
            metrics.observe(400, None)
            return GrpcStatus(INVALID_ARGUMENT, str(exc))
        if isinstance(exc, QueueFull):
            metrics.observe(450, None)
            return GrpcStatus(UNAVAILABLE, f"the instance queue is full "
                              f"({self.app.settings.max_queue_size} requests waiting); "
                              f"retry on another instance")
        if isinstance(exc, DeadlineExceeded):
            metrics.observe(408, None)
            return GrpcStatus(DEADLINE_EXCEEDED, f"the request took longer than rpc.keepalive "
                              f"({self.app.settings.keepalive} ms)")
        return None
