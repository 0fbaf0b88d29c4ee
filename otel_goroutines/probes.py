"""The eBPF side: compile bpf/goroutines.bpf.c with bcc once per agent (BpfProgram), attach it to
each traced process (GoroutineProbes: its uprobes and its row of the per-process config map), read
what it sends.

What the kernel sends comes out of here as numpy arrays of the layouts in bpf/records.h (the
generated kernel_records): a KernelBatch per drain of the ring buffer, and the goroutine map read
in batches. The ring buffer is read by libbpf (inside libbcc) into a compiled RecordSink: no
Python runs per record. The rest of the agent never touches bcc.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import dataclasses
import errno
import io
import os
import platform
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import allocs
from ._ringsink import RecordSink
from .errors import AgentError, UnsupportedTarget
from .goruntime import LabelSupport, ProbePoint, RuntimeSupport
from .gosdk import GO_ABI_DEFINES, SdkSupport
from .kernel_records import (END_EVENT_DTYPE, G_WINDOW, GKEY_DTYPE, GSTATE_DTYPE, LABEL_KEY_MAX, LABEL_VALUE_MAX, LABELS_EVENT_DTYPE,
                             N_STATES, PROC_CONFIG_DTYPE, SCHED_BUCKETS, TRANSITION_EVENT_DTYPE, AppCounter, Counter, EventKind,
                             GstateFlag, ProcFlag, TraceReason)
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
# Every ring-buffer record kind and its one layout; the sink counts any other size as malformed.
RECORD_DTYPES = {EventKind.EV_TRANSITION: TRANSITION_EVENT_DTYPE, EventKind.EV_END: END_EVENT_DTYPE,
                 EventKind.EV_LABELS: LABELS_EVENT_DTYPE, EventKind.EV_PROCESS_EXIT: TRANSITION_EVENT_DTYPE,
                 EventKind.EV_RUNTIME_INITIALISED: TRANSITION_EVENT_DTYPE}

# The uprobe handlers of bpf/goroutines.bpf.c (ProbePoint.handler names one): always compiled, and
# those of each optional feature (compiled in when the agent may use it).
CREATE_HANDLER, EXIT_HANDLER, STATE_HANDLER = "on_goroutine_created", "on_goroutine_exit", "on_casgstatus"
LIFECYCLE_HANDLERS = (CREATE_HANDLER, EXIT_HANDLER)
HANDLERS = LIFECYCLE_HANDLERS + (STATE_HANDLER,)
APP_SPAN_HANDLERS = ("on_app_span_start", "on_app_span_start_ret", "on_app_span_end")
ALLOC_HANDLERS = ("on_mallocgc", "on_malloc_specialized", "on_profilealloc", "on_runtime_initialised")
BUDGET_HANDLERS = ("on_calibrate",)
# Counted by the overhead budget beside the lifecycle and state handlers, never shed: each runs
# once per application span or heap sample (--allocs exact is refused with a budget).
OTHER_COUNTED_HANDLERS = (*APP_SPAN_HANDLERS, "on_mallocgc", "on_malloc_specialized", "on_profilealloc")
OTHER_HANDLERS = "other"  # their hits' key in GoroutineProbes.hits()

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
    labels_left_out: int = 0  # labels goroutines had beyond those the kernel sent (the first 8)


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
    max_goroutines: int = 131072   # goroutines tracked at once (all traced processes together)
    ringbuf_pages: int = 2048      # 8 MiB
    trace_max_spans: int = 1000    # goroutines per trace before a new one starts
    spawner_children: int = 16     # a creator with more children than this is a spawner...
    spawner_age_s: float = 1.0     # ...and so is one older than this: their children start traces
    allocs: allocs.AllocMode = allocs.AllocMode.OFF  # heap allocations per goroutine: exact, sampled or off
    app_traces: bool = True        # follow the application's OpenTelemetry SDK spans (when the target has the SDK)
    labels: bool = True            # send the runtime/pprof labels of ended goroutines
    wakers: bool = True            # with states: who woke each goroutine (wakes.py)
    max_processes: int = 256       # processes traced at once by one agent (rows of the per-process kernel counters)
    budget: bool = False           # --max-overhead: handler hits counted per process, the trap calibration handler
    placement: str = "cheap"       # where probes go: goruntime.PROBE_PLACEMENTS (--probe-placement, hidden, for the bench)


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


# The g fields each read of a g takes: a state change the low ones, a creation all of them.
_G_LO_FIELDS = ("atomicstatus", "goid", "waitreason")
_G_FIELD_SIZES = {"atomicstatus": 4, "goid": 8, "waitreason": 1, "gopc": 8, "startpc": 8, "parentGoid": 8}


def process_config(support: RuntimeSupport, sdk: SdkSupport | None, labels: LabelSupport | None,
                   states_cover_lifecycle: bool) -> np.ndarray:
    """What the probes need to know about a process of this binary (PROC_CONFIG_DTYPE, its slot
    left 0): the g window and its fields, the flags, the SDK and allocation layouts."""
    offsets = {name[2:]: value for name, value in support.offsets.items() if name.startswith("g_")}
    start = min(offsets[f] for f in _G_LO_FIELDS)
    span = lambda fields: max(offsets[f] + _G_FIELD_SIZES[f] for f in fields if f in offsets) - start
    lo_size, all_size = span(_G_LO_FIELDS), span(_G_FIELD_SIZES)
    if start > min(offsets[f] for f in _G_FIELD_SIZES if f in offsets) or all_size > G_WINDOW - 8:
        raise UnsupportedTarget(f"the runtime.g fields the probes read ({offsets}) span more than {G_WINDOW - 8} bytes "
                                "from goid, status and waitreason: this runtime's layout is not supported")
    cfg = np.zeros(1, PROC_CONFIG_DTYPE)[0]
    cfg["g_start"], cfg["g_lo_size"], cfg["g_all_size"] = start, lo_size, all_size
    for g_field, name in (("goid", "g_goid"), ("atomicstatus", "g_status"), ("waitreason", "g_waitreason"),
                          ("gopc", "g_gopc"), ("startpc", "g_startpc"), ("parentGoid", "g_parentgoid")):
        cfg[name] = offsets.get(g_field, start) - start
    cfg["off_g_goid"], cfg["off_g_m"], cfg["off_m_curg"] = offsets["goid"], offsets["m"], support.offsets["m_curg"]
    flags = ProcFlag.CFG_PARENT_GOID if "parentGoid" in offsets else 0
    if states_cover_lifecycle:
        flags |= ProcFlag.CFG_STATES_COVER_LIFECYCLE
    if sdk is not None:
        flags |= ProcFlag.CFG_APP_SPANS
        for name, value in sdk.offsets.items():
            cfg[name.lower()] = value
    if labels is not None:
        flags |= ProcFlag.CFG_LABELS_MAP if labels.layout == "map" else ProcFlag.CFG_LABELS_SLICE
        cfg["off_g_labels"] = labels.offset
    if support.allocs is not None:
        cfg["specialized_malloc_max"] = support.allocs.specialized_max
        if support.allocs.mem_profile_rate is not None:
            flags |= ProcFlag.CFG_MEMPROFILERATE
            cfg["memprofilerate_addr"] = support.allocs.mem_profile_rate
            cfg["profilealloc_probe_addr"] = next(p for p in support.allocs.sampled_probes if p.handler == "on_profilealloc").address
    cfg["flags"] = flags
    return cfg


def queue_by_process(queues: dict[int, dict[EventKind, list[np.ndarray]]], kind: EventKind, records: np.ndarray) -> None:
    """Append each traced process's records of one kind to its queue, in their order; the records
    of a process no longer traced (its last ones, after its detach) go with it."""
    if not len(records):
        return
    tgids = records["tgid"]
    for tgid in np.unique(tgids).tolist():
        queue = queues.get(tgid)
        if queue is not None:
            mine = tgids == tgid
            queue.setdefault(kind, []).append(records if mine.all() else records[mine])


class BpfProgram:
    """The agent's one compiled BPF program: the probes of every traced process run its handlers,
    each process's facts are a row of its proc_configs map, and one ring buffer carries every
    process's records (each says its tgid; drains route them to each process's queue)."""

    def __init__(self, settings: ProbeSettings):
        self.settings = settings
        self._bpf = None
        self._ring = None
        self._sink = RecordSink({int(kind): dtype.itemsize for kind, dtype in RECORD_DTYPES.items()})
        self._free_slots = list(range(settings.max_processes - 1, -1, -1))
        self._queued: dict[int, dict[EventKind, list[np.ndarray]]] = {}  # tgid -> records not yet taken
        self._trap_ns: float | None = None

    def cflags(self) -> list[str]:
        s = self.settings
        features = [f"-DFEATURE_{name}" for name, on in (("APP_SPANS", s.app_traces), ("LABELS", s.labels),
                                                         ("ALLOCS", s.allocs is not allocs.AllocMode.OFF),
                                                         ("BUDGET", s.budget)) if on]
        return [f"-I{BPF_DIR}", f"-DMAX_EVENTS={s.max_events if s.states else 0}", f"-DMAX_GOROUTINES={s.max_goroutines}",
                f"-DMAX_PROCESSES={s.max_processes}", f"-DRINGBUF_PAGES={s.ringbuf_pages}",
                f"-DTRACE_MAX_SPANS={s.trace_max_spans}", f"-DSPAWNER_CHILDREN={s.spawner_children}",
                f"-DSPAWNER_AGE_NS={int(s.spawner_age_s * 1e9)}ULL", "-w"] + \
            features + (["-DWAKERS"] if s.states and s.wakers else []) + pid_namespace_defines() + allocs.bpf_defines() + \
            GO_ABI_DEFINES

    def handlers(self) -> tuple[str, ...]:
        """The handlers this program has: those of the features it was compiled with."""
        s = self.settings
        return HANDLERS + (APP_SPAN_HANDLERS if s.app_traces else ()) + \
            (ALLOC_HANDLERS if s.allocs is not allocs.AllocMode.OFF else ()) + (BUDGET_HANDLERS if s.budget else ())

    @property
    def loaded(self) -> bool:
        return self._bpf is not None

    def load(self) -> None:
        """Compile and load the program, open its ring buffer (once: later calls do nothing)."""
        if self._bpf is not None:
            return
        try:
            from bcc import BPF
            from bcc.libbcc import _RINGBUF_CB_TYPE, lib
        except ImportError:
            raise AgentError("the bcc Python module is missing; run `make setup` (Debian package python3-bpfcc)") from None
        # bcc prints compiler chatter on stderr; keep it for the error message only.
        try:
            with _captured_stderr() as chatter:
                self._bpf = BPF(text=BPF_SOURCE.read_text(), cflags=self.cflags())
        except Exception as exc:
            detail = chatter.getvalue().strip().splitlines()
            raise AgentError(f"could not compile the eBPF program ({exc}); {detail[-1] if detail else 'are kernel headers installed? run `make setup`'}") from None
        try:  # every handler verified and loaded now: a process's attach then only opens its uprobes
            with _captured_stderr() as chatter:
                for handler in self.handlers():
                    self._bpf.load_func(handler, BPF.KPROBE)
        except Exception as exc:
            detail = chatter.getvalue().strip().splitlines()
            self.close()
            raise AgentError(f"the kernel refused the eBPF program ({exc}){': ' + detail[-1] if detail else ''}") from None
        release_compiler_memory()
        if self.settings.allocs is not allocs.AllocMode.OFF:
            weights = self._bpf["alloc_weights"]
            for i, hq in enumerate(allocs.weight_table()):
                weights[ct.c_int(i)] = ct.c_uint32(hq)
        self._sample_fn = _RINGBUF_CB_TYPE(self._sink.callback_address())  # kept: libbpf calls it
        self._ring = lib.bpf_new_ringbuf(self._bpf["events"].map_fd, self._sample_fn, self._sink.context_address())
        if not self._ring:
            self.close()
            raise AgentError("could not open the eBPF ring buffer")

    def __getitem__(self, name: str):
        return self._bpf[name]

    def handler_fds(self) -> dict[str, int]:
        """Loaded handlers by name -> their program fd (for the kernel's per-program statistics)."""
        return {name.decode(): fn.fd for name, fn in self._bpf.funcs.items()}

    def handler_runs(self, handlers: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        """handler -> (runs, run time in ns) as the kernel counts them while its bpf_stats are on
        (enable_run_stats): every process this program traces together, (0, 0) for one not loaded."""
        fds = self.handler_fds()
        return {handler: run_stats(fds[handler]) if handler in fds else (0, 0) for handler in handlers}

    def trap_cost_ns(self, calls: int = 2000, rounds: int = 5) -> float:
        """What one uprobe hit costs here beyond its handler: the trap and an empty BPF run (on_calibrate,
        a program built for a budget), measured once per agent on a site in this process whose first
        instruction the kernel emulates (as it does the agent's probe points), timed without and then
        with a probe on it (medians of rounds)."""
        if self._trap_ns is None:
            from . import _trapsite

            site = {"name": _trapsite.__file__, "sym": "og_trap_site", "pid": os.getpid()}
            bare = statistics.median(_trapsite.calls(calls) for _ in range(rounds))
            self._bpf.attach_uprobe(fn_name="on_calibrate", **site)
            try:
                probed = statistics.median(_trapsite.calls(calls) for _ in range(rounds))
            finally:
                self._bpf.detach_uprobe(**site)
            self._trap_ns = max(probed - bare, 0.0)
        return self._trap_ns

    # --- processes -----------------------------------------------------------------------
    def add_process(self, pid: int, config: np.void) -> int:
        """Give PID its rows of the per-process counters (zeroed) and its config; its slot."""
        if not self._free_slots:
            raise AgentError(f"already tracing {self.settings.max_processes} processes, the most one agent traces at once")
        slot = self._free_slots.pop()
        rows = [("counters", Counter.N_COUNTERS), ("app_counters", AppCounter.N_APP_COUNTERS), ("sched_latency", SCHED_BUCKETS + 1)]
        if self.settings.allocs is not allocs.AllocMode.OFF:
            rows.append(("allocs_elsewhere", len(allocs.ELSEWHERE)))
        for name, per_slot in rows:
            table = self._bpf[name]
            zero = table.Leaf()  # per-CPU: bcc's Leaf is the array of every CPU's value
            for row in range(slot * per_slot, (slot + 1) * per_slot):
                table[ct.c_int(row)] = zero
        config = config.copy()
        config["slot"] = slot
        self._update("proc_configs", pid, config)
        self._bpf["traced"][ct.c_uint32(pid)] = ct.c_uint64(0)
        self._queued[pid] = {}
        return slot

    def remove_process(self, pid: int, slot: int) -> None:
        """Forget PID: its config, its goroutines and application spans left in the maps, its queued records."""
        from bcc.libbcc import lib

        for name in ("proc_configs", "traced"):
            key = ct.c_uint32(pid)
            lib.bpf_delete_elem(self._bpf[name].map_fd, ct.byref(key))
        for name in ["goroutines"] + (["app_stacks"] if self.settings.app_traces else []):  # maps keyed by (tgid, goid)
            table = self._bpf[name]
            keys, _ = read_map(table.map_fd, GKEY_DTYPE, np.dtype((np.void, ct.sizeof(table.Leaf))))
            for key in keys[keys["tgid"] == pid]:
                lib.bpf_delete_elem(table.map_fd, np.array(key).ctypes.data)
        self._queued.pop(pid, None)
        self._free_slots.append(slot)

    def config(self, pid: int) -> np.void | None:
        from bcc.libbcc import lib

        key, value = ct.c_uint32(pid), np.zeros(1, PROC_CONFIG_DTYPE)
        if lib.bpf_lookup_elem(self._bpf["proc_configs"].map_fd, ct.byref(key), value.ctypes.data) != 0:
            return None
        return value[0]

    def set_flag(self, pid: int, flag: int, on: bool) -> None:
        """Set or clear one flag of PID's config in the kernel (the rest as the kernel has it: probe_ip).
        A hit in flight while it changes (nanoseconds) reads the old or the new value."""
        config = self.config(pid)
        if config is None:
            raise AgentError(f"PID {pid} is not registered with the eBPF program")
        config["flags"] = (int(config["flags"]) | flag) if on else (int(config["flags"]) & ~flag)
        self._update("proc_configs", pid, config)

    def _update(self, name: str, pid: int, config: np.void) -> None:
        from bcc.libbcc import lib

        key, value = ct.c_uint32(pid), np.array([config], PROC_CONFIG_DTYPE)
        if lib.bpf_update_elem(self._bpf[name].map_fd, ct.byref(key), value.ctypes.data, 0) != 0:
            raise AgentError(f"could not register PID {pid} with the eBPF program: {os.strerror(ct.get_errno())}")

    def attach_uprobe(self, exe_path: str, point: ProbePoint, pid: int) -> None:
        self._bpf.attach_uprobe(name=exe_path, addr=point.address, fn_name=point.handler, pid=pid)

    def detach_uprobe(self, exe_path: str, point: ProbePoint, pid: int) -> None:
        self._bpf.detach_uprobe(name=exe_path, addr=point.address, pid=pid)

    # --- records -------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> None:
        """Wait timeout_ms, or less if the ring buffer fills past half or a process ends, then queue
        everything it holds. Records come without a wake-up: the wait is a timer, and the consume
        after it is what reads them."""
        from bcc.libbcc import lib

        lib.bpf_poll_ringbuf(self._ring, timeout_ms)
        self.drain()

    def drain(self) -> None:
        """Queue everything the ring buffer holds now, by process."""
        from bcc.libbcc import lib

        lib.bpf_consume_ringbuf(self._ring)
        for kind, dtype in RECORD_DTYPES.items():
            queue_by_process(self._queued, kind, np.frombuffer(self._sink.take(int(kind)), dtype))

    def take(self, pid: int) -> KernelBatch:
        """PID's records queued so far."""
        queue = self._queued.get(pid, {})
        got = {kind: np.concatenate(queue.pop(kind, [])) if kind in queue else np.empty(0, dtype)
               for kind, dtype in RECORD_DTYPES.items()}
        labels = got[EventKind.EV_LABELS]
        return KernelBatch(
            ends=got[EventKind.EV_END],
            transitions=got[EventKind.EV_TRANSITION],
            labels={int(ev["goid"]): labels_of(ev) for ev in labels},
            labels_left_out=int(labels["total"].sum(dtype=np.int64) - labels["count"].sum(dtype=np.int64)),
            process_exited=len(got[EventKind.EV_PROCESS_EXIT]) > 0,
            runtime_initialised=len(got[EventKind.EV_RUNTIME_INITIALISED]) > 0,
        )

    def reader_losses(self) -> dict[str, int]:
        """What the ring-buffer reader itself could not keep (every process's records together)."""
        return {"records_malformed": self._sink.malformed, "records_dropped_no_memory": self._sink.no_memory}

    def close(self) -> None:
        if self._ring:
            from bcc.libbcc import lib

            lib.bpf_free_ringbuf(self._ring)
            self._ring = None
        if self._bpf is not None:
            with _signals_deferred(), _captured_stderr():
                self._bpf.cleanup()
            self._bpf = None


# Probe groups a process's probes come in; each can be attached and detached on its own.
LIFECYCLE, STATES, ALLOCS, APP_SPANS = "lifecycle", "states", "allocs", "app_spans"


class GoroutineProbes:
    """The probes of one traced process, from attach to close, on the agent's BpfProgram (its own
    one when none is given: `run` and `attach`)."""

    def __init__(self, support: RuntimeSupport, exe_path: str, pid: int, settings: ProbeSettings,
                 sdk: SdkSupport | None = None, program: BpfProgram | None = None):
        self.support = support
        self.sdk = sdk if settings.app_traces else None  # the application's OpenTelemetry SDK, when followed
        self.labels = support.labels if settings.labels else None
        self.exe_path = exe_path
        self.pid = pid
        self.settings = settings
        # With state events on, the casgstatus probe also sees creations and exits where the
        # runtime allows it (Go 1.24+): one trap fewer per goroutine and per end.
        self.states_cover_lifecycle = settings.states and support.states_cover_lifecycle
        self.groups: dict[str, tuple[ProbePoint, ...]] = {}
        if not self.states_cover_lifecycle:
            self.groups[LIFECYCLE] = support.lifecycle_probes
        if settings.states:
            self.groups[STATES] = support.state_probes
        if settings.allocs is allocs.AllocMode.EXACT:
            self.groups[ALLOCS] = support.allocs.exact_probes
        elif settings.allocs is allocs.AllocMode.SAMPLED:
            self.groups[ALLOCS] = support.allocs.sampled_probes
        if self.sdk is not None:
            self.groups[APP_SPANS] = self.sdk.probes
        self.probe_points: list[ProbePoint] = [p for points in self.groups.values() for p in points]
        self.config = process_config(support, self.sdk, self.labels, self.states_cover_lifecycle)
        self._own_program = program is None
        # Its own program (`run`, `attach`) leaves out the code of what this binary cannot use.
        self.program = program if program is not None else \
            BpfProgram(dataclasses.replace(settings, app_traces=self.sdk is not None, labels=self.labels is not None))
        self.attached_groups: set[str] = set()
        self._points_on: set[ProbePoint] = set()  # attached now (the budget switches lifecycle points by handler)
        self._slot: int | None = None
        self._labels_left_out = 0  # labels goroutines had beyond those the kernel sent (the first 8)

    def attach(self) -> None:
        """Register the process with the program (loading it first if need be) and attach every group."""
        self.program.load()
        self._slot = self.program.add_process(self.pid, self.config)
        for group in self.groups:
            self.attach_group(group)
        # From here on, with every probe in place, goroutines are seen (attaching them one by one
        # takes tens of milliseconds: a goroutine created meanwhile may have missed them).
        self.attached_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def attach_group(self, group: str) -> None:
        """Attach one probe group (LIFECYCLE, STATES, ALLOCS, APP_SPANS) to this process."""
        self._attach_points(self.groups[group])
        self.attached_groups.add(group)

    def _attach_points(self, points) -> None:
        """Attach those of the points not attached yet."""
        try:
            for point in points:
                if point not in self._points_on:
                    self.program.attach_uprobe(self.exe_path, point, self.pid)
                    self._points_on.add(point)
        except Exception as exc:
            self.close()
            raise AgentError(f"could not attach a uprobe to {self.exe_path} (PID {self.pid}): {exc}") from None

    def detach_group(self, group: str) -> None:
        """Detach one probe group from this process (the others keep running)."""
        self.attached_groups.discard(group)
        self._detach_points(self.groups[group])

    def _detach_points(self, points) -> None:
        """Detach those of the points that are attached."""
        for point in points:
            if point in self._points_on:
                self._points_on.discard(point)
                with contextlib.suppress(Exception), _signals_deferred(), _captured_stderr():
                    self.program.detach_uprobe(self.exe_path, point, self.pid)

    def poll(self, timeout_ms: int) -> KernelBatch:
        """Wait timeout_ms (less if the ring buffer fills or a process ends), then take this process's records."""
        self.program.poll(timeout_ms)
        return self._take()

    def drain(self) -> KernelBatch:
        """This process's records the ring buffer holds now."""
        self.program.drain()
        return self._take()

    def _take(self) -> KernelBatch:
        batch = self.program.take(self.pid)
        self._labels_left_out += batch.labels_left_out
        return batch

    def _entries(self) -> np.ndarray:
        """This process's goroutines in the kernel map, as end records (end_ns 0 while alive)."""
        keys, states = read_map(self.program["goroutines"].map_fd, GKEY_DTYPE, GSTATE_DTYPE)
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

        fd = self.program["goroutines"].map_fd
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

        fd = self.program["goroutines"].map_fd
        key = np.zeros(1, GKEY_DTYPE)
        for goid in goids.tolist():
            key[0] = (self.pid, 0, goid)
            lib.bpf_delete_elem(fd, key.ctypes.data)

    def forget(self, goids: list[int]) -> None:
        """Drop imported goroutines that turned out to have exited during the import."""
        from bcc.libbcc import lib

        fd = self.program["goroutines"].map_fd
        key, st = np.zeros(1, GKEY_DTYPE), np.zeros(1, GSTATE_DTYPE)
        for goid in goids:
            key[0] = (self.pid, 0, goid)
            if lib.bpf_lookup_elem(fd, key.ctypes.data, st.ctypes.data) == 0 and \
                    st[0]["flags"] & GstateFlag.FLAG_EXISTED_AT_ATTACH:
                lib.bpf_delete_elem(fd, key.ctypes.data)

    def _rows(self, table: str, per_slot: int) -> list:
        """This process's rows of a per-process, per-CPU kernel array: each row, every CPU's values."""
        values = self.program[table]
        return [values[ct.c_int(row)] for row in range(self._slot * per_slot, (self._slot + 1) * per_slot)]

    def schedule_latency_histogram(self) -> list[int]:
        """Counts of runnable-to-running waits by log2(ns) bucket (states detail only)."""
        return [sum(row) for row in self._rows("sched_latency", SCHED_BUCKETS + 1)]

    def allocs_elsewhere(self) -> list[allocs.AllocTotals]:
        """Heap allocations no goroutine span holds, by owner (allocs.ELSEWHERE): system stack, untracked goroutines."""
        if self.settings.allocs is allocs.AllocMode.OFF:
            return []
        out = []
        for per_cpu in self._rows("allocs_elsewhere", len(allocs.ELSEWHERE)):
            out.append(allocs.AllocTotals(sum(t.bytes for t in per_cpu),
                                          allocs.whole_allocations(sum(t.count for t in per_cpu)),
                                          sum(t.samples for t in per_cpu)))
        return out

    def exit_time(self) -> int | None:
        """Kernel time at which the traced process's first thread exited, if it has."""
        value = self.program["traced"].get(ct.c_uint32(self.pid))
        return value.value if value is not None and value.value else None

    def probe_ip(self) -> int | None:
        """The runtime address of the first creation-probe hit (for a PIE's load bias)."""
        config = self.program.config(self.pid)
        return int(config["probe_ip"]) or None if config is not None else None

    def counters(self) -> dict[str, int]:
        """The kernel's counters, plus what the ring-buffer reader itself could not keep."""
        rows = self._rows("counters", Counter.N_COUNTERS)
        return {**{name: sum(rows[i]) for i, name in COUNTER_NAMES.items()}, **self.program.reader_losses()}

    def app_counters(self) -> dict[str, int]:
        """Application spans followed, goroutines put under them, pprof labels sent (and what was lost)."""
        rows = self._rows("app_counters", AppCounter.N_APP_COUNTERS)
        return {**{name: sum(rows[i]) for i, name in APP_COUNTER_NAMES.items()}, "labels_left_out": self._labels_left_out}

    # --- switching probes off and on: the overhead budget (shedding.py decides when) -------------
    def switch(self, handler: str, on: bool) -> None:
        """Attach (on) or detach the probe points that run one lifecycle or state handler in this
        process; points already so are left alone. A few milliseconds of the agent's time a point.
        Where the states probe covers creations and exits (CFG_STATES_COVER_LIFECYCLE in the process's
        config), the lifecycle handlers stand down while the flag is set: states off clears it before
        the states probe goes (so lifecycle probes attached beforehand take over creations and exits at
        once), states on sets it again once the states probe is in (the caller detaches them after)."""
        if handler == STATE_HANDLER:
            self._switch_states(on)
            return
        points = self.support.lifecycle_probes  # (a group only where the states probe does not cover them)
        (self._attach_points if on else self._detach_points)([p for p in points if p.handler == handler])
        if LIFECYCLE in self.groups:
            (self.attached_groups.add if set(points) & self._points_on else self.attached_groups.discard)(LIFECYCLE)

    def _switch_states(self, on: bool) -> None:
        covers = self.states_cover_lifecycle
        if on:
            self.attach_group(STATES)
            if covers:
                self._set_config_flag(ProcFlag.CFG_STATES_COVER_LIFECYCLE, True)
            return
        if covers:  # creations and exits go over to the lifecycle probes (if attached) before the states probe goes
            self._set_config_flag(ProcFlag.CFG_STATES_COVER_LIFECYCLE, False)
        self.detach_group(STATES)

    def _set_config_flag(self, flag: int, on: bool) -> None:
        self.program.set_flag(self.pid, flag, on)
        self.config["flags"] = (int(self.config["flags"]) | flag) if on else (int(self.config["flags"]) & ~flag)

    def hits(self) -> dict[str, int]:
        """Runs of each lifecycle and state handler in this process so far, and of the others
        (OTHER_HANDLERS: OTHER_COUNTED_HANDLERS together), with the program built for a budget
        (ProbeSettings.budget; zeros otherwise)."""
        rows = self._rows("counters", Counter.N_COUNTERS)
        return {CREATE_HANDLER: sum(rows[Counter.C_HITS_CREATE]), EXIT_HANDLER: sum(rows[Counter.C_HITS_EXIT]),
                STATE_HANDLER: sum(rows[Counter.C_HITS_STATE]), OTHER_HANDLERS: sum(rows[Counter.C_HITS_OTHER])}

    def close(self) -> None:
        """Detach every probe and forget the process in the program (closed too if it is this process's own)."""
        for group in list(self.attached_groups):
            self.detach_group(group)
        self._detach_points(list(self._points_on))  # the lifecycle probes the budget attached beside the states probe
        if self._slot is not None and self.program.loaded:
            self.program.remove_process(self.pid, self._slot)
        self._slot = None
        if self._own_program:
            self.program.close()


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


def run_stats(prog_fd: int) -> tuple[int, int]:
    """(runs, run time in ns) of a BPF program, from its fdinfo."""
    with open(f"/proc/self/fdinfo/{prog_fd}") as info:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in info if ":\t" in line)
    return int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0))


_MADV_PAGEOUT = 21
_COMPILER_LIBRARIES = ("libLLVM", "libclang")


def release_compiler_memory() -> None:
    """bcc compiles with clang and LLVM inside the agent: ~80 MB of their code is paged in for a
    compile that is over once the program is loaded, and ~30 MB of freed heap stays with the
    process. Give both back: the agent compiles once, `watch` included."""
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


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_deferred():
    """Detaching is not cut short by a stop signal (`watch`'s second one raises KeyboardInterrupt):
    bcc's cleanup, interrupted between closing a probe and forgetting it, fails again at exit with a
    traceback and leaves uprobes behind. Signals that come meanwhile are handled right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came = []
    previous = {s: signal.signal(s, lambda signum, _frame: came.append(signum)) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in came:
            signal.raise_signal(signum)


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
