"""The tracing session: binary analysis -> probes -> kernel events -> records -> spans -> export."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass

from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from . import __version__, goruntime
from .binary.gobinary import GoBinary
from .binary.symbolize import Symbolizer
from .errors import AgentError
from .exporters import ConsoleSink, FileSink, OtlpSink, SpanSink
from .pipeline import ExportPipeline
from .probes import GoroutineProbes, ProbeSettings
from .records import EndReason
from .spans import SpanBuilder
from .target import FORWARDED_SIGNALS, LaunchedTarget, Target
from .tracker import GoroutineTracker, Summary

log = logging.getLogger("otel_goroutines")


@dataclass
class ExportSettings:
    exporter: str            # "otlp", "file" or "console"
    output: str | None       # file/console destination
    endpoint: str | None
    protocol: str
    flush_timeout_s: float = 10.0


@dataclass
class AgentOptions:
    export: ExportSettings
    probes: ProbeSettings
    quiet: bool = False
    poll_interval_ms: int = 100


def monotonic_to_wall_offset() -> int:
    """Wall clock minus the kernel's monotonic clock (bpf_ktime_get_ns), read once, tightly bracketed."""
    best = None
    for _ in range(5):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        wall = time.time_ns()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    return best[1]


def build_resource(binary: GoBinary, target: Target) -> Resource:
    exe = os.path.realpath(target.exe_path) if not isinstance(target, LaunchedTarget) else target.exe_path
    base = Resource({
        "service.name": os.path.basename(exe),
        "process.pid": target.pid,
        "process.executable.path": exe,
        "process.runtime.name": "go",
        "process.runtime.version": binary.go_version,
        "host.name": socket.gethostname(),
        "telemetry.sdk.name": "otel-goroutines",
        "telemetry.sdk.version": __version__,
    })
    # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME override the defaults above.
    return base.merge(OTELResourceDetector().detect())


def make_sink(settings: ExportSettings, resource: Resource) -> SpanSink:
    if settings.exporter == "otlp":
        return OtlpSink(settings.protocol, settings.endpoint, resource)
    if settings.exporter == "file":
        return FileSink(settings.output, resource)
    if settings.exporter == "console":
        stream = open(settings.output, "w") if settings.output else sys.stdout
        return ConsoleSink(stream)
    raise AgentError(f"unknown exporter {settings.exporter!r}")


class StatusLine:
    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self._last >= 1.0

    def update(self, text: str) -> None:
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()
        self._last = time.monotonic()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


class Session:
    def __init__(self, target: Target, options: AgentOptions):
        self.target = target
        self.options = options
        self.binary = GoBinary(target.exe_path)
        self.support = goruntime.support_for(self.binary)
        self.tracker = GoroutineTracker()
        self.summary = Summary()
        self.probes = GoroutineProbes(self.support, target.exe_path, target.pid, options.probes)
        self._builder: SpanBuilder | None = None
        self._stop_reason: EndReason | None = None
        self.spans_built = 0

    # --- signals ---------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        if isinstance(self.target, LaunchedTarget):
            self.target.signal(signum)  # the program decides; the agent follows its exit
        else:
            self._stop_reason = EndReason.AGENT_STOPPED

    def _on_process_exit(self, _pid: int) -> None:
        self._stop_reason = EndReason.PROCESS_EXITED

    # --- spans -------------------------------------------------------------------------
    def _span_builder(self) -> SpanBuilder:
        if self._builder is None:
            symbolizer = Symbolizer(self.binary.functions, self.binary.code, self._load_bias())
            self._builder = SpanBuilder(
                trace_id=int.from_bytes(secrets.token_bytes(16), "big") or 1,
                salt=int.from_bytes(secrets.token_bytes(8), "big"),
                clock_offset_ns=self.clock_offset_ns,
                function_name=symbolizer.function,
                creation_site=symbolizer.creation_site,
                wait_reason=self.support.wait_reason,
                states_traced=self.options.probes.states,
            )
        return self._builder

    def _load_bias(self) -> int:
        if not self.binary.is_pie:
            return 0
        ip = self.probes.probe_ip()
        if ip is None:
            return 0
        # The first creation-probe hit was at one of the known sites; a load bias is page-aligned.
        for point in self.support.lifecycle_probes:
            if point.handler == "on_goroutine_created" and (ip - point.address) % 4096 == 0:
                return ip - point.address
        log.warning("could not derive the PIE load bias; function names may be wrong")
        return 0

    def _export_ready(self, pipeline: ExportPipeline) -> None:
        records = self.tracker.take()
        if not records:
            return
        builder = self._span_builder()
        spans = [builder.build(rec) for rec in records]
        for rec, span in zip(records, spans):
            self.summary.add(span.name, rec.lifetime_ns, rec.end_reason is not EndReason.EXITED)
        self.spans_built += len(spans)
        pipeline.submit(spans)

    # --- the run -----------------------------------------------------------------------
    def run(self) -> int:
        opts = self.options
        resource = build_resource(self.binary, self.target)
        pipeline = ExportPipeline(make_sink(opts.export, resource))
        status = StatusLine(not opts.quiet)
        self.clock_offset_ns = monotonic_to_wall_offset()
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in FORWARDED_SIGNALS}
        try:
            self.probes.attach(self.tracker.on_change, self.tracker.on_end, self._on_process_exit)
            log.info("attached %d probes to PID %d (%s, offsets from %s)", len(self.probes.probe_points),
                     self.target.pid, self.binary.go_version, self.support.offsets_source)
            self.target.start()
            while self._stop_reason is None:
                self.probes.poll(opts.poll_interval_ms)
                self._export_ready(pipeline)
                if self.target.has_exited():
                    self._stop_reason = EndReason.PROCESS_EXITED
                if status.due():
                    created = self.probes.counters()["goroutines_created"]
                    status.update(f"goroutines live {created - self.tracker.ended}  ended {self.tracker.ended}  "
                                  f"exported {pipeline.stats.exported}  dropped {pipeline.stats.dropped}")
            self.probes.drain()
            end_ns = self.probes.exit_time() or time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            for record in self.probes.remaining(end_ns, self._stop_reason):
                self.tracker.on_end(record)
            self._export_ready(pipeline)
            losses = self.probes.counters()
            losses.pop("goroutines_created")
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            self.probes.close()
        status.clear()
        stats = pipeline.close(opts.export.flush_timeout_s)
        losses = {"spans_not_exported": stats.dropped, **losses}
        # Exits of goroutines that predate the attach are expected, not a loss.
        untraced_exits = losses.pop("exits_of_untraced_goroutines")
        print(self.summary.render(losses), file=sys.stderr)
        if untraced_exits:
            print(f"({untraced_exits} goroutines that existed before the attach exited; they have no spans)", file=sys.stderr)
        if any(losses.values()):
            log.warning("losses: %s", ", ".join(f"{k}={v}" for k, v in losses.items() if v))
        if opts.export.exporter == "file":
            print(f"{stats.exported} spans written to {opts.export.output}", file=sys.stderr)
        elif opts.export.exporter == "otlp":
            print(f"{stats.exported} spans exported over OTLP ({opts.export.protocol})", file=sys.stderr)
        return self.target.exit_status()
