# cython: language_level=3
"""The gateway's request counters of one (service, version), compiled.

Bumped on every answer (by the chain and by the data plane), read when
/metrics is scraped (gateway/proxy/metrics.py turns them into families).
"""

BUCKETS = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1.0, 2.0, 5.0, 10.0)
DEF N_BUCKETS = 14


cdef class Series:
    def __init__(self):
        cdef int i
        for i in range(N_BUCKETS):
            self.bounds[i] = BUCKETS[i]

    cpdef void observe(self, int status, double seconds, long long bytes_in,
                       long long bytes_out) noexcept:
        cdef int i = 0
        self.codes[min(max(status // 100, 0), 5)] += 1
        while i < N_BUCKETS and seconds > self.bounds[i]:
            i += 1
        self.buckets[i] += 1
        self.latency_sum += seconds
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    @property
    def codes_by_class(self):
        """Answers by status // 100 (index 0 unused)."""
        return [self.codes[i] for i in range(6)]

    @property
    def bucket_counts(self):
        """Answers per latency bucket (BUCKETS, then +Inf), not cumulative."""
        return [self.buckets[i] for i in range(N_BUCKETS + 1)]
