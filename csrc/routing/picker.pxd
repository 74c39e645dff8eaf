cdef struct Peer:
    int weight
    int effective
    long current
    bint down


cdef class SmoothWeightedPicker:
    cdef Peer* peers
    cdef readonly int size
    cdef readonly list items

    cdef int _pick(self, const int* excluded, int n_excluded) noexcept
    cpdef int pick_index(self, tuple tried=*)
    cpdef void report_failure(self, int index)
    cpdef void set_down(self, int index, bint down)
    cpdef bint is_down(self, int index)
