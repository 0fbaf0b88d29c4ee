"""The span flow without a kernel: recorded-shape batches (bpf/records.h layouts) in, spans out.
State changes that arrive in earlier batches join their goroutine's end; the fast path and the
reference path give the same bytes; special goroutines take the reference path; counts add up."""

import numpy as np
from opentelemetry.sdk.resources import Resource

from otel_goroutines.allocs import AllocMode
from otel_goroutines.exporters import SCOPE
from otel_goroutines.fastspans import BatchSpanEncoder
from otel_goroutines.flow import END_REASONS, GroupSettings, ShortGoroutineGroups, SpanFlow
from otel_goroutines.kernel_records import END_EVENT_DTYPE, TRANSITION_EVENT_DTYPE, EventKind, GstateFlag, TraceReason
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


def flow(fast=True, budget=0.0, states=True, groups: GroupSettings | None = None) -> SpanFlow:
    b = builder(states)
    return SpanFlow(b, LongLived(LongLivedSettings(checkpoint_after_s=1.0, leak_after_s=0)), SpanBudget(budget), Summary(),
                    ENCODER.span, BatchSpanEncoder(b, ENCODER) if fast else None,
                    groups=ShortGoroutineGroups(groups, b.clock_offset_ns) if groups else None)


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


# --- groups of short goroutines ------------------------------------------------------------------
SECOND = 10**9
WINDOW = GroupSettings(window_s=10.0, shorter_than_s=1.0, max_spans=1000)
# builder's clock offset is 10**18 ns, a multiple of the window: kernel time 0 starts a window


def attr(span, key):
    return next((getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes if a.key == key), None)


def test_short_childless_children_of_a_spawner_share_a_trace_per_window_under_a_group_span():
    outputs = []
    for fast in (True, False):
        f = flow(fast, groups=WINDOW)
        batch = np.concatenate([ends([5, 6], parent=2, created=1 * SECOND), ends([7], parent=2, created=9 * SECOND)])
        out = f.ended(batch)
        assert f.group_spans(10 * SECOND) == []  # not before the window's last member may have ended
        [group] = f.group_spans(11 * SECOND + 2_000_000)
        outputs.append((out, group))
    (fast, fast_group), (reference, reference_group) = outputs
    assert sorted(fast) == sorted(reference) and fast_group == reference_group
    members, [group] = decoded(fast), decoded([fast_group])
    assert {m.trace_id for m in members} == {group.trace_id} and {m.parent_span_id for m in members} == {group.span_id}
    assert all(attr(m, "go.goroutine.trace_reason") == "grouped" and not m.links for m in members)
    assert group.name == "short goroutines of main.main" and group.parent_span_id == b""
    assert attr(group, "go.goroutine.group.goroutines") == 3 and attr(group, "go.goroutine.group.spawner_id") == 2
    # It covers its members, from the first creation to the last end, and links to the spawner's span.
    assert group.start_time_unix_nano == min(m.start_time_unix_nano for m in members) == 10**18 + SECOND
    assert group.end_time_unix_nano == max(m.end_time_unix_nano for m in members) == 10**18 + 9 * SECOND + 5_000
    from otel_goroutines.spans import span_id_for, trace_id_for
    [link] = group.links
    assert (link.trace_id, link.span_id) == (trace_id_for(99, 2).to_bytes(16, "big"), span_id_for(99, 2).to_bytes(8, "big"))


def test_goroutines_with_children_long_ones_joined_ones_and_application_ones_keep_their_traces():
    f = flow(groups=WINDOW)
    rows = ends([10, 11, 12, 13, 14, 15], parent=2)
    st = rows["st"]
    st["children"][0] = 1                                  # started a goroutine of its own
    st["end_ns"][1] = st["create_ns"][1] + 2 * SECOND      # lived longer than --group-shorter-than
    st["trace_reason"][2] = TraceReason.TR_JOINS_PARENT    # in its creator's trace already
    st["app_flags"][3] = 4 | 2                             # linked to an application trace
    reasons = np.full(6, END_REASONS.index(EndReason.EXITED), np.uint8)
    reasons[4] = END_REASONS.index(EndReason.AGENT_STOPPED)  # alive at the end
    out = decoded(f.ended(rows, reasons))
    assert f.group_spans(None) != []  # only goroutine 15
    by_goid = {attr(s, "go.goroutine.id"): s for s in out}
    assert attr(by_goid[15], "go.goroutine.trace_reason") == "grouped"
    for goid in (10, 11, 13, 14):
        assert attr(by_goid[goid], "go.goroutine.trace_reason") == "spawner" and by_goid[goid].parent_span_id == b""
    assert by_goid[12].parent_span_id != b"" and attr(by_goid[12], "go.goroutine.trace_reason") is None
    assert len({s.trace_id for s in out}) == 6


def test_one_group_per_spawner_and_window_and_at_most_max_spans_a_trace():
    f = flow(groups=GroupSettings(window_s=10.0, shorter_than_s=1.0, max_spans=4))  # 3 goroutines + the group's span
    batch = np.concatenate([ends(range(100, 107), parent=2, created=SECOND),   # 7 in one window: 3 groups
                            ends([200], parent=3, created=SECOND),             # another spawner
                            ends([300], parent=2, created=12 * SECOND)])       # the next window
    members = decoded(f.ended(batch))
    full = decoded(f.group_spans(2 * SECOND))  # full groups go at once
    assert [attr(g, "go.goroutine.group.goroutines") for g in full] == [3, 3]
    rest = decoded(f.group_spans(None))  # the end: every open group
    groups = full + rest
    assert sorted(attr(g, "go.goroutine.group.goroutines") for g in groups) == [1, 1, 1, 3, 3]
    by_trace = {}
    for m in members:
        by_trace.setdefault(m.trace_id, []).append(attr(m, "go.goroutine.id"))
    assert sorted(map(sorted, by_trace.values())) == [[100, 101, 102], [103, 104, 105], [106], [200], [300]]
    assert {g.trace_id for g in groups} == set(by_trace) and f.groups.grouped == 9 and f.groups.groups == 5
    assert f.group_spans(None) == []


def test_a_member_reported_after_its_window_closed_starts_another_group_of_that_window():
    f = flow(groups=WINDOW)
    first = decoded(f.ended(ends([5], parent=2, created=SECOND)))
    [closed] = decoded(f.group_spans(12 * SECOND))
    late = decoded(f.ended(ends([6], parent=2, created=2 * SECOND)))  # its end record waited in the kernel map
    [reopened] = decoded(f.group_spans(12 * SECOND))
    assert late[0].parent_span_id == reopened.span_id != closed.span_id == first[0].parent_span_id
    assert reopened.start_time_unix_nano <= late[0].start_time_unix_nano and reopened.end_time_unix_nano >= late[0].end_time_unix_nano


def test_no_grouping_without_a_window():
    f = flow()
    [span] = decoded(f.ended(ends([5], parent=2)))
    assert attr(span, "go.goroutine.trace_reason") == "spawner" and f.group_spans(None) == []


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


def test_a_goroutine_that_woke_others_keeps_its_trace():
    """Spans it woke link to it by its trace id, which the kernel gave it: a group would change it."""
    f = flow(groups=WINDOW)
    rows = ends([20, 21], parent=2)
    rows["st"]["flags"][0] = GstateFlag.FLAG_WOKE_OTHERS
    by_goid = {attr(s, "go.goroutine.id"): s for s in decoded(f.ended(rows))}
    assert attr(by_goid[20], "go.goroutine.trace_reason") == "spawner"
    assert attr(by_goid[21], "go.goroutine.trace_reason") == "grouped"
