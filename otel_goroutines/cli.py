"""The otel-goroutines command."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from . import __version__, goruntime, gosdk
from .agent import AgentOptions, ExportSettings, Session
from .analysis import reading_binary
from .allocs import AllocMode
from .binary.gobinary import GoBinary
from .errors import AgentError
from .flow import GroupSettings
from .longlived import LongLivedSettings
from .probes import ProbeSettings, check_privileges
from .settings_check import FiniteFloat, check_endpoints, warn_about_dropped_entries
from .target import AttachedTarget, LaunchedTarget
from .watch import Selector, Watcher, check_health

DEFAULT_OUTPUT = "goroutine-spans.jsonl"


def _fail(message: str, code: int = 1):
    click.echo(f"otel-goroutines: error: {message}", err=True)
    sys.exit(code)


def _one_line_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except AgentError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:  # a file the user named (an output, a binary) that cannot be used
            logging.getLogger("otel_goroutines").debug("OS error", exc_info=True)
            _fail(f"{exc.filename}: {exc.strerror}" if exc.filename else f"{exc.strerror or exc}")
        except Exception as exc:  # a bug: one line, the traceback only with --verbose
            logging.getLogger("otel_goroutines").debug("unexpected error", exc_info=True)
            _fail(f"unexpected {type(exc).__name__}: {exc} (run with -v for details)")
    return wrapper


def _endpoint_source() -> str:
    """Where --endpoint came from, to name it in an error."""
    ctx = click.get_current_context(silent=True)
    from_env = ctx is not None and ctx.get_parameter_source("endpoint") is click.core.ParameterSource.ENVIRONMENT
    return "OTEL_EXPORTER_OTLP_ENDPOINT" if from_env else "--endpoint"


def _tracing_options(func):
    options = [
        click.option("--exporter", type=click.Choice(["otlp", "file", "console"]),
                     help="Where spans go. Default: otlp when an endpoint is configured, else file."),
        click.option("--output", "-o", type=click.Path(dir_okay=False),
                     help=f"File for --exporter file (default {DEFAULT_OUTPUT}) or console (default stdout)."),
        click.option("--endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT", show_envvar=True,
                     help="OTLP collector base URL, e.g. http://localhost:4317 (gRPC) or http://localhost:4318 (HTTP)."),
        click.option("--protocol", type=click.Choice(["grpc", "http/protobuf"]),
                     help="OTLP protocol. Default: OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else http/protobuf."),
        click.option("--detail", type=click.Choice(["lifecycle", "states"]), default="states", show_default=True,
                     help="lifecycle: creation and exit only (cheapest); states: also state-change events and per-state times."),
        click.option("--allocs", type=click.Choice([m.value for m in AllocMode]), default=AllocMode.SAMPLED.value,
                     show_default=True,
                     help="Heap allocations per goroutine: exact (a probe on every allocation: about 1 us each), "
                          "sampled (estimates from the runtime's heap-profile samples, one per 512 KiB, which the agent "
                          "turns on in the target if the Go linker turned them off; not measurable) or off."),
        click.option("--max-events", type=click.IntRange(0, 100000), default=64, show_default=True,
                     help="State-change events kept per goroutine span; the rest are counted in go.goroutine.events_left_out."),
        click.option("--trace-max-spans", type=click.IntRange(1), default=1000, show_default=True,
                     help="Goroutine spans per trace; a goroutine created into a full trace starts a new one, linked."),
        click.option("--spawner-children", type=click.IntRange(0), default=16, show_default=True,
                     help="A goroutine that created more children than this is a spawner: its later children start traces of their own."),
        click.option("--spawner-age", type=FiniteFloat(0), default=1.0, show_default=True,
                     help="Seconds: a goroutine older than this is a spawner too (accept loops, dispatchers, pools)."),
        click.option("--group-window", type=FiniteFloat(0), default=10.0, show_default=True,
                     help="Seconds: a spawner's short goroutines that start none of their own share one trace per "
                          "window, under a span of the group, instead of a trace each (0: a trace each)."),
        click.option("--group-shorter-than", type=FiniteFloat(0), default=1.0, show_default=True,
                     help="Seconds: the lifetime under which a spawner's childless goroutine is grouped (--group-window)."),
        click.option("--checkpoint-after", type=FiniteFloat(0), default=60.0, show_default=True,
                     help="Seconds: a goroutine alive this long is exported as a checkpoint span, and again every so long (0: never)."),
        click.option("--leak-after", type=FiniteFloat(0), default=300.0, show_default=True,
                     help="Seconds blocked in one wait before a goroutine is flagged as a suspected leak (0: never)."),
        click.option("--max-spans-per-second", type=FiniteFloat(0), default=0, show_default=True,
                     help="Span budget (0: none). Over it, short, unremarkable goroutines are counted but not exported."),
        click.option("--metrics-interval", type=FiniteFloat(0), default=10.0, show_default=True,
                     help="Seconds between metric exports (OTLP, or PATH.metrics.jsonl beside --output; 0: no metrics)."),
        click.option("--flush-timeout", type=FiniteFloat(0), default=10.0, show_default=True,
                     help="Seconds allowed at the end to send what is still buffered (spans and the final metrics, together); "
                          "the agent is gone within it, whatever the collector does."),
        click.option("--app-traces", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
                     help="auto: when the program uses the OpenTelemetry Go SDK, a goroutine started while one of its spans "
                          "is active joins that span's trace, as its child; off: goroutines keep traces of their own."),
        click.option("--app-unsampled", type=click.Choice(["follow", "ignore"]), default="follow", show_default=True,
                     help="Goroutine spans in an application trace the application did not sample: follow its decision "
                          "(counted, not exported) or ignore it (exported, in that trace)."),
        click.option("--pprof-labels/--no-pprof-labels", default=True, show_default=True,
                     help="runtime/pprof goroutine labels (read when a goroutine ends) as go.goroutine.label.<key> attributes."),
        click.option("--wakers/--no-wakers", default=True, show_default=True,
                     help="With --detail states: name who woke each goroutine (go.goroutine.waker.* on the wake event) and "
                          "link its span to the waker's."),
        click.option("--ring-buffer-mib", type=click.IntRange(1, 1024), default=8, show_default=True,
                     help="Kernel ring buffer for the probes' records, a power of two. Records wait there until the agent "
                          "reads them (every 100 ms, or at once when half full); what does not fit is counted, never silent."),
        click.option("--max-goroutines", type=click.IntRange(1, 1 << 24), default=131072, show_default=True,
                     help="Goroutines tracked at once (the kernel map's size); one created while it is full gets no span "
                          "and is counted (goroutines_untracked_map_full)."),
        click.option("--max-overhead", type=FiniteFloat(0, 100, min_open=True), metavar="PERCENT",
                     help="Overhead budget: keep the CPU the probes cost the target under PERCENT of its own CPU time, "
                          "shedding detail when over (state events first, then lifecycle probes in duty cycles) and taking "
                          "it back when load falls; spans say whether they were traced in full. Default: no budget."),
        click.option("--quiet", "-q", is_flag=True, help="No live status line."),
        click.option("--probe-placement", type=click.Choice(goruntime.PROBE_PLACEMENTS), default="cheap", hidden=True,
                     help="For bench/run.py only: entry puts every probe on its function's first instruction, to measure "
                          "what the chosen addresses save; its spans are meaningless."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _options(exporter, output, endpoint, protocol, detail, allocs, max_events, trace_max_spans, spawner_children, spawner_age,
             group_window, group_shorter_than, checkpoint_after, leak_after, max_spans_per_second, metrics_interval, flush_timeout, quiet,
             app_traces="auto", app_unsampled="follow", pprof_labels=True, ring_buffer_mib=8, wakers=True, max_goroutines=131072,
             max_overhead=None, probe_placement="cheap") -> AgentOptions:
    traces_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if exporter is None:
        exporter = "otlp" if (endpoint or traces_endpoint) else "file"
    protocol = protocol or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol not in ("grpc", "http/protobuf"):
        raise AgentError(f"OTLP protocol {protocol!r} is not supported; use grpc or http/protobuf")
    if exporter == "otlp":  # refused now, before a program runs with every export failing
        check_endpoints(endpoint, _endpoint_source(), protocol, os.environ)
    if _endpoint_source() == "OTEL_EXPORTER_OTLP_ENDPOINT":
        # Left to the SDK's exporters, which read it with the signal-specific variables
        # (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, ..._METRICS_ENDPOINT) first.
        endpoint = None
    if exporter == "file" and not output:
        output = DEFAULT_OUTPUT
    if ring_buffer_mib & (ring_buffer_mib - 1):
        raise AgentError(f"--ring-buffer-mib {ring_buffer_mib} is not a power of two (the kernel requires one), e.g. 8 or 16")
    if max_overhead and allocs == AllocMode.EXACT.value:
        raise AgentError("--allocs exact traps on every heap allocation (about 1 us each), more than any --max-overhead "
                         "allows; use --allocs sampled (the default) with a budget, or leave --max-overhead out")
    warn_about_dropped_entries()
    return AgentOptions(
        export=ExportSettings(exporter, output, endpoint, protocol, flush_timeout,
                              wire_encoder=os.environ.get("OTEL_GOROUTINES_OTLP_ENCODER", "wire") != "sdk"),
        probes=ProbeSettings(states=detail == "states", allocs=AllocMode(allocs), max_events=max_events, trace_max_spans=trace_max_spans,
                             spawner_children=spawner_children, spawner_age_s=spawner_age,
                             app_traces=app_traces == "auto", labels=pprof_labels, ringbuf_pages=ring_buffer_mib * 256,
                             wakers=wakers, max_goroutines=max_goroutines, budget=bool(max_overhead), placement=probe_placement),
        long_lived=LongLivedSettings(checkpoint_after_s=checkpoint_after, leak_after_s=leak_after),
        groups=GroupSettings(window_s=group_window, shorter_than_s=group_shorter_than),
        spans_per_second=max_spans_per_second,
        metrics_interval_s=metrics_interval,
        quiet=quiet,
        app_unsampled=app_unsampled,
        max_overhead_pct=max_overhead or 0.0,
    )


@click.group()
@click.version_option(__version__, prog_name="otel-goroutines")
@click.option("--verbose", "-v", is_flag=True, help="Log what the agent does.")
def main(verbose):
    """Trace every goroutine of a Go program with eBPF; export each as an OpenTelemetry span."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="otel-goroutines: %(levelname)s: %(message)s")


@main.command(context_settings={"ignore_unknown_options": True})
@_tracing_options
@click.argument("program", nargs=-1, required=True, type=click.UNPROCESSED)
@_one_line_errors
def run(program, **kwargs):
    """Launch PROGRAM and trace it from its first goroutine; exit with its exit status."""
    options = _options(**kwargs)
    check_privileges()
    target = LaunchedTarget(list(program))
    try:
        with reading_binary(target.exe_path):
            code = Session(target, options).run()
    finally:
        target.close()
    sys.exit(code)


@main.command()
@_tracing_options
@click.argument("pid", type=int)
@_one_line_errors
def attach(pid, **kwargs):
    """Trace the running Go process PID until it exits or the agent gets SIGINT/SIGTERM."""
    options = _options(**kwargs)
    check_privileges()
    target = AttachedTarget.from_pid(pid)
    try:
        with reading_binary(target.exe_path):
            Session(target, options).run()
    finally:
        target.close()


@main.command()
@_tracing_options
@click.option("--exe-name", multiple=True, metavar="NAME",
              help="Trace processes whose executable has this file name (a shell pattern; repeatable).")
@click.option("--exe-path", multiple=True, metavar="PATH",
              help="Trace processes whose executable has this path, as the process itself sees it (a shell pattern; repeatable).")
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Trace the process whose PID this file holds (read again at every scan).")
@click.option("--exclude-exe-name", multiple=True, metavar="NAME",
              help="Never trace processes whose executable has this file name (a shell pattern; repeatable; "
                   "wins over the options above). Node-wide: the collector the agent sends to, the kubelet.")
@click.option("--exclude-exe-path", multiple=True, metavar="PATH",
              help="Never trace processes whose executable has this path, as the process itself sees it (a shell pattern; repeatable).")
@click.option("--scan-interval", type=FiniteFloat(0.05), default=1.0, show_default=True,
              help="Seconds between looks at /proc for new processes.")
@click.option("--health-file", type=click.Path(dir_okay=False),
              help="Keep this JSON file fresh while alive, for `otel-goroutines health` (removed at exit).")
@click.option("--shutdown-timeout", type=FiniteFloat(0), default=20.0, show_default=True,
              help="Seconds allowed after SIGTERM/SIGINT to detach and flush every target's spans.")
@_one_line_errors
def watch(exe_name, exe_path, pid_file, exclude_exe_name, exclude_exe_path, scan_interval, health_file, shutdown_timeout,
          **kwargs):
    """Trace every Go process that matches a selector (all Go processes without one) and no
    --exclude-exe-* option, including processes that start or restart later; stop on
    SIGTERM/SIGINT. How a sidecar finds its service.
    With --exporter file, each process gets a file of its own: --output with its PID before the extension."""
    options = _options(**kwargs)
    check_privileges()
    watch_log = logging.getLogger("otel_goroutines.watch")
    if not watch_log.isEnabledFor(logging.INFO):
        watch_log.setLevel(logging.INFO)  # which processes are traced, skipped, gone: the sidecar's log
    selector = Selector(tuple(exe_name), tuple(exe_path), pid_file, tuple(exclude_exe_name), tuple(exclude_exe_path))
    sys.exit(Watcher(selector, options, scan_interval, health_file, shutdown_timeout).run())


@main.command()
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False), help="The --health-file of `watch`.")
@click.option("--max-age", type=FiniteFloat(0), default=30.0, show_default=True,
              help="Seconds: an older heartbeat means the agent is stuck or gone.")
@click.option("--require-target", is_flag=True, help="Unhealthy until the agent traces at least one process (a readiness check).")
@_one_line_errors
def health(path, max_age, require_target):
    """Exit 0 if the `watch` agent writing FILE is alive (and tracing, with --require-target), else 1."""
    problem = check_health(path, max_age, require_target)
    if problem:
        _fail(problem)
    click.echo("ok")


@main.command()
@click.argument("binary", required=False, type=click.Path(dir_okay=False))
@click.option("--pid", type=int, help="Inspect the binary of a running process instead.")
@_one_line_errors
def inspect(binary, pid):
    """Print what the agent would use for BINARY: Go version, offsets, probe addresses."""
    if (binary is None) == (pid is None):
        raise AgentError("give either BINARY or --pid PID")
    path = AttachedTarget.from_pid(pid).exe_path if pid is not None else binary
    shown = f"{os.readlink(path)} (PID {pid}, read through {path})" if pid is not None else path
    with reading_binary(path):
        _inspect(path, shown)


def _inspect(path: str, shown: str) -> None:
    gobin = GoBinary(path)
    support = goruntime.support_for(gobin)
    click.echo(f"binary:          {shown}")
    click.echo(f"Go version:      {gobin.go_version}")
    arch = support.arch
    click.echo(f"architecture:    {arch.name} (Go arguments in {arch.arg(1)}, {arch.arg(2)}, ...; g in {arch.show(arch.g)})"
               f"{'' if arch.name == goruntime.HOST_ARCH else f'; inspect only: this machine is {goruntime.HOST_ARCH}'}")
    click.echo(f"build mode:      {gobin.build_mode}{' (PIE)' if gobin.is_pie else ''}{', cgo' if gobin.uses_cgo else ''}"
               f"{', trimpath' if gobin.build_info.settings.get('-trimpath') == 'true' else ''}, "
               f"{'symbols' if gobin.has_symtab else 'stripped'}, {'DWARF' if gobin.has_dwarf else 'no DWARF'}")
    click.echo(f"function table:  pclntab format {gobin.functions.go_format}, {len(gobin.functions.funcs())} functions")
    click.echo(f"struct offsets:  from {support.offsets_source}")
    for name, value in sorted(support.offsets.items()):
        click.echo(f"  {name:<18} {value}")
    click.echo(f"wait reasons:    {len(support.wait_reasons)}, from "
               f"{'runtime.waitReasonStrings' if goruntime.wait_reasons_in(gobin) else support.offsets_source}")
    allocs = support.allocs
    if allocs is None:
        click.echo("heap allocations: no probe points found (--allocs is off)")
    else:
        rate = f"0x{allocs.mem_profile_rate:x}" if allocs.mem_profile_rate is not None else "not found (estimates assume 512 KiB)"
        click.echo(f"heap sampling:   runtime.MemProfileRate at {rate}, from {allocs.addresses_from}")
        if allocs.specialized_max:
            click.echo(f"                 size-specialized malloc up to {allocs.specialized_max} bytes")
    labels = support.labels
    click.echo(f"pprof labels:    {'runtime/pprof not linked in: the program sets none' if labels is None else f'g.labels at {labels.offset} (from {labels.source}), a labelMap as a {labels.layout}'}")
    sdk = gosdk.sdk_status(gobin)
    click.echo(f"OpenTelemetry:   {gosdk.SDK_MODULE} {sdk.version}" if sdk.version else "OpenTelemetry:   no Go SDK linked in")
    click.echo(f"  correlation:   {'possible' if sdk.correlates else 'not possible'}: {sdk.reason}")
    for name, value in sorted(sdk.support.offsets.items()) if sdk.support else ():
        click.echo(f"  {name:<18} {value}")
    click.echo("probes:")
    for group, points in (("", support.lifecycle_probes + support.state_probes),
                          ("--allocs exact:", allocs.exact_probes if allocs else ()),
                          ("--allocs sampled:", allocs.sampled_probes if allocs else ()),
                          ("application spans:", sdk.support.probes if sdk.support else ())):
        if group and points:
            click.echo(f" {group}")
        for point in points:
            click.echo(f"  {point.handler:<22} {point.function}+{point.address - gobin.function(point.function).entry:<5} "
                       f"0x{point.address:x}  {point.instruction:<24} {point.why}")
