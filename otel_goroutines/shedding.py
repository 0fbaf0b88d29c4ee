"""The overhead budget applied to one traced process: measure, decide (overhead.py), switch probes.

What a hit costs: the trap is measured at start on this machine (GoroutineProbes.trap_cost_ns: an
empty handler on an emulated instruction in the agent itself, as the agent's probe points are);
the handler's run time comes from the kernel's own accounting (bpf_stats, turned on while the
budget runs), so a slower handler, or a slower machine, is seen as it is: a mean over every process
the agent's one program traces, the same code doing the same work. Hits are this process's own: the
handlers count them at the process's slot of the per-process counters (a program built for a budget,
ProbeSettings.budget), since the kernel's run counts add up every process sharing the program.
On Go 1.24+ the states probe also sees creations and exits (CFG_STATES_COVER_LIFECYCLE):
GoroutineProbes.switch hands them to the lifecycle probes before the states probe goes, and back.

Switching keeps the records whole: a goroutine is never seen created twice nor its exit missed
while it is tracked. So a set of probes is changed in this order: exit probes attached first,
creation probes detached before others are attached (a goroutine created in that gap has no span,
as one created while the probes are off), exit probes detached last. In a duty cycle's off part
the exit probe stays on for a short while after the creation probe goes (most goroutines are
short), then goes too; goroutines still tracked then are looked up in the runtime's list of
goroutines (runtime.allgs, in the target's memory) before the probes come back: those gone ended
during the off part, when exactly is unknown (their spans end when the exit probe went, partial).
A binary without a symbol table keeps its exit probe on throughout.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import target_memory
from .goruntime import RuntimeSupport
from .overhead import Detail, HitCosts, Level, OverheadBudget, Sample
from .probes import CREATE_HANDLER as CREATE
from .probes import EXIT_HANDLER as EXIT
from .probes import STATE_HANDLER as STATE
from .probes import OTHER_COUNTED_HANDLERS
from .probes import OTHER_HANDLERS as OTHER
from .probes import GoroutineProbes, enable_run_stats
from .records import take

log = logging.getLogger("otel_goroutines")

HANDLERS = (CREATE, EXIT, STATE)
TICK_MS = 20          # the control loop's period: how soon a burst at full detail is seen (its own, not the agent's poll)
ON_S = 0.5            # a duty cycle's on part: this long, off for the rest of a window of ON_S / duty seconds,
WINDOW_S = (2.0, 60.0)  # within these bounds. A uprobe detach call takes 70-130 ms here (the kernel's wait); the probe
                      # stops firing within 1 ms, the target stalls some 10 ms (scripts/measure_detach.py): few switches
LINGER_S = 0.02       # the exit probe's stay after the creation probe went, in a duty cycle
COUNT_EVERY_NS = 100_000_000  # how often the runtime's goroutine ids are read (runtime.allgs: 2 ms for 1,000 g's),
COUNT_SHARE = 50              # ...and at most once every COUNT_SHARE times the CPU time a read took (2% of a core)
HANDLER_NS = 500.0    # a handler's run time until the kernel has measured it (scripts/measure_bpf_handlers.py: 475-525 ns)
_libc = ctypes.CDLL(None, use_errno=True)


def window_s(duty: float) -> float:
    """A duty cycle's length: its on part ON_S long, within WINDOW_S."""
    return min(max(ON_S / duty, WINDOW_S[0]), WINDOW_S[1])


def target_cpu_s(pid: int) -> float | None:
    """The process's CPU time so far, user + system, all threads (None once it is gone), from its CPU
    clock (clock_getcpuclockid: to the nanosecond, where /proc/PID/stat counts 10 ms ticks, so that
    a burst is judged within milliseconds; Python's time module has no clock_getcpuclockid)."""
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    try:
        return time.clock_gettime_ns(clock.value) / 1e9
    except OSError:  # gone between the two calls
        return None


class ShedHistory:
    """When detail was shed (kernel monotonic ns): a goroutine whose life overlaps any such interval
    was not traced in full."""

    def __init__(self):
        self._starts: list[int] = []
        self._ends: list[int] = []  # the open interval's end is the largest int64
        self._open = False

    def shed(self, now_ns: int) -> None:
        if not self._open:
            self._starts.append(now_ns)
            self._ends.append(np.iinfo(np.int64).max)
            self._open = True

    def restored(self, now_ns: int) -> None:
        if self._open:
            self._ends[-1] = now_ns
            self._open = False

    def traced_in_full(self, create_ns: np.ndarray, end_ns: np.ndarray) -> np.ndarray:
        """Per goroutine: whether no shed interval overlaps [create_ns, end_ns]."""
        create_ns, end_ns = np.asarray(create_ns, np.int64), np.asarray(end_ns, np.int64)
        if not self._starts:
            return np.ones(len(create_ns), bool)
        ends = np.array(self._ends, np.int64)
        first = np.searchsorted(ends, create_ns, "right")  # the first interval ending after the creation
        starts = np.array(self._starts + [np.iinfo(np.int64).max], np.int64)
        return starts[first] > end_ns


@dataclass
class BudgetReport:
    """What the budget did, for the summary and the metrics."""
    percent: float
    trap_ns: float
    overhead: float = 0.0                  # the last evaluation's estimate (fraction of the target's own CPU)
    cost_s: float = 0.0                    # estimated CPU the probes cost the target, in all
    other_cost_s: float = 0.0              # ...of which the application-span and allocation probes' (never shed)
    own_cpu_s: float = 0.0                 # the target's own CPU time over the evaluations
    states_off_s: float = 0.0              # state events shed
    lifecycle_off_s: float = 0.0           # lifecycle probes off (duty cycles' off parts)
    steps: int = 0
    detail: str = "full detail"
    runtime_goroutines: int = 0            # created since tracing began, by the runtime's goroutine ids
    traced_goroutines: int = 0             # ...that the probes saw
    ended_unseen: int = 0                  # tracked goroutines that ended while the exit probe was off
    partial_spans: int = 0

    @property
    def untraced(self) -> int:
        return max(self.runtime_goroutines - self.traced_goroutines, 0)

    @property
    def sampling_ratio(self) -> float:
        return min(self.traced_goroutines / self.runtime_goroutines, 1.0) if self.runtime_goroutines else 1.0

    def render(self) -> str:
        kept = self.cost_s / self.own_cpu_s if self.own_cpu_s else 0.0
        lines = [f"overhead budget {self.percent:g}%: probes cost the target an estimated {kept:.2%} of its own CPU time "
                 f"(trap {self.trap_ns:.0f} ns a hit, measured at start; {self.steps} changes of detail; now: {self.detail})"]
        if self.other_cost_s:
            lines.append(f"  of which application-span and heap-sample probes (never shed): "
                         f"{self.other_cost_s / self.own_cpu_s if self.own_cpu_s else 0.0:.2%}")
        if self.states_off_s or self.lifecycle_off_s:
            lines.append(f"  shed: state events off for {self.states_off_s:.1f} s, lifecycle probes off for "
                         f"{self.lifecycle_off_s:.1f} s (duty cycles); {self.partial_spans} spans not traced in full")
        lines.append(f"  goroutines created: {self.runtime_goroutines} by the runtime's count, {self.traced_goroutines} traced "
                     f"(sampling ratio {self.sampling_ratio:.4f}), {self.untraced} untraced"
                     + (f"; {self.ended_unseen} ended while the exit probe was off" if self.ended_unseen else ""))
        return "\n".join(lines)


@dataclass
class _Phase:
    """The probes attached now, and since when."""
    handlers: frozenset = field(default_factory=frozenset)
    since_ns: int = 0


class ProbeShedder:
    """Keeps one process's probes within --max-overhead, from a thread of its own (start, stop): the
    agent's loop may be busy for a second with a burst of spans, and the budget must not wait for it.
    Goroutines found ended unseen wait in take_unseen() for the agent's loop to make their spans."""

    def __init__(self, probes: GoroutineProbes, support: RuntimeSupport, pid: int, percent: float, states: bool,
                 load_bias: Callable[[], int]):
        self.probes = probes
        self.load_bias = load_bias
        self.support = support
        self.pid = pid
        self.states = states
        self.budget = OverheadBudget(percent, states, probes.states_cover_lifecycle)
        self._stats_fd = enable_run_stats()
        self.report = BudgetReport(percent, probes.program.trap_cost_ns())
        log.info("overhead budget %g%% for PID %d: a uprobe trap costs %.0f ns here (measured now)", percent, pid, self.report.trap_ns)
        self.history = ShedHistory()
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self._phase = _Phase(self._wanted(self.budget.detail, True), now)
        self._on_s = {h: 0.0 for h in HANDLERS}  # seconds attached in the current sample
        self._hits = probes.hits()
        self._cpu = target_cpu_s(pid) or 0.0
        self._created = 0
        self._sample_ns = now
        self._window_ns = now
        self._exit_off_at: int | None = None  # a duty cycle's exit probe goes then
        self._exit_went_ns = now              # when the exit probe last went
        self._worker = ThreadPoolExecutor(2, thread_name_prefix="probe-switch")
        self._in_flight: list[Future] = []
        self._min_goid: int | None = None
        self._max_goid = 0
        self._allgs_read_ns = now
        self._read_cpu_ns = 0

    # --- which probes ---------------------------------------------------------------------
    def _wanted(self, detail: Detail, on_part: bool) -> frozenset:
        """The handlers attached at this detail (in a duty cycle, in its on or off part)."""
        if detail.level is Level.FULL:
            return frozenset({STATE} if self.probes.states_cover_lifecycle else {STATE, CREATE, EXIT})
        if detail.level is Level.DUTY and not on_part:
            return frozenset() if self.support.allgs_address is not None else frozenset({EXIT})
        return frozenset({CREATE, EXIT})

    def _switch(self, wanted: frozenset, now_ns: int) -> None:
        """Exit probes on first, creation probes off before others come on, exit probes off last.
        A detach call waits 70-130 ms for the kernel here (the probe itself stops within 1 ms), so
        the changes run in order on a thread of their own; the control loop waits for them (busy)."""
        ops = self._ops(wanted, now_ns)
        if ops:
            self._in_flight.append(self._worker.submit(self._apply, ops))

    def _apply(self, ops: list[tuple[str, bool]]) -> None:
        t0 = time.perf_counter()
        for handler, on in ops:
            self.probes.switch(handler, on)
        log.debug("overhead budget for PID %d: %s in %.0f ms", self.pid, ", ".join(f"{h} {'on' if on else 'off'}" for h, on in ops),
                  1e3 * (time.perf_counter() - t0))

    def busy(self) -> bool:
        """A change of probes is still under way (and logged, if one failed: the target is likely gone)."""
        for future in [f for f in self._in_flight if f.done()]:
            self._in_flight.remove(future)
            if future.exception() is not None:
                log.warning("overhead budget for PID %d: could not switch probes (%s)", self.pid, future.exception())
        return bool(self._in_flight)

    def _ops(self, wanted: frozenset, now_ns: int) -> list[tuple[str, bool]]:
        """The switches from the probes attached now to wanted, in a safe order; the phase moves now."""
        old = self._phase.handlers
        ops = []
        if wanted == old:
            return ops
        self._account(now_ns)
        if EXIT in old and EXIT not in wanted and CREATE in old and not (wanted & {CREATE, STATE}):
            # a duty cycle's off part: creations stop now, exits are followed a little longer
            self._phase = _Phase(old - {CREATE}, now_ns)
            self._exit_off_at = now_ns + int(LINGER_S * 1e9)
            self._mark(now_ns)
            return [(CREATE, False)]
        self._exit_off_at = None
        if EXIT in wanted and EXIT not in old:
            ops.append((EXIT, True))
        covers = self.probes.states_cover_lifecycle
        states_first = covers and STATE in wanted and STATE not in old
        if states_first:  # it takes over creations and exits from the lifecycle probes (switch sets the flag)
            ops.append((STATE, True))
        if CREATE in old and CREATE not in wanted:
            ops.append((CREATE, False))
        if CREATE in wanted and CREATE not in old and covers:  # before the states probe hands creations over
            ops.append((CREATE, True))
        if (STATE in wanted) != (STATE in old) and not states_first:
            ops.append((STATE, STATE in wanted))
        if CREATE in wanted and CREATE not in old and not covers:
            ops.append((CREATE, True))
        if EXIT in old and EXIT not in wanted:
            ops.append((EXIT, False))
        if self._sees_exits(old) and not self._sees_exits(wanted):
            self._exit_went_ns = now_ns
        self._phase = _Phase(wanted, now_ns)
        self._mark(now_ns)
        return ops

    def _sees_exits(self, handlers: frozenset) -> bool:
        return EXIT in handlers or (STATE in handlers and self.probes.states_cover_lifecycle)

    def _mark(self, now_ns: int) -> None:
        full = self._phase.handlers == self._wanted(Detail(self.budget.top), True)
        (self.history.restored if full else self.history.shed)(now_ns)

    def _account(self, now_ns: int) -> None:
        """Time attached, per handler, and time shed, up to now."""
        seconds = (now_ns - self._phase.since_ns) / 1e9
        for handler in self._phase.handlers:
            self._on_s[handler] += seconds
        if self.states and STATE not in self._phase.handlers:
            self.report.states_off_s += seconds
        if not self._phase.handlers & {CREATE, STATE}:
            self.report.lifecycle_off_s += seconds
        self._phase.since_ns = now_ns

    # --- the control thread --------------------------------------------------------------------
    def start(self, created_total: Callable[[], int]) -> None:
        self._stop = threading.Event()
        self._unseen: list[np.ndarray] = []

        def run():
            while not self._stop.wait(self.wait_ms(time.clock_gettime_ns(time.CLOCK_MONOTONIC), TICK_MS) / 1e3):
                try:
                    self.tick(time.clock_gettime_ns(time.CLOCK_MONOTONIC), created_total(), self._unseen.append)
                except Exception:  # the target went away under a read: the agent's loop sees it end
                    log.debug("overhead budget for PID %d: tick failed", self.pid, exc_info=True)
        self._thread = threading.Thread(target=run, name="overhead-budget", daemon=True)
        self._thread.start()

    def take_unseen(self) -> list[np.ndarray]:
        taken, self._unseen[:] = list(self._unseen), []
        return taken

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.report.steps and self.support.allgs_address is not None:
            self._read_allgs()  # the runtime's count at the end (a process that has exited is not read)
        self._worker.shutdown(wait=True)
        self.busy()

    # --- each tick -------------------------------------------------------------------------
    def tick(self, now_ns: int, created_total: int, end_stale) -> None:
        """After a poll: the duty cycle's phases, and an evaluation when enough was seen.
        created_total: goroutines the kernel saw created so far; end_stale(records) takes tracked
        goroutines found gone while the exit probe was off (the caller makes their spans)."""
        self._created, created = created_total, created_total - self._created
        if self._exit_off_at is not None and now_ns >= self._exit_off_at:
            # beside the creation probe's detach, which may still be waiting for the kernel
            self._exit_off_at = None
            self._switch(self._wanted(self.budget.detail, False), now_ns)
        if self.support.allgs_address is not None and now_ns >= self._allgs_read_ns:
            cpu = time.thread_time_ns()
            self._read_allgs()
            # paced by the cheaper of the last two reads: a one-off slow read (code paged back in) does not hold the next back
            took = time.thread_time_ns() - cpu
            cost, self._read_cpu_ns = min(self._read_cpu_ns, took), took
            self._allgs_read_ns = now_ns + max(COUNT_EVERY_NS, COUNT_SHARE * cost)
        if self.busy():
            return
        self._duty_cycle(now_ns, end_stale)
        self._evaluate(now_ns, created)

    def wait_ms(self, now_ns: int, poll_ms: int) -> int:
        """How long the next poll may wait: a duty cycle's phase changes are due on time."""
        due = [self._exit_off_at] if self._exit_off_at is not None else []
        detail = self.budget.detail
        if detail.level is Level.DUTY:
            due.append(self._window_ns + int((detail.duty if CREATE in self._phase.handlers else 1.0) * window_s(detail.duty) * 1e9))
        soonest = min(due, default=now_ns + poll_ms * 1_000_000)
        return max(0, min(poll_ms, (soonest - now_ns + 999_999) // 1_000_000))

    def _duty_cycle(self, now_ns: int, end_stale) -> None:
        detail = self.budget.detail
        if detail.level is not Level.DUTY:
            return
        into, window = (now_ns - self._window_ns) / 1e9, window_s(detail.duty)
        if into >= window:  # a new window: its on part
            self._window_ns = now_ns
            if CREATE not in self._phase.handlers:
                if not self._sees_exits(self._phase.handlers):
                    self._end_stale(now_ns, end_stale)
                self._switch(self._wanted(detail, True), now_ns)
        elif into >= detail.duty * window and CREATE in self._phase.handlers:
            self._switch(self._wanted(detail, False), now_ns)

    def _end_stale(self, now_ns: int, end_stale) -> None:
        """Goroutines tracked when the exit probe went and gone from the runtime now ended unseen:
        their records (END_EVENT_DTYPE, ending when the exit probe went) go to end_stale."""
        live = self.probes.snapshot(self._exit_went_ns)
        found = self._read_allgs()
        if found is None or not len(live):
            return
        alive = [g.goid for g in found]
        gone = take(live, ~np.isin(live["goid"], np.array(alive, np.uint64)))
        if len(gone):
            gone["st"]["end_ns"] = self._exit_went_ns
            self.report.ended_unseen += len(gone)
            end_stale(gone)

    def _read_allgs(self) -> list | None:
        """The runtime's live goroutines (None if unreadable); notes the largest goroutine id it has given."""
        try:
            found, top = target_memory.all_goroutines(self.pid, self.support, self.load_bias())
        except OSError as exc:
            log.debug("overhead budget for PID %d: could not read the goroutine list (%s)", self.pid, exc)
            return None
        self._max_goid = max(self._max_goid, top)
        return found

    def _evaluate(self, now_ns: int, created: int) -> None:
        cpu = target_cpu_s(self.pid)
        if cpu is None:
            return
        self._account(now_ns)
        runs, total = self.probes.program.handler_runs(HANDLERS + OTHER_COUNTED_HANDLERS), self.probes.hits()
        hits = {h: total[h] - self._hits[h] for h in total}
        sees_lifecycle = self.probes.states_cover_lifecycle
        sample = Sample(seconds=(now_ns - self._sample_ns) / 1e9, target_cpu_s=cpu - self._cpu, created=created,
                        state_hits=hits[STATE], lifecycle_hits=hits[CREATE] + hits[EXIT], states_on_s=self._on_s[STATE],
                        lifecycle_on_s=self._on_s[CREATE] + (self._on_s[STATE] if sees_lifecycle else 0.0), other_hits=hits[OTHER])
        costs = self._costs(runs)
        evaluation = self.budget.observe(sample, costs)
        self._hits, self._cpu, self._sample_ns = total, cpu, now_ns
        self._on_s = {h: 0.0 for h in HANDLERS}
        if evaluation is None:
            return
        r = self.report
        r.overhead = evaluation.overhead
        r.own_cpu_s += evaluation.own_cpu_s
        r.cost_s += evaluation.overhead * evaluation.own_cpu_s if evaluation.own_cpu_s else 0.0
        r.other_cost_s += evaluation.other_s
        if evaluation.after != evaluation.before:
            r.steps += 1
            r.detail = evaluation.after.describe()
            log.info("overhead budget %g%% for PID %d: estimated %.1f%% over the last %.0f ms of the target's own CPU time -> %s",
                     r.percent, self.pid, 100 * evaluation.overhead, 1e3 * evaluation.own_cpu_s, r.detail)
            # into a duty cycle: its off part first (the program has just paid for more detail)
            into_duty = evaluation.after.level is Level.DUTY
            self._window_ns = now_ns - int(into_duty * evaluation.after.duty * window_s(evaluation.after.duty) * 1e9)
            self._switch(self._wanted(evaluation.after, not into_duty), now_ns)

    def _costs(self, runs: dict[str, tuple[int, int]]) -> HitCosts:
        """Trap plus each handler's mean run time as the kernel measured it, every process sharing the
        program together (a default until it has)."""
        handler = {h: (runs[h][1] / runs[h][0] if runs[h][0] else HANDLER_NS) for h in HANDLERS}
        other_runs = sum(runs[h][0] for h in OTHER_COUNTED_HANDLERS)
        other = sum(runs[h][1] for h in OTHER_COUNTED_HANDLERS) / other_runs if other_runs else HANDLER_NS
        trap = self.report.trap_ns
        return HitCosts(trap + handler[STATE], trap + (handler[CREATE] + handler[EXIT]) / 2, trap + other)

    # --- goroutine counts --------------------------------------------------------------------
    def saw_goids(self, goids: np.ndarray) -> None:
        """Ids of goroutines created since tracing began: the runtime numbers them in order."""
        if len(goids):
            low, high = int(goids.min()), int(goids.max())
            self._min_goid = low if self._min_goid is None else min(self._min_goid, low)
            self._max_goid = max(self._max_goid, high)

    def report_at(self, now_ns: int, traced: int, partial_spans: int) -> BudgetReport:
        """What the budget did so far (up to its last tick); traced: goroutines the kernel saw created."""
        r = self.report
        r.traced_goroutines = traced
        r.runtime_goroutines = self._max_goid - self._min_goid + 1 if self._min_goid is not None else 0
        r.runtime_goroutines = max(r.runtime_goroutines, traced)
        r.partial_spans = partial_spans
        return r

    def close(self) -> None:
        os.close(self._stats_fd)
