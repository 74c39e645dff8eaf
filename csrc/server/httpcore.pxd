# The request and response types every compiled part of the data plane shares.

cpdef bytes status_line(int status)

# A request head at most, in the gateway's data plane and the workers' server: past either, 431.
cdef enum:
    MAX_HEAD = 65536
    MAX_HEADERS = 100


cdef class Request:
    cdef public str method, path, query
    cdef public dict headers
    cdef public list raw_headers  # (bytes name, bytes value) as received
    cdef public bytes body
    cdef public object peer
    cdef public bint keep_alive


cdef class Response:
    cdef public int status
    cdef public bytes body
    cdef public object headers  # [(str, str)], b"Name: value\r\n" lines, or None
    cdef public str content_type

    cpdef bytes head(self, bint keep_alive)


cpdef Response json_response(obj, int status=*, headers=*)
cpdef Response error_response(int status, str message, headers=*)
cpdef Response answer_exception(answer_error, exc, request)
