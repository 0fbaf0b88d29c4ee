"""Kernel times onto the wall clock: a step of the wall clock is followed, a slew or the read's own
jitter is not a step, and spans built after a step (fast path and reference path alike) carry it."""

from otel_goroutines.wallclock import STEP_NS, WallClock

from test_flow import changes, decoded, ends, flow


def test_a_step_is_followed_and_jitter_is_not_a_step():
    reads = iter([5_000, 5_000 + STEP_NS // 2, 5_000 + 3_600 * 10**9, 5_000 - 2 * 10**9, 5_000 - 2 * 10**9 + 700])
    clock = WallClock(lambda: next(reads))
    assert clock.offset_ns == 5_000
    assert clock.step_ns() == 0 and clock.offset_ns == 5_000  # under STEP_NS: the old offset stays
    assert clock.step_ns() == 3_600 * 10**9 and clock.offset_ns == 5_000 + 3_600 * 10**9  # an hour forward
    assert clock.step_ns() == -(3_600 + 2) * 10**9 and clock.offset_ns == 5_000 - 2 * 10**9  # and back past the start
    assert clock.step_ns() == 0


def test_this_machines_clocks_read_again_show_no_step():
    """STEP_NS is above what a real read varies by (a threshold under the jitter would log steps all day)."""
    clock = WallClock()
    assert not any(clock.step_ns() for _ in range(20_000))


def test_spans_built_after_the_offset_moves_carry_the_new_time():
    for fast in (True, False):
        f = flow(fast)
        f.changes(changes(5, [1_100]), {})
        (before,) = decoded(f.ended(ends([5])))
        f.builder.clock_offset_ns += 3_600 * 10**9  # what Session does on a step
        f.changes(changes(6, [1_100]), {})
        (after,) = decoded(f.ended(ends([6])))
        assert after.start_time_unix_nano - before.start_time_unix_nano == 3_600 * 10**9, fast
        assert after.end_time_unix_nano - before.end_time_unix_nano == 3_600 * 10**9
        assert after.events[0].time_unix_nano - before.events[0].time_unix_nano == 3_600 * 10**9
