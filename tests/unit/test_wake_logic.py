"""Naming wakers (wakes.py) and the waker links a span gets (SpanBuilder.wake_links)."""

import numpy as np

from otel_goroutines import wakes
from otel_goroutines.kernel_records import WakerFlag
from otel_goroutines.records import GoroutineRecord, StateChange, TraceReason
from otel_goroutines.spans import SpanBuilder, span_id_for, trace_id_for
from otel_goroutines.wakes import Waker

GOROUTINE, TRACED, APP = WakerFlag.WAKER_GOROUTINE, WakerFlag.WAKER_TRACED, WakerFlag.WAKER_APP_TRACE
SITES = {0x10: "runtime.ready", 0x20: "runtime.injectglist", 0x30: "runtime.findRunnable", 0x40: "runtime.goready.func1",
         0x50: "main.worker", 0x60: "runtime.gcBgMarkWorker"}
REASONS = ["", "chan receive", "sleep", "IO wait", "GC assist wait", "sync.Mutex.Lock"]


def builder() -> SpanBuilder:
    return SpanBuilder(salt=99, clock_offset_ns=0, function_name=lambda pc: SITES.get(pc, hex(pc)), creation_site=lambda pc: None,
                       wait_reason=lambda i: REASONS[i], states_traced=True)


def test_a_goroutine_woke_it_when_one_ran_and_the_call_site_is_not_the_runtimes():
    assert wakes.named_goroutine(GOROUTINE | TRACED, 7, 9, "runtime.ready")
    assert wakes.named_goroutine(GOROUTINE, 7, 9, "runtime.goready.func1")
    assert not wakes.named_goroutine(0, 0, 9, "runtime.ready")  # no goroutine on the thread: the scheduler, sysmon
    # The runtime's own lists, whoever started the world: not the goroutine that happened to run.
    assert not wakes.named_goroutine(GOROUTINE | TRACED, 7, 9, "runtime.injectglist")
    assert not wakes.named_goroutine(GOROUTINE, 9, 9, "runtime.ready")  # itself: not a waker
    assert wakes.waker_of(True, "main.producer", "chan receive") is Waker.GOROUTINE
    assert wakes.waker_of(True, "", "chan receive") is Waker.GOROUTINE  # no span: its start function is not known
    assert wakes.waker_of(True, "runtime.main", "chan receive") is Waker.GOROUTINE
    # The runtime's own goroutines are the runtime, named by their id too.
    assert wakes.waker_of(True, "runtime.gcBgMarkWorker", "semacquire") is Waker.RUNTIME_GC
    assert wakes.waker_of(True, "runtime.runFinalizers", "chan receive") is Waker.RUNTIME
    assert wakes.waker_of(False, "", "sleep") is Waker.RUNTIME_TIMER
    assert wakes.waker_of(False, "", "IO wait") is Waker.RUNTIME_NETPOLL
    assert wakes.waker_of(False, "", "GC assist wait") is Waker.RUNTIME_GC
    assert wakes.waker_of(False, "", "chan receive") is Waker.RUNTIME


def test_event_attributes():
    assert wakes.event_attributes(Waker.GOROUTINE, 7) == {"go.goroutine.waker.kind": "goroutine", "go.goroutine.waker.id": 7}
    assert wakes.event_attributes(Waker.RUNTIME_TIMER, None) == {"go.goroutine.waker.kind": "runtime", "go.goroutine.waker.cause": "timer"}
    assert wakes.event_attributes(Waker.RUNTIME_GC, 3) == {"go.goroutine.waker.kind": "runtime", "go.goroutine.waker.cause": "gc",
                                                         "go.goroutine.waker.id": 3}
    assert wakes.event_attributes(Waker.RUNTIME, None) == {"go.goroutine.waker.kind": "runtime"}
    assert wakes.event_attributes(Waker.NONE, None) == {}


def wake(t: int, waker: int, flags=GOROUTINE | TRACED, site=0x10, root=None) -> StateChange:
    return StateChange(t, 4, 1, 1, flags, waker, waker if root is None else root, site, 0x50)


def record(changes) -> GoroutineRecord:
    return GoroutineRecord(pid=1, goid=5, parent_goid=1, parent_traced=True, create_ns=0, end_ns=100, start_pc=0, go_pc=0,
                           state_ns=(0,) * 12, transitions=len(changes), events_left_out=0, changes=changes)


def test_one_link_per_waker_in_the_order_they_first_woke_it_capped_and_the_rest_counted():
    b = builder()
    changes = [wake(1, 30, root=3), wake(2, 31), wake(3, 30), StateChange(4, 2, 4, 1), wake(5, 0, flags=0),
               wake(6, 32, flags=GOROUTINE | APP), wake(7, 33, site=0x20), wake(8, 34, flags=GOROUTINE)]
    changes += [wake(10 + i, 40 + i) for i in range(wakes.WAKE_LINKS_MAX)]
    links, left_out = b.wake_links(record(changes))
    assert [(link.trace_id, link.span_id) for link in links[:2]] == [(trace_id_for(99, 3), span_id_for(99, 30)),
                                                                      (trace_id_for(99, 31), span_id_for(99, 31))]
    assert [link.span_id for link in links[2:]] == [span_id_for(99, 40 + i) for i in range(wakes.WAKE_LINKS_MAX - 3)]
    assert all(link.attributes == {"go.goroutine.link": "waker"} for link in links)
    # Counted: 30, 31, 32 (application trace), then 40.. : the cap's worth; left out: 32 and the three over the cap.
    assert left_out == 4
    span = b.build(record(changes))
    assert span.attributes["go.goroutine.waker_links_left_out"] == 4 and span.links == links
    by_time = {e.time_ns: e.attributes for e in span.events}
    assert by_time[1]["go.goroutine.waker.id"] == 30 and by_time[7] == {"go.goroutine.state.previous": "waiting",
                                                                        "go.goroutine.waker.kind": "runtime"}


def test_links_to_keep_is_wake_links_on_arrays():
    rng = np.random.default_rng(3)
    woken = np.sort(rng.integers(0, 6, 300))
    goid = rng.integers(0, 14, 300).astype(np.uint64)
    flags = rng.integers(0, 8, 300)
    has_span, traced = (flags & (TRACED | APP)) != 0, (flags & TRACED) != 0
    keep, left_out = wakes.links_to_keep(woken, goid, has_span, traced)
    for row in range(6):
        first = {}
        for i in np.flatnonzero((woken == row) & has_span):
            first.setdefault(int(goid[i]), i)
        counted = list(first.values())[:wakes.WAKE_LINKS_MAX]
        want = [i for i in counted if traced[i]]
        assert np.flatnonzero(keep & (woken == row)).tolist() == want
        assert left_out[row] == len(first) - len(want)


def test_no_waker_link_to_the_parent_span():
    b = builder()
    rec = record([wake(1, 1), wake(2, 30)])  # goroutine 1 created it: its span is the parent
    rec.trace_reason = TraceReason.JOINS_PARENT
    links, left_out = b.wake_links(rec)
    assert [link.span_id for link in links] == [span_id_for(99, 30)] and left_out == 0
    assert b.build(rec).events[0].attributes["go.goroutine.waker.id"] == 1  # still named on the event
    rec.trace_reason = TraceReason.SPAWNER  # a trace of its own: the creator is a link, and so is the waker
    assert [link.span_id for link in b.wake_links(rec)[0]] == [span_id_for(99, 1), span_id_for(99, 30)]
