"""A step of the wall clock while the agent runs (NTP's first sync, a VM resumed, a date set): the
spans built after it carry the new time, as the application's own spans would. The machine's clock
cannot be stepped under the other tests, so the agent's own read of it is shifted, in-process, on a
Session with real probes on a real program."""

import logging
import subprocess
import time

import pytest

from helpers import parsed_options, spans_from_otlp_json
from otel_goroutines import agent
from otel_goroutines.target import AttachedTarget
from otel_goroutines.wallclock import WallClock, monotonic_to_wall_offset

pytestmark = pytest.mark.ebpf

HOUR_NS = 3_600 * 10**9


def _run_for(steps, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        next(steps)


def test_a_wall_clock_step_moves_the_spans_that_follow(programs, tmp_path, monkeypatch, caplog):
    # The offset is read once and then only shifted: a real step of this machine's clock (its VM's
    # steps, +5 ms to +14 s, were seen under load) stays out of the test, whose times are in the same frame.
    shift, real = [0], monotonic_to_wall_offset()
    monkeypatch.setattr(agent, "WallClock", lambda: WallClock(lambda: real + shift[0]))
    output = tmp_path / "spans.jsonl"
    ticker = subprocess.Popen([str(programs["ticker"]), str(tmp_path / "manifest.json"), "60s"])
    target = AttachedTarget.from_pid(ticker.pid)
    try:
        session = agent.Session(target, parsed_options("--exporter", "file", "--output", str(output), "--metrics-interval", "0",
                                                       "--quiet"))
        with caplog.at_level(logging.WARNING, logger="otel_goroutines"):
            steps = session.steps(handle_signals=False)
            next(steps)  # attached
            _run_for(steps, 3.0)
            stepped_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + real
            shift[0] = HOUR_NS  # the wall clock jumps an hour ahead; the kernel's monotonic clock does not
            _run_for(steps, 3.0)  # the agent reads the clock again every second
            session.stop()
            for _ in steps:
                pass
    finally:
        ticker.kill()
        ticker.wait()
        target.close()
    assert "the wall clock stepped by +3600.000 s" in caplog.text
    ticks = [s for s in spans_from_otlp_json(output) if s.name == "main.tick"]
    # Built before the agent saw the step (up to a second and a poll after it): the real time.
    before = [s for s in ticks if s.end_ns < stepped_at + 2 * 10**9]
    # Built after: an hour ahead, start and end alike.
    after = [s for s in ticks if s.start_ns > stepped_at + HOUR_NS - 2 * 10**9]
    assert len(before) >= 5 and len(after) >= 5 and len(before) + len(after) == len(ticks), (len(before), len(after), len(ticks))
    assert all(s.end_ns - s.start_ns < 10**9 for s in ticks)  # no span straddles the step
