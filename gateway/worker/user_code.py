"""EAS-style custom processors: a user's class with initialize() and process(data).

The entry is `path/to/file.py` or `path/to/file.py:ClassName`. Without a class
name, the one class in the file that defines `process` is used.
"""
from __future__ import annotations

import importlib.util
import inspect
import os


class UserProcessor:
    def __init__(self, entry: str, model_path: str | None = None):
        path, _, class_name = entry.partition(":")
        if not os.path.isfile(path):
            raise ValueError(f"processor entry {path!r} does not exist")
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
        if callable(getattr(self.instance, "initialize", None)):
            self.instance.initialize()

    def process(self, data: bytes) -> tuple[bytes, int]:
        """Run the user's process(); its answer must be (bytes or str, status)."""
        result = self.instance.process(data)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError("process() must return (data, status)")
        body, status = result
        if isinstance(body, str):
            body = body.encode()
        return bytes(body), int(status)
