cdef struct RouteTarget:
    const char* service      # the service's name in the request target
    Py_ssize_t service_n
    const char* subpath      # what the upstream gets after the backend's prefix
    const char* version      # a v2 path's /versions/<v> (version_n 0: none)
    Py_ssize_t version_n
    const char* path_end     # the '?' of the query, or the end


cdef int route_target(const char* p, Py_ssize_t n, RouteTarget* t) noexcept


cdef class Exchange:
    cdef public object request, route, backend, caller  # caller: its rule built-ins
    cdef public str service, subpath, version, request_id
    cdef public list extra             # (bytes, bytes) headers added to the upstream request
    cdef public list response_headers  # (str, str) headers added to the client's response
    cdef public double started


cdef class RouteFilter:
    cdef object app


cdef class AuthFilter:
    cdef object verify


cdef class VersionFilter:
    pass


cdef class Chain:
    cdef readonly list filters
    cdef object observe, forwarder

    cpdef object run(self, request)
    cpdef object finish(self, Exchange ex, response)
    cpdef object forward(self, Exchange ex)
