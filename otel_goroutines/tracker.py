"""The summary printed at the end: goroutines seen, by start function."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FunctionStats:
    count: int = 0
    alive_at_end: int = 0
    lifetimes_ns: list[np.ndarray] = field(default_factory=list)  # one array per batch: 8 bytes a goroutine


class Summary:
    """Goroutines seen, grouped by start function, for the report at the end."""

    def __init__(self):
        self.by_function: dict[str, FunctionStats] = defaultdict(FunctionStats)

    def add_batch(self, names: list[str], index: np.ndarray, lifetimes_ns: np.ndarray, alive_at_end: np.ndarray) -> None:
        """Goroutines of a batch: names[index[i]] is row i's start function."""
        order = np.argsort(index, kind="stable")
        bounds = np.searchsorted(index[order], np.arange(len(names) + 1))
        for i, name in enumerate(names):
            rows = order[bounds[i]:bounds[i + 1]]
            stats = self.by_function[name]
            stats.count += len(rows)
            stats.alive_at_end += int(alive_at_end[rows].sum())
            stats.lifetimes_ns.append(lifetimes_ns[rows])

    @property
    def total(self) -> int:
        return sum(s.count for s in self.by_function.values())

    def render(self, losses: dict[str, int], created: int | None = None, top: int = 15) -> str:
        lines = [f"goroutines seen: {self.total}"]
        if created is not None:  # by the kernel's count: seen = created + existing at attach - losses
            lines.append(f"goroutines created while traced: {created}")
        rows = sorted(self.by_function.items(), key=lambda kv: -kv[1].count)
        if rows:
            width = min(_NAME_WIDTH, max(len(name) for name, _ in rows[:top]))
            lines.append(f"  {'start function':<{width}}  {'count':>7}  {'alive':>5}  {'median':>10}  {'max':>10}")
            for name, s in rows[:top]:
                lt = np.sort(np.concatenate(s.lifetimes_ns))
                lines.append(f"  {_fit(name, width):<{width}}  {s.count:>7}  {s.alive_at_end:>5}  "
                             f"{_duration(int(lt[len(lt) // 2])):>10}  {_duration(int(lt[-1])):>10}")
            if len(rows) > top:
                lines.append(f"  ... and {len(rows) - top} more start functions")
        lost = {k: v for k, v in losses.items() if v}
        lines.append("nothing dropped" if not lost else "dropped or degraded: " + ", ".join(f"{k}={v}" for k, v in lost.items()))
        return "\n".join(lines)


_NAME_WIDTH = 60


def _fit(name: str, width: int) -> str:
    """name in width characters: a longer one keeps its package's start and its function's end, with
    "..." between (the end names the function, the start its module)."""
    if len(name) <= width:
        return name
    head = width // 3
    return name[:head] + "..." + name[len(name) - (width - head - 3):]


def _duration(ns: int) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.1f} {unit}"
    return f"{ns} ns"
