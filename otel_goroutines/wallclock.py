"""Where kernel times go on the wall clock. The probes stamp events with the kernel's monotonic
clock (bpf_ktime_get_ns); spans carry wall-clock times, as the application's own spans do."""

from __future__ import annotations

import time
from typing import Callable

# A change of the offset smaller than this is no step: NTP's slewing speeds or slows both clocks
# alike, and a bracketed read of the two varies by well under a microsecond.
STEP_NS = 1_000_000
CHECK_EVERY_NS = 1_000_000_000  # a read costs about 3 us


def monotonic_to_wall_offset() -> int:
    """Wall clock minus the kernel's monotonic clock, tightly bracketed."""
    best = None
    for _ in range(5):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        wall = time.time_ns()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    return best[1]


class WallClock:
    """The offset from kernel time to wall-clock time, read again now and then: the wall clock can
    step (NTP's first sync, a VM resumed, a date set) while the monotonic clock does not, and spans
    after a step must carry the time the application's spans carry."""

    def __init__(self, read: Callable[[], int] = monotonic_to_wall_offset):
        self._read = read
        self.offset_ns = read()

    def step_ns(self) -> int:
        """Read the offset again; how far the wall clock stepped since the last read (0: it did not)."""
        offset = self._read()
        step = offset - self.offset_ns
        if abs(step) < STEP_NS:
            return 0
        self.offset_ns = offset
        return step
