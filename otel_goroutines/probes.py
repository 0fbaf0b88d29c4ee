"""The eBPF side: compile bpf/goroutines.bpf.c with bcc, attach it to one process, read what it sends.

What the kernel sends comes out of here as numpy arrays of the layouts in bpf/records.h (the
generated kernel_records): a KernelBatch per drain of the ring buffer, and the goroutine map read
in batches. The ring buffer is read by libbpf (inside libbcc) into a compiled RecordSink: no
Python runs per record. The rest of the agent never touches bcc.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import io
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import allocs
from ._ringsink import RecordSink
from .errors import AgentError
from .goruntime import ProbePoint, RuntimeSupport
from .gosdk import SdkSupport
from .kernel_records import (END_EVENT_DTYPE, GKEY_DTYPE, GSTATE_DTYPE, LABEL_KEY_MAX, LABEL_VALUE_MAX, LABELS_EVENT_DTYPE,
                             N_STATES, TRANSITION_EVENT_DTYPE, AppCounter, Counter, EventKind, GstateFlag, TraceReason)
from .records import take
from .target_memory import ExistingGoroutine

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
BPF_SOURCE = BPF_DIR / "goroutines.bpf.c"

# Names users see for the kernel's counters (summary, metrics), by enum counter / app_counter.
COUNTER_NAMES = {Counter.C_MAP_FULL: "goroutines_untracked_map_full", Counter.C_EVENTS_LOST: "state_events_lost_ringbuf",
                 Counter.C_END_DEFERRED: "ends_deferred_ringbuf", Counter.C_UNTRACKED_EXIT: "exits_of_untraced_goroutines",
                 Counter.C_READ_ERROR: "target_memory_read_errors", Counter.C_CREATED: "goroutines_created"}
APP_COUNTER_NAMES = {AppCounter.AC_SPANS_STARTED: "app_spans_started", AppCounter.AC_SPANS_ENDED: "app_spans_ended",
                     AppCounter.AC_SPANS_DROPPED_DEEP: "app_spans_forgotten_too_deep",
                     AppCounter.AC_STACKS_FULL: "app_spans_not_followed_map_full",
                     AppCounter.AC_UNKNOWN_SPAN_TYPE: "app_spans_of_unknown_type",
                     AppCounter.AC_GOROUTINES_JOINED: "goroutines_under_app_spans",
                     AppCounter.AC_LABELS_SENT: "goroutines_with_labels", AppCounter.AC_LABELS_LOST: "labels_lost_ringbuf"}
# Every ring-buffer record kind and its one size; the sink counts any other as malformed.
RECORD_SIZES = {EventKind.EV_TRANSITION: TRANSITION_EVENT_DTYPE.itemsize, EventKind.EV_END: END_EVENT_DTYPE.itemsize,
                EventKind.EV_LABELS: LABELS_EVENT_DTYPE.itemsize, EventKind.EV_PROCESS_EXIT: TRANSITION_EVENT_DTYPE.itemsize,
                EventKind.EV_RUNTIME_INITIALISED: TRANSITION_EVENT_DTYPE.itemsize}

_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39
_BPF_NOEXIST = 1
_MAP_BATCH = 4096  # entries per BPF_MAP_LOOKUP_BATCH call


@dataclass
class KernelBatch:
    """What one drain of the ring buffer gave."""
    ends: np.ndarray         # END_EVENT_DTYPE: goroutines that exited, with their whole state
    transitions: np.ndarray  # TRANSITION_EVENT_DTYPE: state changes, in the order they happened
    labels: dict[int, dict[str, str]] = field(default_factory=dict)  # goid -> pprof labels, sent ahead of its end
    process_exited: bool = False
    runtime_initialised: bool = False


def labels_of(ev: np.void) -> dict[str, str]:
    """A goroutine's pprof labels (the first 8); keys and values cut to the kernel's buffers end in "..."."""
    out = {}
    for label in ev["labels"][:min(int(ev["count"]), len(ev["labels"]))]:
        key_len, value_len = int(label["key_len"]), int(label["value_len"])
        key = label["key"][:min(key_len, LABEL_KEY_MAX)].tobytes().decode("utf-8", "replace")
        value = label["value"][:min(value_len, LABEL_VALUE_MAX)].tobytes().decode("utf-8", "replace")
        out[key + ("..." if key_len > LABEL_KEY_MAX else "")] = value + ("..." if value_len > LABEL_VALUE_MAX else "")
    return out


def read_map(map_fd: int, key_dtype: np.dtype, value_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every entry of a BPF hash map, a few thousand per system call (BPF_MAP_LOOKUP_BATCH). bcc's
    own batch reader shares one variable between the batch token and the count, and builds ctypes
    objects per entry."""
    from bcc.libbcc import lib

    keys, values = np.empty(_MAP_BATCH, key_dtype), np.empty(_MAP_BATCH, value_dtype)
    in_token, out_token, count = ct.c_uint32(), ct.c_uint32(), ct.c_uint32()
    got_keys, got_values, first = [], [], True
    while True:
        count.value = len(keys)
        res = lib.bpf_lookup_batch(map_fd, None if first else ct.byref(in_token), ct.byref(out_token),
                                   keys.ctypes.data, values.ctypes.data, ct.byref(count))
        err = ct.get_errno()
        got_keys.append(keys[:count.value].copy())
        got_values.append(values[:count.value].copy())
        if res != 0 and err == errno.ENOSPC:  # one hash bucket holds more than a batch: retry with more room
            keys, values = np.empty(2 * len(keys), key_dtype), np.empty(2 * len(values), value_dtype)
            continue
        if res != 0:
            if err != errno.ENOENT:
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            break
        in_token.value, first = out_token.value, False
    return np.concatenate(got_keys), np.concatenate(got_values)


def as_ends(tgid: np.ndarray, goid: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Map entries as end records (END_EVENT_DTYPE), the one shape the span flow reads."""
    ends = np.zeros(len(goid), END_EVENT_DTYPE)
    ends["kind"], ends["tgid"], ends["goid"], ends["st"] = EventKind.EV_END, tgid, goid, states
    return ends


@dataclass(frozen=True)
class ProbeSettings:
    states: bool = True            # probe casgstatus for state events and per-state times
    max_events: int = 64           # state events kept per goroutine; the rest are counted
    max_goroutines: int = 131072   # goroutines tracked at once
    ringbuf_pages: int = 2048      # 8 MiB
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


class GoroutineProbes:
    """The probes of one traced process, from attach to close."""

    def __init__(self, support: RuntimeSupport, exe_path: str, pid: int, settings: ProbeSettings,
                 sdk: SdkSupport | None = None):
        self.support = support
        self.sdk = sdk if settings.app_traces else None  # the application's OpenTelemetry SDK, when followed
        self.labels = support.labels if settings.labels else None
        self.exe_path = exe_path
        self.pid = pid
        self.settings = settings
        # With state events on, the casgstatus probe also sees creations and exits where the
        # runtime allows it (Go 1.24+): one trap fewer per goroutine and per end.
        self.states_cover_lifecycle = settings.states and support.states_cover_lifecycle
        self.probe_points: list[ProbePoint] = [] if self.states_cover_lifecycle else list(support.lifecycle_probes)
        if settings.states:
            self.probe_points += support.state_probes
        if settings.allocs is allocs.AllocMode.EXACT:
            self.probe_points += support.allocs.exact_probes
        elif settings.allocs is allocs.AllocMode.SAMPLED:
            self.probe_points += support.allocs.sampled_probes
        if self.sdk is not None:
            self.probe_points += self.sdk.probes
        self._bpf = None
        self._ring = None
        self._sink = RecordSink({int(kind): size for kind, size in RECORD_SIZES.items()})

    def _cflags(self) -> list[str]:
        cflags = self.support.bpf_defines() + [
            f"-I{BPF_DIR}",
            f"-DMAX_EVENTS={self.settings.max_events if self.settings.states else 0}",
            f"-DMAX_GOROUTINES={self.settings.max_goroutines}",
            f"-DRINGBUF_PAGES={self.settings.ringbuf_pages}",
            f"-DTRACE_MAX_SPANS={self.settings.trace_max_spans}",
            f"-DSPAWNER_CHILDREN={self.settings.spawner_children}",
            f"-DSPAWNER_AGE_NS={int(self.settings.spawner_age_s * 1e9)}ULL",
            "-w",
        ]
        if self.states_cover_lifecycle:
            cflags.append("-DSTATES_COVER_LIFECYCLE")
        cflags += pid_namespace_defines()
        if self.settings.allocs is not allocs.AllocMode.OFF:
            cflags += allocs.bpf_defines() + self.support.allocs.bpf_defines(self.settings.allocs is allocs.AllocMode.SAMPLED)
        if self.sdk is not None:
            cflags += self.sdk.bpf_defines()
        if self.labels is not None:
            cflags += self.labels.bpf_defines()
        return cflags

    def attach(self) -> None:
        try:
            from bcc import BPF
            from bcc.libbcc import _RINGBUF_CB_TYPE, lib
        except ImportError:
            raise AgentError("the bcc Python module is missing; run `make setup` (Debian package python3-bpfcc)") from None
        # bcc prints compiler chatter on stderr; keep it for the error message only.
        try:
            with _captured_stderr() as chatter:
                self._bpf = BPF(text=BPF_SOURCE.read_text(), cflags=self._cflags())
        except Exception as exc:
            detail = chatter.getvalue().strip().splitlines()
            raise AgentError(f"could not compile the eBPF program ({exc}); {detail[-1] if detail else 'are kernel headers installed? run `make setup`'}") from None
        release_compiler_memory()
        self._bpf["traced"][ct.c_uint32(self.pid)] = ct.c_uint64(0)
        if self.settings.allocs is allocs.AllocMode.SAMPLED:
            weights = self._bpf["alloc_weights"]
            for i, hq in enumerate(allocs.weight_table()):
                weights[ct.c_int(i)] = ct.c_uint32(hq)
        self._sample_fn = _RINGBUF_CB_TYPE(self._sink.callback_address())  # kept: libbpf calls it
        self._ring = lib.bpf_new_ringbuf(self._bpf["events"].map_fd, self._sample_fn, self._sink.context_address())
        if not self._ring:
            self.close()
            raise AgentError("could not open the eBPF ring buffer")
        try:
            for point in self.probe_points:
                self._bpf.attach_uprobe(name=self.exe_path, addr=point.address, fn_name=point.handler, pid=self.pid)
        except Exception as exc:
            self.close()
            raise AgentError(f"could not attach a uprobe to {self.exe_path} (PID {self.pid}): {exc}") from None
        self._attached = {point.address for point in self.probe_points}
        # From here on, with every probe in place, goroutines are seen (attaching them one by one
        # takes tens of milliseconds: a goroutine created meanwhile may have missed them).
        self.attached_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def poll(self, timeout_ms: int) -> KernelBatch:
        """Wait timeout_ms, or less if the ring buffer fills past half or the process ends, then take
        everything the ring buffer holds. Records come without a wake-up: the wait is a timer, and
        the consume after it is what reads them."""
        from bcc.libbcc import lib

        lib.bpf_poll_ringbuf(self._ring, timeout_ms)
        return self.drain()

    def drain(self) -> KernelBatch:
        """Everything the ring buffer holds now."""
        from bcc.libbcc import lib

        lib.bpf_consume_ringbuf(self._ring)
        take = lambda kind, dtype: np.frombuffer(self._sink.take(int(kind)), dtype)
        labels = take(EventKind.EV_LABELS, LABELS_EVENT_DTYPE)
        return KernelBatch(
            ends=take(EventKind.EV_END, END_EVENT_DTYPE),
            transitions=take(EventKind.EV_TRANSITION, TRANSITION_EVENT_DTYPE),
            labels={int(ev["goid"]): labels_of(ev) for ev in labels},
            process_exited=len(take(EventKind.EV_PROCESS_EXIT, TRANSITION_EVENT_DTYPE)) > 0,
            runtime_initialised=len(take(EventKind.EV_RUNTIME_INITIALISED, TRANSITION_EVENT_DTYPE)) > 0,
        )

    def _entries(self) -> np.ndarray:
        """This process's goroutines in the kernel map, as end records (end_ns 0 while alive)."""
        keys, states = read_map(self._bpf["goroutines"].map_fd, GKEY_DTYPE, GSTATE_DTYPE)
        mine = keys["tgid"] == self.pid
        return as_ends(keys["tgid"][mine], keys["goid"][mine], take(states, mine))

    def snapshot(self, now_ns: int, include_ended: bool = False) -> np.ndarray:
        """The goroutines in the kernel map now (END_EVENT_DTYPE), per-state times counted up to now_ns.
        With include_ended, also finished goroutines whose end record found the ring buffer full."""
        entries = self._entries()
        st = entries["st"]
        alive = st["end_ns"] == 0
        rows = np.flatnonzero(alive)
        status = np.minimum(st["status"][rows], N_STATES - 1)
        st["state_ns"][rows, status] += np.maximum(np.int64(now_ns) - st["last_ns"][rows].astype(np.int64), 0).astype(np.uint64)
        return entries if include_ended else take(entries, alive)

    def import_existing(self, goroutines: list[ExistingGoroutine], now_ns: int) -> int:
        """Put goroutines that predate the probes into the kernel map, as if created now, each
        starting a trace of its own. Goroutines the probes already saw are left alone."""
        from bcc.libbcc import lib  # bcc's Table has no insert-if-absent; the raw call takes flags

        fd = self._bpf["goroutines"].map_fd
        key, st = np.zeros(1, GKEY_DTYPE), np.zeros(1, GSTATE_DTYPE)
        imported = 0
        for g in goroutines:
            key[0] = (self.pid, 0, g.goid)
            st[0] = 0
            for name, value in (("create_ns", now_ns), ("last_ns", now_ns), ("parent_goid", g.parent_goid),
                                ("start_pc", g.start_pc), ("go_pc", g.go_pc), ("status", g.status), ("root_goid", g.goid),
                                ("trace_reason", TraceReason.TR_UNTRACED_PARENT),
                                ("flags", GstateFlag.FLAG_EXISTED_AT_ATTACH), ("waitreason", g.wait_reason)):
                st[0][name] = value
            if lib.bpf_update_elem(fd, key.ctypes.data, st.ctypes.data, _BPF_NOEXIST) == 0:
                imported += 1
        return imported

    def delete(self, goids: np.ndarray) -> None:
        """Drop goroutines from the kernel map (ended ones whose records were taken from it)."""
        from bcc.libbcc import lib

        fd = self._bpf["goroutines"].map_fd
        key = np.zeros(1, GKEY_DTYPE)
        for goid in goids.tolist():
            key[0] = (self.pid, 0, goid)
            lib.bpf_delete_elem(fd, key.ctypes.data)

    def forget(self, goids: list[int]) -> None:
        """Drop imported goroutines that turned out to have exited during the import."""
        from bcc.libbcc import lib

        fd = self._bpf["goroutines"].map_fd
        key, st = np.zeros(1, GKEY_DTYPE), np.zeros(1, GSTATE_DTYPE)
        for goid in goids:
            key[0] = (self.pid, 0, goid)
            if lib.bpf_lookup_elem(fd, key.ctypes.data, st.ctypes.data) == 0 and \
                    st[0]["flags"] & GstateFlag.FLAG_EXISTED_AT_ATTACH:
                lib.bpf_delete_elem(fd, key.ctypes.data)

    def schedule_latency_histogram(self) -> list[int]:
        """Counts of runnable-to-running waits by log2(ns) bucket (states detail only)."""
        table = self._bpf["sched_latency"]
        return [sum(table[ct.c_int(i)]) for i in range(len(table))]

    def allocs_elsewhere(self) -> list[allocs.AllocTotals]:
        """Heap allocations no goroutine span holds, by owner (allocs.ELSEWHERE): system stack, untracked goroutines."""
        if self.settings.allocs is allocs.AllocMode.OFF:
            return []
        table = self._bpf["allocs_elsewhere"]
        out = []
        for i in range(len(allocs.ELSEWHERE)):
            per_cpu = table[ct.c_int(i)]
            out.append(allocs.AllocTotals(sum(t.bytes for t in per_cpu),
                                          allocs.whole_allocations(sum(t.count for t in per_cpu)),
                                          sum(t.samples for t in per_cpu)))
        return out

    def exit_time(self) -> int | None:
        """Kernel time at which the traced process's first thread exited, if it has."""
        value = self._bpf["traced"].get(ct.c_uint32(self.pid))
        return value.value if value is not None and value.value else None

    def probe_ip(self) -> int | None:
        """The runtime address of the first creation-probe hit (for a PIE's load bias)."""
        value = self._bpf["probe_ip"][ct.c_int(0)].value
        return value or None

    def counters(self) -> dict[str, int]:
        """The kernel's counters, plus what the ring-buffer reader itself could not keep."""
        values = self._bpf["counters"]
        out = {name: sum(values[ct.c_int(i)]) for i, name in COUNTER_NAMES.items()}
        out["records_malformed"] = self._sink.malformed
        out["records_dropped_no_memory"] = self._sink.no_memory
        return out

    def app_counters(self) -> dict[str, int]:
        """Application spans followed, goroutines put under them, pprof labels sent (and what was lost)."""
        values = self._bpf["app_counters"]
        return {name: sum(values[ct.c_int(i)]) for i, name in APP_COUNTER_NAMES.items()}

    # --- switching probes off and on: the overhead budget (shedding.py decides when) -------------
    def switch(self, handler: str, on: bool) -> None:
        """Attach (on) or detach the lifecycle or state probe points that run `handler` in this process;
        points already so are left alone. A few milliseconds of the agent's time a point."""
        for point in self.support.lifecycle_probes + self.support.state_probes:
            if point.handler != handler or (point.address in self._attached) == on:
                continue
            if on:
                self._bpf.attach_uprobe(name=self.exe_path, addr=point.address, fn_name=point.handler, pid=self.pid)
                self._attached.add(point.address)
            else:
                self._bpf.detach_uprobe(name=self.exe_path, addr=point.address, pid=self.pid)
                self._attached.discard(point.address)

    def handler_runs(self, handlers: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        """handler -> (runs, run time in ns) as the kernel counts them while its bpf_stats are on
        (enable_run_stats); (0, 0) for a handler never attached."""
        out = {}
        for handler in handlers:
            fn = self._bpf.funcs.get(handler.encode())
            out[handler] = _run_stats(fn.fd) if fn is not None else (0, 0)
        return out

    def trap_cost_ns(self, calls: int = 2000, rounds: int = 5) -> float:
        """What one uprobe hit costs here beyond its handler: the trap and an empty BPF run, measured on
        a site in this process whose first instruction the kernel emulates (as it does the agent's probe
        points), timed without and then with a probe on it (medians of rounds)."""
        from . import _trapsite

        site = {"name": _trapsite.__file__, "sym": "og_trap_site", "pid": os.getpid()}
        bare = statistics.median(_trapsite.calls(calls) for _ in range(rounds))
        self._bpf.attach_uprobe(fn_name="on_calibrate", **site)
        try:
            probed = statistics.median(_trapsite.calls(calls) for _ in range(rounds))
        finally:
            self._bpf.detach_uprobe(**site)
        return max(probed - bare, 0.0)

    def close(self) -> None:
        if self._ring:
            from bcc.libbcc import lib

            lib.bpf_free_ringbuf(self._ring)
            self._ring = None
        if self._bpf is not None:
            with _captured_stderr():
                self._bpf.cleanup()
            self._bpf = None


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_ENABLE_STATS = 32


def enable_run_stats() -> int:
    """Turn on the kernel's run count and run time of every BPF program while the returned fd is open
    (BPF_ENABLE_STATS: about 20 ns a run, for every program on the machine)."""
    libc = ct.CDLL(None, use_errno=True)
    attr = (ct.c_uint32 * 32)()  # union bpf_attr, enable_stats.type = BPF_STATS_RUN_TIME (0)
    fd = libc.syscall(ct.c_long(_SYS_BPF[platform.machine()]), ct.c_int(_BPF_ENABLE_STATS), attr, ct.c_uint(ct.sizeof(attr)))
    if fd < 0:
        err = ct.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    return fd


def _run_stats(prog_fd: int) -> tuple[int, int]:
    """(runs, run time in ns) of a BPF program, from its fdinfo."""
    with open(f"/proc/self/fdinfo/{prog_fd}") as info:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in info if ":\t" in line)
    return int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0))


_MADV_PAGEOUT = 21
_COMPILER_LIBRARIES = ("libLLVM", "libclang")


def release_compiler_memory() -> None:
    """bcc compiles with clang and LLVM inside the agent: ~80 MB of their code is paged in for a
    compile that is over once the program is loaded, and ~30 MB of freed heap stays with the
    process. Give both back (the next compile, in `watch`, pages the code in again)."""
    libc = ct.CDLL(None, use_errno=True)
    libc.malloc_trim(0)
    libc.madvise.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int]
    try:
        with open("/proc/self/maps") as maps:
            regions = [line.split() for line in maps]
    except OSError:
        return
    for fields in regions:
        if len(fields) >= 6 and any(lib in fields[5] for lib in _COMPILER_LIBRARIES):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            libc.madvise(start, end - start, _MADV_PAGEOUT)  # best effort: a refusal only leaves them resident


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
