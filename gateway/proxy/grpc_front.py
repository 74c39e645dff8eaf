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

The gRPC server is the workers' compiled one (csrc/server/grpcwire.pyx): unary
calls only (ModelStreamInfer is UNIMPLEMENTED). The gateway answers ServerLive,
ServerReady, ServerMetadata and grpc.health.v1's Check itself. HTTP statuses
map to the gRPC codes they stand for (`CODES`).

Nothing unvalidated crosses into HTTP/1.1 (issue 21, C2: a CR LF in metadata or
a model name once injected a second request on a pooled upstream connection).
nghttp2 already refuses header fields that are not valid HTTP/2 (CR, LF and NUL
in values, upper case or separators in names); the upstream request is still
built only from fields checked here: metadata names are RFC 9110 tokens and
values RFC 9110 field values (no control characters but tab), `x-request-id`
is visible ASCII (128 at most), and model names and versions are
`[A-Za-z0-9_.-]{1,128}` without `..` (a superset of service names). What fails
is INVALID_ARGUMENT naming the field.
"""
from __future__ import annotations

import asyncio
import logging
import re

import orjson

from .._native.grpcwire import (DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT, NOT_FOUND,
                                PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAUTHENTICATED,
                                UNAVAILABLE, UNIMPLEMENTED, GrpcServer, GrpcStatus)
from ..auth import raw_token_refusal
from ..codec import oip
from ..codec.tensors import CodecError
from ..protos import oip_pb2 as pb
from ..server import Request, Response

log = logging.getLogger("infergate.gateway")

CODES = {
    400: INVALID_ARGUMENT, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: NOT_FOUND,
    405: UNIMPLEMENTED, 408: DEADLINE_EXCEEDED, 413: RESOURCE_EXHAUSTED,
    429: RESOURCE_EXHAUSTED, 431: INVALID_ARGUMENT, 450: UNAVAILABLE, 502: UNAVAILABLE,
    503: UNAVAILABLE, 504: DEADLINE_EXCEEDED,
}


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")   # RFC 9110 token (HTTP/2 names are lower case)
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # RFC 9110 field-value, as latin-1
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_MODEL = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# Metadata that is gRPC's own or frames the HTTP/1.1 message the gateway writes itself:
# never forwarded.
_NOT_FORWARDED = frozenset((
    "content-type", "te", "grpc-accept-encoding", "grpc-timeout", "grpc-encoding",
    "content-length", "transfer-encoding", "host", "connection", "keep-alive",
    "proxy-connection", "upgrade", "expect", "trailer", "inference-header-content-length"))


def _model_path(name: str, version: str, action: str = "") -> str:
    """The v2 path of a model, from a checked name and version (INVALID_ARGUMENT else)."""
    for field, value in (("model name", name), ("model version", version)):
        if (value or field == "model name") and (
                not _MODEL.fullmatch(value) or ".." in value):
            raise GrpcStatus(INVALID_ARGUMENT, f"the {field} {value[:140]!r} is not "
                             f"[A-Za-z0-9_.-]{{1,128}} without '..'")
    path = f"/v2/models/{name}"
    if version:
        path += f"/versions/{version}"
    return path + action


def _headers(metadata: dict) -> dict:
    """The HTTP headers a call's metadata stands for, each checked (INVALID_ARGUMENT)."""
    headers = {}
    for name, value in metadata.items():
        if name in _NOT_FORWARDED:
            continue
        if not _TOKEN.fullmatch(name):
            raise GrpcStatus(INVALID_ARGUMENT, f"metadata name {name[:100]!r} is not an HTTP "
                                               f"token")
        if not _FIELD_VALUE.fullmatch(value):
            raise GrpcStatus(INVALID_ARGUMENT, f"metadata {name!r} holds a control character")
        headers[name] = value
    request_id = headers.get("x-request-id")
    if request_id is not None and not _REQUEST_ID.fullmatch(request_id):
        raise GrpcStatus(INVALID_ARGUMENT, "x-request-id must be 1 to 128 visible ASCII "
                                           "characters")
    return headers


def _status(response: Response) -> GrpcStatus:
    """The gRPC status an HTTP answer that is not a 200 stands for."""
    try:
        document = orjson.loads(response.body)
        message = document.get("error") or document.get("message") or ""
    except (orjson.JSONDecodeError, AttributeError):
        message = response.body[:200].decode("utf-8", "replace")
    code = CODES.get(response.status, INTERNAL if response.status < 500 else UNAVAILABLE)
    return GrpcStatus(code, message or f"HTTP {response.status}")


class GrpcFront:
    def __init__(self, app, max_message: int):
        self.app = app  # GatewayApp: its handle() takes the HTTP form of each call
        dataplane = app.dataplane
        self.server = GrpcServer(self.call, max_message, read_timeout=app.read_timeout,
                                 idle_timeout=app.idle_timeout,
                                 max_connections=app.max_connections,
                                 others=lambda: len(dataplane.clients),
                                 budget=dataplane)
        self.methods = oip.grpc_routes(self)
        self._server_metadata = pb.ServerMetadataResponse(
            **oip.server_metadata()).SerializeToString()

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> int:
        return await self.server.listen(host, port, reuse_port)

    async def stop(self, grace: float) -> None:
        await self.server.drain(grace)

    def call(self, path: str, metadata: dict, message: bytes, peer):
        method = self.methods.get(path)
        if method is None:
            return GrpcStatus(UNIMPLEMENTED, f"method {path} is not served here")
        result = method(_Caller(metadata, peer), message)
        if asyncio.iscoroutine(result):
            return asyncio.get_running_loop().create_task(result)
        return result

    # -- one call through the HTTP handler -----------------------------------------------------

    async def _http(self, caller: "_Caller", method: str, path: str, body: bytes = b"",
                    header_length: int | None = None) -> Response:
        """The gateway's answer to the HTTP form of a call (a 200, else GrpcStatus)."""
        headers = _headers(caller.metadata)
        if header_length is not None:
            headers["inference-header-content-length"] = str(header_length)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        request = Request(method, path, "", headers, raw, body, caller.peer, True)
        response = self.app.handle(request)
        if not isinstance(response, Response):
            response = await response
        if response.status != 200:
            raise _status(response)
        return response

    def server_live(self, caller, message):
        return oip.SERVER_LIVE

    def server_ready(self, caller, message):
        return oip.SERVER_READY[self.app.ready and not self.app.dataplane.draining]

    def server_metadata(self, caller, message):
        return self._server_metadata

    def health_check(self, caller, message):
        return oip.HEALTH[self.app.ready and not self.app.dataplane.draining]

    @staticmethod
    def _parse(message_type, message: bytes):
        try:
            return message_type.FromString(message)
        except Exception as exc:
            raise GrpcStatus(INVALID_ARGUMENT, f"the request does not parse: {exc}") from None

    async def model_ready(self, caller, message):
        request = self._parse(pb.ModelReadyRequest, message)
        try:
            await self._http(caller, "GET", _model_path(request.name, request.version,
                                                          "/ready"))
        except GrpcStatus as status:
            if status.code == UNAVAILABLE:
                return oip.MODEL_READY[False]
            raise
        return oip.MODEL_READY[True]

    async def model_metadata(self, caller, message):
        request = self._parse(pb.ModelMetadataRequest, message)
        response = await self._http(caller, "GET", _model_path(request.name, request.version))
        return _upstream(lambda: oip.metadata_message(orjson.loads(response.body)))

    async def model_config(self, caller, message):
        request = self._parse(pb.ModelConfigRequest, message)
        response = await self._http(caller, "GET", _model_path(request.name, request.version,
                                                                 "/config"))
        return _upstream(lambda: oip.config_message(orjson.loads(response.body)))

    def _token_check(self, caller, service: str) -> None:
        """UNAUTHENTICATED unless the call carries a token of `service` as it is (before a
        message's typed contents are turned into tensors on the loop: that costs work and
        memory linear in the message, which no caller without a token may spend). Over
        gRPC a token is raw: the HTTP body an EAS signature covers is the gateway's.
        Unknown services, and services without tokens, are left to the chain."""
        route = self.app.table.routes.get(service)
        if route is None or not (route.token or route.callers):
            return
        tokens = ([route.token] if route.token else []) + [token for token, _ in route.callers]
        reason = raw_token_refusal(caller.metadata.get("authorization", ""), tokens, service)
        if reason is not None:
            raise GrpcStatus(UNAUTHENTICATED, reason)

    async def model_infer(self, caller, message):
        try:
            request = oip.parse_infer_request(message)
            self._token_check(caller, request.model_name)
            body, header_length = oip.http_from_grpc(request)
        except CodecError as exc:
            raise GrpcStatus(INVALID_ARGUMENT, str(exc)) from None
        response = await self._http(caller, "POST", _model_path(
            request.model_name, request.model_version, "/infer"), body, header_length)

        def answer():
            message = pb.ModelInferResponse()
            oip.grpc_from_http(response.body, _header(
                response, b"inference-header-content-length"), message)
            return message
        return _upstream(answer)


class _Caller:
    """Who made a call: its metadata (read as HTTP headers) and address."""

    __slots__ = ("metadata", "peer")

    def __init__(self, metadata: dict, peer):
        self.metadata = metadata
        self.peer = peer


def _upstream(build) -> bytes:
    """The serialized message `build()` makes of an upstream's answer (UNAVAILABLE when
    the answer is not what the protocol says)."""
    try:
        return build().SerializeToString()
    except (ValueError, KeyError, TypeError, CodecError) as exc:
        log.warning("unreadable answer from upstream: %s", exc)
        raise GrpcStatus(UNAVAILABLE, "the upstream's answer is not a valid inference "
                                      "response") from None
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
