from gateway._native.picker cimport SmoothWeightedPicker
from gateway._native.upstream cimport UpstreamConnection


cdef class Forwarding:
    cdef object ex, backend, head, future, pool, loop, on_finish, on_retry
    cdef UpstreamConnection conn
    cdef SmoothWeightedPicker picker
    cdef set deadline_slot  # where the deadline sweep finds this request until it is done
    cdef object failed_answer, failed_transport  # an instance's own 5xx beats a connect error
    cdef tuple tried  # indexes already tried: a retry never repeats one
    cdef int tries_left, index

    cdef void _attempt(self)
    cdef void _send(self, UpstreamConnection conn)
    cdef void _failed(self, error)
    cdef void _timed_out(self)
    cdef void _finish(self, response)
