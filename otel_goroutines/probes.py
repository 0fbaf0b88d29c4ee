"""The eBPF side: compile bpf/goroutines.bpf.c with bcc, attach it to one process, read what it sends.

Kernel events come out of here as GoroutineRecords (ended goroutines) and StateChanges; the
rest of the agent never touches bcc.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import allocs
from .errors import AgentError
from .goruntime import N_STATES, ProbePoint, RuntimeSupport
from .gosdk import SdkSupport
from .target_memory import ExistingGoroutine
from .records import EndReason, GoroutineRecord, StateChange, TraceReason

BPF_SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "goroutines.bpf.c"

EV_TRANSITION, EV_END, EV_PROCESS_EXIT, EV_RUNTIME_INITIALISED, EV_LABELS = 1, 2, 3, 4, 5
APP_COUNTER_NAMES = ("app_spans_started", "app_spans_ended", "app_spans_forgotten_too_deep", "app_spans_not_followed_map_full",
                     "app_spans_of_unknown_type", "goroutines_under_app_spans", "goroutines_with_labels",
                     "labels_lost_ringbuf")
COUNTER_NAMES = ("goroutines_untracked_map_full", "state_events_lost_ringbuf", "ends_deferred_ringbuf",
                 "exits_of_untraced_goroutines", "target_memory_read_errors", "goroutines_created")

_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39
FLAG_EXISTED_AT_ATTACH = 1
_BPF_NOEXIST = 1


class _GState(ct.Structure):
    _fields_ = [("create_ns", ct.c_uint64), ("end_ns", ct.c_uint64), ("last_ns", ct.c_uint64),
                ("parent_goid", ct.c_uint64), ("start_pc", ct.c_uint64), ("go_pc", ct.c_uint64),
                ("state_ns", ct.c_uint64 * N_STATES), ("status", ct.c_uint32), ("transitions", ct.c_uint32),
                ("events_sent", ct.c_uint32), ("events_left_out", ct.c_uint32),
                ("parent_traced", ct.c_uint32), ("pad", ct.c_uint32), ("root_goid", ct.c_uint64),
                ("parent_root_goid", ct.c_uint64),
                ("children", ct.c_uint32), ("trace_reason", ct.c_uint32), ("flags", ct.c_uint32),
                ("waitreason", ct.c_uint32),
                ("alloc_bytes", ct.c_uint64), ("alloc_count", ct.c_uint64), ("alloc_samples", ct.c_uint64),
                ("app_trace_id", ct.c_uint8 * 16), ("app_span_id", ct.c_uint8 * 8), ("app_flags", ct.c_uint32),
                ("app_pad", ct.c_uint32)]


class _GKey(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("pad", ct.c_uint32), ("goid", ct.c_uint64)]


class _Header(ct.Structure):
    _fields_ = [("kind", ct.c_uint32), ("tgid", ct.c_uint32), ("goid", ct.c_uint64)]


class _TransitionEvent(ct.Structure):
    _fields_ = _Header._fields_ + [("ts", ct.c_uint64), ("from_state", ct.c_uint32), ("to_state", ct.c_uint32),
                                   ("waitreason", ct.c_uint32), ("pad", ct.c_uint32)]


class _EndEvent(ct.Structure):
    _fields_ = _Header._fields_ + [("st", _GState)]


_MAX_LABELS, _LABEL_KEY_MAX, _LABEL_VALUE_MAX = 8, 32, 64  # as in the BPF program


class _Label(ct.Structure):
    _fields_ = [("key_len", ct.c_uint16), ("value_len", ct.c_uint16), ("key", ct.c_uint8 * _LABEL_KEY_MAX),
                ("value", ct.c_uint8 * _LABEL_VALUE_MAX)]


class _LabelsEvent(ct.Structure):
    _fields_ = _Header._fields_ + [("count", ct.c_uint32), ("total", ct.c_uint32), ("labels", _Label * _MAX_LABELS)]


def _labels(ev: _LabelsEvent) -> dict[str, str]:
    """A goroutine's pprof labels (the first 8); keys and values cut to the kernel's buffers end in "..."."""
    out = {}
    for label in ev.labels[:min(ev.count, _MAX_LABELS)]:
        key = bytes(label.key[:min(label.key_len, _LABEL_KEY_MAX)]).decode("utf-8", "replace")
        value = bytes(label.value[:min(label.value_len, _LABEL_VALUE_MAX)]).decode("utf-8", "replace")
        out[key + ("..." if label.key_len > _LABEL_KEY_MAX else "")] = value + ("..." if label.value_len > _LABEL_VALUE_MAX else "")
    return out


@dataclass(frozen=True)
class ProbeSettings:
    states: bool = True            # probe casgstatus for state events and per-state times
    max_events: int = 64           # state events kept per goroutine; the rest are counted
    max_goroutines: int = 131072   # goroutines tracked at once
    ringbuf_pages: int = 1024      # 4 MiB
    trace_max_spans: int = 1000    # goroutines per trace before a new one starts
    spawner_children: int = 16     # a creator with more children than this is a spawner...
    spawner_age_s: float = 1.0     # ...and so is one older than this: their children start traces
    allocs: allocs.AllocMode = allocs.AllocMode.OFF  # heap allocations per goroutine: exact, sampled or off
    app_traces: bool = True        # follow the application's OpenTelemetry SDK spans (when the target has the SDK)
    labels: bool = True            # send the runtime/pprof labels of ended goroutines


def check_privileges() -> None:
    """Fail early, in one line, when this process cannot load BPF programs or attach uprobes."""
    try:
        with open("/proc/self/status") as status:
            cap_eff = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return
    has = lambda cap: bool(cap_eff >> cap & 1)
    if not (has(_CAP_SYS_ADMIN) or (has(_CAP_BPF) and has(_CAP_PERFMON))):
        raise AgentError("loading eBPF probes needs root (or CAP_BPF and CAP_PERFMON); run with sudo")


_INIT_PID_NS_INO = 0xEFFFFFFC  # PROC_PID_INIT_INO: the kernel's own PID namespace


def pid_namespace_defines(ns_path: str = "/proc/self/ns/pid") -> list[str]:
    """In a PID namespace of its own (a sidecar sharing its pod's), the agent knows processes by
    that namespace's PIDs and the kernel by its own: the BPF program is then told to report the
    agent's (bpf_get_ns_current_pid_tgid), so its map keys and events match the PIDs from /proc."""
    try:
        st = os.stat(ns_path)
    except OSError:
        return []
    if st.st_ino == _INIT_PID_NS_INO:
        return []
    return [f"-DAGENT_PIDNS_DEV={st.st_dev}ULL", f"-DAGENT_PIDNS_INO={st.st_ino}ULL"]


def _record(goid: int, tgid: int, st: _GState, end_reason: EndReason) -> GoroutineRecord:
    return GoroutineRecord(
        pid=tgid, goid=goid, parent_goid=st.parent_goid, parent_traced=bool(st.parent_traced),
        create_ns=st.create_ns, end_ns=st.end_ns, start_pc=st.start_pc, go_pc=st.go_pc,
        state_ns=tuple(st.state_ns), transitions=st.transitions, events_left_out=st.events_left_out,
        end_reason=end_reason, root_goid=st.root_goid, parent_root_goid=st.parent_root_goid, trace_reason=TraceReason(st.trace_reason),
        existed_at_attach=bool(st.flags & FLAG_EXISTED_AT_ATTACH), status=st.status, wait_reason=st.waitreason,
        since_ns=st.last_ns, alloc_bytes=st.alloc_bytes,
        alloc_count=(st.alloc_count + allocs.COUNT_UNIT // 2) >> allocs.COUNT_SHIFT, alloc_samples=st.alloc_samples,
        app_trace_id=int.from_bytes(bytes(st.app_trace_id), "big"), app_span_id=int.from_bytes(bytes(st.app_span_id), "big"),
        app_flags=st.app_flags)


def _ended(rec: GoroutineRecord, now_ns: int, reason: EndReason) -> GoroutineRecord:
    rec.end_ns = now_ns
    rec.end_reason = reason
    return rec


class GoroutineProbes:
    """The probes of one traced process, from attach to close."""

    def __init__(self, support: RuntimeSupport, exe_path: str, pid: int, settings: ProbeSettings,
                 sdk: SdkSupport | None = None):
        self.support = support
        self.sdk = sdk if settings.app_traces else None  # the application's OpenTelemetry SDK, when followed
        self.labels = support.labels if settings.labels else None
        self._labels_of: dict[tuple[int, int], dict[str, str]] = {}  # labels sent ahead of their goroutine's end
        self.exe_path = exe_path
        self.pid = pid
        self.settings = settings
        self.probe_points: list[ProbePoint] = list(support.lifecycle_probes)
        if settings.states:
            self.probe_points += support.state_probes
        if settings.allocs is allocs.AllocMode.EXACT:
            self.probe_points += support.allocs.exact_probes
        elif settings.allocs is allocs.AllocMode.SAMPLED:
            self.probe_points += support.allocs.sampled_probes
        if self.sdk is not None:
            self.probe_points += self.sdk.probes
        self._bpf = None

    def attach(self, on_change: Callable[[int, int, StateChange], None], on_end: Callable[[GoroutineRecord], None],
               on_process_exit: Callable[[int], None], on_runtime_initialised: Callable[[], None] = lambda: None) -> None:
        try:
            from bcc import BPF
        except ImportError:
            raise AgentError("the bcc Python module is missing; run `make setup` (Debian package python3-bpfcc)") from None
        cflags = self.support.bpf_defines() + [
            f"-DMAX_EVENTS={self.settings.max_events if self.settings.states else 0}",
            f"-DMAX_GOROUTINES={self.settings.max_goroutines}",
            f"-DRINGBUF_PAGES={self.settings.ringbuf_pages}",
            f"-DTRACE_MAX_SPANS={self.settings.trace_max_spans}",
            f"-DSPAWNER_CHILDREN={self.settings.spawner_children}",
            f"-DSPAWNER_AGE_NS={int(self.settings.spawner_age_s * 1e9)}ULL",
            "-w",
        ]
        cflags += pid_namespace_defines()
        if self.settings.allocs is not allocs.AllocMode.OFF:
            cflags += allocs.bpf_defines() + self.support.allocs.bpf_defines(self.settings.allocs is allocs.AllocMode.SAMPLED)
        if self.sdk is not None:
            cflags += self.sdk.bpf_defines()
        if self.labels is not None:
            cflags += self.labels.bpf_defines()
        # bcc prints compiler chatter on stderr; keep it for the error message only.
        try:
            with _captured_stderr() as chatter:
                self._bpf = BPF(text=BPF_SOURCE.read_text(), cflags=cflags)
        except Exception as exc:
            detail = chatter.getvalue().strip().splitlines()
            raise AgentError(f"could not compile the eBPF program ({exc}); {detail[-1] if detail else 'are kernel headers installed? run `make setup`'}") from None
        self._bpf["traced"][ct.c_uint32(self.pid)] = ct.c_uint64(0)
        if self.settings.allocs is allocs.AllocMode.SAMPLED:
            weights = self._bpf["alloc_weights"]
            for i, hq in enumerate(allocs.weight_table()):
                weights[ct.c_int(i)] = ct.c_uint32(hq)
        self.attached_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # from here on, goroutines are seen
        try:
            for point in self.probe_points:
                self._bpf.attach_uprobe(name=self.exe_path, addr=point.address, fn_name=point.handler, pid=self.pid)
        except Exception as exc:
            self.close()
            raise AgentError(f"could not attach a uprobe to {self.exe_path} (PID {self.pid}): {exc}") from None

        def handle(_ctx, data, _size):
            header = ct.cast(data, ct.POINTER(_Header)).contents
            if header.kind == EV_TRANSITION:
                ev = ct.cast(data, ct.POINTER(_TransitionEvent)).contents
                on_change(ev.tgid, ev.goid, StateChange(ev.ts, ev.from_state, ev.to_state, ev.waitreason))
            elif header.kind == EV_END:
                ev = ct.cast(data, ct.POINTER(_EndEvent)).contents
                on_end(self._with_labels(_record(ev.goid, ev.tgid, ev.st, EndReason.EXITED)))
            elif header.kind == EV_LABELS:
                ev = ct.cast(data, ct.POINTER(_LabelsEvent)).contents
                self._labels_of[(ev.tgid, ev.goid)] = _labels(ev)
            elif header.kind == EV_PROCESS_EXIT:
                on_process_exit(header.tgid)
            elif header.kind == EV_RUNTIME_INITIALISED:
                on_runtime_initialised()

        self._bpf["events"].open_ring_buffer(handle)

    def poll(self, timeout_ms: int) -> None:
        self._bpf.ring_buffer_poll(timeout_ms)

    def drain(self) -> None:
        self._bpf.ring_buffer_consume()

    def remaining(self, now_ns: int, reason: EndReason) -> list[GoroutineRecord]:
        """Records still in the kernel map: goroutines alive now (ended at now_ns), and finished
        goroutines whose end record found the ring buffer full (with their real end time)."""
        return [self._with_labels(rec if rec.end_ns else _ended(rec, now_ns, reason))
                for rec in self.snapshot(now_ns, include_ended=True)]

    def _with_labels(self, rec: GoroutineRecord) -> GoroutineRecord:
        rec.labels = self._labels_of.pop((rec.pid, rec.goid), rec.labels)
        return rec

    def snapshot(self, now_ns: int, include_ended: bool = False) -> list[GoroutineRecord]:
        """The goroutines in the kernel map now, per-state times counted up to now_ns."""
        records = []
        for key, st in self._bpf["goroutines"].items():
            if key.tgid != self.pid or (st.end_ns and not include_ended):
                continue
            if not st.end_ns:
                st.state_ns[min(st.status, N_STATES - 1)] += max(0, now_ns - st.last_ns)
            records.append(_record(key.goid, key.tgid, st, EndReason.EXITED))
        return records

    def import_existing(self, goroutines: list[ExistingGoroutine], now_ns: int) -> int:
        """Put goroutines that predate the probes into the kernel map, as if created now, each
        starting a trace of its own. Goroutines the probes already saw are left alone."""
        from bcc.libbcc import lib  # bcc's Table has no insert-if-absent; the raw call takes flags

        table = self._bpf["goroutines"]
        imported = 0
        for g in goroutines:
            key = _GKey(self.pid, 0, g.goid)
            st = _GState(create_ns=now_ns, last_ns=now_ns, parent_goid=g.parent_goid, start_pc=g.start_pc,
                         go_pc=g.go_pc, status=g.status, root_goid=g.goid,
                         trace_reason=TraceReason.UNTRACED_PARENT, flags=FLAG_EXISTED_AT_ATTACH, waitreason=g.wait_reason)
            if lib.bpf_update_elem(table.map_fd, ct.byref(key), ct.byref(st), _BPF_NOEXIST) == 0:
                imported += 1
        return imported

    def forget(self, goids: list[int]) -> None:
        """Drop imported goroutines that turned out to have exited during the import."""
        table = self._bpf["goroutines"]
        for goid in goids:
            key = _GKey(self.pid, 0, goid)
            st = table.get(key)
            if st is not None and st.flags & FLAG_EXISTED_AT_ATTACH:
                del table[key]

    def schedule_latency_histogram(self) -> list[int]:
        """Counts of runnable-to-running waits by log2(ns) bucket (states detail only)."""
        table = self._bpf["sched_latency"]
        return [sum(table[ct.c_int(i)]) for i in range(len(table))]

    def start_function_counts(self) -> dict[int, tuple[int, int]]:
        """start pc -> (goroutines created, exited) since the probes were attached."""
        return {k.value: (v.created, v.exited) for k, v in self._bpf["by_start_pc"].items()}

    def allocs_elsewhere(self) -> list[allocs.AllocTotals]:
        """Heap allocations no goroutine span holds, by owner (allocs.ELSEWHERE): system stack, untracked goroutines."""
        if self.settings.allocs is allocs.AllocMode.OFF:
            return []
        table = self._bpf["allocs_elsewhere"]
        out = []
        for i in range(len(allocs.ELSEWHERE)):
            per_cpu = table[ct.c_int(i)]
            out.append(allocs.AllocTotals(sum(t.bytes for t in per_cpu),
                                          (sum(t.count for t in per_cpu) + allocs.COUNT_UNIT // 2) >> allocs.COUNT_SHIFT,
                                          sum(t.samples for t in per_cpu)))
        return out

    def exit_time(self) -> int | None:
        """Kernel time at which the traced process's first thread exited, if it has."""
        value = self._bpf["traced"].get(ct.c_uint32(self.pid))
        return value.value if value is not None and value.value else None

    def probe_ip(self) -> int | None:
        """The runtime address of the first creation-probe hit (for a PIE's load bias)."""
        table = self._bpf["probe_ips"]
        value = table.get(ct.c_uint32(self.pid))
        return value.value if value is not None else None

    def counters(self) -> dict[str, int]:
        values = self._bpf["counters"]
        return {name: sum(values[ct.c_int(i)]) for i, name in enumerate(COUNTER_NAMES)}

    def app_counters(self) -> dict[str, int]:
        """Application spans followed, goroutines put under them, pprof labels sent (and what was lost)."""
        values = self._bpf["app_counters"]
        return {name: sum(values[ct.c_int(i)]) for i, name in enumerate(APP_COUNTER_NAMES)}

    def close(self) -> None:
        if self._bpf is not None:
            with _captured_stderr():
                self._bpf.cleanup()
            self._bpf = None


@contextlib.contextmanager
def _captured_stderr():
    """Capture what C code (libbcc, clang) writes to fd 2."""
    buffer = io.StringIO()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buffer
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buffer.write(tmp.read().decode("utf-8", "replace"))
