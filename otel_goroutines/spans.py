"""GoroutineRecord -> GoroutineSpan. Pure: no kernel, no I/O, no OpenTelemetry SDK."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .goruntime import STATE_NAMES
from .records import EndReason, GoroutineRecord

_MASK64 = (1 << 64) - 1
_WAITING = 4


@dataclass(slots=True)
class SpanEvent:
    name: str
    time_ns: int  # wall clock
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


def span_id_for(salt: int, goid: int) -> int:
    """A span id from a goroutine id: splitmix64 is a bijection, so distinct goids of one process
    never collide, and a child can name its parent's span without any shared state."""
    z = (salt + goid * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) or 1


@dataclass
class SpanBuilder:
    trace_id: int
    salt: int
    clock_offset_ns: int  # wall clock - kernel monotonic clock
    function_name: Callable[[int], str]
    creation_site: Callable[[int], tuple[str, str, int] | None]
    wait_reason: Callable[[int], str]
    states_traced: bool

    def build(self, rec: GoroutineRecord) -> GoroutineSpan:
        name = self.function_name(rec.start_pc)
        attrs = {
            "go.goroutine.id": rec.goid,
            "go.goroutine.parent_id": rec.parent_goid,
            "code.function.name": name,
            "go.goroutine.end_reason": rec.end_reason.value,
        }
        site = self.creation_site(rec.go_pc) if rec.go_pc else None
        if site is not None:
            attrs["go.goroutine.created_by"] = site[0]
            if site[1]:
                attrs["code.file.path"] = site[1]
                attrs["code.line.number"] = site[2]
        if rec.end_reason is not EndReason.EXITED:
            attrs["go.goroutine.alive_at_end"] = True
        if self.states_traced:
            for state, ns in enumerate(rec.state_ns):
                if ns:
                    attrs[f"go.goroutine.{STATE_NAMES.get(state, str(state))}_ns"] = ns
            attrs["go.goroutine.transitions"] = rec.transitions
            attrs["go.goroutine.events_left_out"] = rec.events_left_out

        offset = self.clock_offset_ns
        events = []
        for change in rec.changes:
            ev_attrs = {"go.goroutine.state.previous": STATE_NAMES.get(change.from_state, str(change.from_state))}
            if change.to_state == _WAITING:
                ev_attrs["go.goroutine.wait_reason"] = self.wait_reason(change.wait_reason)
            events.append(SpanEvent(STATE_NAMES.get(change.to_state, str(change.to_state)), change.time_ns + offset, ev_attrs))
        events.append(SpanEvent(rec.end_reason.value, rec.end_ns + offset, {}))

        parent = span_id_for(self.salt, rec.parent_goid) if rec.parent_traced else None
        return GoroutineSpan(self.trace_id, span_id_for(self.salt, rec.goid), parent, name,
                             rec.create_ns + offset, rec.end_ns + offset, attrs, events)
