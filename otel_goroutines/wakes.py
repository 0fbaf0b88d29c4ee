"""Who woke a goroutine: the kernel's facts about a wake (waiting -> runnable) -> a waker, named.

The kernel sends, with each wake, the goroutine running on the waking thread (if any), its start
function and trace when it has a span, and the call site of casgstatus (bpf/goroutines.bpf.c
note_waker). That goroutine is the waker when the call site is not the runtime's own: runtime.ready
(goready: a channel send or close, an unlock, a WaitGroup.Done...). It is named by its id, as kind
`goroutine`, or `runtime` when it is one of the runtime's own goroutines (a GC worker, the sweeper).
The runtime is the waker, with no id, when no goroutine ran (the scheduler running timers or
polling the network, sysmon) or when the call site is the runtime's own (injectglist of the network
poller's or the GC's lists, findRunnable, park_m): a goroutine that happened to be on the thread
(one that started the world after a GC, say) is not named then. The cause, where it can be told
from the ended wait's reason or the runtime goroutine: timer, netpoll, gc.
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
    "runtime.(*gcControllerState).findRunnableGCWorker",
})
_GC_GOROUTINES = frozenset({"runtime.gcBgMarkWorker", "runtime.bgsweep", "runtime.bgscavenge", "runtime.forcegchelper"})


class Waker(IntEnum):
    """A wake's waker kind and cause, as the span event names them (0: the change is not a wake)."""
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


def is_runtime_goroutine(start_function: str) -> bool:
    """One of the runtime's own goroutines (as Go's isSystemGoroutine, by start function)."""
    return start_function.startswith("runtime.") and start_function != "runtime.main"


def named_goroutine(flags: int, waker_goid: int, woken_goid: int, call_site: str) -> bool:
    """The goroutine running at the wake woke it (the wake event names its id)."""
    return bool(flags & WakerFlag.WAKER_GOROUTINE) and waker_goid != woken_goid and call_site not in _RUNTIME_CALL_SITES


def waker_of(named: bool, waker_function: str, wait_reason: str) -> Waker:
    """The waker of one wake: named is named_goroutine's answer, waker_function its start function
    (when it has a span; else "")."""
    if named and not is_runtime_goroutine(waker_function):
        return Waker.GOROUTINE
    if named and waker_function in _GC_GOROUTINES:
        return Waker.RUNTIME_GC
    return runtime_cause(wait_reason)


def event_attributes(waker: Waker, waker_goid: int | None) -> dict:
    """The wake event's attributes about its waker (the id last: the fast encoder appends it)."""
    if waker is Waker.NONE:
        return {}
    cause = _CAUSES.get(waker)
    attrs = {"go.goroutine.waker.kind": "goroutine" if waker is Waker.GOROUTINE else "runtime"}
    if cause:
        attrs["go.goroutine.waker.cause"] = cause
    if waker_goid is not None:
        attrs["go.goroutine.waker.id"] = waker_goid
    return attrs


def wakers(is_wake: np.ndarray, flags: np.ndarray, waker_goid: np.ndarray, woken_goid: np.ndarray, wake_pc: np.ndarray,
           waker_start_pc: np.ndarray, wait_reason: np.ndarray, function_name: Callable[[int], str],
           reason_name: Callable[[int], str]) -> tuple[np.ndarray, np.ndarray]:
    """named_goroutine and waker_of on arrays of changes: (uint8 Waker codes, mask of the named
    goroutines); names looked up once per distinct pc and reason."""
    code, named = np.zeros(len(is_wake), np.uint8), np.zeros(len(is_wake), bool)
    rows = np.flatnonzero(is_wake)
    if not len(rows):
        return code, named

    def per_distinct(values: np.ndarray, f: Callable[[int], object], dtype) -> np.ndarray:
        distinct, at = np.unique(values, return_inverse=True)
        return np.array([f(int(v)) for v in distinct.tolist()], dtype)[at]

    runtime_site = per_distinct(wake_pc[rows], lambda pc: function_name(pc) in _RUNTIME_CALL_SITES, bool)
    has_function = (flags[rows] & (WakerFlag.WAKER_TRACED | WakerFlag.WAKER_APP_TRACE)) != 0
    start = np.where(has_function, waker_start_pc[rows], 0)
    system = per_distinct(start, lambda pc: pc != 0 and is_runtime_goroutine(function_name(pc)), bool)
    gc_goroutine = per_distinct(start, lambda pc: pc != 0 and function_name(pc) in _GC_GOROUTINES, bool)
    cause = per_distinct(wait_reason[rows], lambda r: runtime_cause(reason_name(r)), np.uint8)
    named[rows] = ((flags[rows] & WakerFlag.WAKER_GOROUTINE) != 0) & (waker_goid[rows] != woken_goid[rows]) & ~runtime_site
    code[rows] = np.where(named[rows] & ~system, np.uint8(Waker.GOROUTINE),
                          np.where(named[rows] & gc_goroutine, np.uint8(Waker.RUNTIME_GC), cause))
    return code, named


def links_to_keep(woken: np.ndarray, waker_goid: np.ndarray, has_span: np.ndarray, traced: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The wakes that get a link, of changes grouped by woken goroutine (woken: each one's row,
    ascending, time order within). Each row's first wake by each distinct waker with a span
    (has_span: a named goroutine, with a span) counts, the first WAKE_LINKS_MAX of them are linked
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
