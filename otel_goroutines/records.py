"""Goroutine records: what the kernel tells user space about one goroutine's life."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class EndReason(str, Enum):
    EXITED = "exited"                  # the goroutine returned or called runtime.Goexit
    PROCESS_EXITED = "process_exited"  # still alive when the program exited
    AGENT_STOPPED = "agent_stopped"    # still alive when the agent stopped tracing


@dataclass(slots=True)
class StateChange:
    time_ns: int      # kernel monotonic clock
    from_state: int
    to_state: int
    wait_reason: int  # index into runtime.waitReasonStrings; meaningful when to_state is waiting


@dataclass(slots=True)
class GoroutineRecord:
    pid: int
    goid: int
    parent_goid: int
    parent_traced: bool          # the creator has a span of its own
    create_ns: int               # kernel monotonic clock
    end_ns: int
    start_pc: int                # runtime addresses, as the target sees them
    go_pc: int
    state_ns: tuple[int, ...]    # time spent in each runtime state, indexed by status value
    transitions: int
    events_left_out: int
    end_reason: EndReason = EndReason.EXITED
    changes: list[StateChange] = field(default_factory=list)

    @property
    def lifetime_ns(self) -> int:
        return self.end_ns - self.create_ns
