"""The tracing session: binary analysis -> probes -> kernel events -> records -> spans -> export."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from . import __version__, allocs, goruntime, gosdk, target_memory
from .binary.gobinary import GoBinary
from .binary.symbolize import Symbolizer
from .deadline import Deadline
from .errors import AgentError
from .exporters import ConsoleSink, FileSink, OtlpSink, SpanSink, open_output
from .longlived import LongLived, LongLivedSettings
from .metrics import GoroutineMetrics, MetricsData, MetricsSender
from .pipeline import ExportPipeline
from .probes import GoroutineProbes, ProbeSettings
from .records import EndReason, GoroutineRecord, StateChange, TraceReason
from .sampling import SpanBudget
from .spans import SpanBuilder, SpanEvent, app_unsampled
from .target import FORWARDED_SIGNALS, AttachedTarget, LaunchedTarget, Target
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
    long_lived: LongLivedSettings = field(default_factory=LongLivedSettings)
    spans_per_second: float = 0.0    # 0: no budget
    metrics_interval_s: float = 10.0  # 0: no metrics
    quiet: bool = False
    poll_interval_ms: int = 100
    app_unsampled: str = "follow"     # goroutine spans in an application trace it did not sample: "follow" (drop) or "ignore"


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


def make_sink(settings: ExportSettings, resource: Resource, deadline: Deadline | None = None) -> SpanSink:
    if settings.exporter == "otlp":
        return OtlpSink(settings.protocol, settings.endpoint, resource, deadline=deadline)
    if settings.exporter == "file":
        return FileSink(settings.output, resource)
    if settings.exporter == "console":
        stream = open_output(settings.output) if settings.output else sys.stdout
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
        if options.probes.allocs is not allocs.AllocMode.OFF and self.support.allocs is None:
            log.warning("no heap-allocation probe points in %s: --allocs %s is off", target.exe_path, options.probes.allocs.value)
            options.probes = dataclasses.replace(options.probes, allocs=allocs.AllocMode.OFF)
        self.tracker = GoroutineTracker()
        self.summary = Summary()
        self.sdk = gosdk.sdk_status(self.binary)  # the application's OpenTelemetry SDK, if any
        self.probes = GoroutineProbes(self.support, target.exe_path, target.pid, options.probes, self.sdk.support)
        self.app_unsampled = 0  # goroutine spans not exported: in an application trace it did not sample
        self.long_lived = LongLived(options.long_lived)
        self.budget = SpanBudget(options.spans_per_second)
        self.salt = int.from_bytes(secrets.token_bytes(8), "big")
        self._symbolizer: Symbolizer | None = None
        self._builder: SpanBuilder | None = None
        self._stop_reason: EndReason | None = None
        self._scan_now = False
        self._imported: set[int] = set()  # goroutines that existed at attach
        self.alloc_totals = allocs.AllocTotals()  # what the exported goroutine spans hold, summed
        self.profile_rate: allocs.ProfileRate | None = None

    # --- signals and kernel notifications ----------------------------------------------
    def _on_signal(self, signum, _frame):
        if isinstance(self.target, LaunchedTarget):
            self.target.signal(signum)  # the program decides; the agent follows its exit
        else:
            self._stop_reason = EndReason.AGENT_STOPPED

    def _on_process_exit(self, _pid: int) -> None:
        self._stop_reason = EndReason.PROCESS_EXITED

    def _on_change(self, pid: int, goid: int, change: StateChange) -> None:
        self.tracker.on_change(pid, goid, change)
        if change.to_state == goruntime.G_LEAKED:
            self._scan_now = True  # the runtime found a leak: export it now

    # --- symbols and spans ---------------------------------------------------------------
    def symbolizer(self) -> Symbolizer:
        if self._symbolizer is None:
            self._symbolizer = Symbolizer(self.binary.functions, self.binary.code, self._load_bias())
        return self._symbolizer

    def _load_bias(self) -> int:
        if not self.binary.is_pie:
            return 0
        ip = self.probes.probe_ip()
        # The first creation-probe hit was at one of the known sites; a load bias is page-aligned.
        for point in self.support.lifecycle_probes:
            if ip is not None and point.handler == "on_goroutine_created" and (ip - point.address) % 4096 == 0:
                return ip - point.address
        try:
            return target_memory.load_bias(self.target.pid, self.binary)
        except OSError:
            log.warning("could not find where the PIE binary is loaded; function names may be wrong")
            return 0

    def _span_builder(self) -> SpanBuilder:
        if self._builder is None:
            symbolizer = self.symbolizer()
            self._builder = SpanBuilder(
                salt=self.salt,
                clock_offset_ns=self.clock_offset_ns,
                function_name=symbolizer.function,
                creation_site=symbolizer.creation_site,
                wait_reason=self.support.wait_reason,
                states_traced=self.options.probes.states,
                allocs=self.options.probes.allocs,
            )
        return self._builder

    def _export_ended(self, pipeline: ExportPipeline) -> None:
        records = self.tracker.take()
        if not records:
            return
        builder = self._span_builder()
        spans = []
        for rec in map(self._adopt, records):
            before, leak_flagged = self.long_lived.finish(rec)
            span = builder.build(rec, before)
            if leak_flagged:
                span.attributes["go.goroutine.leak_suspected"] = True
            if not self._unsampled_by_app(rec):
                spans.append(span)
            alive = rec.end_reason is not EndReason.EXITED
            self.summary.add(span.name, rec.lifetime_ns, alive)
            t = self.alloc_totals
            self.alloc_totals = allocs.AllocTotals(t.bytes + rec.alloc_bytes, t.count + rec.alloc_count, t.samples + rec.alloc_samples)
            if self.metrics is not None:
                self.metrics.observe_end(span.name, rec.lifetime_ns)
        pipeline.submit(self.budget.select(spans))

    def _export_long_lived(self, pipeline: ExportPipeline, now_ns: int) -> None:
        builder = self._span_builder()
        is_runtime = lambda pc: self.symbolizer().function(pc).startswith("runtime.")
        spans = []
        for due in self.long_lived.due(self.probes.snapshot(now_ns), now_ns, is_runtime):
            rec = self._adopt(due.record)
            rec.changes = self.tracker.take_changes(rec.pid, rec.goid)
            before = self.long_lived.record_checkpoint(rec, now_ns)
            span = builder.checkpoint(rec, before, now_ns)
            if due.leak:
                span.attributes["go.goroutine.leak_suspected"] = True
                span.events.append(SpanEvent("leak_suspected", now_ns + self.clock_offset_ns,
                                             {"go.goroutine.wait_reason": self.support.wait_reason(rec.wait_reason),
                                              "go.goroutine.blocked_ns": now_ns - rec.since_ns,
                                              "go.goroutine.leak.reason": due.leak}))
                if rec.status == goruntime.G_LEAKED:
                    span.error = "goroutine leaked (detected by the Go runtime)"
            if not self._unsampled_by_app(rec):
                spans.append(span)
        pipeline.submit(self.budget.select(spans))

    def _unsampled_by_app(self, rec) -> bool:
        """The goroutine is in an application trace the application did not sample, and its spans follow
        that decision (--app-unsampled follow): counted, not exported."""
        if self.options.app_unsampled == "follow" and app_unsampled(rec):
            self.app_unsampled += 1
            return True
        return False

    def _app_summary(self, counters: dict[str, int]) -> str | None:
        """What the application's spans and pprof labels gave, for the summary at the end."""
        lines = []
        if self.probes.sdk is not None:
            lines.append(f"application spans ({gosdk.SDK_MODULE} {self.sdk.version}): {counters['app_spans_started']} followed, "
                         f"{counters['goroutines_under_app_spans']} goroutines started under them")
            if self.app_unsampled:
                lines.append(f"({self.app_unsampled} goroutine spans not exported: their application trace was not sampled)")
            lost = {k: v for k, v in counters.items() if v and k in ("app_spans_forgotten_too_deep", "app_spans_not_followed_map_full",
                                                                       "app_spans_of_unknown_type")}
            if lost:
                lines.append("application spans degraded: " + ", ".join(f"{k}={v}" for k, v in lost.items()))
        if counters["goroutines_with_labels"] or counters["labels_lost_ringbuf"]:
            lines.append(f"goroutines with pprof labels: {counters['goroutines_with_labels']}"
                         + (f" (labels_lost_ringbuf={counters['labels_lost_ringbuf']})" if counters["labels_lost_ringbuf"] else ""))
        return "\n".join(lines) or None

    def _adopt(self, rec: GoroutineRecord) -> GoroutineRecord:
        """A goroutine created by an imported one while the import ran (after the probes were in
        place) was recorded as the child of an untraced parent: make it what it would have been,
        the child of a goroutine that existed at attach, a spawner (own trace, linked)."""
        if rec.trace_reason is TraceReason.UNTRACED_PARENT and rec.parent_goid in self._imported \
                and not rec.existed_at_attach:
            rec.trace_reason, rec.parent_traced, rec.parent_root_goid = TraceReason.SPAWNER, True, rec.parent_goid
        return rec

    def _import_existing(self, now_ns: int) -> None:
        """Goroutines alive at attach time get spans too, starting now."""
        if self.support.allgs_address is None:
            log.warning("no symbol table: goroutines that existed before the attach get no spans")
            return
        try:
            bias = self._load_bias()
            found = target_memory.live_goroutines(self.target.pid, self.support, bias)
            imported = self.probes.import_existing(found, now_ns)
            alive = target_memory.still_alive(self.target.pid, self.support, found)
        except OSError as exc:
            log.warning("could not read the goroutine list of PID %d (%s); goroutines that existed before the attach get no spans",
                        self.target.pid, exc)
            return
        self.probes.forget([g.goid for g in found if g.goid not in alive])
        self._imported = alive
        self.existing_at_attach = imported
        log.info("%d goroutines existed at attach", imported)

    def _enable_heap_sampling(self) -> None:
        """--allocs sampled rides on the runtime's heap-profile samples: turn them on if the linker
        turned them off (called once the runtime has initialised)."""
        support = self.support.allocs
        if self.options.probes.allocs is not allocs.AllocMode.SAMPLED or self.profile_rate is not None:
            return
        if support.mem_profile_rate is None:
            log.warning("runtime.MemProfileRate not found (%s): heap sampling cannot be checked or turned on; "
                        "estimates assume the default rate", support.addresses_from)
            return
        bias = self._load_bias()
        try:
            disabled = support.profiling_disabled
            self.profile_rate = allocs.enable_heap_sampling(self.target.pid, support.mem_profile_rate + bias,
                                                            None if disabled is None else disabled + bias)
        except OSError as exc:
            log.warning("could not read or set runtime.MemProfileRate in PID %d (%s): heap sampling may be off",
                        self.target.pid, exc)
            return
        (log.warning if self.profile_rate.rate == 0 else log.info)("--allocs sampled: %s", self.profile_rate.note)

    def _metrics_snapshot(self, now_ns: int, stats) -> MetricsData:
        counters = self.probes.counters()
        self.metrics.existing_at_attach = self.existing_at_attach
        return self.metrics.collect(
            now_ns + self.clock_offset_ns,
            self.probes.start_function_counts(),
            self.probes.schedule_latency_histogram(),
            self.long_lived.leaks_flagged,
            {"exported": stats.exported, "sampled_out": self.budget.sampled_out, "dropped": stats.dropped,
             "untracked_map_full": counters["goroutines_untracked_map_full"], "app_unsampled": self.app_unsampled})

    # --- the run -----------------------------------------------------------------------
    def run(self) -> int:
        """Trace to the end (the target's exit; SIGINT/SIGTERM for an attached one); its exit status."""
        for _ in self.steps():
            pass
        return self.target.exit_status()

    def stop(self) -> None:
        """End the session at its next step: goroutines still alive end as agent_stopped."""
        self._stop_reason = self._stop_reason or EndReason.AGENT_STOPPED

    def steps(self, handle_signals: bool = True):
        """The whole session as a generator, so one process can run several (`watch`): it yields
        once the probes are attached and the target runs, then after each poll of the kernel, and
        returns after the final flush and summary. Closing it early still detaches the probes."""
        opts = self.options
        resource = build_resource(self.binary, self.target)
        deadline = Deadline()  # one flush deadline at the end, for spans and metrics alike
        pipeline = ExportPipeline(make_sink(opts.export, resource, deadline))
        sender = MetricsSender(opts.export.exporter, opts.export.protocol, opts.export.endpoint, opts.export.output,
                               deadline) if opts.metrics_interval_s else None
        status = StatusLine(not opts.quiet)
        self.clock_offset_ns = monotonic_to_wall_offset()
        self.existing_at_attach = 0
        start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self.metrics = GoroutineMetrics(resource, lambda pc: self.symbolizer().function(pc), start_ns + self.clock_offset_ns) \
            if sender and sender.enabled else None
        scan_every_ns = int(opts.long_lived.scan_interval_s * 1e9)
        metrics_every_ns = int(opts.metrics_interval_s * 1e9)
        next_scan = start_ns + scan_every_ns
        next_metrics = start_ns + metrics_every_ns
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in FORWARDED_SIGNALS} if handle_signals else {}
        try:
            self.probes.attach(self._on_change, self.tracker.on_end, self._on_process_exit, self._enable_heap_sampling)
            log.info("attached %d probes to PID %d (%s, offsets from %s)", len(self.probes.probe_points),
                     self.target.pid, self.binary.go_version, self.support.offsets_source)
            log.info("application spans: %s", self.sdk.reason if opts.probes.app_traces else "not followed (--app-traces off)")
            if isinstance(self.target, AttachedTarget):
                self._import_existing(self.probes.attached_ns)
                self._enable_heap_sampling()  # the runtime has long initialised
            self.target.start()
            yield
            while self._stop_reason is None:
                self.probes.poll(opts.poll_interval_ms)
                self._export_ended(pipeline)
                now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                if self._scan_now or (scan_every_ns and now >= next_scan):
                    self._export_long_lived(pipeline, now)
                    self._scan_now, next_scan = False, now + scan_every_ns
                if self.metrics is not None and now >= next_metrics:
                    sender.send(self._metrics_snapshot(now, pipeline.stats))
                    next_metrics = now + metrics_every_ns
                if self.target.has_exited():
                    self._stop_reason = EndReason.PROCESS_EXITED
                if status.due():
                    live = self.existing_at_attach + self.probes.counters()["goroutines_created"] - self.tracker.ended
                    status.update(f"goroutines live {live}  ended {self.tracker.ended}  "
                                  f"exported {pipeline.stats.exported}  dropped {pipeline.stats.dropped + self.budget.sampled_out}")
                yield
            self.probes.drain()
            end_ns = self.probes.exit_time() or time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            for record in self.probes.remaining(end_ns, self._stop_reason):
                self.tracker.on_end(record)
            self._export_ended(pipeline)
            final_metrics = self._metrics_snapshot(end_ns, pipeline.stats) if self.metrics is not None else None
            losses = self.probes.counters()
            losses.pop("goroutines_created")
            elsewhere = self.probes.allocs_elsewhere()
            app_counters = self.probes.app_counters()
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            self.probes.close()
        status.clear()
        deadline.start(opts.export.flush_timeout_s)
        if sender is not None:
            sender.send(final_metrics)  # goes out while the spans flush, not after them
        stats = pipeline.close(deadline.remaining())
        if sender is not None:
            sender.close(None, deadline.remaining())
        losses = {"spans_not_exported": stats.dropped, "spans_sampled_out": self.budget.sampled_out, **losses}
        # Exits of goroutines that predate the attach are expected, not a loss.
        untraced_exits = losses.pop("exits_of_untraced_goroutines")
        print(self.summary.render(losses), file=sys.stderr)
        if opts.probes.allocs is not allocs.AllocMode.OFF:
            rate = f" at 1 per {self.profile_rate.rate} bytes" if self.profile_rate and self.profile_rate.rate > 1 else ""
            print(allocs.render(opts.probes.allocs, self.alloc_totals, elsewhere, rate), file=sys.stderr)
        if (app := self._app_summary(app_counters)) is not None:
            print(app, file=sys.stderr)
        if self.existing_at_attach:
            print(f"({self.existing_at_attach} goroutines existed at attach: their spans start at the attach)", file=sys.stderr)
        if untraced_exits:
            print(f"({untraced_exits} goroutines that existed before the attach exited untraced)", file=sys.stderr)
        if self.long_lived.leaks_flagged:
            print(f"suspected goroutine leaks: {self.long_lived.leaks_flagged}", file=sys.stderr)
        if any(losses.values()):
            log.warning("losses: %s", ", ".join(f"{k}={v}" for k, v in losses.items() if v))
        if opts.export.exporter == "file":
            print(f"{stats.exported} spans written to {opts.export.output}", file=sys.stderr)
        elif opts.export.exporter == "otlp":
            print(f"{stats.exported} spans exported over OTLP ({opts.export.protocol})", file=sys.stderr)
        return self.target.exit_status()
