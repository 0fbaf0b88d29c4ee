"""Goroutine metrics beside the spans, from aggregates the kernel keeps.

The kernel already counts (created/exited per start function, the runnable-to-running
histogram), so metrics are built directly as the SDK's MetricsData and handed to its OTLP
metric exporter; no per-event SDK instrument calls on the hot path. All are cumulative.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from typing import Callable

import numpy as np

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import (  # noqa: F401  (MetricsData is re-exported for the agent)
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric,
                                              MetricExportResult, MetricsData, NumberDataPoint, ResourceMetrics,
                                              ScopeMetrics, Sum)
from opentelemetry.sdk.resources import Resource

from .deadline import Deadline, bound_sdk_exporter
from .exporters import SCOPE, JsonLinesFile

log = logging.getLogger(__name__)

CUMULATIVE = AggregationTemporality.CUMULATIVE
MAX_FUNCTIONS = 50  # per-function series; the rest are summed under "other"
LIFETIME_BOUNDS_S = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0)
_LIFETIME_BOUNDS_NS = np.array([round(b * 1e9) for b in LIFETIME_BOUNDS_S], np.int64)


class GoroutineMetrics:
    def __init__(self, resource: Resource, function_name: Callable[[int], str], start_ns: int):
        self._resource = resource
        self._function_name = function_name
        self._start_ns = start_ns
        self._lifetimes: dict[str, list[int]] = defaultdict(lambda: [0] * (len(LIFETIME_BOUNDS_S) + 1))
        self._lifetime_sums: dict[str, float] = defaultdict(float)  # min/max are not tracked: None leaves them unset
        self.existing_at_attach = 0

    def observe_ends(self, names: list[str], index: np.ndarray, lifetimes_ns: np.ndarray) -> None:
        """Lifetimes of a batch of ended goroutines: names[index[i]] is row i's start function."""
        buckets = np.searchsorted(_LIFETIME_BOUNDS_NS, lifetimes_ns, "left")
        width = len(LIFETIME_BOUNDS_S) + 1
        counts = np.bincount(index * width + buckets, minlength=len(names) * width).reshape(len(names), width)
        sums = np.bincount(index, weights=lifetimes_ns / 1e9, minlength=len(names))
        for name, row, total in zip(names, counts.tolist(), sums.tolist()):
            if name not in self._lifetimes and len(self._lifetimes) >= MAX_FUNCTIONS:
                name = "other"
            self._lifetimes[name] = [a + b for a, b in zip(self._lifetimes[name], row)]
            self._lifetime_sums[name] += total

    def collect(self, now_ns: int, start_counts: dict[int, tuple[int, int]], sched_histogram: list[int],
                leaks: int, spans: dict[str, int], budget=None) -> MetricsData:
        created, exited = defaultdict(int), defaultdict(int)
        for pc, (c, e) in start_counts.items():
            name = self._function_name(pc)
            created[name] += c
            exited[name] += e
        top = set(sorted(created, key=created.get, reverse=True)[:MAX_FUNCTIONS])
        def by_function(counts):
            folded = defaultdict(int)
            for name, n in counts.items():
                folded[name if name in top else "other"] += n
            return folded
        live = self.existing_at_attach + sum(created.values()) - sum(exited.values())

        def point(value, attrs=None):
            return NumberDataPoint(attrs or {}, self._start_ns, now_ns, value)

        def counter(name, unit, description, points, monotonic=True):
            return Metric(name, description, unit, Sum(points, CUMULATIVE, monotonic))

        metrics = [
            counter("go.goroutine.count", "{goroutine}", "Live goroutines.", [point(live)], monotonic=False),
            counter("go.goroutine.created", "{goroutine}", "Goroutines created since tracing began, by start function.",
                    [point(n, {"code.function.name": f}) for f, n in by_function(created).items()]),
            counter("go.goroutine.exited", "{goroutine}", "Goroutines that exited since tracing began, by start function.",
                    [point(n, {"code.function.name": f}) for f, n in by_function(exited).items()]),
            counter("go.goroutine.leaks", "{goroutine}", "Goroutines flagged as suspected leaks.", [point(leaks)]),
            counter("otel_goroutines.spans", "{span}", "Goroutine spans by outcome.",
                    [point(n, {"outcome": k}) for k, n in spans.items()]),
            Metric("go.goroutine.lifetime", "Goroutine lifetimes, by start function.", "s", Histogram([
                HistogramDataPoint({"code.function.name": f}, self._start_ns, now_ns, sum(buckets),
                                   self._lifetime_sums[f], buckets, LIFETIME_BOUNDS_S, None, None)
                for f, buckets in self._lifetimes.items()], CUMULATIVE)),
        ]
        if sched_histogram and sum(sched_histogram[:-1]):
            buckets, total_ns = sched_histogram[:-1], sched_histogram[-1]
            bounds = [2 ** (i + 1) / 1e9 for i in range(len(buckets) - 1)]  # bucket i holds [2^i, 2^(i+1)) ns
            metrics.append(Metric("go.schedule.duration", "Time goroutines spent runnable before running.", "s", Histogram([
                HistogramDataPoint({}, self._start_ns, now_ns, sum(buckets), total_ns / 1e9, buckets, bounds, None, None)],
                CUMULATIVE)))
        if budget is not None:
            metrics += self._budget(budget, point, counter)
        return MetricsData([ResourceMetrics(self._resource, [ScopeMetrics(SCOPE, metrics, "")], "")])

    @staticmethod
    def _budget(report, point, counter) -> list[Metric]:
        """What the overhead budget (shedding.BudgetReport) estimated and shed."""
        gauge = lambda name, unit, description, value: Metric(name, description, unit, Gauge([point(value)]))
        return [
            gauge("otel_goroutines.overhead", "1", "The probes' estimated CPU cost, a fraction of the target's own CPU time "
                  "(last evaluation).", report.overhead),
            gauge("otel_goroutines.overhead.budget", "1", "--max-overhead, as a fraction.", report.percent / 100),
            counter("otel_goroutines.shed.duration", "s", "Time detail was shed to keep the overhead budget, by what.",
                    [point(report.states_off_s, {"detail": "state_events"}), point(report.lifecycle_off_s, {"detail": "lifecycle"})]),
            counter("otel_goroutines.goroutines.untraced", "{goroutine}", "Goroutines created while their probes were off "
                    "(the runtime's count less those traced).", [point(report.untraced)]),
            gauge("otel_goroutines.sampling.ratio", "1", "Goroutines traced / created by the runtime's count: divide counts "
                  "from spans by it.", report.sampling_ratio),
        ]


def metrics_json(data: MetricsData) -> str:
    message = MessageToDict(encode_metrics(data), use_integers_for_enums=True)
    return json.dumps(message, separators=(",", ":"))


class _MetricsRefused(logging.Filter):
    """Catches the SDK exporters' error for an endpoint that takes no metrics (Jaeger's OTLP receiver:
    gRPC UNIMPLEMENTED, HTTP 404), which they would log at every export, and keeps it for one warning."""

    LOGGERS = ("opentelemetry.exporter.otlp.proto.grpc.exporter", "opentelemetry.exporter.otlp.proto.http.metric_exporter")

    def __init__(self):
        super().__init__()
        self.reason: str | None = None
        self.thread: int | None = None  # the exporting thread: each target of `watch` has its own
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.thread == self.thread and record.msg.startswith("Failed to export") and args and args[0] == "metrics":
            code = args[2] if record.msg.startswith("Failed to export %s to %s") else args[1]  # gRPC; HTTP
            if getattr(code, "name", code) in ("UNIMPLEMENTED", 404):
                self.reason = f"gRPC {code.name}" if hasattr(code, "name") else f"HTTP {code}"
                return False
        return True

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


class MetricsSender:
    """Exports the latest MetricsData from a thread, so a slow collector never blocks tracing.
    Metrics are cumulative: when a send is still running, the next snapshot replaces the pending one.
    An OTLP endpoint that takes no metrics (a tracing backend) is said once and sent no more."""

    def __init__(self, exporter: str, protocol: str, endpoint: str | None, output: str | None,
                 deadline: Deadline | None = None):
        self._write = None
        self._refused: _MetricsRefused | None = None
        deadline = deadline or Deadline()
        if exporter == "otlp":
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
                if endpoint:  # --endpoint: a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is
                    endpoint = endpoint.rstrip("/") + "/v1/metrics"
            otlp = OTLPMetricExporter(endpoint=endpoint, timeout=5)
            self._refused = _MetricsRefused()
            self._write = lambda data: bound_sdk_exporter(otlp, deadline, 5) and otlp.export(data) is MetricExportResult.SUCCESS
            self._shutdown = lambda: (otlp.shutdown(), self._refused.remove())
        elif exporter == "file" and output:
            lines = JsonLinesFile(output + ".metrics.jsonl")
            self._write = lambda data: lines.append(metrics_json(data).encode() + b"\n")
            self._shutdown = lines.close
        self.enabled = self._write is not None
        self.failures = 0
        self.not_sent = 0  # snapshots not sent to an endpoint that refused metrics
        self._pending: MetricsData | None = None
        self._cond = threading.Condition()
        self._closing = False
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="metrics-export", daemon=True)
            self._thread.start()
            if self._refused is not None:
                self._refused.thread = self._thread.ident

    def send(self, data: MetricsData) -> None:
        with self._cond:
            self._pending = data
            self._cond.notify()

    def close(self, final: MetricsData | None, timeout_s: float) -> None:
        if not self.enabled:
            return
        with self._cond:
            if final is not None:
                self._pending = final
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        self._shutdown()

    def _refusal(self) -> str | None:
        return None if self._refused is None else self._refused.reason

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                data, self._pending = self._pending, None
                if data is None:
                    return
            if self._refusal() is not None:
                self.not_sent += 1
                continue
            try:
                ok = self._write(data)
            except Exception as exc:
                log.debug("metrics export raised %s", exc)
                ok = False
            if not ok and self._refusal() is not None:
                self.not_sent += 1
                log.warning("the OTLP endpoint takes no metrics (%s): metrics are not sent any more (the spans are); "
                            "turn them off with --metrics-interval 0, or send them elsewhere with "
                            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", self._refusal())
            elif not ok:
                self.failures += 1
                if self.failures == 1:
                    log.warning("metrics export failed (collector down or refusing?); will send the next snapshot")
