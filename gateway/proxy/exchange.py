"""The one object every filter of the chain reads and annotates."""
from __future__ import annotations

import uuid


class Exchange:
    __slots__ = ("request", "service", "subpath", "route", "backend", "extra", "request_id",
                 "response_headers")

    def __init__(self, request, service: str, subpath: str):
        self.request = request
        self.service = service
        self.subpath = subpath
        self.route = None
        self.backend = None
        self.extra = []  # (bytes, bytes) headers added to the upstream request
        self.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.response_headers = []  # (str, str) added to the client's response
