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
from urllib.parse import unquote

import numpy as np
from opentelemetry.sdk.resources import OTELResourceDetector, Resource

from . import __version__, allocs, goruntime, gosdk, target_memory
from .analysis import AnalysisCache, analyse
from .binary.gobinary import GoBinary
from .binary.symbolize import Symbolizer
from .cgroup_identity import process_identity
from .deadline import Deadline
from .errors import AgentError
from .exporters import ConsoleSink, FileSink, OtlpSink, SpanSink, open_output
from .fastspans import BatchSpanEncoder
from .flow import END_REASONS, FlowCounts, GroupSettings, ShortGoroutineGroups, SpanFlow
from .kernel_records import GstateFlag
from .longlived import LongLived, LongLivedSettings
from .metrics import GoroutineMetrics, MetricsData, MetricsSender
from .pipeline import ExportPipeline
from .probes import BpfProgram, GoroutineProbes, KernelBatch, ProbeSettings
from .records import EndReason, take
from .sampling import SpanBudget
from .shedding import BudgetReport, ProbeShedder
from .spans import SpanBuilder
from .target import FORWARDED_SIGNALS, AttachedTarget, LaunchedTarget, Target
from .tracker import Summary
from .wallclock import CHECK_EVERY_NS as CLOCK_CHECK_NS, WallClock

log = logging.getLogger("otel_goroutines")


@dataclass(frozen=True)
class ExportSettings:
    exporter: str            # "otlp", "file" or "console"
    output: str | None       # file/console destination
    endpoint: str | None
    protocol: str
    flush_timeout_s: float = 10.0
    wire_encoder: bool = True  # False: the SDK's own span encoder (OTEL_GOROUTINES_OTLP_ENCODER=sdk, for the bench)


@dataclass(frozen=True)
class AgentOptions:
    export: ExportSettings
    probes: ProbeSettings
    long_lived: LongLivedSettings = field(default_factory=LongLivedSettings)
    groups: GroupSettings = field(default_factory=GroupSettings)  # max_spans is probes.trace_max_spans
    spans_per_second: float = 0.0    # 0: no budget
    metrics_interval_s: float = 10.0  # 0: no metrics
    quiet: bool = False
    poll_interval_ms: int = 100
    app_unsampled: str = "follow"     # goroutine spans in an application trace it did not sample: "follow" (drop) or "ignore"
    max_overhead_pct: float = 0.0     # the probes' CPU cost kept under this % of the target's own (shedding.py); 0: no budget


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
        **process_identity(target.pid),  # container.id, k8s.pod.uid: the Collector's k8sattributes adds the rest
    })
    # An attached program's own OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override the defaults
    # above (a launched one has the agent's environment), and the agent's own override those.
    own = target_otel_resource(target) if isinstance(target, AttachedTarget) else Resource({})
    return base.merge(own).merge(OTELResourceDetector().detect())


def target_otel_resource(target: Target) -> Resource:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES from the traced process's own environment, so
    that its goroutine spans land in the service its own spans use (parsed as the SDK parses them)."""
    try:
        env = target.environment()
    except OSError as exc:
        log.warning("could not read the environment of PID %d (%s): its OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES "
                    "are not used", target.pid, exc.strerror or exc)
        return Resource({})
    attributes = {}
    for entry in filter(None, (e.strip() for e in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","))):
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            log.warning("OTEL_RESOURCE_ATTRIBUTES of PID %d: entry %r ignored: not key=value", target.pid, entry)
            continue
        attributes[key.strip()] = unquote(value.strip())
    if env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = env["OTEL_SERVICE_NAME"]
    return Resource(attributes)


def make_sink(settings: ExportSettings, resource: Resource, deadline: Deadline | None = None) -> SpanSink:
    if settings.exporter == "otlp":
        return OtlpSink(settings.protocol, settings.endpoint, resource, deadline=deadline, fast=settings.wire_encoder)
    if settings.exporter == "file":
        return FileSink(settings.output, resource)
    if settings.exporter == "console":
        stream = open_output(settings.output) if settings.output else sys.stdout
        return ConsoleSink(stream)
    raise AgentError(f"unknown exporter {settings.exporter!r}")


def session_probe_settings(settings: ProbeSettings, support: goruntime.RuntimeSupport, exe_path: str) -> ProbeSettings:
    """The probe settings of one traced binary: --allocs is off where it has no allocation probe
    points. A copy: the options stay as parsed (`watch` gives every process the same ones)."""
    if settings.allocs is not allocs.AllocMode.OFF and support.allocs is None:
        log.warning("no heap-allocation probe points in %s: --allocs %s is off", exe_path, settings.allocs.value)
        return dataclasses.replace(settings, allocs=allocs.AllocMode.OFF)
    return settings


class StatusLine:
    """The live status on the terminal's last line. A scroll region above it keeps the program's own
    output (which shares the terminal under `run`) from being written into it, as apt's progress bar does."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0
        self._size: os.terminal_size | None = None  # the terminal's, when the scroll region was set

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self._last >= 1.0

    def update(self, text: str) -> None:
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
        except OSError:
            return
        out = []
        if size != self._size:  # first time, or resized
            if self._size is None:
                out.append("\n\033[1A")  # room for the status line, if the cursor is on the last one
            out.append(f"\0337\033[1;{size.lines - 1}r\0338")  # DECSTBM homes the cursor: saved around it
            self._size = size
        out.append(f"\0337\033[{size.lines};1H\033[K{text[:size.columns - 1]}\0338")
        sys.stderr.write("".join(out))
        sys.stderr.flush()
        self._last = time.monotonic()

    def clear(self) -> None:
        if self._size is not None:
            sys.stderr.write(f"\0337\033[r\033[{self._size.lines};1H\033[K\0338")  # whole screen scrolls again
            sys.stderr.flush()
            self._size = None


class Session:
    """The life of one traced process: attach, poll the kernel, stop. What the kernel sends goes
    through a SpanFlow (flow.py, pure) to the export pipeline."""

    def __init__(self, target: Target, options: AgentOptions, program: BpfProgram | None = None,
                 analyses: AnalysisCache | None = None):
        self.target = target
        self.options = options
        placement = options.probes.placement
        analysis = analyses.get(target.exe_path, placement) if analyses is not None else analyse(target.exe_path, placement)
        self.binary = analysis.binary
        self.support = analysis.support
        self.probe_settings = session_probe_settings(options.probes, self.support, target.exe_path)
        self.summary = Summary()
        self.sdk = analysis.sdk  # the application's OpenTelemetry SDK, if any
        self.probes = GoroutineProbes(self.support, target.exe_path, target.pid, self.probe_settings, self.sdk.support, program)
        self.long_lived = LongLived(options.long_lived)
        self.budget = SpanBudget(options.spans_per_second)
        self.salt = int.from_bytes(secrets.token_bytes(8), "big")
        self._symbolizer: Symbolizer | None = None
        self._flow: SpanFlow | None = None
        self._stop_reason: EndReason | None = None
        self._scan_now = False
        self._imported: set[int] = set()  # goroutines that existed at attach
        self.profile_rate: allocs.ProfileRate | None = None
        self.shedder: ProbeShedder | None = None  # --max-overhead
        self.flush_timeout_s = options.export.flush_timeout_s  # stop() may shorten it (watch's --shutdown-timeout)

    # --- signals -------------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        if isinstance(self.target, LaunchedTarget):
            self.target.signal(signum)  # the program decides; the agent follows its exit
        else:
            self._stop_reason = EndReason.AGENT_STOPPED

    # --- symbols and spans ---------------------------------------------------------------
    def symbolizer(self) -> Symbolizer:
        if self._symbolizer is None:
            self._symbolizer = Symbolizer(self.binary.functions, self.binary.code, self._load_bias(), self.binary.isa,
                                          self.binary.inlined_call)
        return self._symbolizer

    def _load_bias(self) -> int:
        if not self.binary.is_pie:
            return 0
        ip = self.probes.probe_ip()
        # The first creation was seen at one of the probed sites; a load bias is page-aligned.
        for point in self.probes.probe_points:
            if ip is not None and point.handler in ("on_goroutine_created", "on_casgstatus") and (ip - point.address) % 4096 == 0:
                return ip - point.address
        try:
            return target_memory.load_bias(self.target.pid, self.binary)
        except OSError:
            log.warning("could not find where the PIE binary is loaded; function names may be wrong")
            return 0

    def _span_flow(self, sink: SpanSink) -> SpanFlow:
        """Built at the first goroutine seen: names need the load bias the probes find then."""
        if self._flow is None:
            symbolizer = self.symbolizer()
            builder = SpanBuilder(
                salt=self.salt,
                clock_offset_ns=self.clock.offset_ns,
                function_name=symbolizer.function,
                creation_site=symbolizer.creation_site,
                wait_reason=self.support.wait_reason,
                states_traced=self.probe_settings.states,
                allocs=self.probe_settings.allocs,
                wakers=self.probe_settings.wakers,
            )
            encoder = getattr(sink, "encoder", None)  # sinks that take encoded spans
            grouping = dataclasses.replace(self.options.groups, max_spans=self.probe_settings.trace_max_spans)
            self._flow = SpanFlow(builder, self.long_lived, self.budget, self.summary,
                                  encoder.span if encoder is not None else None,
                                  BatchSpanEncoder(builder, encoder) if encoder is not None else None,
                                  self.metrics, self.options.app_unsampled == "follow",
                                  ShortGoroutineGroups(grouping, self.clock.offset_ns) if grouping.window_s else None,
                                  self.shedder.history.traced_in_full if self.shedder is not None else None)
            self._flow.imported = self._imported
        return self._flow

    def _take(self, batch: KernelBatch, pipeline: ExportPipeline) -> None:
        """One drain of the ring buffer: state changes wait, ended goroutines become spans."""
        if batch.runtime_initialised:
            self._enable_heap_sampling()
        if batch.process_exited:
            self._stop_reason = self._stop_reason or EndReason.PROCESS_EXITED
        if not len(batch.ends) and not len(batch.transitions) and not batch.labels:
            return
        flow = self._span_flow(pipeline.sink)
        if len(batch.transitions) and (batch.transitions["to"] == goruntime.G_LEAKED).any():
            self._scan_now = True  # the runtime found a leak: export it now
        flow.changes(batch.transitions, batch.labels)
        pipeline.submit(flow.ended(batch.ends))
        if self.shedder is not None:
            self.shedder.saw_goids(batch.ends["goid"][(batch.ends["st"]["flags"] & GstateFlag.FLAG_EXISTED_AT_ATTACH) == 0])

    def _scan(self, pipeline: ExportPipeline, now_ns: int) -> None:
        """Checkpoints and leaks of live goroutines; ends the full ring buffer left in the kernel map."""
        entries = self.probes.snapshot(now_ns, include_ended=True)
        if not len(entries):
            return
        flow = self._span_flow(pipeline.sink)
        ended = entries["st"]["end_ns"] != 0
        if ended.any():
            pipeline.submit(flow.ended(take(entries, ended)))
            self.probes.delete(entries["goid"][ended])
        pipeline.submit(flow.checkpoints(take(entries, ~ended), now_ns))

    def _app_summary(self, counters: dict[str, int]) -> str | None:
        """What the application's spans and pprof labels gave, for the summary at the end."""
        lines = []
        if self.probes.sdk is not None:
            lines.append(f"application spans ({gosdk.SDK_MODULE} {self.sdk.version}): {counters['app_spans_started']} followed, "
                         f"{counters['goroutines_under_app_spans']} goroutines started under them")
            if (unsampled := self._counts().app_unsampled):
                lines.append(f"({unsampled} goroutine spans not exported: their application trace was not sampled)")
            lost = {k: v for k, v in counters.items() if v and k in ("app_spans_forgotten_too_deep", "app_spans_not_followed_map_full",
                                                                       "app_spans_of_unknown_type")}
            if lost:
                lines.append("application spans degraded: " + ", ".join(f"{k}={v}" for k, v in lost.items()))
        label_losses = {k: counters[k] for k in ("labels_left_out", "labels_lost_ringbuf") if counters[k]}
        if counters["goroutines_with_labels"] or label_losses:
            lines.append(f"goroutines with pprof labels: {counters['goroutines_with_labels']}"
                         + (" (" + ", ".join(f"{k}={v}" for k, v in label_losses.items()) + ")" if label_losses else ""))
        return "\n".join(lines) or None

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
        if self.probe_settings.allocs is not allocs.AllocMode.SAMPLED or self.profile_rate is not None:
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
            now_ns + self.clock.offset_ns,
            self._start_function_counts(now_ns),
            self.probes.schedule_latency_histogram(),
            self.long_lived.leaks_flagged,
            {"exported": stats.exported, "sampled_out": self.budget.sampled_out, "dropped": stats.dropped,
             "untracked_map_full": counters["goroutines_untracked_map_full"], "app_unsampled": self._counts().app_unsampled},
            self._budget_report(now_ns, counters))

    def _budget_report(self, now_ns: int, counters: dict[str, int]) -> BudgetReport | None:
        if self.shedder is None:
            return None
        return self.shedder.report_at(now_ns, counters["goroutines_created"], self._counts().partial)

    def _start_function_counts(self, now_ns: int) -> dict[int, tuple[int, int]]:
        """start pc -> (created since tracing began, exited): what ended, plus what lives in the kernel map now."""
        counts = self._counts()
        created = dict(counts.created_by_start_pc)
        live = self.probes.snapshot(now_ns)["st"]  # alive at the end too: the flow counts only those that exited
        new = live[(live["flags"] & GstateFlag.FLAG_EXISTED_AT_ATTACH) == 0]
        pcs, n = np.unique(new["start_pc"], return_counts=True)
        for pc, count in zip(pcs.tolist(), n.tolist()):
            created[pc] = created.get(pc, 0) + count
        exited = counts.exited_by_start_pc
        return {pc: (created.get(pc, 0), exited.get(pc, 0)) for pc in created.keys() | exited.keys()}

    def _counts(self) -> FlowCounts:
        return self._flow.counts if self._flow is not None else FlowCounts()

    # --- the run -----------------------------------------------------------------------
    def run(self) -> int:
        """Trace to the end (the target's exit; SIGINT/SIGTERM for an attached one); its exit status."""
        for _ in self.steps():
            pass
        return self.target.exit_status()

    def stop(self, flush_timeout_s: float | None = None) -> None:
        """End the session at its next step: goroutines still alive end as agent_stopped. flush_timeout_s
        shortens --flush-timeout for this session (`watch` shares its --shutdown-timeout among targets)."""
        self._stop_reason = self._stop_reason or EndReason.AGENT_STOPPED
        if flush_timeout_s is not None:
            self.flush_timeout_s = min(self.flush_timeout_s, flush_timeout_s)

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
        self.clock = WallClock()
        self.existing_at_attach = 0
        start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self.metrics = GoroutineMetrics(resource, lambda pc: self.symbolizer().function(pc), start_ns + self.clock.offset_ns) \
            if sender and sender.enabled else None
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in FORWARDED_SIGNALS} if handle_signals else {}
        try:
            self._attach()
            yield
            yield from self._trace(pipeline, sender, start_ns)
            end = self._finish(pipeline)
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            if self.shedder is not None:
                self.shedder.close()
            self.probes.close()
        deadline.start(self.flush_timeout_s)
        if sender is not None:
            sender.send(end.metrics)  # goes out while the spans flush, not after them
        stats = pipeline.close(deadline.remaining())
        if sender is not None:
            sender.close(None, deadline.remaining())
        self._report(stats, end, sender.not_sent if sender is not None else 0)
        return self.target.exit_status()

    def _attach(self) -> None:
        compiled = self.probes.program.loaded
        started = time.monotonic()
        if self.options.max_overhead_pct:  # measured before the probes go on: a busy target pays full detail until the budget acts
            self.probes.program.load()
            self.probes.program.trap_cost_ns()
        self.probes.attach()
        if self.options.max_overhead_pct:
            self.shedder = ProbeShedder(self.probes, self.support, self.target.pid, self.options.max_overhead_pct,
                                        self.probe_settings.states, self._load_bias)
            self.shedder.start(lambda: self.probes.counters()["goroutines_created"])
        log.info("attached %d probes to PID %d in %.1f ms%s (%s, offsets from %s)", len(self.probes.probe_points), self.target.pid,
                 (time.monotonic() - started) * 1e3, "" if compiled else ", the eBPF program compiled first",
                 self.binary.go_version, self.support.offsets_source)
        log.info("application spans: %s", self.sdk.reason if self.probe_settings.app_traces else "not followed (--app-traces off)")
        if isinstance(self.target, AttachedTarget):
            self._import_existing(self.probes.attached_ns)
            self._enable_heap_sampling()  # the runtime has long initialised
        self.target.start()

    def _trace(self, pipeline: ExportPipeline, sender: MetricsSender | None, start_ns: int):
        """Poll the kernel until the target exits or the agent is stopped; yields after each poll."""
        opts = self.options
        status = StatusLine(not opts.quiet)
        scan_every_ns = int(opts.long_lived.scan_interval_s * 1e9)
        metrics_every_ns = int(opts.metrics_interval_s * 1e9)
        next_scan, next_metrics, next_clock = start_ns + scan_every_ns, start_ns + metrics_every_ns, start_ns + CLOCK_CHECK_NS
        while self._stop_reason is None:
            polled = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # every end before this is read by the poll
            self._take(self.probes.poll(opts.poll_interval_ms), pipeline)
            if self._flow is not None:
                pipeline.submit(self._flow.group_spans(polled))
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if self._scan_now or (scan_every_ns and now >= next_scan):
                self._scan(pipeline, now)
                self._scan_now, next_scan = False, now + scan_every_ns
            if now >= next_clock:
                self._follow_wall_clock()
                next_clock = now + CLOCK_CHECK_NS
            if self.metrics is not None and now >= next_metrics:
                sender.send(self._metrics_snapshot(now, pipeline.stats))
                next_metrics = now + metrics_every_ns
            for gone in self.shedder.take_unseen() if self.shedder is not None else ():
                self._end_unseen(gone, pipeline)
            if self.target.has_exited():
                self._stop_reason = self._stop_reason or EndReason.PROCESS_EXITED
            if status.due():
                ended = self._counts().ended
                live = self.existing_at_attach + self.probes.counters()["goroutines_created"] - ended
                status.update(f"goroutines live {live}  ended {ended}  "
                              f"exported {pipeline.stats.exported}  dropped {pipeline.stats.dropped + self.budget.sampled_out}")
            yield
        status.clear()

    def _follow_wall_clock(self) -> None:
        step = self.clock.step_ns()
        if step:
            log.warning("the wall clock stepped by %+.3f s: spans from now on carry the new time", step / 1e9)
            if self._flow is not None:  # the group windows keep the old alignment: they stay whole
                self._flow.builder.clock_offset_ns = self.clock.offset_ns

    def _end_unseen(self, gone: np.ndarray, pipeline: ExportPipeline) -> None:
        """Goroutines that ended while the overhead budget had their exit probe off: spans now."""
        pipeline.submit(self._span_flow(pipeline.sink).ended(gone))
        self.probes.delete(gone["goid"])

    def _finish(self, pipeline: ExportPipeline) -> "_End":
        """The last records: what the ring buffer still holds, then every goroutine left in the kernel
        map (alive now, or ended while the ring buffer was full)."""
        if self.shedder is not None:
            self.shedder.stop()
            for gone in self.shedder.take_unseen():
                self._end_unseen(gone, pipeline)
        self._take(self.probes.drain(), pipeline)
        end_ns = self.probes.exit_time() or time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        left = self.probes.snapshot(end_ns, include_ended=True)
        if len(left):
            st = left["st"].copy()
            alive = st["end_ns"] == 0
            st["end_ns"][alive] = end_ns
            left["st"] = st
            reasons = np.where(alive, END_REASONS.index(self._stop_reason), END_REASONS.index(EndReason.EXITED))
            pipeline.submit(self._span_flow(pipeline.sink).ended(left, reasons))
            if self.shedder is not None:
                self.shedder.saw_goids(left["goid"][(st["flags"] & GstateFlag.FLAG_EXISTED_AT_ATTACH) == 0])
        if self._flow is not None:
            pipeline.submit(self._flow.group_spans(None))
        log.info("every span is handed to the exporter (%d goroutines were left in the kernel map)", len(left))
        counters = self.probes.counters()
        return _End(self._metrics_snapshot(end_ns, pipeline.stats) if self.metrics is not None else None,
                    counters, self.probes.allocs_elsewhere(), self.probes.app_counters(), self._budget_report(end_ns, counters))

    def _report(self, stats, end: "_End", metrics_not_sent: int) -> None:
        """The summary on stderr."""
        opts = self.options
        losses = dict(end.counters)
        created = losses.pop("goroutines_created")
        losses = {"spans_not_exported": stats.dropped, "spans_sampled_out": self.budget.sampled_out, **losses,
                  "metrics_not_sent": metrics_not_sent}
        # Exits of goroutines that predate the attach are expected, not a loss.
        untraced_exits = losses.pop("exits_of_untraced_goroutines")
        print(self.summary.render(losses, created), file=sys.stderr)
        if self.probe_settings.allocs is not allocs.AllocMode.OFF:
            rate = f" at 1 per {self.profile_rate.rate} bytes" if self.profile_rate and self.profile_rate.rate > 1 else ""
            print(allocs.render(self.probe_settings.allocs, self._counts().alloc_totals, end.allocs_elsewhere, rate), file=sys.stderr)
        if (app := self._app_summary(end.app_counters)) is not None:
            print(app, file=sys.stderr)
        if self.existing_at_attach:
            print(f"({self.existing_at_attach} goroutines existed at attach: their spans start at the attach)", file=sys.stderr)
        if untraced_exits:
            print(f"({untraced_exits} goroutines that existed before the attach exited untraced)", file=sys.stderr)
        if self._flow is not None and self._flow.groups is not None and self._flow.groups.groups:
            groups = self._flow.groups
            print(f"short goroutines of spawners: {groups.grouped} in {groups.groups} group traces "
                  f"(one per spawner per {opts.groups.window_s:g} s window)", file=sys.stderr)
        if self.long_lived.leaks_flagged:
            print(f"suspected goroutine leaks: {self.long_lived.leaks_flagged}", file=sys.stderr)
        if end.budget is not None:
            print(end.budget.render(), file=sys.stderr)
        if any(losses.values()):
            log.warning("losses: %s", ", ".join(f"{k}={v}" for k, v in losses.items() if v))
        if opts.export.exporter == "file":
            print(f"{stats.exported} spans written to {opts.export.output}", file=sys.stderr)
        elif opts.export.exporter == "otlp":
            print(f"{stats.exported} spans exported over OTLP ({opts.export.protocol})", file=sys.stderr)


@dataclass
class _End:
    """What the kernel side said last, read before the probes are closed."""
    metrics: MetricsData | None
    counters: dict[str, int]
    allocs_elsewhere: list
    app_counters: dict[str, int]
    budget: BudgetReport | None = None
