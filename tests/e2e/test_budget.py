"""--max-overhead on real probes (the README's "Overhead budget").

- a light program under a 5% budget loses nothing: every goroutine it started has its span, traced in
  full (go.goroutine.traced_in_full=true), with its state events, and the summary says nothing was shed;
- a program creating goroutines as fast as it can (bench/go/churn, pinned), under the same budget, runs
  near its untraced speed, gets its detail shed and says so (summary, spans marked partial), and still
  exports spans; without a budget, every goroutine is traced.
- two processes on one program built for a budget: hits counted per process, and on Go 1.24+ the
  hand-over of creations and exits between the states probe and the lifecycle probes.
"""

from __future__ import annotations

import json
import re

import pytest

from helpers import bench_module, by_goid, go_toolchain, goroutine_spans, run_agent, spans_from_otlp_json

pytestmark = pytest.mark.ebpf


@pytest.fixture(scope="module")
def bench():
    return bench_module()


@pytest.fixture(scope="module")
def bench_churn(bench):
    """bench/go/churn, built (once per source and toolchain) the way the bench builds it."""
    return bench.build_programs(go_toolchain(), ("churn",))["churn"]


def test_a_light_program_under_budget_loses_nothing(programs, tmp_path):
    manifest_path, out = tmp_path / "manifest.json", tmp_path / "spans.jsonl"
    run = run_agent(["-v", "run", "-q", "--max-overhead", "5", "--exporter", "file", "--output", str(out), "--",
                     str(programs["tree"]), str(manifest_path)])
    assert run.returncode == 0, run.stderr
    manifest, spans = json.loads(manifest_path.read_text()), by_goid(spans_from_otlp_json(out))
    for g in manifest["goroutines"]:
        span = spans[g["goid"]]
        assert span.name == g["func"]
        assert span.attributes["go.goroutine.traced_in_full"] is True, g
        assert span.attributes["go.goroutine.transitions"] >= 1 and any(e[0] == "running" for e in span.events), g
    assert "overhead budget 5%" in run.stderr and "0 changes of detail" in run.stderr, run.stderr
    assert "shed:" not in run.stderr


def _churn(bench, exe, tmp_path, n: int, agent_args: tuple[str, ...] | None):
    """bench/go/churn on the first CPU (GOMAXPROCS=1), held until the agent (on the other CPU) is
    attached; (churn's own JSON line, the agent's stderr, its spans)."""
    pin = bench.Pinning.choose()
    out = tmp_path / f"spans-{len(list(tmp_path.iterdir()))}.jsonl"
    tracer = None if agent_args is None else (lambda pid: bench.AgentProcess(
        ["attach", "-q", "--exporter", "file", "--output", str(out), *agent_args, str(pid)], cpu=pin.agent))
    agent = {}
    if tracer is not None:
        def traced(pid):
            agent["proc"] = tracer(pid)
            return agent["proc"]
    churn, res = bench.held_churn({"churn": exe}, pin, ["-n", str(n), "-warmup", "0"], traced if tracer else None)
    if res is None:
        return churn, "", []
    assert res["returncode"] == 0, agent["proc"].lines[-20:]
    return churn, "\n".join(agent["proc"].lines), spans_from_otlp_json(out)


def test_a_churn_under_budget_runs_near_its_untraced_speed(bench, bench_churn, tmp_path):
    """As many goroutines as the program can create: under --max-overhead 5 it costs within about 5% of
    its untraced CPU time per goroutine (CPU time, user + system, the traps included: what the budget
    promises; the machine is shared, so wall time says more about the others' load than about the
    probes. Generous slack: it is the shedding that is tested, not the machine), exports spans and says
    what it shed. The same program without a budget is traced in full."""
    n = 2_000_000
    # Generous slack: the mechanism is tested here, its speed in the bench (`--only budget`). Measured
    # here: +2 to +11% alone; full detail costs this program about ten times its untraced time. A loaded
    # machine only adds (the agent reacts later, the program's caches suffer): +25.4% was seen with
    # bench/go/churn running beside the suite, so the best of up to three rounds is held to +50%.
    ratios = []
    while len(ratios) < 3 and (not ratios or ratios[-1] >= 1.5):
        before, _, _ = _churn(bench, bench_churn, tmp_path, n, None)
        budgeted, stderr, spans = _churn(bench, bench_churn, tmp_path, n, ("--max-overhead", "5"))
        after, _, _ = _churn(bench, bench_churn, tmp_path, n, None)
        ratios.append(budgeted["cpu_s"] / ((before["cpu_s"] + after["cpu_s"]) / 2))
    assert min(ratios) < 1.5, (ratios, stderr)
    assert re.search(r"overhead budget 5% for PID \d+: estimated .* -> state events off", stderr), stderr
    shed = re.search(r"shed: state events off for ([\d.]+) s, lifecycle probes off for ([\d.]+) s", stderr)
    assert shed and float(shed.group(1)) > 0 and float(shed.group(2)) > 0, stderr
    # churn's heap samples (--allocs sampled) are counted, not shed
    assert re.search(r"of which application-span and heap-sample probes \(never shed\): [\d.]+%", stderr), stderr
    counts = re.search(r"goroutines created: (\d+) by the runtime's count, (\d+) traced", stderr)
    assert counts and int(counts.group(1)) > int(counts.group(2)) > 0, stderr
    spans = goroutine_spans(spans)  # (group spans of short goroutines are no goroutine's: no such attribute)
    assert spans and any(s.attributes["go.goroutine.traced_in_full"] is False for s in spans)

    full, stderr, spans = _churn(bench, bench_churn, tmp_path, 100_000, ())
    spans = goroutine_spans(spans)
    seen = int(re.search(r"goroutines seen: (\d+)", stderr).group(1))
    assert seen >= 100_000 and len(spans) == seen, stderr
    assert "overhead budget" not in stderr and all("go.goroutine.traced_in_full" not in s.attributes for s in spans)


def test_hits_are_per_process_and_states_hand_lifecycle_over(programs, tmp_path):
    """Two processes on one program built for a budget: each one's handler hits are its own (the
    kernel's run counts would add both up). On a Go whose states probe covers creations and exits,
    lifecycle probes attached beside it stand down (none seen twice), and turning states off hands
    creations and exits over to them (still seen)."""
    import time

    from helpers import poll, tickers_on_one_program
    from otel_goroutines.probes import CREATE_HANDLER, EXIT_HANDLER, STATE_HANDLER, ProbeSettings
    with tickers_on_one_program(programs["ticker"], tmp_path, ProbeSettings(budget=True)) as probes:
        counter = lambda p, name: p.counters()[name]
        for p in probes:
            p.attach()
        assert probes[0].states_cover_lifecycle  # the hand-over is what this test is about
        assert poll(lambda: all(counter(p, "goroutines_created") >= 10 for p in probes), 20)
        assert probes[0].hits()[STATE_HANDLER] > 0 and probes[0].hits()[CREATE_HANDLER] == 0
        for handler in (EXIT_HANDLER, CREATE_HANDLER):  # beside the states probe: they stand down
            probes[0].switch(handler, True)
        made = [counter(p, "goroutines_created") for p in probes]
        untracked = counter(probes[0], "exits_of_untraced_goroutines")
        time.sleep(1.0)
        grown = [counter(p, "goroutines_created") - m for p, m in zip(probes, made)]
        assert 0 < grown[0] <= 1.5 * grown[1] + 5, grown  # not each creation twice
        assert counter(probes[0], "exits_of_untraced_goroutines") == untracked
        assert probes[0].hits()[CREATE_HANDLER] > 0 and probes[1].hits()[CREATE_HANDLER] == 0  # its own hits
        probes[0].switch(STATE_HANDLER, False)
        time.sleep(0.1)  # a hit already inside the handler may still count
        states = [p.hits()[STATE_HANDLER] for p in probes]
        made = counter(probes[0], "goroutines_created")
        untracked = counter(probes[0], "exits_of_untraced_goroutines")
        assert poll(lambda: counter(probes[0], "goroutines_created") >= made + 20, 20)  # seen by the lifecycle probes
        assert probes[0].hits()[STATE_HANDLER] == states[0] and probes[1].hits()[STATE_HANDLER] > states[1]
        assert counter(probes[0], "exits_of_untraced_goroutines") == untracked  # exits of tracked goroutines seen


def test_watch_keeps_each_process_within_its_own_budget(bench, bench_churn, tmp_path):
    """`watch --max-overhead 10` with two processes of one binary on one program: the one creating
    goroutines as fast as it can sheds its detail; the light one beside it (100 goroutines a second,
    each busy for 5 ms: its pacing loop's wake-ups and the goroutines cost it about 1% in probe hits)
    loses nothing: every goroutine it started has its span, traced in full, with its state events.
    (Not the manifests' 5%: its busy time is a wall-clock spin, so a loaded machine shrinks its CPU
    time and raises its estimate; with bench/go/churn beside the suite it reached 2.8%, past 5%'s
    shedding point of 2.5%.)"""
    import signal
    import subprocess

    from helpers import AGENT, poll
    out, log_path = tmp_path / "spans.jsonl", tmp_path / "agent.log"
    bench_churn = bench_churn.resolve()  # the path the process's /proc/PID/exe shows (the cache is behind a symlink)
    with open(log_path, "w") as log_file:
        agent = subprocess.Popen([*AGENT, "-v", "watch", "-q", "--scan-interval", "0.2", "--max-overhead", "10", "--exe-path",
                                  str(bench_churn), "--exporter", "file", "--output", str(out)],
                                 stdout=log_file, stderr=subprocess.STDOUT, text=True)
    held = lambda *args: subprocess.Popen([str(bench_churn), "-hold", "-warmup", "0", *args], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True)
    heavy, light = held("-n", "3000000"), held("-rate", "100", "-duration", "3s", "-spin", "5ms")
    try:
        for p in (heavy, light):
            assert poll(lambda: f"tracing PID {p.pid}" in log_path.read_text(), 120), log_path.read_text()
        for p in (heavy, light):
            p.stdin.write("go\n")
            p.stdin.flush()
        made = {p.pid: json.loads(p.communicate(timeout=300)[0].splitlines()[-1])["n"] for p in (heavy, light)}
        assert poll(lambda: all(f"PID {p.pid} ({bench_churn}) exited" in log_path.read_text() for p in (heavy, light)), 120), \
            log_path.read_text()
    finally:
        for p in (heavy, light):
            if p.poll() is None:
                p.kill()
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
    text = log_path.read_text()
    assert re.search(rf"overhead budget 10% for PID {heavy.pid}: estimated .* -> state events off", text), text
    assert f"overhead budget 10% for PID {light.pid}: estimated" not in text, text  # never a change of detail
    spans = goroutine_spans(spans_from_otlp_json(tmp_path / f"spans.{light.pid}.jsonl"))
    shorts = [s for s in spans if s.name == "main.short"]
    assert len(shorts) == made[light.pid], (len(shorts), made)
    assert all(s.attributes["go.goroutine.traced_in_full"] is True and any(e[0] == "running" for e in s.events) for s in shorts)
    heavy_spans = goroutine_spans(spans_from_otlp_json(tmp_path / f"spans.{heavy.pid}.jsonl"))
    assert heavy_spans and any(s.attributes["go.goroutine.traced_in_full"] is False for s in heavy_spans)
