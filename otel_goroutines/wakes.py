"""Who woke a goroutine: the kernel's facts about a wake (waiting -> runnable) -> a waker, named.

The kernel sends, with each wake, the goroutine running on the waking thread (if any), whether it
has a span, and the call site of casgstatus (bpf/goroutines.bpf.c note_waker). A goroutine is the
waker when it was running and the call site is runtime.ready (goready: a channel send or close, an
unlock, a WaitGroup.Done...). The runtime is the waker when no goroutine ran (the scheduler running
timers or polling the network, sysmon) or when the call site is the runtime's own (injectglist of
the network poller's or the GC's lists, findRunnable, park_m): then a goroutine that happened to be
on the thread (one that started the world after a GC, say) is not named. The wait reason tells
what the runtime was doing, where it can: timer, netpoll, gc.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Callable

import numpy as np

from .kernel_records import WakerFlag

WAKE_LINKS_MAX = 8  # waker links a span carries (distinct wakers, first woken first); the rest are counted
WAKER_LINK = {"go.goroutine.link": "waker"}
# Callers of casgstatus(gp, _Gwaiting, _Grunnable) that are the runtime's own doing, whoever runs.
_RUNTIME_CALL_SITES = frozenset({
    "runtime.injectglist", "runtime.findRunnable", "runtime.findrunnable", "runtime.park_m",
    "runtime.(*gcControllerState).findRunnableGCWorker", "runtime.(*gcControllerState).findRunnableGCWorker.func1",
})


class Waker(IntEnum):
    """A wake's waker, as the span event names it (0: the change is not a wake)."""
    NONE = 0
    GOROUTINE = 1
    RUNTIME = 2          # cause unknown
    RUNTIME_TIMER = 3
    RUNTIME_NETPOLL = 4
    RUNTIME_GC = 5


_CAUSES = {Waker.RUNTIME_TIMER: "timer", Waker.RUNTIME_NETPOLL: "netpoll", Waker.RUNTIME_GC: "gc"}


def runtime_cause(wait_reason: str) -> Waker:
    """What the runtime was doing when it ended a wait of this reason."""
    if wait_reason == "sleep":
        return Waker.RUNTIME_TIMER
    if wait_reason == "IO wait":
        return Waker.RUNTIME_NETPOLL
    if wait_reason.startswith(("GC", "garbage collection", "force gc")):
        return Waker.RUNTIME_GC
    return Waker.RUNTIME


def waker_of(flags: int, waker_goid: int, woken_goid: int, call_site: str, wait_reason: str) -> Waker:
    """The waker of one wake (flags: the kernel's enum waker_flag)."""
    if flags & WakerFlag.WAKER_GOROUTINE and waker_goid != woken_goid and call_site not in _RUNTIME_CALL_SITES:
        return Waker.GOROUTINE
    return runtime_cause(wait_reason)


def event_attributes(waker: Waker, waker_goid: int) -> dict:
    """The wake event's attributes about its waker (the id last: the fast encoder appends it)."""
    if waker is Waker.NONE:
        return {}
    if waker is Waker.GOROUTINE:
        return {"go.goroutine.waker.kind": "goroutine", "go.goroutine.waker.id": waker_goid}
    cause = _CAUSES.get(waker)
    return {"go.goroutine.waker.kind": "runtime", **({"go.goroutine.waker.cause": cause} if cause else {})}


def wakers(is_wake: np.ndarray, flags: np.ndarray, waker_goid: np.ndarray, woken_goid: np.ndarray,
           wake_pc: np.ndarray, wait_reason: np.ndarray, function_name: Callable[[int], str],
           reason_name: Callable[[int], str]) -> np.ndarray:
    """waker_of on arrays of changes (uint8 Waker codes); names looked up once per distinct pc and reason."""
    out = np.zeros(len(is_wake), np.uint8)
    rows = np.flatnonzero(is_wake)
    if not len(rows):
        return out
    pcs, pc_at = np.unique(wake_pc[rows], return_inverse=True)
    runtime_site = np.array([function_name(int(pc)) in _RUNTIME_CALL_SITES for pc in pcs.tolist()])[pc_at]
    reasons, reason_at = np.unique(wait_reason[rows], return_inverse=True)
    cause = np.array([runtime_cause(reason_name(int(r))) for r in reasons.tolist()], np.uint8)[reason_at]
    by_goroutine = ((flags[rows] & WakerFlag.WAKER_GOROUTINE) != 0) & (waker_goid[rows] != woken_goid[rows]) & ~runtime_site
    out[rows] = np.where(by_goroutine, np.uint8(Waker.GOROUTINE), cause)
    return out


def links_to_keep(woken: np.ndarray, waker_goid: np.ndarray, has_span: np.ndarray, traced: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The wakes that get a link, of changes grouped by woken goroutine (woken: each one's row,
    ascending, time order within). Each row's first wake by each distinct waker with a span
    (has_span: a goroutine waker, with a span) counts, the first WAKE_LINKS_MAX of them are linked
    when that span is the agent's (traced), the others are left out. Returns (mask of the changes
    linked, per row index the number of wakers left out). SpanBuilder's wake_links, on arrays."""
    rows_n = int(woken.max()) + 1 if len(woken) else 0
    keep = np.zeros(len(woken), bool)
    candidates = np.flatnonzero(has_span)
    if not len(candidates):
        return keep, np.zeros(rows_n, np.int64)
    c = candidates[np.lexsort((candidates, waker_goid[candidates], woken[candidates]))]  # by row, waker, time
    first = np.ones(len(c), bool)
    first[1:] = (woken[c][1:] != woken[c][:-1]) | (waker_goid[c][1:] != waker_goid[c][:-1])
    distinct = np.sort(c[first])  # each row's first wake by each waker, in time order
    rows = woken[distinct]
    rank = np.arange(len(distinct)) - np.searchsorted(rows, rows, "left")
    linked = distinct[(rank < WAKE_LINKS_MAX) & traced[distinct]]
    keep[linked] = True
    return keep, np.bincount(rows, minlength=rows_n) - np.bincount(woken[linked], minlength=rows_n)
