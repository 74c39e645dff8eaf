"""The gateway's gRPC port: inference.GRPCInferenceService in front of every service.

Each call becomes the HTTP request of the Open Inference Protocol that says
the same thing (ModelInfer: POST /v2/models/<m>[/versions/<v>]/infer with
every tensor in binary) and goes through the gateway's own handler: the same
chain as HTTP requests (the service's token from the `authorization`
metadata, rate limits, version choice, with metadata read as headers) and the
same data plane (instances, retries on another one, deadlines). Workers and
Triton servers behind the gateway are reached over HTTP; the answer comes back
as the gRPC message, its data in `raw_output_contents`.

Why not forward gRPC as gRPC: one forwarder, one set of retry and routing
rules, and any v2 HTTP upstream (a Triton fleet included) works unchanged.

The gateway answers ServerLive, ServerReady and ServerMetadata itself.
HTTP statuses map to the gRPC codes they stand for (`CODES`).
"""
from __future__ import annotations

import logging

import grpc
import orjson
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..codec import oip
from ..codec.tensors import CodecError
from ..protos import oip_pb2 as pb
from ..server import Request, Response

log = logging.getLogger("infergate.gateway")

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.INVALID_ARGUMENT, 450: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _model_path(name: str, version: str, action: str = "") -> str:
    path = f"/v2/models/{name}"
    if version:
        path += f"/versions/{version}"
    return path + action


class UpstreamError(Exception):
    """An HTTP answer that is not a 200, as the gRPC status it stands for."""

    def __init__(self, response: Response):
        try:
            document = orjson.loads(response.body)
            message = document.get("error") or document.get("message") or ""
        except (orjson.JSONDecodeError, AttributeError):
            message = response.body[:200].decode("utf-8", "replace")
        super().__init__(message or f"HTTP {response.status}")
        self.code = CODES.get(response.status, grpc.StatusCode.INTERNAL if
                              response.status < 500 else grpc.StatusCode.UNAVAILABLE)


class GrpcFront:
    def __init__(self, app, max_message: int):
        self.app = app  # GatewayApp: its handle() takes the HTTP form of each call
        self.server = aio.server(options=oip.grpc_options(max_message))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        unary = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest,
                               pb.ServerMetadataResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
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
        self._server_metadata = pb.ServerMetadataResponse(**oip.server_metadata())

    async def listen(self, host: str, port: int) -> int:
        bound = self.server.add_insecure_port(f"[{host}]:{port}" if ":" in host
                                              else f"{host}:{port}")
        if not bound:
            raise OSError(f"cannot listen for gRPC on {host}:{port}")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def stop(self, grace: float) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)

    # -- one call through the HTTP handler -----------------------------------------------------

    async def _http(self, context, method: str, path: str, body: bytes = b"",
                    header_length: int | None = None) -> Response:
        """The gateway's answer to the HTTP form of a call (a 200, else UpstreamError)."""
        headers, raw = {}, []
        for key, value in context.invocation_metadata() or ():
            if key.endswith("-bin") or key.startswith(":") or key in ("content-type", "te"):
                continue
            headers[key] = value
            raw.append((key.encode("latin-1"), value.encode("latin-1")))
        if header_length is not None:
            headers["inference-header-content-length"] = str(header_length)
            raw.append((b"Inference-Header-Content-Length", str(header_length).encode()))
        peer = context.peer() or ""  # "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"
        host, _, port = peer.partition(":")[2].rpartition(":")
        request = Request(method, path, "", headers, raw, body,
                          (host.strip("[]"), int(port)) if port.isdigit() else None, True)
        response = self.app.handle(request)
        if not isinstance(response, Response):
            response = await response
        if response.status != 200:
            raise UpstreamError(response)
        return response

    async def _call(self, context, make):
        try:
            return await make()
        except UpstreamError as exc:
            await context.abort(exc.code, str(exc))
        except CodecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (ValueError, KeyError, TypeError) as exc:  # an upstream answer we cannot read
            log.warning("unreadable answer from upstream: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the upstream's answer is not a valid inference response")

    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self.app.ready and not self.app.dataplane.draining)

    async def server_metadata(self, request, context):
        return self._server_metadata

    async def model_ready(self, request, context):
        async def ready():
            try:
                await self._http(context, "GET", _model_path(request.name, request.version,
                                                             "/ready"))
            except UpstreamError as exc:
                if exc.code is grpc.StatusCode.UNAVAILABLE:
                    return pb.ModelReadyResponse(ready=False)
                raise
            return pb.ModelReadyResponse(ready=True)
        return await self._call(context, ready)

    async def model_metadata(self, request, context):
        async def metadata():
            response = await self._http(context, "GET", _model_path(request.name,
                                                                    request.version))
            return oip.metadata_message(orjson.loads(response.body))
        return await self._call(context, metadata)

    async def model_config(self, request, context):
        async def config():
            response = await self._http(context, "GET", _model_path(request.name,
                                                                    request.version, "/config"))
            return oip.config_message(orjson.loads(response.body))
        return await self._call(context, config)

    async def _infer(self, context, data: bytes):
        request = oip.parse_infer_request(data)
        body, header_length = oip.http_from_grpc(request)
        response = await self._http(context, "POST", _model_path(
            request.model_name, request.model_version, "/infer"), body, header_length)
        answer = pb.ModelInferResponse()
        oip.grpc_from_http(response.body, _header(response, b"inference-header-content-length"),
                           answer)
        return answer

    async def model_infer(self, data: bytes, context):
        return await self._call(context, lambda: self._infer(context, data))

    async def model_stream_infer(self, messages, context):
        async for data in messages:
            try:
                answer = await self._infer(context, data)
            except (UpstreamError, CodecError) as exc:
                yield pb.ModelStreamInferResponse(error_message=str(exc))
                continue
            yield pb.ModelStreamInferResponse(infer_response=answer)


def _header(response: Response, lower_name: bytes):
    """A header's value in a proxied answer (its headers are raw "Name: value" lines)."""
    headers = response.headers
    if not headers:
        return None
    if isinstance(headers, bytes):
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == lower_name:
                return value.strip().decode("latin-1")
        return None
    for name, value in headers:
        if name.lower().encode("latin-1") == lower_name:
            return value
    return None
