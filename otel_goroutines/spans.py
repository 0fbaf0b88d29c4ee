"""GoroutineRecord -> GoroutineSpan. Pure: no kernel, no I/O, no OpenTelemetry SDK."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import wakes
from .allocs import AllocMode
from .goruntime import G_LEAKED, STATE_NAMES
from .kernel_records import WakerFlag
from .records import EndReason, GoroutineRecord, StateChange, TraceReason

_MASK64 = (1 << 64) - 1
_RUNNABLE, _WAITING = 1, 4
_TRACE_SALT = 0x5EED_0F_7A_CE_5A17   # second half of a trace id
_HISTORY_SALT = 0x415_7041_C0DE    # traces that hold a long-lived goroutine's checkpoints
LEAKED_BY_RUNTIME = "goroutine leaked (detected by the Go runtime)"  # error status of its spans
_TRACE_REASONS = {TraceReason.UNTRACED_PARENT: "untraced_parent", TraceReason.SPAWNER: "spawner",
                  TraceReason.TRACE_FULL: "trace_full", TraceReason.APP_SPAN: "application_span",
                  TraceReason.GROUPED: "grouped"}
# A group of short goroutines (flow.ShortGoroutineGroups) is named like a goroutine, by GROUP_BIT | its serial
# number: its trace and span ids come from the same bijection as goroutines' and never meet theirs.
GROUP_BIT = 1 << 62
# GoroutineRecord.app_flags (bpf/goroutines.bpf.c): in the application's trace app_trace_id; or in a trace
# of its own, linked to its creator there; and the application's sampling decision for that trace.
APP_IN_TRACE, APP_LINKED, APP_SAMPLED = 1, 2, 4


@dataclass(slots=True)
class SpanEvent:
    name: str
    time_ns: int  # wall clock
    attributes: dict


@dataclass(slots=True)
class SpanLink:
    trace_id: int
    span_id: int
    attributes: dict


@dataclass(slots=True)
class GoroutineSpan:
    trace_id: int
    span_id: int
    parent_span_id: int | None
    name: str
    start_ns: int  # wall clock
    end_ns: int
    attributes: dict
    events: list[SpanEvent] = field(default_factory=list)
    links: list[SpanLink] = field(default_factory=list)
    error: str | None = None  # span status ERROR with this description


@dataclass(slots=True)
class GroupWindow:
    """Short childless goroutines of one spawner created in one time window (flow.ShortGoroutineGroups)."""
    serial: int        # its name: GROUP_BIT | serial
    spawner: int       # the creator's goroutine id
    spawner_root: int  # the creator's trace (root goroutine), for the link
    go_pc: int         # the go statement of its first goroutine
    first_ns: int      # kernel time: the first one's creation
    last_ns: int       # ...the last one's end
    count: int = 0


@dataclass(frozen=True, slots=True)
class Checkpointed:
    """What earlier checkpoint spans of a goroutine already covered."""
    count: int                 # checkpoint spans exported so far
    until_ns: int              # kernel time the last one ended
    state_ns: tuple[int, ...]  # per-state totals at that time
    allocs: tuple[int, int, int] = (0, 0, 0)  # heap bytes, allocations, samples at that time


def mix64(salt: int, n: int) -> int:
    """splitmix64 of salt + n: a bijection of n, so distinct goroutine ids never collide."""
    z = (salt + n * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) or 1


def span_id_for(salt: int, goid: int) -> int:
    """A goroutine's span id: a child names its parent's span without any shared state."""
    return mix64(salt, goid)


def trace_id_for(salt: int, root_goid: int) -> int:
    return mix64(salt, root_goid) << 64 | mix64(salt ^ _TRACE_SALT, root_goid)


def checkpoint_span_id(salt: int, goid: int, index: int) -> int:
    return mix64(salt ^ (index * _HISTORY_SALT), goid)


@dataclass
class SpanBuilder:
    salt: int
    clock_offset_ns: int  # wall clock - kernel monotonic clock
    function_name: Callable[[int], str]
    creation_site: Callable[[int], tuple[str, str, int] | None]
    wait_reason: Callable[[int], str]
    states_traced: bool
    allocs: AllocMode = AllocMode.OFF
    wakers: bool = True  # the kernel names wakers (probes' --wakers): else a wake is just a state change

    def build(self, rec: GoroutineRecord, before: Checkpointed | None = None) -> GoroutineSpan:
        """The goroutine's span, over its whole life: its children never start before it, even when
        checkpoint spans went out while it lived. Then its events are those since the last
        checkpoint (the earlier ones are in the checkpoints), and it links to that checkpoint."""
        span = self._span(rec, None, rec.end_ns)
        if before:
            span.attributes["go.goroutine.checkpoints"] = before.count
            span.links.append(self._previous_checkpoint(rec, before))
        span.trace_id = trace_id_for(self.salt, rec.root_goid)
        span.span_id = span_id_for(self.salt, rec.goid)
        if rec.trace_reason is TraceReason.JOINS_PARENT:
            span.parent_span_id = span_id_for(self.salt, rec.parent_goid)
        elif rec.trace_reason is TraceReason.GROUPED:  # under its group's span, which links to the spawner
            span.parent_span_id = span_id_for(self.salt, rec.root_goid)
            span.attributes["go.goroutine.trace_reason"] = _TRACE_REASONS[rec.trace_reason]
        elif rec.trace_reason is not TraceReason.NO_PARENT:
            if rec.trace_reason not in (TraceReason.UNTRACED_PARENT, TraceReason.APP_SPAN):
                span.links.append(SpanLink(trace_id_for(self.salt, rec.parent_root_goid),
                                           span_id_for(self.salt, rec.parent_goid), {"go.goroutine.link": "creator"}))
            span.attributes["go.goroutine.trace_reason"] = _TRACE_REASONS[rec.trace_reason]
        if rec.app_flags:
            _place_in_app_trace(span, rec, span_id_for(self.salt, rec.parent_goid))
        span.attributes["go.goroutine.end_reason"] = rec.end_reason.value
        if rec.end_reason is not EndReason.EXITED:
            span.attributes["go.goroutine.alive_at_end"] = True
        span.events.append(SpanEvent(rec.end_reason.value, rec.end_ns + self.clock_offset_ns, {}))
        span.links += self.wake_links(rec)[0]
        return span

    def checkpoint(self, rec: GoroutineRecord, before: Checkpointed | None, now_ns: int) -> GoroutineSpan:
        """A span for the part of a live goroutine's life since its last checkpoint. Checkpoints
        go to a trace of their own per goroutine, side by side in time, numbered; the final span links
        to the last one. (Not each to the one before: Jaeger takes a link within a trace for a parent,
        and flags a later checkpoint shorter than the one before for clock skew.)"""
        span = self._span(rec, before, now_ns)
        index = before.count + 1 if before else 1
        span.trace_id = trace_id_for(self.salt ^ _HISTORY_SALT, rec.goid)
        span.span_id = checkpoint_span_id(self.salt, rec.goid, index)
        span.attributes["go.goroutine.checkpoint"] = index
        span.attributes["go.goroutine.partial"] = True
        span.links += self.wake_links(rec)[0]
        return span

    def group(self, group: GroupWindow) -> GoroutineSpan:
        """The span a group of short goroutines sits under: from its first one's creation to its last one's
        end, named after the function whose go statement made them, linked to the spawner's span."""
        site = self.creation_site(group.go_pc) if group.go_pc else None
        made_by = site[0] if site else f"goroutine {group.spawner}"
        attrs = {"go.goroutine.group.spawner_id": group.spawner, "go.goroutine.created_by": made_by,
                 "go.goroutine.group.goroutines": group.count}
        link = SpanLink(trace_id_for(self.salt, group.spawner_root), span_id_for(self.salt, group.spawner),
                        {"go.goroutine.link": "creator"})
        key = GROUP_BIT | group.serial
        return GoroutineSpan(trace_id_for(self.salt, key), span_id_for(self.salt, key), None, f"short goroutines of {made_by}",
                             group.first_ns + self.clock_offset_ns, group.last_ns + self.clock_offset_ns, attrs, [], [link])

    def mark_leak(self, span: GoroutineSpan, rec: GoroutineRecord, why: str, now_ns: int) -> None:
        """A checkpoint span of a suspected leak: flagged, with the wait it is stuck in."""
        span.attributes["go.goroutine.leak_suspected"] = True
        span.events.append(SpanEvent("leak_suspected", now_ns + self.clock_offset_ns,
                                     {"go.goroutine.wait_reason": self.wait_reason(rec.wait_reason),
                                      "go.goroutine.blocked_ns": now_ns - rec.since_ns, "go.goroutine.leak.reason": why}))
        if rec.status == G_LEAKED:
            span.error = LEAKED_BY_RUNTIME

    def _span(self, rec: GoroutineRecord, before: Checkpointed | None, end_ns: int) -> GoroutineSpan:
        """The part of rec's life after `before` (a checkpoint), or all of it."""
        name = self.function_name(rec.start_pc)
        attrs = {
            "go.goroutine.id": rec.goid,
            "go.goroutine.parent_id": rec.parent_goid,
            "code.function.name": name,
        }
        site = self.creation_site(rec.go_pc) if rec.go_pc else None
        if site is not None:
            attrs["go.goroutine.created_by"] = site[0]
            if site[1]:
                attrs["code.file.path"] = site[1]
                attrs["code.line.number"] = site[2]
        if rec.existed_at_attach:
            attrs["go.goroutine.existed_at_attach"] = True
        if rec.traced_in_full is not None:
            attrs["go.goroutine.traced_in_full"] = rec.traced_in_full
        for key, value in rec.labels.items():
            attrs[f"go.goroutine.label.{key}"] = value
        if self.states_traced:
            previous = before.state_ns if before else (0,) * len(rec.state_ns)
            for state, (ns, earlier) in enumerate(zip(rec.state_ns, previous)):
                if ns - earlier:
                    attrs[f"go.goroutine.{STATE_NAMES.get(state, str(state))}_ns"] = ns - earlier
            attrs["go.goroutine.transitions"] = rec.transitions
            attrs["go.goroutine.events_left_out"] = rec.events_left_out
        if self.allocs is not AllocMode.OFF:
            done = before.allocs if before else (0, 0, 0)
            attrs["go.goroutine.alloc.bytes"] = rec.alloc_bytes - done[0]
            attrs["go.goroutine.alloc.count"] = rec.alloc_count - done[1]
            if self.allocs is AllocMode.SAMPLED:  # the values are estimates resting on this many samples
                attrs["go.goroutine.alloc.samples"] = rec.alloc_samples - done[2]

        left_out = self.wake_links(rec)[1]
        if left_out:
            attrs["go.goroutine.waker_links_left_out"] = left_out

        offset = self.clock_offset_ns
        events = []
        for change in rec.changes:
            ev_attrs = {"go.goroutine.state.previous": STATE_NAMES.get(change.from_state, str(change.from_state))}
            if change.to_state == _WAITING:
                ev_attrs["go.goroutine.wait_reason"] = self.wait_reason(change.wait_reason)
            waker, named = self.waker(rec, change)
            ev_attrs.update(wakes.event_attributes(waker, change.waker_goid if named else None))
            events.append(SpanEvent(STATE_NAMES.get(change.to_state, str(change.to_state)), change.time_ns + offset, ev_attrs))
        start_ns = before.until_ns if before else rec.create_ns
        return GoroutineSpan(0, 0, None, name, start_ns + offset, end_ns + offset, attrs, events)

    def waker(self, rec: GoroutineRecord, change: StateChange) -> tuple[wakes.Waker, bool]:
        """The waker of a change (NONE: not a wake), and whether the event names its goroutine."""
        if not self.wakers or change.from_state != _WAITING or change.to_state != _RUNNABLE:
            return wakes.Waker.NONE, False
        named = wakes.named_goroutine(change.waker, change.waker_goid, rec.goid, self.function_name(change.wake_pc))
        has_function = change.waker & (WakerFlag.WAKER_TRACED | WakerFlag.WAKER_APP_TRACE)
        function = self.function_name(change.waker_start_pc) if has_function and change.waker_start_pc else ""
        return wakes.waker_of(named, function, self.wait_reason(change.wait_reason)), named

    def wake_links(self, rec: GoroutineRecord) -> tuple[list[SpanLink], int]:
        """Links to the spans of the goroutines that woke this one: one per waker, the first
        WAKE_LINKS_MAX wakers with a span; and how many wakers with a span got none (over the cap, or
        their span is in an application's trace, whose id the kernel does not send). None to the
        parent span: the span is its child already (and Jaeger would turn its parent into a link)."""
        parent = rec.parent_goid if _parent_is_creator(rec) else None
        first: dict[int, StateChange] = {}
        for change in rec.changes:
            if change.waker & (WakerFlag.WAKER_TRACED | WakerFlag.WAKER_APP_TRACE) and change.waker_goid not in first \
                    and change.waker_goid != parent and self.waker(rec, change)[1]:
                first[change.waker_goid] = change
        links = [SpanLink(trace_id_for(self.salt, c.waker_root), span_id_for(self.salt, c.waker_goid), dict(wakes.WAKER_LINK))
                 for c in list(first.values())[:wakes.WAKE_LINKS_MAX] if c.waker & WakerFlag.WAKER_TRACED]
        return links, len(first) - len(links)

    def _previous_checkpoint(self, rec: GoroutineRecord, before: Checkpointed) -> SpanLink:
        return SpanLink(trace_id_for(self.salt ^ _HISTORY_SALT, rec.goid), checkpoint_span_id(self.salt, rec.goid, before.count),
                        {"go.goroutine.link": "previous_checkpoint"})


def _parent_is_creator(rec: GoroutineRecord) -> bool:
    """The span's parent is its creator's span (build's rule)."""
    if rec.app_flags & APP_IN_TRACE:
        return not rec.app_span_id
    return rec.trace_reason is TraceReason.JOINS_PARENT


def _place_in_app_trace(span: GoroutineSpan, rec: GoroutineRecord, creator_span_id: int) -> None:
    """A goroutine created under an application span is in the application's trace, the child of that
    span (app_span_id), or of its creator's span when it followed its creator there; one cut from such a
    trace (spawner, full trace) links to its creator's place in it."""
    if rec.app_flags & APP_IN_TRACE:
        span.trace_id = rec.app_trace_id
        span.parent_span_id = rec.app_span_id or creator_span_id
    elif rec.app_flags & APP_LINKED and span.links:
        creator = span.links[-1]
        creator.trace_id = rec.app_trace_id
        creator.span_id = rec.app_span_id or creator_span_id


def app_unsampled(rec: GoroutineRecord) -> bool:
    """In an application trace the application chose not to sample."""
    return bool(rec.app_flags & APP_IN_TRACE) and not rec.app_flags & APP_SAMPLED
