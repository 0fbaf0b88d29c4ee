"""The overhead budget's control loop (overhead.py) and shed history (shedding.py), fed counts and CPU times."""

import numpy as np
import pytest

from otel_goroutines.overhead import FIT_MARGIN, MIN_DUTY, RESTORE_AFTER, Detail, HitCosts, Level, OverheadBudget, Sample
from otel_goroutines.shedding import ShedHistory

COSTS = HitCosts(state_ns=1000, lifecycle_ns=1000)  # 1 us a hit: 10,000 hits a second of CPU = 1%


def second(cpu_s, created=0, state_hits=0, lifecycle_hits=0, states_on=1.0, lifecycle_on=1.0):
    """One second of wall time; cpu_s: the target's CPU time, the probes' cost included."""
    return Sample(1.0, cpu_s, created, state_hits, lifecycle_hits, states_on, lifecycle_on)


def full_second(own_cpu_s, state_hits, created):
    """A second at FULL detail (Go 1.24+: the state probe sees creations and exits too)."""
    return second(own_cpu_s + state_hits * 1e-6, created, state_hits)


def test_a_light_program_keeps_everything():
    budget = OverheadBudget(5, states=True, states_see_lifecycle=True)
    for _ in range(10):  # 1,000 state changes a second on 0.3 s of CPU: 0.33%
        ev = budget.observe(full_second(0.3, 1000, 300), COSTS)
        assert ev is not None and ev.after == Detail(Level.FULL)
    assert ev.overhead == pytest.approx(0.001 / 0.3)


def test_state_events_go_first_when_lifecycle_fits():
    budget = OverheadBudget(5, states=True, states_see_lifecycle=True)
    # 100,000 state hits (10%) for 10,000 goroutines: lifecycle would cost 20,000 hits = 2%
    ev = budget.observe(full_second(1.0, 100_000, 10_000), COSTS)
    assert ev.overhead == pytest.approx(0.1)
    assert budget.detail == Detail(Level.NO_STATES)


def test_a_churn_sheds_to_a_duty_cycle_at_once():
    budget = OverheadBudget(5, states=True, states_see_lifecycle=True)
    # 300,000 goroutines a second of own CPU, 3 state hits each: 90%; lifecycle alone 60%
    budget.observe(full_second(1.0, 900_000, 300_000), COSTS)
    assert budget.detail.level is Level.DUTY
    assert 0.6 * budget.detail.duty <= FIT_MARGIN * 0.05 < 0.6 * budget.detail.duty * 2  # the largest duty that fits


def test_detail_comes_back_step_by_step_after_calm_evaluations():
    budget = OverheadBudget(5, states=True, states_see_lifecycle=True)
    budget.observe(full_second(1.0, 900_000, 300_000), COSTS)
    duty = budget.detail.duty
    # the load falls: at that duty, few lifecycle hits per second of CPU
    quiet = second(1.0, created=10, lifecycle_hits=20, states_on=0.0, lifecycle_on=duty)
    budget.observe(quiet, COSTS)
    assert budget.detail.duty == duty  # hysteresis: one calm evaluation is not enough
    for _ in range(RESTORE_AFTER - 1):
        budget.observe(quiet, COSTS)
    assert budget.detail.duty == 2 * duty
    for _ in range(RESTORE_AFTER * 20):
        budget.observe(quiet, COSTS)
    assert budget.detail == Detail(Level.FULL)


def test_no_state_events_asked_for_never_means_full():
    budget = OverheadBudget(5, states=False, states_see_lifecycle=False)
    assert budget.detail == Detail(Level.NO_STATES)
    for _ in range(RESTORE_AFTER * 3):
        budget.observe(second(1.0, 10, lifecycle_hits=20, states_on=0.0), COSTS)
    assert budget.detail == Detail(Level.NO_STATES)


def test_the_duty_has_a_floor():
    budget = OverheadBudget(0.001, states=True, states_see_lifecycle=True)
    budget.observe(full_second(1.0, 900_000, 300_000), COSTS)
    assert budget.detail == Detail(Level.DUTY, MIN_DUTY)


def test_an_evaluation_waits_for_enough_target_cpu():
    budget = OverheadBudget(5, states=True, states_see_lifecycle=True)
    assert budget.observe(Sample(0.1, 0.004, 10, 30, 0, 0.1, 0.1), COSTS) is None
    assert budget.observe(Sample(0.1, 0.004, 10, 30, 0, 0.1, 0.1), COSTS) is None
    assert budget.observe(Sample(0.1, 0.004, 10, 30, 0, 0.1, 0.1), COSTS) is not None  # 12 ms of target CPU in all
    assert budget.observe(Sample(0.1, 0.001, 10, 30, 0, 0.1, 0.1), COSTS) is None
    assert budget.observe(Sample(1.95, 0.001, 10, 30, 0, 1.95, 1.95), COSTS) is not None  # 2 s of wall time


def test_an_idle_target_with_no_hits_is_within_budget():
    budget = OverheadBudget(5, states=True, states_see_lifecycle=True)
    ev = budget.observe(Sample(2.0, 0.0, 0, 0, 0, 2.0, 2.0), COSTS)
    assert ev.overhead == 0 and budget.detail == Detail(Level.FULL)


def test_history_marks_goroutines_alive_across_a_shed_interval():
    history = ShedHistory()
    history.shed(100)
    history.restored(200)
    history.shed(300)  # still open
    create = np.array([10, 10, 150, 210, 210, 250, 400])
    end = np.array([50, 120, 160, 290, 310, 260, 500])
    assert history.traced_in_full(create, end).tolist() == [True, False, False, True, False, True, False]
    assert ShedHistory().traced_in_full(create, end).all()



OTHER = HitCosts(state_ns=1000, lifecycle_ns=1000, other_ns=1000)


def test_probes_never_shed_count_and_leave_the_rest_less():
    budget = OverheadBudget(5, states=True, states_see_lifecycle=True)
    # 1.5% in state hits (lifecycle alone 1%) fit a 5% budget (shed to at most FIT_MARGIN of it) alone;
    # with 2% in application-span and heap-sample hits they do not, nor does the lifecycle at full time
    light = Sample(1.0, 1.035, 5_000, 15_000, 0, 1.0, 1.0, other_hits=20_000)
    ev = budget.observe(light, OTHER)
    assert ev.overhead == pytest.approx(0.035) and ev.other_s == pytest.approx(0.02)
    assert budget.detail.level is Level.DUTY
    assert budget.predicted(budget.detail, OTHER) <= FIT_MARGIN * 0.05


def test_probes_never_shed_alone_over_the_budget_shed_the_rest_to_the_floor():
    budget = OverheadBudget(5, states=True, states_see_lifecycle=True)
    budget.observe(Sample(1.0, 1.1, 10_000, 30_000, 0, 1.0, 1.0, other_hits=70_000), OTHER)
    assert budget.detail == Detail(Level.DUTY, MIN_DUTY)
