"""EAS-style custom processors: a user's class with initialize() and process(data).

The entry is `path/to/file.py` or `path/to/file.py:ClassName`. Without a class
name, the one class in the file that defines `process` is used. EAS
processors (`import allspark`, `class P(allspark.BaseProcessor)`) load
unchanged: gateway/worker/allspark.py stands in for the EAS runtime's module.

Answers follow EAS: status 0 or 200 is success; a status no HTTP client knows,
or an exception in process(), is a 400 carrying the message (a client's
request the processor refused, not a server failure: the gateway does not
retry it elsewhere).
"""
from __future__ import annotations

import http
import importlib.util
import inspect
import logging
import os
import sys

from ..server import error_response
from . import allspark

log = logging.getLogger("infergate.worker")

# What a processor may answer as it is: HTTP's codes and EAS's 450 (queue full).
KNOWN_STATUSES = frozenset(s.value for s in http.HTTPStatus) | {450}


def answer_of(processor, data: bytes) -> tuple[bytes, int]:
    """(body, HTTP status) of processor.process(data), as EAS answers it."""
    try:
        result = processor.process(data)
    except Exception as exc:
        log.warning("process() failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        return error_response(400, f"process() failed: {type(exc).__name__}: {exc}").body, 400
    if not (isinstance(result, tuple) and len(result) == 2):
        return error_response(400, "process() must return (data, status), got "
                                   f"{type(result).__name__}").body, 400
    body, status = result
    if isinstance(body, str):
        body = body.encode()
    try:
        status = int(status)
    except (TypeError, ValueError):
        status = -1
    if status == 0:
        status = 200
    return bytes(body), status if status in KNOWN_STATUSES else 400


class UserProcessor:
    def __init__(self, entry: str, model_path: str | None = None,
                 model_config: str | None = None):
        path, _, class_name = entry.partition(":")
        if not os.path.isfile(path):
            raise ValueError(f"processor entry {path!r} does not exist")
        sys.modules.setdefault("allspark", allspark)
        spec = importlib.util.spec_from_file_location("infergate_user_processor", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if class_name:
            cls = getattr(module, class_name, None)
            if cls is None:
                raise ValueError(f"{path} has no class {class_name!r}")
        else:
            candidates = [c for _, c in inspect.getmembers(module, inspect.isclass)
                          if c.__module__ == module.__name__ and callable(getattr(c, "process", None))]
            if len(candidates) != 1:
                raise ValueError(f"{path} must define exactly one class with a process() method "
                                 f"(found {len(candidates)}); name it as {path}:ClassName")
            cls = candidates[0]
        self.instance = cls()
        self.instance.model_path = model_path
        self.instance.model_config = model_config
        if callable(getattr(self.instance, "initialize", None)):
            self.instance.initialize()

    def process(self, data: bytes) -> tuple[bytes, int]:
        return answer_of(self.instance, data)
