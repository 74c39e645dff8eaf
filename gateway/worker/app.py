"""The worker: one model instance behind the EAS data-plane routes.

Routes: POST /api/predict/<service>[/<subpath>] (predict), GET of the same
(signature JSON), /health (liveness), /ready (503 while draining), /metrics.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from prometheus_client import generate_latest

from .. import auth
from ..server import HttpServer, Request, Response, error_response, json_response
from ..serviceconfig import RpcSettings
from . import metrics
from .model import BadInput, OnnxModel
from .processors import make_processor
from .runner import DeadlineExceeded, QueueFull, ThreadedRunner
from .user_code import UserProcessor

log = logging.getLogger("infergate.worker")

_HEALTH = json_response({"status": "ok"})
# Bodies (in or out) above this are decoded/encoded on a codec thread: below it the
# hop costs more than the work it moves.
LARGE_PAYLOAD = 256 << 10


class WorkerApp:
    def __init__(self, service: str, settings: RpcSettings, model_path: str | None,
                 processor: str, token: str = "", processor_entry: str | None = None,
                 max_body_size: int = 64 << 20, intra_op_threads: int = 1):
        self.service = service
        self.settings = settings
        self.token = token
        self.prefix = f"/api/predict/{service}"
        self.runner = ThreadedRunner(settings)
        self.codec_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="codec")
        self.user = None
        self.model = None
        if processor == "python":
            entry = processor_entry or model_path
            self.user = UserProcessor(entry, model_path if entry != model_path else None)
        else:
            self.model = OnnxModel(model_path, intra_op_threads)
            self.processor = make_processor(processor, self.model)
            self.signature = json_response(self.model.signature())
        self.batcher = None
        if settings.batching and self.model is not None:
            from ..batching import BatchingRunner
            self.batcher = BatchingRunner(self.model, settings)
            self.infer = self.batcher.infer
        else:
            self.infer = self._infer_unbatched
        self.server = HttpServer(self.handle, max_body_size=max_body_size)
        self.port = None

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> int:
        self.runner.bind(asyncio.get_running_loop())
        self.port = await self.server.listen(host, port, reuse_port)
        log.info("worker for service %r listening on %s:%d", self.service, host, self.port)
        return self.port

    async def _infer_unbatched(self, call, deadline):
        return await self.runner.call(deadline, self.model.run, call.feeds, call.output_names)

    def handle(self, request: Request):
        path = request.path
        if path == self.prefix or path.startswith(self.prefix + "/"):
            if request.method == "POST":
                return self.predict(request)
            if request.method == "GET":
                if self.model is None:
                    return error_response(404, "a python processor has no model signature")
                return self.signature
            return error_response(405, f"{request.method} is not allowed on {path}")
        if path == "/health":
            return _HEALTH
        if path == "/ready":
            return error_response(503, "draining") if self.server.draining else _HEALTH
        if path == "/metrics":
            return Response(200, generate_latest(), None, "text/plain; version=0.0.4")
        if path.startswith("/api/predict/"):
            return error_response(404, f"unknown service {path[len('/api/predict/'):].split('/')[0]!r}; "
                                       f"this worker serves {self.service!r}")
        return error_response(404, f"no route for {path}")

    async def predict(self, request: Request) -> Response:
        started = time.perf_counter()
        response = await self._predict(request)
        metrics.observe(response.status, time.perf_counter() - started)
        return response

    async def _predict(self, request: Request) -> Response:
        if self.token:
            reason = auth.verify(request.headers, request.method, request.path, request.body,
                                 self.token, self.service)
            if reason:
                return error_response(401, reason)
        deadline = self.runner.deadline()
        try:
            if self.user is not None:
                body, status = await self.runner.call(deadline, self.user.process, request.body)
                return Response(status, body)
            body = request.body
            if len(body) > LARGE_PAYLOAD:
                call = await self._off_loop(self.processor.decode, body)
            else:
                call = self.processor.decode(body)
            outputs = await self.infer(call, deadline)
            if sum(output.nbytes for output in outputs) > LARGE_PAYLOAD:
                answer = await self._off_loop(self.processor.encode, call, outputs)
            else:
                answer = self.processor.encode(call, outputs)
            return Response(200, answer, None, self.processor.content_type)
        except BadInput as exc:
            return error_response(400, str(exc))
        except QueueFull:
            return error_response(450, f"the instance queue is full ({self.settings.max_queue_size} "
                                       "requests waiting); retry on another instance")
        except DeadlineExceeded:
            return error_response(408, f"the request took longer than rpc.keepalive "
                                       f"({self.settings.keepalive} ms)")

    def _off_loop(self, fn, *args):
        # Big bodies take milliseconds to decode or encode: keep the loop answering others.
        return asyncio.get_running_loop().run_in_executor(self.codec_pool, fn, *args)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await self.server.drain(timeout=self.settings.keepalive / 1000.0 + 5)
        await asyncio.get_running_loop().run_in_executor(None, self.runner.close)
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
        self.codec_pool.shutdown(wait=False)
