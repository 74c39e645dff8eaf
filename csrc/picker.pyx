# cython: language_level=3
"""Smooth weighted round robin (nginx's algorithm), compiled.

Each pick adds every peer's effective weight to its current weight, takes the
peer with the largest current weight and subtracts the total from it. Peers
with weight 0 (draining) or marked down are skipped. Failures halve a peer's
effective weight; successes restore it step by step, so a flaky instance gets
less traffic without being removed outright.
"""
from libc.stdlib cimport malloc, free
from libc.string cimport memset

cdef struct Peer:
    int weight
    int effective
    long current
    bint down

cdef class SmoothWeightedPicker:
    """Picks among peers by index; the caller keeps the peer objects."""

    cdef Peer* peers
    cdef readonly int size
    cdef readonly list items

    def __cinit__(self, items, weights):
        weights = list(weights)
        items = list(items)
        if len(items) != len(weights):
            raise ValueError("items and weights differ in length")
        self.size = len(items)
        self.items = items
        self.peers = <Peer*>malloc(max(self.size, 1) * sizeof(Peer))
        if self.peers == NULL:
            raise MemoryError()
        memset(self.peers, 0, max(self.size, 1) * sizeof(Peer))
        cdef int i
        for i in range(self.size):
            w = int(weights[i])
            if w < 0:
                raise ValueError(f"weight of peer {i} is negative: {w}")
            self.peers[i].weight = w
            self.peers[i].effective = w

    def __dealloc__(self):
        free(self.peers)

    cdef int _pick(self, unsigned long long exclude_mask) noexcept:
        cdef int i, best = -1
        cdef long total = 0
        cdef Peer* p
        for i in range(self.size):
            p = &self.peers[i]
            if p.weight == 0 or p.down or (i < 64 and (exclude_mask >> i) & 1):
                continue
            p.current += p.effective
            total += p.effective
            if best < 0 or p.current > self.peers[best].current:
                best = i
        if best >= 0:
            self.peers[best].current -= total
        return best

    cpdef int pick_index(self, unsigned long long exclude_mask=0):
        """Index of the next peer, or -1 when none can take traffic.

        exclude_mask has bit i set for peers this request already tried.
        """
        return self._pick(exclude_mask)

    def pick(self, unsigned long long exclude_mask=0):
        cdef int i = self._pick(exclude_mask)
        return None if i < 0 else self.items[i]

    cpdef void report_failure(self, int index):
        if 0 <= index < self.size:
            self.peers[index].effective = self.peers[index].effective // 2

    cpdef void report_success(self, int index):
        cdef Peer* p
        if 0 <= index < self.size:
            p = &self.peers[index]
            if p.effective < p.weight:
                # Recover by a tenth of the weight (at least 1) per success.
                p.effective += max(1, p.weight // 10)
                if p.effective > p.weight:
                    p.effective = p.weight

    cpdef void set_down(self, int index, bint down):
        if 0 <= index < self.size:
            self.peers[index].down = down
            if not down:
                self.peers[index].effective = self.peers[index].weight

    cpdef bint is_down(self, int index):
        return self.peers[index].down

    def weights(self):
        return [self.peers[i].weight for i in range(self.size)]

    def effective_weights(self):
        return [self.peers[i].effective for i in range(self.size)]

    def available(self):
        """Number of peers that can take new requests."""
        cdef int i, n = 0
        for i in range(self.size):
            if self.peers[i].weight > 0 and not self.peers[i].down:
                n += 1
        return n
