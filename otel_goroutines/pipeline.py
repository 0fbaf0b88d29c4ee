"""A bounded, counted buffer between the span builder and a sink, drained by one thread.

Unlike the SDK's BatchSpanProcessor it never drops silently: while the sink fails (collector
down) batches are retried with backoff, and when the buffer is full the oldest spans are
dropped and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from .exporters import SpanSink

log = logging.getLogger(__name__)


@dataclass
class ExportStats:
    exported: int = 0
    dropped: int = 0          # spans given up on: buffer overflow, or still unsent at shutdown
    failed_attempts: int = 0  # export calls that failed (each retried)


class ExportPipeline:
    def __init__(self, sink: SpanSink, max_buffered: int = 200_000, batch_size: int = 8192,
                 max_backoff_s: float = 5.0):
        self.sink = sink
        self._max_buffered = max_buffered
        self._batch_size = batch_size
        self._max_backoff_s = max_backoff_s
        self._buffer: deque = deque()  # GoroutineSpans or their encoded bytes
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")
        self._failing = False
        self._in_flight = 0       # spans in the export call under way
        self._abandoned = False   # close() gave up waiting: what is in flight is counted as dropped
        self.stats = ExportStats()
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def submit(self, items: list) -> None:
        """Spans in the form the sink takes: GoroutineSpans, or for a sink with an `encoder` their
        encoded bytes (a tenth of the memory of the span objects while a burst waits for the collector)."""
        if not items:
            return
        with self._cond:
            self._buffer.extend(items)
            self._drop_overflow()
            self._cond.notify()

    def _drop_overflow(self) -> None:
        """Hold at most max_buffered spans, the batch in an export call included: the newest; the
        oldest waiting are dropped and counted (under the lock)."""
        overflow = min(len(self._buffer) + self._in_flight - self._max_buffered, len(self._buffer))
        if overflow > 0:
            for _ in range(overflow):
                self._buffer.popleft()
            self.stats.dropped += overflow

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def close(self, timeout_s: float) -> ExportStats:
        """Flush what is buffered within timeout_s; what is still unsent then is counted as dropped."""
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + timeout_s
            self._cond.notify()
        self._thread.join(timeout_s + 1.0)
        with self._cond:
            # A call still hanging on the collector is not known to have delivered anything.
            self._abandoned = True
            self.stats.dropped += len(self._buffer) + self._in_flight
            self._buffer.clear()
        self.sink.shutdown()
        return self.stats

    def _run(self) -> None:
        backoff = 0.25
        while True:
            with self._cond:
                while not self._buffer and not self._closing:
                    self._cond.wait()
                if not self._buffer or time.monotonic() > self._deadline:
                    return
                batch = [self._buffer.popleft() for _ in range(min(self._batch_size, len(self._buffer)))]
                self._in_flight = len(batch)
            try:
                ok = self.sink.export(batch)
            except Exception as exc:  # a sink must not kill the agent; the batch is retried
                log.warning("span export raised %s", exc)
                ok = False
            with self._cond:
                self._in_flight = 0
                if self._abandoned:
                    return
                if ok:
                    self.stats.exported += len(batch)
            if ok:
                if self._failing:
                    log.warning("span export recovered")
                self._failing = False
                backoff = 0.25
                continue
            self.stats.failed_attempts += 1
            if not self._failing:
                log.warning("span export failed (%s); retrying, buffering up to %d spans", self.sink.failure_hint, self._max_buffered)
            self._failing = True
            with self._cond:
                self._buffer.extendleft(reversed(batch))
                if self._closing and time.monotonic() + backoff > self._deadline:
                    return
                self._cond.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
