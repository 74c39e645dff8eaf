"""The gateway's access log: one JSON object per answered request (JSON lines).

Off by default; `infergate gateway --access-log PATH` turns it on. The data
plane calls it as each answer goes out, forwarded or not (requests it could not
read show "-" for the method and path): time (seconds since the epoch), client
address, method, path with query, status, the answer body's bytes, and
milliseconds from the first byte of the request to the answer. Lines are
buffered and written at least once a second, and at shutdown; the file is
created private to the gateway's user (0600).
"""
from __future__ import annotations

import os
import time

import orjson

FLUSH_S = 1.0


class AccessLog:
    def __init__(self, path: str):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        self.file = os.fdopen(fd, "ab", buffering=1 << 16)
        self.path = path
        self._timer = None

    def __call__(self, peer, method: bytes, target: bytes, status: int, length: int,
                 seconds: float) -> None:
        self.file.write(orjson.dumps({
            "time": round(time.time(), 3), "client": peer[0] if peer else None,
            "method": method.decode("latin-1"), "path": target.decode("latin-1"),
            "status": status, "bytes": length, "ms": round(seconds * 1000, 3)}) + b"\n")

    def start(self, loop) -> None:
        """Flush on `loop` every FLUSH_S seconds."""
        def tick():
            self.file.flush()
            self._timer = loop.call_later(FLUSH_S, tick)
        self._timer = loop.call_later(FLUSH_S, tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.file.close()
