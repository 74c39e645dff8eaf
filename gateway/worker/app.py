"""The worker: one model instance behind the EAS data-plane routes.

Routes: POST /api/predict/<service>[/<subpath>] (predict), GET of the same
(signature JSON), /health (liveness), /ready (503 while warming up or
draining), /metrics, and the Open Inference Protocol's under /v2 (oip.py;
gRPC in oip_grpc.py).

A predict request costs the event loop only its HTTP work: the handler returns
the Future of a job, and the inference thread (or, with batching, the batch's
thread) decodes, runs, encodes and counts it, big bodies included. Errors the
runner or the batcher raise (queue full, deadline, bad input) are answered by
`answer_error`.
"""
from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import generate_latest

from .. import auth
from ..server import HttpServer, Request, Response, error_response, json_response
from ..serviceconfig import RpcSettings
from . import gpu_metrics, metrics
from .model import BadInput, OnnxModel
from .oip import OipFace
from .processors import make_processor
from .processors.base import BodyTooLarge
from .runner import DeadlineExceeded, QueueFull, ThreadedRunner, cpu_inference_threads
from .user_code import UserProcessor
from .warmup import WarmUp

log = logging.getLogger("infergate.worker")

_HEALTH = json_response({"status": "ok"})


class WorkerApp:
    def __init__(self, service: str, settings: RpcSettings, model_path: str | None,
                 processor: str, token: str = "", processor_entry: str | None = None,
                 max_body_size: int = 64 << 20, intra_op_threads: int = 1,
                 device: str = "auto", provider_options: dict | None = None,
                 signature_name: str | None = None, model_config: str | None = None):
        self.service = service
        self.settings = settings
        self.token = token
        self.prefix = f"/api/predict/{service}"
        self.prefix_slash = self.prefix + "/"
        self.user = None
        self.model = None
        threads = settings.worker_threads
        if processor == "python":
            entry = processor_entry or model_path
            self.user = UserProcessor(entry, model_path if entry != model_path else None,
                                      model_config)
        else:
            self.model = OnnxModel(model_path, intra_op_threads, device, provider_options,
                                   signature_name)
            self.processor = make_processor(processor, self.model, max_body_size)
            self.signature = json_response(self.model.signature())
            if self.model.provider == "CPUExecutionProvider":
                threads = cpu_inference_threads(threads, intra_op_threads)
        self.runner = ThreadedRunner(settings, threads)
        self.batcher = None
        if settings.batching and self.model is not None:
            from ..batching import BatchingRunner
            self.batcher = BatchingRunner(self.model, settings, self.processor.decode,
                                          self._run_whole)
        self.warm_up = WarmUp(self.model, self.batcher.batch_sizes if self.batcher else (1,))
        self._timeout = error_response(408, f"the request took longer than rpc.keepalive "
                                            f"({settings.keepalive} ms)")
        self._queue_full = error_response(
            450, f"the instance queue is full ({settings.max_queue_size} requests waiting); "
                 "retry on another instance")
        if self.model is not None and self.model.provider != "CPUExecutionProvider":
            gpu_metrics.register()
        self.server = HttpServer(self.handle, max_body_size=max_body_size,
                                 answer_error=self.answer_error)
        self.oip = OipFace(self, max_body_size)
        self.max_body_size = max_body_size
        self.grpc = None
        self.port = self.grpc_port = None

    async def listen(self, host: str, port: int, reuse_port: bool = False,
                     grpc_port: int | None = None) -> int:
        """Serve HTTP on host:port, and gRPC on host:grpc_port unless it is None (0: any)."""
        loop = asyncio.get_running_loop()
        self.runner.bind(loop)
        if self.batcher is not None:
            self.batcher.bind(loop)
        self.port = await self.server.listen(host, port, reuse_port)
        log.info("worker for service %r listening on %s:%d", self.service, host, self.port)
        if grpc_port is not None and self.model is not None:
            from .oip_grpc import GrpcFace

            self.grpc = GrpcFace(self.oip, self.max_body_size)
            self.grpc_port = await self.grpc.listen(host, grpc_port, reuse_port)
            log.info("worker for service %r serving gRPC on %s:%d", self.service, host,
                     self.grpc_port)
        return self.port

    def handle(self, request: Request):
        path = request.path
        if path == self.oip.infer_path and request.method == "POST":  # v2's hot route
            return self.oip.infer(request)
        if path == self.prefix or path.startswith(self.prefix_slash):
            if self.model is not None and path.startswith("/v2", len(self.prefix)) and (
                    len(path) == len(self.prefix) + 3 or path[len(self.prefix) + 3] == "/"):
                # (A python processor's subpaths, /v2 included, are its own.)
                return self.oip.handle(request, path[len(self.prefix):], named=False)
            if request.method == "POST":
                return self.predict(request)
            if request.method == "GET":
                if self.model is None:
                    return error_response(404, "a python processor has no model signature")
                if self.token:  # the model's inputs and outputs are the service's to show
                    reason = auth.verify(request.headers, request.method, path, request.body,
                                         self.token, self.service, query=request.query)
                    if reason:
                        return error_response(401, reason)
                return self.signature
            return error_response(405, f"{request.method} is not allowed on {path}")
        if path.startswith("/v2") and (len(path) == 3 or path[3] == "/"):
            return self.oip.handle(request, path)
        if path == "/health":
            return _HEALTH
        if path == "/ready":
            if self.server.draining:
                return error_response(503, "draining")
            if not self.warm_up.done:
                return error_response(503, self.warm_up.progress())
            return _HEALTH
        if path == "/metrics":
            return Response(200, generate_latest(), None, "text/plain; version=0.0.4")
        if path.startswith("/api/predict/"):
            return error_response(404, f"unknown service {path[len('/api/predict/'):].split('/')[0]!r}; "
                                       f"this worker serves {self.service!r}")
        return error_response(404, f"no route for {path}")

    def answer_error(self, exc: BaseException) -> Response | None:
        """What a predict job's exception answers (None: unexpected, a 500)."""
        if isinstance(exc, BodyTooLarge):
            response = error_response(413, str(exc))
        elif isinstance(exc, BadInput):
            response = error_response(400, str(exc))
        elif isinstance(exc, QueueFull):
            response = self._queue_full
        elif isinstance(exc, DeadlineExceeded):
            response = self._timeout
        else:
            return None
        metrics.observe(response.status, None)
        return response

    def predict(self, request: Request):
        """A Response, or a Future of one (the connection writes it when it resolves)."""
        started = time.perf_counter()
        if self.token:
            reason = auth.verify(request.headers, request.method, request.path, request.body,
                                 self.token, self.service, query=request.query)
            if reason:
                metrics.observe(401, None)
                return error_response(401, reason)
        deadline = self.runner.deadline()
        if self.user is not None:
            return self.runner.submit(deadline, self._run_user, request.body, started)
        if self.batcher is None:
            return self.runner.submit(deadline, self._run, request.body, started)
        return self.batcher.submit(deadline, request.body, self._encode, started)

    # -- on inference threads --------------------------------------------------------------

    def _run(self, body: bytes, started: float) -> Response:
        return self._answer(self.processor.serve(body)[0], started)

    def _run_whole(self, source, started: float) -> tuple[Response, int]:
        """The response to one request (a body, or a v2 job) run alone, and the rows it ran."""
        if type(source) is not bytes:
            return source.serve(started)
        answer, rows = self.processor.serve(source)
        return self._answer(answer, started), rows

    def _encode(self, call, outputs: list, started: float) -> Response:
        return self._answer(self.processor.encode(call, outputs), started)

    def _answer(self, body: bytes, started: float) -> Response:
        metrics.observe(200, time.perf_counter() - started)
        return Response(200, body, None, self.processor.content_type)

    def _run_user(self, body: bytes, started: float) -> Response:
        answer, status = self.user.process(body)
        metrics.observe(status, time.perf_counter() - started)
        return Response(status, answer)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Warm the model up at its batch sizes; /ready answers 503 until it is done."""
        await asyncio.get_running_loop().run_in_executor(None, self.warm_up.run)
        if self.grpc is not None:
            await self.grpc.set_serving(True)

    async def stop(self) -> None:
        grace = self.settings.keepalive / 1000.0 + 5
        if self.grpc is not None:
            await asyncio.gather(self.server.drain(timeout=grace), self.grpc.stop(grace))
        else:
            await self.server.drain(timeout=grace)
        await asyncio.get_running_loop().run_in_executor(None, self.runner.close)
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
