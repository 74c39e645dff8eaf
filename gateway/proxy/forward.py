"""The last step of the chain: send the exchange to an instance, retrying elsewhere.

Connect errors, lost connections, 5xx and 450 are retried on another instance
of the same version, never the same one twice, within the retry budget and
the request's deadline. Failures lower an instance's effective weight.
"""
from __future__ import annotations

import asyncio
import time

from .._native.proxy_head import finish_request, request_head, response_headers
from ..routing.upstream import UpstreamError
from ..server import Response, error_response
from . import metrics

MAX_TRIES = 3


async def forward(ex) -> Response:
    backend = ex.backend
    picker = backend.picker
    if not backend.pools:
        state = "stopped" if backend.status == "Stopped" else "has no instances"
        return error_response(503, f"service {backend.name!r} {state}")
    request = ex.request
    target = backend.prefix + ex.subpath.encode("latin-1")
    if request.query:
        target += b"?" + request.query.encode("latin-1")
    extra = ex.extra
    extra.append((b"X-Request-Id", ex.request_id.encode("latin-1")))
    if backend.auth_header is not None:
        extra.append(backend.auth_header)
    head = request_head(request.method.encode(), target, request.raw_headers, extra)
    deadline = time.monotonic() + backend.timeout
    tried = 0
    failed_answer = None  # an instance's own 5xx/450: more telling than a connect error
    failed_transport = None
    for _ in range(min(MAX_TRIES, len(backend.pools))):
        index = picker.pick_index(tried)
        if index < 0:
            break
        tried |= 1 << index
        pool = backend.pools[index]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            upstream = await asyncio.wait_for(
                pool.request(finish_request(head, b"Host: " + pool.host_header + b"\r\n",
                                            request.body)), remaining)
        except UpstreamError as exc:
            picker.report_failure(index)
            metrics.retried(ex.service, "connect")
            failed_transport = error_response(502, f"upstream {pool.ip}:{pool.port} failed: {exc}")
            continue
        except asyncio.TimeoutError:
            picker.report_failure(index)
            return error_response(504, f"upstream {pool.ip}:{pool.port} did not answer within "
                                       f"{backend.timeout:.1f}s")
        status = upstream.status
        content_type, passthrough = response_headers(upstream.headers)
        response = Response(status, upstream.body, passthrough, content_type)
        if status >= 500 or status == 450:
            picker.report_failure(index)
            metrics.retried(ex.service, str(status))
            failed_answer = response
            continue
        picker.report_success(index)
        return response
    if failed_answer is not None or failed_transport is not None:
        return failed_answer or failed_transport
    return error_response(503, f"service {backend.name!r} has no healthy instance")
