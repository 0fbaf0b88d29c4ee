"""The span flow: kernel records in, spans, summary and per-function counts out.

Pure: no kernel, no I/O, so unit tests drive it with recorded or generated records. It works on
whole batches (numpy arrays of bpf/records.h layouts): state changes wait for their goroutine's
end, then each batch of ended goroutines becomes spans. The common goroutine (no checkpoint, no
labels, no application trace, no leak) is encoded straight from the arrays by fastspans; the
few others go through SpanBuilder, the reference the fast path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import allocs
from .fastspans import BatchSpanEncoder, Changes
from .kernel_records import TRANSITION_EVENT_DTYPE, GstateFlag
from .kernel_records import TraceReason as KernelTraceReason
from .longlived import LongLived
from .metrics import GoroutineMetrics
from .records import EndReason, GoroutineRecord, StateChange, TraceReason, take
from .sampling import SpanBudget
from .spans import GROUP_BIT, LEAKED_BY_RUNTIME, GoroutineSpan, GroupWindow, SpanBuilder, app_unsampled
from .tracker import Summary

END_REASONS = tuple(EndReason)  # end_reason codes of a batch: index into this
_EXITED = END_REASONS.index(EndReason.EXITED)
_WAITING = 4
_CHANGE_FIELDS = ("ts", "from", "to", "waitreason", "waker", "waker_goid", "waker_root", "wake_pc", "waker_start_pc")  # StateChange's order
_AGE_EVERY = 10  # batches (about a second) between moves of held changes from _young to _old
_TR_SPAWNER = int(KernelTraceReason.TR_SPAWNER)
_CLOSE_GRACE_NS = 1_000_000  # between a probe's end time and its record's submission: a group closes this much later


def record_of(row: np.void, end_reason: EndReason, changes: list[StateChange], labels: dict,
              traced_in_full: bool | None = None) -> GoroutineRecord:
    """One end record (END_EVENT_DTYPE) as a GoroutineRecord, for the reference path."""
    st = row["st"]
    return GoroutineRecord(
        pid=int(row["tgid"]), goid=int(row["goid"]), parent_goid=int(st["parent_goid"]),
        parent_traced=bool(st["parent_traced"]), create_ns=int(st["create_ns"]), end_ns=int(st["end_ns"]),
        start_pc=int(st["start_pc"]), go_pc=int(st["go_pc"]), state_ns=tuple(int(v) for v in st["state_ns"]),
        transitions=int(st["transitions"]), events_left_out=int(st["events_left_out"]), end_reason=end_reason,
        root_goid=int(st["root_goid"]), parent_root_goid=int(st["parent_root_goid"]),
        trace_reason=TraceReason(int(st["trace_reason"])),
        existed_at_attach=bool(st["flags"] & GstateFlag.FLAG_EXISTED_AT_ATTACH), status=int(st["status"]),
        wait_reason=int(st["waitreason"]), since_ns=int(st["last_ns"]), alloc_bytes=int(st["alloc_bytes"]),
        alloc_count=allocs.whole_allocations(int(st["alloc_count"])),
        alloc_samples=int(st["alloc_samples"]), app_trace_id=int.from_bytes(st["app_trace_id"].tobytes(), "big"),
        app_span_id=int.from_bytes(st["app_span_id"].tobytes(), "big"), app_flags=int(st["app_flags"]),
        labels=labels, changes=changes, traced_in_full=traced_in_full)


@dataclass(frozen=True)
class GroupSettings:
    window_s: float = 10.0       # 0: no grouping
    shorter_than_s: float = 1.0  # lifetime under which a childless child of a spawner is grouped
    max_spans: int = 1000        # spans of a group's trace, its own included (--trace-max-spans)


class ShortGoroutineGroups:
    """One trace per spawner per time window for its short childless goroutines.

    A spawner's children start traces of their own (the kernel's TR_SPAWNER): a ticker or a dispatcher
    of short workers made a trace per goroutine, thousands a minute. So, at its end, a goroutine that
    the kernel cut from its spawner, that started no goroutine, ended within shorter_than_s of its
    creation and is in no application trace, goes instead into its spawner's group for the window (of
    window_s, aligned on the wall clock) it was created in: a trace whose root span (SpanBuilder.group)
    covers its members, side by side. Nothing else changes trace: no trace was rooted at such a goroutine.
    A group holds max_spans - 1 goroutines; the next ones start another. Its span goes out once full, or
    once its window is over (every member has ended by then: window end + shorter_than_s); a member
    reported later than that (its end record waited in the kernel map) starts a new group of the window."""

    def __init__(self, settings: GroupSettings, clock_offset_ns: int):
        self._window_ns = int(settings.window_s * 1e9)
        self._shorter_ns = int(settings.shorter_than_s * 1e9)
        self._capacity = max(1, settings.max_spans - 1)
        self._offset = clock_offset_ns  # windows are aligned on the wall clock
        self._open: dict[tuple[int, int], GroupWindow] = {}  # (spawner, window) -> its group being filled
        self._full: list[GroupWindow] = []
        self._serial = 0
        self.grouped = 0  # goroutines put in groups
        self.groups = 0   # groups made

    def assign(self, ends: np.ndarray, reasons: np.ndarray) -> None:
        """Puts the eligible rows of a batch (END_EVENT_DTYPE; end_reason codes) in groups, in place:
        trace_reason GROUPED, root_goid their group's name (GROUP_BIT | serial)."""
        st = ends["st"]
        pick = st["trace_reason"] == _TR_SPAWNER  # (fields of nested records are strided: each test costs, cheapest first)
        if not pick.any():
            return
        pick &= (st["children"] == 0) & (st["app_flags"] == 0) & (reasons == _EXITED)
        pick &= (st["flags"] & GstateFlag.FLAG_WOKE_OTHERS) == 0  # links to its span name its own trace
        pick &= st["end_ns"] - st["create_ns"] < np.uint64(self._shorter_ns)  # (an end before its creation: huge, not short)
        rows = np.flatnonzero(pick)
        if not len(rows):
            return
        spawner, create, end = st["parent_goid"][rows], st["create_ns"][rows].view(np.int64), st["end_ns"][rows].view(np.int64)
        if spawner.min() == spawner.max() and self._window(create.min()) == self._window(create.max()):
            runs = [((int(spawner[0]), int(self._window(create[0]))), 0, len(rows))]  # most batches: one spawner, one window
        else:
            window = self._window(create)
            order = np.lexsort((window, spawner))  # stable: a key's rows keep their batch order
            rows, spawner, create, end, window = rows[order], spawner[order], create[order], end[order], window[order]
            bounds = np.flatnonzero(np.r_[True, (spawner[1:] != spawner[:-1]) | (window[1:] != window[:-1]), True]).tolist()
            runs = [((int(spawner[a]), int(window[a])), a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        names = np.empty(len(rows), np.uint64)
        for key, a, b in runs:
            self._fill(key, st[rows[a]], create[a:b], end[a:b], names[a:b])
        st["trace_reason"][rows] = TraceReason.GROUPED.value
        st["root_goid"][rows] = names
        self.grouped += len(rows)

    def _window(self, create_ns):
        """The window (of window_ns, on the wall clock) of kernel times create_ns."""
        return (create_ns + self._offset) // self._window_ns

    def _fill(self, key: tuple[int, int], first: np.void, create: np.ndarray, end: np.ndarray, names: np.ndarray) -> None:
        """Goroutines of one key (their creation and end times), `first` the first's gstate, into that key's open
        group and new ones as groups fill; names: where their group's name goes."""
        start, stop = 0, len(create)
        while start < stop:
            group = self._open.get(key)
            if group is None:
                self._serial += 1
                self.groups += 1
                group = self._open[key] = GroupWindow(self._serial, key[0], int(first["parent_root_goid"]), int(first["go_pc"]),
                                                      int(create[start]), 0)
            n = min(stop - start, self._capacity - group.count)
            group.first_ns = min(group.first_ns, int(create[start:start + n].min()))
            group.last_ns = max(group.last_ns, int(end[start:start + n].max()))
            group.count += n
            names[start:start + n] = GROUP_BIT | group.serial
            if group.count == self._capacity:
                self._full.append(self._open.pop(key))
            start += n

    def due(self, now_ns: int | None) -> list[GroupWindow]:
        """Groups complete at kernel time now_ns (every end record before it has been read), or all (None)."""
        done, self._full = self._full, []
        for key in [k for k in self._open if now_ns is None or now_ns >= self._closes_ns(k[1])]:
            done.append(self._open.pop(key))
        return done

    def _closes_ns(self, window: int) -> int:
        return (window + 1) * self._window_ns - self._offset + self._shorter_ns + _CLOSE_GRACE_NS


@dataclass
class FlowCounts:
    """Totals for the summary and metrics."""
    ended: int = 0
    app_unsampled: int = 0  # spans not exported: in an application trace the application did not sample
    partial: int = 0        # goroutines not traced in full: the overhead budget shed detail during their life
    alloc_totals: allocs.AllocTotals = field(default_factory=allocs.AllocTotals)
    exited_by_start_pc: dict[int, int] = field(default_factory=dict)   # goroutines that exited
    created_by_start_pc: dict[int, int] = field(default_factory=dict)  # ...that were also created since tracing began


class SpanFlow:
    """Turns batches of ended goroutines into spans (encoded bytes when `encode` is given, else
    GoroutineSpan objects for sinks that want them), keeping the summary and counts."""

    def __init__(self, builder: SpanBuilder, long_lived: LongLived, budget: SpanBudget, summary: Summary,
                 encode: Callable[[GoroutineSpan], bytes] | None, batch_encoder: BatchSpanEncoder | None,
                 metrics: GoroutineMetrics | None = None, follow_app_sampling: bool = True,
                 groups: ShortGoroutineGroups | None = None,
                 traced_in_full: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
        self.builder = builder
        self.groups = groups
        self.long_lived = long_lived
        self.budget = budget
        self.summary = summary
        self.metrics = metrics
        self._encode = encode
        self._batch_encoder = batch_encoder if encode is not None else None
        self._follow_app_sampling = follow_app_sampling
        self._traced_in_full = traced_in_full  # (create_ns, end_ns) -> mask; None: no overhead budget, no attribute
        self._young = self._old = np.empty(0, TRANSITION_EVENT_DTYPE)  # state changes of goroutines still alive
        self._batches = 0
        self._labels: dict[int, dict[str, str]] = {}
        self.imported: set[int] = set()  # goroutines that existed at attach
        self.counts = FlowCounts()

    # --- state changes ----------------------------------------------------------------------
    # Changes wait for their goroutine's end. Most goroutines end within a batch or two, so recent
    # changes (`_young`) are searched as they are; those of long-lived goroutines move, about once a
    # second, to `_old`, kept sorted by goroutine: a batch finds its few there by binary search
    # instead of scanning them all (10,000 idle goroutines hold up to 640,000 changes).
    def changes(self, transitions: np.ndarray, labels: dict[int, dict[str, str]]) -> None:
        """Hold state changes and labels until their goroutine ends (they always come first)."""
        if len(transitions):
            self._young = np.concatenate((self._young, transitions)) if len(self._young) else transitions
        self._labels.update(labels)
        self._batches += 1
        if self._batches % _AGE_EVERY == 0 and len(self._young):
            merged = np.concatenate((self._old, self._young))
            self._old, self._young = take(merged, np.argsort(merged["goid"], kind="stable")), self._young[:0]

    def take_changes(self, goid: int) -> list[StateChange]:
        """The state changes held for a live goroutine (for a checkpoint span), and forget them."""
        return _state_changes(self._claim_changes(np.array([goid], np.uint64))[0])

    def _claim_changes(self, goids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The held changes of goroutines goids (sorted), grouped by goroutine: (changes, CSR offsets)."""
        old = self._old
        at = np.searchsorted(old["goid"], goids)
        held = goids[(at < len(old)) & (old["goid"][np.minimum(at, len(old) - 1)] == goids)] if len(old) else goids[:0]
        from_old, self._old = _split(old, held)
        from_young, self._young = _split(self._young, goids)
        claimed = np.concatenate((from_old, from_young))  # older first: each goroutine's stay in time order
        claimed = take(claimed, np.argsort(claimed["goid"], kind="stable"))
        first = np.searchsorted(claimed["goid"], goids, "left")
        last = np.searchsorted(claimed["goid"], goids, "right")
        return claimed, np.concatenate(([0], np.cumsum(last - first))).astype(np.int64)

    # --- ends ---------------------------------------------------------------------------------
    def ended(self, ends: np.ndarray, end_reason: np.ndarray | None = None) -> list:
        """Spans of a batch of ended goroutines (END_EVENT_DTYPE rows); end_reason: a code per row
        (index into END_REASONS), or None for all exited."""
        if not len(ends):
            return []
        order = np.argsort(ends["goid"], kind="stable")
        ends = _first_goroutines(self._adopted(take(ends, order)))  # a copy: rows may change in place
        reasons = np.full(len(ends), _EXITED, np.uint8) if end_reason is None else np.asarray(end_reason, np.uint8)[order]
        if self.groups is not None:
            self.groups.assign(ends, reasons)
        changes, offsets = self._claim_changes(ends["goid"])
        self._count(ends, reasons)
        full = self._full(ends)
        slow = self._needs_reference(ends)
        spans = self._reference(take(ends, slow), reasons[slow], changes, offsets, np.flatnonzero(slow),
                                None if full is None else full[slow])
        fast = ~slow
        fast[fast] = self.budget.select_mask(self._interesting(ends["st"], reasons)[fast])
        if fast.any():
            spans += self._fast(take(ends, fast), reasons[fast], *_select(changes, offsets, fast),
                                None if full is None else full[fast])
        return spans

    def _full(self, ends: np.ndarray) -> np.ndarray | None:
        """Whether each goroutine was traced in full (None without an overhead budget)."""
        if self._traced_in_full is None:
            return None
        full = self._traced_in_full(ends["st"]["create_ns"], ends["st"]["end_ns"])
        self.counts.partial += int(len(full) - full.sum())
        return full

    def _adopted(self, ends: np.ndarray) -> np.ndarray:
        """A goroutine created by an imported one while the import ran (after the probes were in place)
        was recorded as the child of an untraced parent: make it what it would have been, the child of
        a goroutine that existed at attach, a spawner (own trace, linked)."""
        if not self.imported:
            return ends
        st = ends["st"]
        adopt = (st["trace_reason"] == KernelTraceReason.TR_UNTRACED_PARENT) & \
            np.isin(st["parent_goid"], np.fromiter(self.imported, np.uint64)) & \
            ((st["flags"] & GstateFlag.FLAG_EXISTED_AT_ATTACH) == 0)
        return _with_fields(ends, adopt, trace_reason=KernelTraceReason.TR_SPAWNER, parent_traced=1,
                            parent_root_goid=st["parent_goid"])

    def _needs_reference(self, ends: np.ndarray) -> np.ndarray:
        """Rows the fast path does not cover: application traces, labels, checkpoints, leak flags."""
        if self._batch_encoder is None:
            return np.ones(len(ends), bool)
        slow = ends["st"]["app_flags"] != 0
        special = self._labels.keys() | self.long_lived.goroutines()
        if special:
            slow |= np.isin(ends["goid"], np.fromiter(special, np.uint64))
        return slow

    def _count(self, ends: np.ndarray, reasons: np.ndarray) -> None:
        """Summary, metrics and totals of every ended goroutine, exported or not."""
        st = ends["st"]
        pcs, inverse = np.unique(st["start_pc"], return_inverse=True)
        names = [self.builder.function_name(int(pc)) for pc in pcs]
        lifetimes = (st["end_ns"].astype(np.int64) - st["create_ns"].astype(np.int64))
        alive = reasons != _EXITED
        self.summary.add_batch(names, inverse, lifetimes, alive)
        if self.metrics is not None:
            self.metrics.observe_ends(names, inverse, lifetimes)
        new = (st["flags"] & GstateFlag.FLAG_EXISTED_AT_ATTACH) == 0
        _add_counts(self.counts.exited_by_start_pc, pcs, np.bincount(inverse, weights=~alive, minlength=len(pcs)))
        # (Goroutines still alive are created too: the caller counts those in the kernel map.)
        _add_counts(self.counts.created_by_start_pc, pcs, np.bincount(inverse, weights=new & ~alive, minlength=len(pcs)))
        t = self.counts.alloc_totals
        count = int(allocs.whole_allocations(st["alloc_count"]).sum())
        self.counts.alloc_totals = allocs.AllocTotals(t.bytes + int(st["alloc_bytes"].sum()), t.count + count,
                                                      t.samples + int(st["alloc_samples"].sum()))
        self.counts.ended += len(ends)

    def _fast(self, ends: np.ndarray, reasons: np.ndarray, changes: np.ndarray, offsets: np.ndarray,
              full: np.ndarray | None) -> list[bytes]:
        st = ends["st"]
        cols = {name: st[name] for name in st.dtype.names}
        if full is not None:
            cols["traced_in_full"] = full
        cols["tgid"], cols["goid"] = ends["tgid"], ends["goid"]
        cols["alloc_count"] = allocs.whole_allocations(st["alloc_count"])
        return self._batch_encoder.encode(cols, reasons, Changes(offsets, *(changes[name] for name in _CHANGE_FIELDS)))

    def _interesting(self, st: np.ndarray, reasons: np.ndarray) -> np.ndarray:
        """SpanBudget.interesting, on arrays (the fast path's rows have no checkpoint, leak or error)."""
        budget = self.budget
        lifetime = st["end_ns"].astype(np.int64) - st["create_ns"].astype(np.int64)
        return (reasons != _EXITED) | (lifetime >= budget.keep_longer_than_s * 1e9) | \
            (self.builder.states_traced & (st["state_ns"][:, _WAITING] >= budget.keep_waiting_longer_than_s * 1e9))

    def _reference(self, ends: np.ndarray, reasons: np.ndarray, changes: np.ndarray, offsets: np.ndarray,
                   rows: np.ndarray, full: np.ndarray | None) -> list:
        spans = []
        full = [None] * len(ends) if full is None else full.tolist()
        for row, reason, i, in_full in zip(ends, reasons.tolist(), rows.tolist(), full):
            goid = int(row["goid"])
            rec = record_of(row, END_REASONS[reason], _state_changes(changes[offsets[i]:offsets[i + 1]]),
                            self._labels.pop(goid, {}), in_full)
            before, leak_flagged, marked_leaked = self.long_lived.finish(rec)
            span = self.builder.build(rec, before)
            if leak_flagged:
                span.attributes["go.goroutine.leak_suspected"] = True
            if marked_leaked:
                span.error = LEAKED_BY_RUNTIME
            if self._follow_app_sampling and app_unsampled(rec):
                self.counts.app_unsampled += 1
                continue
            spans.append(span)
        return self.prepared(self.budget.select(spans))

    # --- goroutines still alive -----------------------------------------------------------------
    def checkpoints(self, live: np.ndarray, now_ns: int) -> list:
        """Checkpoint spans of live goroutines (END_EVENT_DTYPE rows, end_ns 0) that are due one or
        look leaked now."""
        live = _first_goroutines(self._adopted(live))
        candidates = take(live, self.long_lived.candidates(live["st"]["create_ns"], live["st"]["last_ns"],
                                                           live["st"]["status"], now_ns))
        records = [record_of(row, EndReason.EXITED, [], {}) for row in candidates]
        is_runtime = lambda pc: self.builder.function_name(pc).startswith("runtime.")
        spans = []
        for due in self.long_lived.due(records, now_ns, is_runtime):
            rec = due.record
            rec.changes = self.take_changes(rec.goid)
            before = self.long_lived.record_checkpoint(rec, now_ns)
            span = self.builder.checkpoint(rec, before, now_ns)
            if due.leak:
                self.builder.mark_leak(span, rec, due.leak, now_ns)
            if self._follow_app_sampling and app_unsampled(rec):
                self.counts.app_unsampled += 1
                continue
            spans.append(span)
        return self.prepared(self.budget.select(spans))

    def group_spans(self, now_ns: int | None) -> list:
        """The spans of the groups of short goroutines complete at kernel time now_ns (None: all, at the end)."""
        if self.groups is None:
            return []
        return self.prepared([self.builder.group(g) for g in self.groups.due(now_ns)])

    def prepared(self, spans: list[GoroutineSpan]) -> list:
        """What the sink takes: encoded bytes, or the span objects."""
        return [self._encode(s) for s in spans] if self._encode is not None else spans


def _first_goroutines(rows: np.ndarray) -> np.ndarray:
    """runtime.main, created by the runtime's start-up on the system stack, has no creator: it roots the
    program's tree (not an untraced parent's child), and its go_pc, inside newproc's ABI wrapper
    (`<autogenerated>:1`), is no creation site."""
    return _with_fields(rows, rows["st"]["parent_goid"] == 0, trace_reason=TraceReason.NO_PARENT, go_pc=0)


def _with_fields(rows: np.ndarray, where: np.ndarray, **values) -> np.ndarray:
    """A copy of the end records with these gstate fields set where `where` holds (an array value: its
    elements there); the records themselves when it holds nowhere."""
    if not where.any():
        return rows
    rows = rows.copy()
    st = rows["st"]
    for name, value in values.items():
        st[name][where] = value[where] if isinstance(value, np.ndarray) else value
    return rows


def _add_counts(by_pc: dict[int, int], pcs: np.ndarray, counts: np.ndarray) -> None:
    for pc, n in zip(pcs.tolist(), counts.tolist()):
        if n:
            by_pc[pc] = by_pc.get(pc, 0) + int(n)


def _state_changes(rows: np.ndarray) -> list[StateChange]:
    return [StateChange(*c) for c in zip(*(rows[name].tolist() for name in _CHANGE_FIELDS))]


def _split(changes: np.ndarray, goids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the changes of goroutines goids, the others)."""
    if not len(changes) or not len(goids):
        return changes[:0], changes
    mine = np.isin(changes["goid"], goids)
    return take(changes, mine), take(changes, ~mine)


def _select(changes: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The changes of the selected rows (a mask) and their CSR offsets."""
    counts = np.diff(offsets)
    chosen = np.repeat(rows, counts)
    return take(changes, chosen), np.concatenate(([0], np.cumsum(counts[rows]))).astype(np.int64)
