# cython: language_level=3
"""Deadlines of many pending operations on one event loop, checked on coarse ticks.

One timer for all of them instead of a timer handle made and cancelled per
operation: an entry goes into the set of the tick its deadline falls in and
leaves it (`set.discard`) when it finishes first. An entry expires never before
its deadline and at most one tick after it.
"""


cdef class Deadlines:

    def __init__(self, loop, on_expire, double tick=0.05):
        self.loop = loop
        self.on_expire = on_expire  # called with each expired entry, on the loop
        self.tick = tick
        self.slots = {}
        self.timer = None
        self.next_tick = 0

    cpdef set add(self, entry, double deadline):
        """File `entry` under `deadline` (loop.time() seconds); returns the set to leave."""
        cdef long long tick = <long long>(deadline / self.tick) + 1
        slot = self.slots.get(tick)
        if slot is None:
            slot = self.slots[tick] = set()
            if self.next_tick == 0 or tick < self.next_tick:
                self._arm(tick)
        slot.add(entry)
        return slot

    cdef void _arm(self, long long tick):
        if self.timer is not None:
            self.timer.cancel()
        self.next_tick = tick
        self.timer = self.loop.call_at(tick * self.tick, self._sweep)

    def _sweep(self):
        # A tick's slot goes only once the loop's clock has passed the tick, so
        # never before any deadline in it (even if the timer fires a little early).
        cdef long long now = <long long>(self.loop.time() / self.tick)
        self.timer = None
        self.next_tick = 0
        for tick in [t for t in self.slots if t <= now]:
            for entry in self.slots.pop(tick):
                self.on_expire(entry)
        if self.slots:
            self._arm(min(self.slots))
