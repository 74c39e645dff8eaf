cdef class Deadlines:
    cdef dict slots  # tick number -> set of entries
    cdef readonly object loop
    cdef object on_expire, timer
    cdef double tick
    cdef long long next_tick  # the tick the timer is set for (0: no timer)

    cpdef set add(self, entry, double deadline)
    cdef void _arm(self, long long tick)
