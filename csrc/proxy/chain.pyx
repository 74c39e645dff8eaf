# cython: language_level=3
"""The gateway's filter chain, compiled: one Exchange per request, filters over it.

A filter (the contract: gateway/proxy/filter.py) takes the Exchange and
returns None (go on), a Response (answer now) or an awaitable (a filter that
must wait, such as a global rate limit when its lease is empty). The chain
owns the iteration: on an awaitable it pauses, and resumes with the next
filter once the awaitable gives None (Envoy's filter manager does the same).
The last step hands the request to the data plane, which forwards it
(csrc/proxy/dataplane.pyx). Route, auth and version choice are compiled
here; other filters (rate limits) are Python.

The data plane runs this chain for the requests it does not forward by itself
(a route with rate limits, an EAS signature, anything unusual).

This module imports nothing above the compiled core: what it needs from the
Python side (checking a token, recording metrics, forwarding) is handed in.
"""
import os
import time

from libc.string cimport memchr, memcmp

from gateway._native.httpcore cimport Response, error_response

# Request ids: a random per-process prefix and a counter (uuid4 costs more per request).
cdef str _ID_PREFIX = os.urandom(8).hex()
cdef unsigned long long _id_counter = 0
cdef object _perf_counter = time.perf_counter


cdef inline const char* _segment_end(const char* p, const char* end) noexcept:
    while p < end and p[0] != b'/':
        p += 1
    return p


cdef inline bint _is_dot(const char* p, const char* end) noexcept:
    """p starts a "." (or "%2e") of the segment that ends at `end`; advances nothing."""
    return p < end and (p[0] == b'.' or (end - p >= 3 and p[0] == b'%' and p[1] == b'2' and
                                          (p[2] == b'e' or p[2] == b'E')))


cdef inline const char* _after_dot(const char* p) noexcept:
    return p + 1 if p[0] == b'.' else p + 3


cdef bint _escapes(const char* p, const char* end) noexcept:
    """Whether a path could leave where it is put: a "." or ".." segment (percent-encoded
    too), an encoded slash or backslash, a backslash, or an empty segment (a doubled
    slash); an upstream that normalises paths would resolve those elsewhere."""
    cdef const char* seg
    cdef const char* q
    while p < end:
        if p[0] != b'/':
            return True
        seg = p + 1
        q = seg
        while q < end and q[0] != b'/':
            if q[0] == b'\\' or (q[0] == b'%' and end - q >= 3 and (
                    (q[1] == b'2' and (q[2] == b'f' or q[2] == b'F')) or
                    (q[1] == b'5' and (q[2] == b'c' or q[2] == b'C')))):
                return True
            q += 1
        if q == seg and q < end:
            return True  # "//"
        if _is_dot(seg, q):
            if _after_dot(seg) == q:
                return True  # "."
            if _is_dot(_after_dot(seg), q) and _after_dot(_after_dot(seg)) == q:
                return True  # ".."
        p = q
    return False


cdef int route_target(const char* p, Py_ssize_t n, RouteTarget* t) noexcept:
    """Split a request target that names a service: 1, or 0 when it names none, or -1 when
    its path could leave the service (dot segments, encoded slashes, doubled slashes).

    /api/predict/<service>[/<subpath>]: the upstream gets the subpath after its
    prefix (an EAS path, or an Open Inference Protocol one: /v2/...).
    /v2/models/<service>[/...]: the upstream gets the whole v2 path after its
    prefix (workers serve v2 under /api/predict/<service> too: gateway/worker/oip.py).
    Either way a v2 path's /v2/models/<m>/versions/<v> names a version.
    """
    cdef const char* end = p + n
    cdef const char* q = <const char*>memchr(p, b'?', n)
    cdef const char* v2
    t.path_end = q if q != NULL else end
    end = t.path_end
    if end - p >= 13 and memcmp(p, b"/api/predict/", 13) == 0:
        t.service = p + 13
        t.subpath = _segment_end(t.service, end)
    elif end - p >= 11 and memcmp(p, b"/v2/models/", 11) == 0:
        t.service = p + 11
        t.subpath = p
    else:
        return 0
    t.service_n = _segment_end(t.service, end) - t.service
    t.version_n = 0
    v2 = t.subpath
    if end - v2 > 11 and memcmp(v2, b"/v2/models/", 11) == 0:
        q = _segment_end(v2 + 11, end)
        if end - q > 10 and memcmp(q, b"/versions/", 10) == 0:
            t.version = q + 10
            t.version_n = _segment_end(t.version, end) - t.version
    return -1 if _escapes(t.subpath, end) else 1


cdef class Exchange:
    """The one object every filter of the chain reads and annotates."""

    def __init__(self, request, str service, str subpath, str version, double started):
        global _id_counter
        self.request = request
        self.service = service
        self.subpath = subpath
        self.version = version
        self.started = started
        self.caller = None
        self.route = None
        self.backend = None
        self.extra = []
        self.response_headers = []
        request_id = request.headers.get("x-request-id")
        if not request_id:
            _id_counter += 1
            request_id = "%s%016x" % (_ID_PREFIX, _id_counter)
        self.request_id = request_id


cdef class RouteFilter:
    """Finds the service's route in the current table (read per request: it is swapped
    whole when the configuration changes)."""

    def __init__(self, app):
        self.app = app

    def __call__(self, Exchange ex):
        route = self.app.table.routes.get(ex.service)
        if route is None:
            return error_response(404, f"unknown service {ex.service!r}")
        ex.route = route
        return None


cdef class AuthFilter:
    """The service's token, raw or as an EAS signature, or an identified caller's (whose
    identity the version rules then read): `verify(headers, method, path, body, token,
    service)` gives the reason to refuse, or None, or (a signature that must be checked
    against replays in the store) an awaitable of either."""

    def __init__(self, verify):
        self.verify = verify

    def __call__(self, Exchange ex):
        route = ex.route
        token = route.token
        callers = route.callers
        if not token and not callers:
            return None
        request = ex.request
        reason = None
        if token:
            reason = self.verify(request.headers, request.method, request.path, request.body,
                                 token, ex.service, None, request.query)
            if reason is None:
                return None
            if not isinstance(reason, str):
                return _verdict(reason, ex, None)
        for caller_token, identity in callers:  # an identified caller's token
            verdict = self.verify(request.headers, request.method, request.path, request.body,
                                  caller_token, ex.service, None, request.query)
            if verdict is None:
                ex.caller = identity
                return None
            if not isinstance(verdict, str):
                return _verdict(verdict, ex, identity)
        if reason is None:
            reason = self.verify(request.headers, request.method, request.path, request.body,
                                 callers[0][0], ex.service, None, request.query)
        return error_response(401, reason)


async def _verdict(pending, Exchange ex, identity):
    """A valid signature's replay check: None (ex's caller is `identity`) or a 401."""
    reason = await pending
    if reason is not None:
        return error_response(401, reason)
    if identity is not None:
        ex.caller = identity
    return None


cdef class VersionFilter:
    """The version (backend) that takes the request: the one a v2 path names, else a header
    rule, else the traffic shares. (A v2 version that is none of the service's, such as
    Triton's "1", is the upstream's to check.)"""

    def __call__(self, Exchange ex):
        if ex.version:
            backend = ex.route.versions.get(ex.version)
            if backend is not None:
                ex.backend = backend
                return None
        backend, extra = ex.route.choose(ex.request.headers, ex.caller)
        if backend is None:
            return error_response(503, f"service {ex.service!r} has no version taking traffic")
        ex.backend = backend
        if extra is not None:
            ex.extra.append(extra)
        return None


cdef class Chain:
    """Runs the filters in order over a new Exchange; the first answer wins.

    `observe(service, version, status, seconds, bytes_in, bytes_out)` records each
    answer; `forwarder(ex, finish)` forwards a request the filters let through and
    gives a Future of finish(ex, the answer)."""

    def __init__(self, list filters, observe, forwarder):
        self.filters = filters
        self.observe = observe
        self.forwarder = forwarder

    cpdef object run(self, request):
        """A Response, a Future of one (forwarded), or a coroutine (a filter waited)."""
        cdef double started = _perf_counter()
        cdef bytes path = (<str>request.path).encode("latin-1")
        cdef RouteTarget t
        cdef const char* p = path
        cdef int found = route_target(p, len(path), &t)
        if found == 0:
            return error_response(404, f"no route for {request.path}")
        if found < 0:
            return error_response(400, f"path {request.path!r} is refused: dot segments, "
                                       "encoded slashes and doubled slashes could leave the "
                                       "service")
        cdef Exchange ex = Exchange(
            request, p[t.service - p:t.service - p + t.service_n].decode("latin-1"),
            p[t.subpath - p:t.path_end - p].decode("latin-1"),
            p[t.version - p:t.version - p + t.version_n].decode("latin-1") if t.version_n else "",
            started)
        cdef Py_ssize_t position
        for position in range(len(self.filters)):
            response = self.filters[position](ex)
            if response is not None:
                if isinstance(response, Response):
                    return self.finish(ex, response)
                return _resume(self, ex, response, position)
        return self.forward(ex)

    cpdef object finish(self, Exchange ex, response):
        """Last touch on every answer: the request id (and filters' headers), and metrics."""
        cdef list lines = ["X-Request-Id: ", ex.request_id, "\r\n"]
        for name, value in ex.response_headers:
            lines += [name, ": ", value, "\r\n"]
        cdef bytes added = "".join(lines).encode("latin-1")
        headers = response.headers
        if headers is None:
            response.headers = added
        elif isinstance(headers, bytes):
            response.headers = headers + added
        else:
            response.headers = b"".join(
                [f"{n}: {v}\r\n".encode("latin-1") for n, v in headers]) + added
        self.observe(ex.service if ex.route is not None else "_unknown",
                     ex.backend.name if ex.backend is not None else "", response.status,
                     _perf_counter() - ex.started, len(ex.request.body), len(response.body))
        return response

    cpdef object forward(self, Exchange ex):
        """The upstream's answer as a Future, or a Response at once when nothing can take it."""
        backend = ex.backend
        if not backend.pools:
            state = "stopped" if backend.status == "Stopped" else "has no instances"
            return self.finish(ex, error_response(503, f"service {backend.name!r} {state}"))
        return self.forwarder(ex, self.finish)


async def _resume(Chain chain, Exchange ex, pending, Py_ssize_t position):
    """The rest of the chain after a filter paused it: from the next filter on, once the
    paused one lets the request go on."""
    response = await pending
    cdef list filters = chain.filters
    while response is None:
        position += 1
        if position == len(filters):
            break
        response = filters[position](ex)
        if response is not None and not isinstance(response, Response):
            response = await response
    if response is not None:
        return chain.finish(ex, response)
    result = chain.forward(ex)
    return result if isinstance(result, Response) else await result
