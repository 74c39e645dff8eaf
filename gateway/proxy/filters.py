"""The filters of the gateway's chain, each one concern over an Exchange.

A filter returns None to pass the exchange on, or a Response to answer now.
"""
from __future__ import annotations

from .. import auth
from ..server import error_response


def route_filter(table_ref):
    def route(ex):
        route = table_ref().routes.get(ex.service)
        if route is None:
            return error_response(404, f"unknown service {ex.service!r}")
        ex.route = route
        return None
    return route


def auth_filter(ex):
    token = ex.route.token
    if not token:
        return None
    request = ex.request
    reason = auth.verify(request.headers, request.method, request.path, request.body, token,
                         ex.service)
    return error_response(401, reason) if reason else None


def version_filter(ex):
    backend, extra = ex.route.choose(ex.request.headers)
    if backend is None:
        return error_response(503, f"service {ex.service!r} has no version taking traffic")
    ex.backend = backend
    if extra is not None:
        ex.extra.append(extra)
    return None
