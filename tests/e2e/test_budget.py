"""--max-overhead on real probes (the README's "Overhead budget").

- a light program under a 5% budget loses nothing: every goroutine it started has its span, traced in
  full (go.goroutine.traced_in_full=true), with its state events, and the summary says nothing was shed;
- a program creating goroutines as fast as it can, under the same budget, gets its detail shed and
  says so (summary, spans marked partial), and still exports spans.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from helpers import by_goid, go_toolchain, run_agent, spans_from_otlp_json

pytestmark = pytest.mark.ebpf
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_churn():
    """bench/go/churn, built (once per source and toolchain) the way the bench builds it."""
    sys.path.insert(0, str(BENCH))
    try:
        import run as bench_run
    finally:
        sys.path.remove(str(BENCH))
    return bench_run.build_programs(go_toolchain(), ("churn",))["churn"]


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


def test_a_churn_under_budget_sheds_and_says_so(bench_churn, tmp_path):
    out = tmp_path / "spans.jsonl"
    run = run_agent(["-v", "run", "-q", "--max-overhead", "5", "--exporter", "file", "--output", str(out), "--",
                     str(bench_churn), "-n", "2000000", "-warmup", "0"], env={"GOMAXPROCS": "1"})
    assert run.returncode == 0, run.stderr
    assert re.search(r"overhead budget 5%: estimated .* -> state events off", run.stderr), run.stderr
    shed = re.search(r"shed: state events off for ([\d.]+) s, lifecycle probes off for ([\d.]+) s", run.stderr)
    assert shed and float(shed.group(1)) > 0 and float(shed.group(2)) > 0, run.stderr
    counts = re.search(r"goroutines created: (\d+) by the runtime's count, (\d+) traced", run.stderr)
    assert counts and int(counts.group(1)) > int(counts.group(2)) > 0, run.stderr
    spans = spans_from_otlp_json(out)
    assert spans and any(s.attributes["go.goroutine.traced_in_full"] is False for s in spans)
