"""Joins kernel events into complete GoroutineRecords, and keeps the counts for the summary."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .records import GoroutineRecord, StateChange


class GoroutineTracker:
    """State changes arrive before their goroutine's end record; hold them until it comes."""

    def __init__(self):
        self._changes: dict[tuple[int, int], list[StateChange]] = defaultdict(list)
        self.ready: list[GoroutineRecord] = []
        self.ended = 0

    def on_change(self, pid: int, goid: int, change: StateChange) -> None:
        self._changes[(pid, goid)].append(change)

    def on_end(self, record: GoroutineRecord) -> None:
        record.changes = self._changes.pop((record.pid, record.goid), [])
        self.ready.append(record)
        self.ended += 1

    def take_changes(self, pid: int, goid: int) -> list[StateChange]:
        """The state changes buffered for a live goroutine (for a checkpoint span)."""
        return self._changes.pop((pid, goid), [])

    def take(self) -> list[GoroutineRecord]:
        ready, self.ready = self.ready, []
        return ready


@dataclass
class FunctionStats:
    count: int = 0
    alive_at_end: int = 0
    lifetimes_ns: list[int] = field(default_factory=list)


class Summary:
    """Goroutines seen, grouped by start function, for the report at the end."""

    def __init__(self):
        self.by_function: dict[str, FunctionStats] = defaultdict(FunctionStats)

    def add(self, name: str, lifetime_ns: int, alive_at_end: bool) -> None:
        stats = self.by_function[name]
        stats.count += 1
        stats.alive_at_end += alive_at_end
        stats.lifetimes_ns.append(lifetime_ns)

    @property
    def total(self) -> int:
        return sum(s.count for s in self.by_function.values())

    def render(self, losses: dict[str, int], top: int = 15) -> str:
        lines = [f"goroutines seen: {self.total}"]
        rows = sorted(self.by_function.items(), key=lambda kv: -kv[1].count)
        if rows:
            width = min(60, max(len(name) for name, _ in rows[:top]))
            lines.append(f"  {'start function':<{width}}  {'count':>7}  {'alive':>5}  {'median':>10}  {'max':>10}")
            for name, s in rows[:top]:
                lt = sorted(s.lifetimes_ns)
                lines.append(f"  {name[:width]:<{width}}  {s.count:>7}  {s.alive_at_end:>5}  "
                             f"{_duration(lt[len(lt) // 2]):>10}  {_duration(lt[-1]):>10}")
            if len(rows) > top:
                lines.append(f"  ... and {len(rows) - top} more start functions")
        lost = {k: v for k, v in losses.items() if v}
        lines.append("nothing dropped" if not lost else "dropped or degraded: " + ", ".join(f"{k}={v}" for k, v in lost.items()))
        return "\n".join(lines)


def _duration(ns: int) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.1f} {unit}"
    return f"{ns} ns"
