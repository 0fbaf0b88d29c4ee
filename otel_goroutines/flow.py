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
from .spans import GoroutineSpan, SpanBuilder, app_unsampled
from .tracker import Summary

END_REASONS = tuple(EndReason)  # end_reason codes of a batch: index into this
_EXITED = END_REASONS.index(EndReason.EXITED)
_WAITING = 4
_AGE_EVERY = 10  # batches (about a second) between moves of held changes from _young to _old


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
                 traced_in_full: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
        self.builder = builder
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
        ends = self._adopted(take(ends, order))
        reasons = np.full(len(ends), _EXITED, np.uint8) if end_reason is None else np.asarray(end_reason, np.uint8)[order]
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
        if not adopt.any():
            return ends
        ends = ends.copy()
        st = ends["st"]
        st["trace_reason"][adopt] = KernelTraceReason.TR_SPAWNER
        st["parent_traced"][adopt] = 1
        st["parent_root_goid"][adopt] = st["parent_goid"][adopt]
        return ends

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
        return self._batch_encoder.encode(cols, reasons, Changes(offsets, changes["ts"], changes["from"], changes["to"],
                                                                 changes["waitreason"]))

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
            before, leak_flagged = self.long_lived.finish(rec)
            span = self.builder.build(rec, before)
            if leak_flagged:
                span.attributes["go.goroutine.leak_suspected"] = True
            if self._follow_app_sampling and app_unsampled(rec):
                self.counts.app_unsampled += 1
                continue
            spans.append(span)
        return self.prepared(self.budget.select(spans))

    # --- goroutines still alive -----------------------------------------------------------------
    def checkpoints(self, live: np.ndarray, now_ns: int) -> list:
        """Checkpoint spans of live goroutines (END_EVENT_DTYPE rows, end_ns 0) that are due one or
        look leaked now."""
        live = self._adopted(live)
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

    def prepared(self, spans: list[GoroutineSpan]) -> list:
        """What the sink takes: encoded bytes, or the span objects."""
        return [self._encode(s) for s in spans] if self._encode is not None else spans


def _add_counts(by_pc: dict[int, int], pcs: np.ndarray, counts: np.ndarray) -> None:
    for pc, n in zip(pcs.tolist(), counts.tolist()):
        if n:
            by_pc[pc] = by_pc.get(pc, 0) + int(n)


def _state_changes(rows: np.ndarray) -> list[StateChange]:
    return [StateChange(ts, f, t, w) for ts, f, t, w in
            zip(rows["ts"].tolist(), rows["from"].tolist(), rows["to"].tolist(), rows["waitreason"].tolist())]


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
