# cython: language_level=3
"""Smooth weighted round robin (nginx's algorithm), compiled.

Each pick adds every peer's effective weight to its current weight, takes the
peer with the largest current weight and subtracts the total from it. Peers
with weight 0 (draining) or marked down are skipped. A failure lowers a peer's
effective weight by a quarter of its weight; every pick gives it 1 back, as
nginx does, so a flaky instance gets less traffic for a while and always
comes back (a peer at effective weight 0 could otherwise never be picked to
prove itself again).
"""
from libc.stdlib cimport malloc, free
from libc.string cimport memset

cdef class SmoothWeightedPicker:
    """Picks among peers by index; the caller keeps the peer objects."""

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

    cdef int _pick(self, const int* excluded, int n_excluded) noexcept:
        cdef int i, j, best = -1
        cdef long total = 0
        cdef Peer* p
        cdef bint skip
        for i in range(self.size):
            p = &self.peers[i]
            if p.weight == 0 or p.down:
                continue
            skip = False
            for j in range(n_excluded):
                if excluded[j] == i:
                    skip = True
                    break
            if skip:
                continue
            p.current += p.effective
            total += p.effective
            if p.effective < p.weight:
                p.effective += 1
            if best < 0 or p.current > self.peers[best].current:
                best = i
        if best >= 0:
            self.peers[best].current -= total
        return best

    cpdef int pick_index(self, tuple tried=()):
        """Index of the next peer, or -1 when none can take traffic.

        `tried`: indexes this request already tried (a retry never repeats one).
        """
        cdef int small[8]
        cdef int* excluded = small
        cdef int n = len(tried), i, picked
        if n > 8:
            excluded = <int*>malloc(n * sizeof(int))
            if excluded == NULL:
                raise MemoryError()
        for i in range(n):
            excluded[i] = tried[i]
        picked = self._pick(excluded, n)
        if excluded != small:
            free(excluded)
        return picked

    def pick(self, tuple tried=()):
        cdef int i = self.pick_index(tried)
        return None if i < 0 else self.items[i]

    cpdef void report_failure(self, int index):
        cdef Peer* p
        if 0 <= index < self.size:
            p = &self.peers[index]
            p.effective -= max(1, p.weight // 4)
            if p.effective < 0:
                p.effective = 0

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
