"""The worker's Open Inference Protocol over gRPC: inference.GRPCInferenceService.

grpcio's asyncio server on the worker's own event loop, beside the HTTP
server, serving the same `OipFace` (gateway/worker/oip.py): ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig,
ModelInfer and ModelStreamInfer, and grpc.health.v1 (SERVING once warmed up,
NOT_SERVING while draining). An infer request is queued on the same runner or
batcher as HTTP ones and decoded, run and answered on an inference thread
(`GrpcInferJob`); answers carry their data in `raw_output_contents`.

The service token, when the worker has one, is the `authorization` metadata.
Errors map to gRPC codes as the HTTP statuses they stand for: bad input
INVALID_ARGUMENT, queue full UNAVAILABLE (try another instance), the
service's keepalive passed DEADLINE_EXCEEDED.
"""
from __future__ import annotations

import hmac
import logging
import time

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..codec import oip
from ..codec.tensors import CodecError
from ..protos import oip_pb2 as pb
from . import metrics
from .model import BadInput
from .processors.base import Call
from .runner import DeadlineExceeded, QueueFull

log = logging.getLogger("infergate.worker")

class GrpcInferJob:
    """One ModelInferRequest for an inference thread."""

    __slots__ = ("face", "request")

    def __init__(self, face, request):
        self.face = face
        self.request = request

    def decode(self) -> Call:
        request = self.request
        try:
            feeds = oip.feeds_from_grpc(request)
        except CodecError as exc:
            raise BadInput(str(exc)) from None
        model = self.face.model
        return Call(model.check_feeds(feeds),
                    model.check_outputs([o.name for o in request.outputs]), request)

    def finish(self, call: Call, outputs: list, started: float):
        face = self.face
        response = pb.ModelInferResponse(model_name=face.name, model_version=face.name,
                                         id=call.context.id)
        try:
            oip.fill_grpc_response(response, call.output_names, outputs)
        except CodecError as exc:
            raise BadInput(str(exc)) from None
        metrics.observe(200, time.perf_counter() - started)
        return response

    def serve(self, started: float) -> tuple:
        call = self.decode()
        return self.finish(call, self.face.model.run(call.feeds, call.output_names),
                           started), call.rows

    def answer(self, started: float):
        return self.serve(started)[0]


class GrpcFace:
    """inference.GRPCInferenceService and grpc.health.v1 over a worker's OipFace."""

    def __init__(self, face, max_message: int):
        self.face = face
        self.app = face.app
        self.server = aio.server(options=oip.grpc_options(max_message))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        unary = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest,
                               pb.ServerMetadataResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest,
                              pb.ModelMetadataResponse),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelInfer": (self.model_infer, None, pb.ModelInferResponse),  # bytes in
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request and request.FromString,
            response_serializer=response.SerializeToString)
            for name, (fn, request, response) in unary.items()}
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(oip.GRPC_SERVICE, handlers),))
        self._metadata = self._config = None
        if face.model is not None:
            self._metadata = oip.metadata_message(face.metadata)
            self._config = oip.config_message(face.config)
        self._server_metadata = pb.ServerMetadataResponse(**oip.server_metadata())

    async def listen(self, host: str, port: int) -> int:
        bound = self.server.add_insecure_port(f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot listen for gRPC on {host}:{port}")
        await self.server.start()
        return bound

    async def set_serving(self, serving: bool) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING if serving
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)

    # -- methods -----------------------------------------------------------------------------

    async def _checked(self, context, name: str | None = None, version: str = "") -> None:
        """Abort with the right code unless the caller may use (name, version)."""
        token = self.app.token
        if token:
            given = dict(context.invocation_metadata()).get("authorization", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    f"service {self.face.name!r} needs its token in the "
                                    f"authorization metadata" if not given else
                                    "the token does not match")
        if name is not None:
            wrong = self.face.model_error(name, version)
            if wrong is not None:
                await context.abort(grpc.StatusCode.NOT_FOUND, wrong)

    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self.face.ready)

    async def server_metadata(self, request, context):
        return self._server_metadata

    async def model_ready(self, request, context):
        await self._checked(context, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.face.ready)

    async def model_metadata(self, request, context):
        await self._checked(context, request.name, request.version)
        return self._metadata

    async def model_config(self, request, context):
        await self._checked(context, request.name, request.version)
        return self._config

    def _submit(self, request):
        """A Future of the answer to a ModelInferRequest (raises QueueFull at once)."""
        started = time.perf_counter()
        job = GrpcInferJob(self.face, request)
        app = self.app
        deadline = app.runner.deadline()
        if app.batcher is not None:
            return app.batcher.submit(deadline, job, job.finish, started)
        return app.runner.submit(deadline, job.answer, started)

    async def model_infer(self, data: bytes, context):
        await self._checked(context)
        try:
            request = oip.parse_infer_request(data)
        except CodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        wrong = self.face.model_error(request.model_name, request.model_version)
        if wrong is not None:
            await context.abort(grpc.StatusCode.NOT_FOUND, wrong)
        try:
            return await self._submit(request)
        except Exception as exc:
            code, message = self._status(exc)
            await context.abort(code, message)

    async def model_stream_infer(self, messages, context):
        """Answers in the order the requests came; an error answers that request alone."""
        await self._checked(context)
        async for data in messages:
            try:
                request = oip.parse_infer_request(data)
            except CodecError as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))
                continue
            wrong = self.face.model_error(request.model_name, request.model_version)
            if wrong is not None:
                yield pb.ModelStreamInferResponse(error_message=wrong)
                continue
            try:
                response = await self._submit(request)
            except Exception as exc:
                yield pb.ModelStreamInferResponse(error_message=self._status(exc)[1])
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    def _status(self, exc: BaseException) -> tuple:
        if isinstance(exc, BadInput):
            metrics.observe(400, None)
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        if isinstance(exc, QueueFull):
            metrics.observe(450, None)
            return grpc.StatusCode.UNAVAILABLE, (
                f"the instance queue is full ({self.app.settings.max_queue_size} requests "
                f"waiting); retry on another instance")
        if isinstance(exc, DeadlineExceeded):
            metrics.observe(408, None)
            return grpc.StatusCode.DEADLINE_EXCEEDED, (
                f"the request took longer than rpc.keepalive ({self.app.settings.keepalive} ms)")
        log.error("gRPC inference failed", exc_info=exc)
        metrics.observe(500, None)
        return grpc.StatusCode.INTERNAL, "internal error"
