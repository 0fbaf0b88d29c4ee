"""A spans-per-second budget that drops the boring first and always keeps the interesting."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .spans import GoroutineSpan


@dataclass
class SpanBudget:
    spans_per_second: float = 0.0  # 0: no budget
    keep_longer_than_s: float = 1.0
    keep_waiting_longer_than_s: float = 1.0
    sampled_out: int = 0

    def __post_init__(self):
        self._tokens = self.spans_per_second
        self._last = time.monotonic()

    def interesting(self, span: GoroutineSpan) -> bool:
        a = span.attributes
        return (span.error is not None or "go.goroutine.alive_at_end" in a or "go.goroutine.leak_suspected" in a
                or "go.goroutine.checkpoint" in a or "go.goroutine.checkpoints" in a
                or span.end_ns - span.start_ns >= self.keep_longer_than_s * 1e9
                or a.get("go.goroutine.waiting_ns", 0) >= self.keep_waiting_longer_than_s * 1e9)

    def select(self, spans: list[GoroutineSpan]) -> list[GoroutineSpan]:
        """The spans to export; the others are counted in sampled_out."""
        if not self.spans_per_second:
            return spans
        keep = self.select_mask(np.fromiter((self.interesting(s) for s in spans), bool, len(spans)))
        return [span for span, kept in zip(spans, keep) if kept]

    def select_mask(self, interesting: np.ndarray) -> np.ndarray:
        """Which of a batch of spans to export, given which are interesting; the others are counted
        in sampled_out. Interesting spans always go; the others while tokens last, in order."""
        if not self.spans_per_second:
            return np.ones(len(interesting), bool)
        now = time.monotonic()
        self._tokens = min(self.spans_per_second, self._tokens + (now - self._last) * self.spans_per_second)
        self._last = now
        # Each span kept takes a token; a boring one is kept while a token is left after those before it.
        keep = interesting.copy()
        boring = np.flatnonzero(~interesting)
        taken_before = np.arange(len(boring)) + np.cumsum(interesting)[boring] - interesting[boring]
        keep[boring] = self._tokens - taken_before >= 1
        self._tokens -= int(keep.sum())
        self.sampled_out += int(len(keep) - keep.sum())
        self._tokens = max(self._tokens, -self.spans_per_second)  # interesting bursts borrow at most a second
        return keep
