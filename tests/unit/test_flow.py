"""The span flow without a kernel: recorded-shape batches (bpf/records.h layouts) in, spans out.
State changes that arrive in earlier batches join their goroutine's end; the fast path and the
reference path give the same bytes; special goroutines take the reference path; counts add up."""

import numpy as np
from opentelemetry.sdk.resources import Resource

from otel_goroutines.allocs import AllocMode
from otel_goroutines.exporters import SCOPE
from otel_goroutines.fastspans import BatchSpanEncoder
from otel_goroutines.flow import END_REASONS, SpanFlow
from otel_goroutines.kernel_records import END_EVENT_DTYPE, TRANSITION_EVENT_DTYPE, EventKind, TraceReason
from otel_goroutines.longlived import LongLived, LongLivedSettings
from otel_goroutines.otlp_wire import SpanEncoder
from otel_goroutines.records import EndReason
from otel_goroutines.sampling import SpanBudget
from otel_goroutines.spans import SpanBuilder
from otel_goroutines.tracker import Summary

ENCODER = SpanEncoder(Resource({"service.name": "svc"}), SCOPE)
NAMES = {0x1000: "main.worker", 0x2000: "main.spawner", 0x3000: "runtime.bgsweep"}


def builder(states=True) -> SpanBuilder:
    return SpanBuilder(salt=99, clock_offset_ns=10**18, function_name=lambda pc: NAMES.get(pc, hex(pc)),
                       creation_site=lambda pc: ("main.main", "/src/main.go", pc & 0xFF) if pc else None,
                       wait_reason=lambda i: "chan receive" if i == 7 else f"waitreason({i})", states_traced=states,
                       allocs=AllocMode.SAMPLED)


def flow(fast=True, budget=0.0, states=True) -> SpanFlow:
    b = builder(states)
    return SpanFlow(b, LongLived(LongLivedSettings(checkpoint_after_s=1.0, leak_after_s=0)), SpanBudget(budget), Summary(),
                    ENCODER.span, BatchSpanEncoder(b, ENCODER) if fast else None)


def ends(goids, start_pc=0x1000, parent=1, created=1_000, lifetime=5_000) -> np.ndarray:
    rows = np.zeros(len(goids), END_EVENT_DTYPE)
    rows["kind"], rows["tgid"], rows["goid"] = EventKind.EV_END, 42, goids
    st = rows["st"]
    st["create_ns"], st["end_ns"], st["parent_goid"] = created, created + lifetime, parent
    st["start_pc"], st["go_pc"], st["root_goid"] = start_pc, 0x5005, np.asarray(goids)
    st["trace_reason"] = TraceReason.TR_SPAWNER
    st["parent_traced"], st["parent_root_goid"] = 1, parent
    st["state_ns"][:, 2] = lifetime  # running
    st["transitions"] = 2
    st["alloc_bytes"], st["alloc_count"], st["alloc_samples"] = 4096, 3 << 16, 1
    return rows


def changes(goid, times, states=((1, 2), (2, 4))) -> np.ndarray:
    rows = np.zeros(len(times), TRANSITION_EVENT_DTYPE)
    rows["kind"], rows["tgid"], rows["goid"], rows["ts"] = EventKind.EV_TRANSITION, 42, goid, times
    rows["from"], rows["to"] = zip(*states[:len(times)])
    rows["waitreason"] = 7
    return rows


def decoded(encoded):
    from opentelemetry.proto.trace.v1.trace_pb2 import Span
    out = []
    for item in encoded:
        span = Span()
        span.ParseFromString(item[2:] if item[1] < 0x80 else item[3:] if item[2] < 0x80 else item[4:])
        out.append(span)
    return sorted(out, key=lambda s: s.span_id)


def test_changes_from_earlier_batches_join_their_goroutine_and_fast_equals_reference():
    outputs = []
    for fast in (True, False):
        f = flow(fast)
        f.changes(changes(5, [1_100]), {})  # one batch: goroutine 5 starts running
        f.changes(changes(6, [1_200, 1_300]), {})
        f.changes(changes(5, [1_400], states=((2, 4),)), {})  # a later batch: it waits
        outputs.append(f.ended(ends([6, 5, 9])))
        assert f.take_changes(5) == [] and len(f._young) == len(f._old) == 0  # every change went to its span
    fast, reference = outputs
    assert sorted(fast) == sorted(reference)  # order is free, content is not
    spans = {s.attributes[0].value.int_value: s for s in decoded(fast)}
    assert [e.name for e in spans[5].events] == ["running", "waiting", "exited"]
    assert [e.time_unix_nano - 10**18 for e in spans[5].events] == [1_100, 1_400, 6_000]
    assert [e.name for e in spans[9].events] == ["exited"]


def test_changes_of_long_lived_goroutines_are_found_after_they_age():
    f = flow()
    f.changes(changes(5, [1_100, 1_200]), {})
    f.changes(changes(8, [1_150]), {})
    for _ in range(20):  # batches go by: the held changes move to the sorted store
        f.changes(np.empty(0, TRANSITION_EVENT_DTYPE), {})
    assert len(f._old) == 3 and len(f._young) == 0
    f.changes(changes(5, [1_300], states=((4, 1),)), {})  # a newer one, still young
    [span] = decoded(f.ended(ends([5], lifetime=10_000)))
    assert [e.time_unix_nano - 10**18 for e in span.events] == [1_100, 1_200, 1_300, 11_000]
    assert [c.time_ns for c in f.take_changes(8)] == [1_150] and len(f._old) == 0


def test_special_goroutines_take_the_reference_path_and_keep_their_labels():
    f = flow()
    f.changes(np.empty(0, TRANSITION_EVENT_DTYPE), {5: {"tenant": "a"}})
    rows = ends([5, 6])
    rows["st"]["app_flags"][1] = 1  # in an application trace (sampled: 4 not set -> unsampled, not exported)
    out = f.ended(rows)
    assert len(out) == 1 and f.counts.app_unsampled == 1
    [span] = decoded(out)
    assert any(a.key == "go.goroutine.label.tenant" and a.value.string_value == "a" for a in span.attributes)
    assert not f._labels


def test_counts_and_summary_cover_every_ended_goroutine():
    f = flow()
    rows = ends(np.arange(10, 20))
    rows["st"]["start_pc"][:3] = 0x2000
    rows["st"]["flags"][:2] = 1  # existed at attach: not created while traced
    reasons = np.full(10, END_REASONS.index(EndReason.EXITED), np.uint8)
    reasons[-1] = END_REASONS.index(EndReason.PROCESS_EXITED)
    assert len(f.ended(rows, reasons)) == 10
    c = f.counts
    assert c.ended == 10 and f.summary.total == 10
    assert c.exited_by_start_pc == {0x2000: 3, 0x1000: 6}
    assert c.created_by_start_pc == {0x2000: 1, 0x1000: 6}  # created while traced, and exited
    assert (c.alloc_totals.bytes, c.alloc_totals.count, c.alloc_totals.samples) == (40960, 30, 10)
    assert f.summary.by_function["main.worker"].alive_at_end == 1


def test_budget_keeps_the_interesting_and_as_many_others_as_it_allows():
    f = flow(budget=5)
    rows = ends(np.arange(100, 120))
    rows["st"]["end_ns"][::4] += 2 * 10**9  # lived over a second: interesting
    out = f.ended(rows)
    lifetimes = sorted(s.end_time_unix_nano - s.start_time_unix_nano for s in decoded(out))
    assert sum(t > 10**9 for t in lifetimes) == 5  # all 5 interesting ones
    # In order: the first (interesting) and the next three (boring) take the 5 tokens with the fifth
    # (interesting); after that only interesting ones go.
    assert len(out) == 8
    assert f.budget.sampled_out == 20 - len(out)


def test_budget_mask_is_the_sequential_rule(monkeypatch):
    from otel_goroutines import sampling
    monkeypatch.setattr(sampling.time, "monotonic", lambda: 100.0)  # no refill during the check
    budget = SpanBudget(10)
    rng = np.random.default_rng(3)
    for _ in range(20):
        interesting = rng.random(30) < 0.3
        tokens = budget._tokens = float(rng.integers(-5, 11))  # at most the budget, as refills leave it
        budget._last = 100.0
        keep = budget.select_mask(interesting)
        expected = []
        for hot in interesting:
            expected.append(bool(hot or tokens >= 1))
            tokens -= expected[-1]
        assert keep.tolist() == expected


def test_checkpoints_of_live_goroutines_then_the_final_span_links_them():
    f = flow()
    live = ends([7], created=0, lifetime=0)
    live["st"]["end_ns"] = 0
    [checkpoint] = decoded(f.checkpoints(live, now_ns=2 * 10**9))
    assert any(a.key == "go.goroutine.checkpoint" for a in checkpoint.attributes)
    final = ends([7], created=0, lifetime=3 * 10**9)
    [span] = decoded(f.ended(final))  # reference path: it has a checkpoint
    assert checkpoint.span_id in [link.span_id for link in span.links]
    assert span.start_time_unix_nano == checkpoint.start_time_unix_nano  # both from the creation: the whole life


def test_the_first_goroutine_has_no_parent_no_trace_reason_and_no_creation_site():
    """runtime.main (parent id 0, created by the runtime's start-up) roots the tree: neither an untraced
    parent's child nor created at a `go` statement (its go_pc lies in newproc's ABI wrapper)."""
    outputs = []
    for fast in (True, False):
        rows = ends([1, 7], parent=0)
        rows["st"]["trace_reason"] = TraceReason.TR_UNTRACED_PARENT  # what the kernel says
        outputs.append(flow(fast).ended(rows))
    fast, reference = outputs
    assert sorted(fast) == sorted(reference)
    for span in decoded(fast):
        keys = {a.key for a in span.attributes}
        assert not span.parent_span_id and not span.links
        assert not {"go.goroutine.trace_reason", "code.file.path", "code.line.number", "go.goroutine.created_by"} & keys
        assert {a.key: a.value.int_value for a in span.attributes}["go.goroutine.parent_id"] == 0
