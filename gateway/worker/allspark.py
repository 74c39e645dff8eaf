"""`import allspark`: EAS Python processors run unchanged.

An EAS processor subclasses `allspark.BaseProcessor`, loads what it needs in
`initialize()` and answers each request body in `process(data)` with
`(bytes, status)`; status 0 or 200 is success (EAS manual, "Python
processors"). A worker loading such a file (gateway/worker/user_code.py) makes
this module importable as `allspark` first. `get_model_path()` and
`get_model_config()` give the service's `model_path` and `model_config`, as the
EAS runtime does.

`run()` serves the processor alone, for local testing as the manual shows
(`python app.py`, then `curl http://127.0.0.1:8080/test -d '10 20'`): every
POST is a request, on `endpoint` (default 0.0.0.0:8080).
"""
from __future__ import annotations


class BaseProcessor:
    def __init__(self, worker_threads: int = 5, worker_processes: int = 1,
                 endpoint: str | None = None):
        self.worker_threads = worker_threads
        self.worker_processes = worker_processes
        self.endpoint = endpoint or "0.0.0.0:8080"
        self.model_path = None
        self.model_config = None

    def initialize(self) -> None:
        """Load models and the like, once, before the first request."""

    def process(self, data: bytes):
        raise NotImplementedError("a processor defines process(data) -> (bytes, status)")

    def get_model_path(self):
        return self.model_path

    def get_model_config(self):
        return self.model_config

    def run(self) -> None:
        """Serve this processor on `endpoint` until interrupted (local testing)."""
        import asyncio

        import uvloop

        from ..server import HttpServer, Response
        from .user_code import answer_of

        self.initialize()
        host, _, port = self.endpoint.rpartition(":")

        async def serve():
            loop = asyncio.get_running_loop()

            def answer(data):
                body, status = answer_of(self, data)
                return Response(status, body)

            def handle(request):
                if request.method != "POST":
                    return Response(405, b"POST a request body")
                return loop.run_in_executor(None, answer, request.body)

            await HttpServer(handle).listen(host or "0.0.0.0", int(port))
            await asyncio.Event().wait()

        uvloop.run(serve())
