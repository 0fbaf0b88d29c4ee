"""The overhead budget (--max-overhead PERCENT): how much detail the probes may keep.

Pure: no kernel, no clock. The agent (shedding.py) feeds it what it saw over each interval (probe
hits, goroutines created, the target's CPU time, how long each probe set was attached) and the cost
of a hit; it answers with the detail to trace at. The estimate is

    overhead = sum over handlers of hits x (trap + handler run time) / (target CPU - that cost)

since the traps and handlers run on the target's threads and are part of its CPU time. The
application-span and heap-sample probes ("other": one hit per application span or heap sample) are
counted in it but never shed: what they cost leaves the rest less of the budget. Detail is shed,
most expensive first, in this order, and taken back in the reverse order:

1. FULL: every probe (state events, lifecycle).
2. NO_STATES: state events off (the casgstatus probe detached; creation and exit probes on).
3. DUTY: lifecycle probes on for a fraction of each window (1/2, 1/4, ... down to MIN_DUTY), so the
   goroutines created in the on part are a representative sample of the program's.

Shedding happens at once, to the most detailed level whose predicted cost fits the budget;
taking detail back needs the prediction for the next level up to stay under RESTORE_MARGIN of the
budget for RESTORE_AFTER evaluations in a row, one step at a time (hysteresis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import IntEnum


class Level(IntEnum):
    """What is traced, most detail first."""
    FULL = 0       # state events and lifecycle
    NO_STATES = 1  # lifecycle only
    DUTY = 2       # lifecycle, part of each window


MIN_DUTY = 1 / 512         # below this the budget is reported as not kept, not shed further
# The prediction counts a hit's trap and handler as measured in isolation; inside a program a hit
# costs up to about twice that (its caches and branch predictors disturbed: the bench's server at
# full lifecycle detail paid 2.7 us a hit against 1.2 us measured), hence the margins.
FIT_MARGIN = 0.5           # shed to what is predicted to use at most this much of the budget
RESTORE_MARGIN = 0.3       # take detail back only when the next level up would use at most this much
RESTORE_AFTER = 3          # ...for this many evaluations in a row
MIN_TARGET_CPU_S = 0.01    # an evaluation needs this much of the target's CPU time (its CPU clock, to the ns)...
MAX_INTERVAL_S = 2.0       # ...or this much wall time (an idle target)
LIFECYCLE_HITS_PER_GOROUTINE = 2.0  # creation and exit


@dataclass(frozen=True)
class Detail:
    level: Level
    duty: float = 1.0  # DUTY: the part of each window the lifecycle probes are on

    def describe(self) -> str:
        return {Level.FULL: "full detail", Level.NO_STATES: "state events off",
                Level.DUTY: f"state events off, lifecycle probes on {self.duty:.2%} of the time"}[self.level]


@dataclass(frozen=True)
class Sample:
    """What one interval showed (differences over it)."""
    seconds: float = 0.0         # wall time
    target_cpu_s: float = 0.0    # the target's CPU time, user + system (the traps and handlers included)
    created: int = 0             # goroutines the probes saw created
    state_hits: int = 0          # runs of the state handler (casgstatus)
    lifecycle_hits: int = 0      # runs of the creation and exit handlers
    states_on_s: float = 0.0     # how long the state probe was attached
    lifecycle_on_s: float = 0.0  # how long the creation probe was attached (or the state probe, when it sees creations)
    other_hits: int = 0          # runs of the application-span and allocation handlers (attached throughout)

    def __add__(self, other: Sample) -> Sample:
        return Sample(*(a + b for a, b in zip(self.__dict__.values(), other.__dict__.values())))


@dataclass(frozen=True)
class HitCosts:
    """CPU time one probe hit costs the target: the trap plus the handler's run, in ns."""
    state_ns: float
    lifecycle_ns: float
    other_ns: float = 0.0


@dataclass(frozen=True)
class Evaluation:
    overhead: float     # estimated over the interval, a fraction of the target's own CPU time
    own_cpu_s: float    # the target's CPU time less the probes' cost
    other_s: float      # ...of which the application-span and allocation probes' (not shed)
    before: Detail
    after: Detail


class OverheadBudget:
    """Decides the detail from what the probes cost. `states` says whether state events were asked
    for (--detail states); `states_see_lifecycle` whether the state probe also sees creations and
    exits (Go 1.24+: then FULL needs no lifecycle probe)."""

    def __init__(self, percent: float, states: bool, states_see_lifecycle: bool):
        self.budget = percent / 100
        self.states_see_lifecycle = states_see_lifecycle
        self.detail = Detail(Level.FULL if states else Level.NO_STATES)
        self.top = self.detail.level  # the most detail allowed
        self._pending = Sample()
        self._calm = 0
        # Hits per second of the target's own CPU time, last seen with each probe set attached, and
        # state hits per lifecycle hit when both were seen: with state events off, the state rate is
        # predicted from the lifecycle rate (a program that creates fewer goroutines switches less).
        self.state_rate = 0.0
        self.lifecycle_rate = 0.0
        self.states_per_lifecycle: float | None = None
        self.other_rate = 0.0

    def observe(self, sample: Sample, costs: HitCosts) -> Evaluation | None:
        """Add an interval; once enough has been seen, evaluate it and decide (self.detail)."""
        self._pending = self._pending + sample
        s = self._pending
        if s.target_cpu_s < MIN_TARGET_CPU_S and s.seconds < MAX_INTERVAL_S:
            return None
        self._pending = Sample()
        cost_s = (s.state_hits * costs.state_ns + s.lifecycle_hits * costs.lifecycle_ns + s.other_hits * costs.other_ns) / 1e9
        own = max(s.target_cpu_s - cost_s, 0.0)
        overhead = cost_s / own if own > 0 else (math.inf if cost_s > 0 else 0.0)
        self._learn(s, own)
        before = self.detail
        self.detail = self._decide(costs)
        return Evaluation(overhead, own, s.other_hits * costs.other_ns / 1e9, before, self.detail)

    def _learn(self, s: Sample, own: float) -> None:
        """Hit rates per second of the target's own CPU time, for each probe set that was attached
        (spread evenly: the program's load is taken as steady over the interval)."""
        if own <= 0 or s.seconds <= 0:
            return
        self.other_rate = s.other_hits / own
        if s.states_on_s > 0:
            self.state_rate = s.state_hits / (own * s.states_on_s / s.seconds)
        if s.lifecycle_on_s > 0:
            lifecycle = s.lifecycle_hits if s.lifecycle_hits else s.created * LIFECYCLE_HITS_PER_GOROUTINE
            if s.states_on_s > 0 and self.states_see_lifecycle:  # the state probe saw them: predict the lifecycle probes'
                lifecycle = s.created * LIFECYCLE_HITS_PER_GOROUTINE
            self.lifecycle_rate = lifecycle / (own * s.lifecycle_on_s / s.seconds)
        if s.states_on_s > 0 and self.lifecycle_rate > 0:
            self.states_per_lifecycle = self.state_rate / self.lifecycle_rate
        elif self.states_per_lifecycle is not None:
            self.state_rate = self.lifecycle_rate * self.states_per_lifecycle

    def predicted(self, detail: Detail, costs: HitCosts) -> float:
        """The overhead detail would cost at the rates last seen."""
        lifecycle = self.lifecycle_rate * costs.lifecycle_ns / 1e9
        other = self._never_shed(costs)
        if detail.level is Level.FULL:
            states = self.state_rate * costs.state_ns / 1e9
            return other + (states if self.states_see_lifecycle else states + lifecycle)
        return other + lifecycle * (detail.duty if detail.level is Level.DUTY else 1.0)

    def _decide(self, costs: HitCosts) -> Detail:
        fits = self._most_detail_within(FIT_MARGIN * self.budget, costs)
        if (fits.level, -fits.duty) > (self.detail.level, -self.detail.duty):  # less detail than now: shed at once
            self._calm = 0
            return fits
        up = self._one_step_up(self.detail)
        if up is not None and self.predicted(up, costs) <= RESTORE_MARGIN * self.budget:
            self._calm += 1
            if self._calm >= RESTORE_AFTER:
                self._calm = 0
                return up
        else:
            self._calm = 0
        return self.detail

    def _most_detail_within(self, limit: float, costs: HitCosts) -> Detail:
        for level in (Level.FULL, Level.NO_STATES):
            if level >= self.top and self.predicted(Detail(level), costs) <= limit:
                return Detail(level)
        other = self._never_shed(costs)
        full_cycle = self.predicted(Detail(Level.DUTY, 1.0), costs) - other
        duty = 0.5
        while duty > MIN_DUTY and other + full_cycle * duty > limit:
            duty /= 2
        return Detail(Level.DUTY, duty)

    def _never_shed(self, costs: HitCosts) -> float:
        """The application-span and allocation probes' overhead, at the rate last seen."""
        return self.other_rate * costs.other_ns / 1e9

    def _one_step_up(self, detail: Detail) -> Detail | None:
        if detail.level is Level.DUTY:
            return replace(detail, duty=detail.duty * 2) if detail.duty < 0.5 else Detail(Level.NO_STATES)
        if detail.level is Level.NO_STATES and self.top is Level.FULL:
            return Detail(Level.FULL)
        return None
