"""The one object every filter of the chain reads and annotates."""
from __future__ import annotations

import itertools
import os

# Request ids: a random per-process prefix and a counter (uuid4 costs more per request).
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)


class Exchange:
    __slots__ = ("request", "service", "subpath", "route", "backend", "extra", "request_id",
                 "response_headers", "started")

    def __init__(self, request, service: str, subpath: str, started: float):
        self.started = started
        self.request = request
        self.service = service
        self.subpath = subpath
        self.route = None
        self.backend = None
        self.extra = []  # (bytes, bytes) headers added to the upstream request
        self.request_id = (request.headers.get("x-request-id")
                           or f"{_PREFIX}{next(_COUNTER):016x}")
        self.response_headers = []  # (str, str) added to the client's response
