"""The benchmark harness still runs: `bench/run.py --smoke` (a few seconds, real probes, real collector).

Nothing here asserts a timing: the numbers depend on the machine. What it checks is the harness's
structure: every section and mode ran as many times as asked, with the counts the smoke asked for,
every span of the export runs received, the report has every section and mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ebpf

ROOT = Path(__file__).resolve().parents[2]


def test_bench_smoke_runs_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rounds = results["rounds"]
    assert results["smoke"] is True and rounds == 1
    # Every section ran every one of its modes, `rounds` times, each run a figure.
    churn = results["churn"]["ns_per_goroutine"]
    assert set(churn) == set(results["modes"]) >= {"none", "lifecycle"}
    assert all(len(runs) == rounds and all(v > 0 for v in runs) for runs in churn.values()), churn
    server = results["server"]["runs"]
    assert server and all(len(runs) == rounds for runs in server.values())
    assert all(r["requests"] > 0 and r["errors"] == 0 for runs in server.values() for r in runs)
    pinned = results["pinned"]["ns_per_goroutine"]
    assert set(pinned) == {"none", "lifecycle", "bare_lifecycle"} and all(len(runs) == rounds for runs in pinned.values())
    # The export path: the smoke's 5,000 spans (wire encoder) and 1,000 (the SDK's), each exported and
    # received by the collector, exactly.
    exports = {(e["encoder"], e["protocol"], e["kind"]): e for e in results["agent"]["export"]}
    assert set(exports) == {("wire", "grpc", "states"), ("sdk", "grpc", "states")}
    for (encoder, _, _), export in exports.items():
        assert export["received_by_collector"] == export["spans"] == export["exported"] == (5_000 if encoder == "wire" else 1_000), export
    # The agent on a churn: as many goroutines as the smoke asks for (-n 2,000; a rate of 5,000/s for
    # 0.5 s), each run with its loss counters and its figures; over OTLP, at least as many spans
    # received as goroutines created (the runtime's own goroutines come on top).
    steady, burst = results["steady"]["runs"]["lifecycle file"], results["rss"]["runs"]["defaults grpc"]
    assert len(steady) == len(burst) == rounds
    for run, created in [*((r, 2_000) for r in steady + burst), (results["rate"], 2_500)]:
        assert run["created"] == created, run
        assert run["loss_counters"] is not None and run["cpu_after_attach_s"] > 0 and run["maxrss_mb"] > 0, run
    assert all(r["received"] is None for r in steady)  # the file exporter
    assert all(r["received"] >= r["created"] for r in [*burst, results["rate"]]), (burst, results["rate"])
    wakes = results["wakes"]["ns_per_wake"]
    assert set(wakes) == {"none", "no_wakers", "wakers"} and all(len(runs) == rounds and all(v > 0 for v in runs) for runs in wakes.values())
    report = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## 1. Goroutine churn", "## 2. HTTP server under load", "## 3. The agent", "## Targets",
                    "### 4. Pinned churn", "### 5. Agent CPU per goroutine", "### 6. Agent memory", "### 7. Sustained rate",
                    "## 8. Wake-up edges", "## Goals (issue 11)"):
        assert heading in report
    assert all(label in report for label in results["modes"].values()), results["modes"]
