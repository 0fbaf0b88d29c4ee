"""Heap allocations per goroutine (--allocs exact|sampled|off): the estimate math, and the target's
heap-profile rate.

exact: a probe on every heap allocation (mallocgc, and the size-specialized entries that compiled
code calls directly from Go 1.27) adds the requested size to the allocating goroutine's totals in
the kernel.

sampled: a probe on runtime.profilealloc, where the runtime records a heap-profile sample (one per
MemProfileRate bytes on average, 512 KiB by default). Each sample of size s taken at rate r stood
for an allocation that had probability p = 1 - exp(-s/r) of being sampled, so it counts for 1/p
allocations and s/p bytes (a Horvitz-Thompson estimate, unbiased; pprof's scaleHeapSample applies
the same factor to each bucket, whose samples all have one size). The kernel has no floating
point, so it adds, per sample,

    bytes += r + s * h(s/r)          count += r/s + h(s/r)      where h(x) = 1/(1-exp(-x)) - 1/x

with h, a smooth function from 1/2 (x -> 0) to 1 (x -> oo), read from a table user space fills
(weight_table). Counts are kept in 1/COUNT_UNIT units (exact mode adds COUNT_UNIT per allocation).
kernel_estimate below is the same integer arithmetic as the BPF code, for tests.

A program that never reads heap profiles has its sampling turned off at start by the Go linker
(runtime.disableMemoryProfiling: MemProfileRate = 0). Sampled mode then turns it on once the
runtime has initialised (enable_heap_sampling), at the default rate.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from enum import Enum

COUNT_SHIFT = 16
COUNT_UNIT = 1 << COUNT_SHIFT  # fixed-point unit of the kernel's allocation counts


def whole_allocations(count):
    """The kernel's allocation counts (in 1/COUNT_UNIT; an int or a numpy array) rounded to whole ones."""
    return (count + COUNT_UNIT // 2) >> COUNT_SHIFT
WEIGHT_STEPS = 64          # table entries per unit of x = s/r
WEIGHT_X_MAX = 16          # from x = 16 on, 1/p = 1 to 1e-7: the sample counts as itself
WEIGHT_ENTRIES = WEIGHT_STEPS * WEIGHT_X_MAX
RATE_CAP = 0x7000000       # runtime.fastexprand caps the mean of its exponential at this
DEFAULT_RATE = 512 * 1024  # runtime.MemProfileRate's default


class AllocMode(str, Enum):
    EXACT = "exact"
    SAMPLED = "sampled"
    OFF = "off"


def h(x: float) -> float:
    """1/(1-exp(-x)) - 1/x, continuous at 0."""
    if x < 1e-6:
        return 0.5 + x / 12
    return -1 / math.expm1(-x) - 1 / x


def weight_table() -> list[int]:
    """h at the middle of each table step, in 1/COUNT_UNIT units (what the kernel looks up)."""
    return [round(h((i + 0.5) / WEIGHT_STEPS) * COUNT_UNIT) for i in range(WEIGHT_ENTRIES)]


def sample_weight(size: int, rate: int) -> float:
    """How many allocations one heap-profile sample of `size` bytes stands for (pprof's scale)."""
    if rate <= 1:
        return 1.0
    return 1 / -math.expm1(-size / min(rate, RATE_CAP))


def kernel_estimate(size: int, rate: int, table: list[int]) -> tuple[int, int]:
    """(bytes, count in 1/COUNT_UNIT) that the BPF code adds for one sample: the same integer steps."""
    if rate <= 1:
        return size, COUNT_UNIT
    rate = min(rate, RATE_CAP)
    index = size * WEIGHT_STEPS // rate
    if index >= WEIGHT_ENTRIES:
        return size, COUNT_UNIT
    hq = table[index]
    return rate + (size * hq >> COUNT_SHIFT), (rate << COUNT_SHIFT) // size + hq


def bpf_defines() -> list[str]:
    """The constants the BPF code shares with this module."""
    return [f"-DALLOC_COUNT_SHIFT={COUNT_SHIFT}", f"-DALLOC_WEIGHT_STEPS={WEIGHT_STEPS}ULL",
            f"-DALLOC_WEIGHT_ENTRIES={WEIGHT_ENTRIES}", f"-DALLOC_RATE_CAP={RATE_CAP}ULL",
            f"-DDEFAULT_MEMPROFILERATE={DEFAULT_RATE}ULL"]


# --- allocations no goroutine span holds ---------------------------------------------------

ELSEWHERE = ("system stack", "goroutines without a span")  # index = bpf enum alloc_owner


@dataclass(frozen=True)
class AllocTotals:
    bytes: int = 0
    count: int = 0    # allocations (sampled: an estimate)
    samples: int = 0  # heap-profile samples the estimate rests on (sampled mode)


def render(mode: AllocMode, traced: AllocTotals, elsewhere: list[AllocTotals], rate_note: str = "") -> str:
    """The summary's allocation lines: what the spans hold, and what no span holds."""
    what = "exact" if mode is AllocMode.EXACT else f"sampled{rate_note}, estimates"
    lines = [f"heap allocations ({what}):"]
    rows = [("goroutine spans", traced)] + list(zip(ELSEWHERE, elsewhere))
    for name, t in rows:
        extra = f"  from {t.samples} samples" if mode is AllocMode.SAMPLED else ""
        lines.append(f"  {name:<26} {_bytes(t.bytes):>10}  {t.count:>12,} allocations{extra}")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# --- the target's heap-profile rate ---------------------------------------------------------

@dataclass(frozen=True)
class ProfileRate:
    rate: int                  # runtime.MemProfileRate after the call
    enabled_by_agent: bool     # the agent turned sampling on (the linker had turned it off)
    note: str                  # why the rate is what it is, for the log and summary


def enable_heap_sampling(pid: int, rate_address: int, disabled_address: int | None) -> ProfileRate:
    """Read runtime.MemProfileRate in the target; when it is 0 because the linker disabled memory
    profiling (nothing in the program reads heap profiles), set it to the default rate so that
    sampled mode has samples to ride on. A rate the program chose is left alone."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        rate = struct.unpack("<q", os.pread(fd, 8, rate_address))[0]
        if rate != 0:
            return ProfileRate(rate, False, f"the program's runtime.MemProfileRate = {rate}")
        disabled = disabled_address is not None and os.pread(fd, 1, disabled_address) == b"\x01"
        if not disabled:
            return ProfileRate(0, False, "runtime.MemProfileRate = 0: the program turned heap sampling off; "
                                         "no allocation is sampled")
        os.pwrite(fd, struct.pack("<q", DEFAULT_RATE), rate_address)
        return ProfileRate(DEFAULT_RATE, True, f"heap sampling was off (no heap profile is read in the program); "
                                               f"the agent set runtime.MemProfileRate = {DEFAULT_RATE}")
    finally:
        os.close(fd)
