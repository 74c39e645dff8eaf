cdef class Series:
    cdef long long codes[6]       # by status // 100
    cdef long long buckets[15]    # latency: counters.BUCKETS, then +Inf
    cdef double bounds[14]
    cdef readonly double latency_sum
    cdef readonly long long bytes_in, bytes_out

    cpdef void observe(self, int status, double seconds, long long bytes_in,
                       long long bytes_out) noexcept
