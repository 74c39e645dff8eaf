cdef class UpstreamResponse:
    cdef public int status
    cdef public list headers  # (bytes name, bytes value)
    cdef public bytes body
    cdef public bint keep_alive


cdef class UpstreamConnection:
    cdef public object transport
    cdef public object on_done  # callback(conn, response, error) of the exchange in flight
    cdef public bint closed
    cdef object parser
    cdef list headers, body
    cdef bint headers_done, framed  # framed: Content-Length or chunked says where it ends

    cdef void _fail(self, error)
    cdef void _deliver(self, bint keep_alive)
    cpdef void send(self, bytes data, on_done)
