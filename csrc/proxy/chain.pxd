cdef class Exchange:
    cdef public object request, route, backend
    cdef public str service, subpath, request_id
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
