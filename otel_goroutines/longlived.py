"""Goroutines that live long: checkpoint spans, and suspected leaks.

Scans of the kernel map (every few seconds) find goroutines older than the checkpoint age, and
goroutines blocked in the same wait past the leak threshold; both are exported at once as a
checkpoint span, so people see them without waiting for an end that may never come.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .goruntime import G_LEAKED, G_WAITING
from .records import GoroutineRecord
from .spans import Checkpointed


@dataclass(frozen=True)
class LongLivedSettings:
    checkpoint_after_s: float = 60.0   # 0: never
    leak_after_s: float = 300.0        # 0: never

    @property
    def scan_interval_s(self) -> float:
        active = [t for t in (self.checkpoint_after_s, self.leak_after_s) if t > 0]
        return min(5.0, max(0.2, min(active) / 4)) if active else 0.0


@dataclass
class Due:
    record: GoroutineRecord
    leak: str | None = None  # why it is a suspected leak, when it is one


@dataclass
class LongLived:
    settings: LongLivedSettings
    checkpointed: dict[tuple[int, int], Checkpointed] = field(default_factory=dict)
    _flagged_waits: dict[tuple[int, int], int] = field(default_factory=dict)  # goroutine -> since_ns of the flagged wait
    _marked_by_runtime: set[tuple[int, int]] = field(default_factory=set)  # flagged goroutines the runtime marked _Gleaked
    leaks_flagged: int = 0

    def candidates(self, create_ns: np.ndarray, since_ns: np.ndarray, status: np.ndarray, now_ns: int) -> np.ndarray:
        """Which live goroutines due() may pick (a cheap superset, on arrays): old enough for a
        checkpoint, marked leaked, or waiting past the leak threshold."""
        checkpoint_ns = int(self.settings.checkpoint_after_s * 1e9)
        leak_ns = int(self.settings.leak_after_s * 1e9)
        now = np.int64(now_ns)
        pick = status == G_LEAKED
        if checkpoint_ns:
            pick |= now - create_ns.astype(np.int64) >= checkpoint_ns
        if leak_ns:
            pick |= (status == G_WAITING) & (now - since_ns.astype(np.int64) >= leak_ns)
        return pick

    def due(self, records: list[GoroutineRecord], now_ns: int, is_runtime: callable) -> list[Due]:
        """Among live goroutines, those whose checkpoint is due or that look leaked now."""
        checkpoint_ns = int(self.settings.checkpoint_after_s * 1e9)
        leak_ns = int(self.settings.leak_after_s * 1e9)
        out = []
        for rec in records:
            key = (rec.pid, rec.goid)
            leak = None
            if key not in self._flagged_waits or self._flagged_waits[key] != rec.since_ns:
                if rec.status == G_LEAKED:
                    leak = "the Go runtime marked it leaked"
                    self._marked_by_runtime.add(key)
                elif (leak_ns and rec.status == G_WAITING and now_ns - rec.since_ns >= leak_ns
                      and not is_runtime(rec.start_pc)):
                    leak = f"blocked in one wait for {(now_ns - rec.since_ns) / 1e9:.1f} s"
            if leak:
                self._flagged_waits[key] = rec.since_ns
                self.leaks_flagged += 1
                out.append(Due(rec, leak))
                continue
            last = self.checkpointed.get(key)
            if checkpoint_ns and now_ns - (last.until_ns if last else rec.create_ns) >= checkpoint_ns:
                out.append(Due(rec))
        return out

    def record_checkpoint(self, rec: GoroutineRecord, now_ns: int) -> Checkpointed | None:
        """Note a checkpoint span for rec up to now_ns; returns what came before it."""
        key = (rec.pid, rec.goid)
        before = self.checkpointed.get(key)
        self.checkpointed[key] = Checkpointed(before.count + 1 if before else 1, now_ns, rec.state_ns,
                                              (rec.alloc_bytes, rec.alloc_count, rec.alloc_samples))
        return before

    def goroutines(self) -> set[int]:
        """Goroutines with checkpoints or a flagged leak: their final span needs what is noted here."""
        return {goid for _, goid in self.checkpointed} | {goid for _, goid in self._flagged_waits}

    def finish(self, rec: GoroutineRecord) -> tuple[Checkpointed | None, bool, bool]:
        """At the goroutine's end: its checkpoints so far, whether it was flagged as a leak, and whether
        the Go runtime itself marked it leaked."""
        key = (rec.pid, rec.goid)
        marked = key in self._marked_by_runtime
        self._marked_by_runtime.discard(key)
        return self.checkpointed.pop(key, None), self._flagged_waits.pop(key, None) is not None, marked
