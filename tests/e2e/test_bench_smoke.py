"""The benchmark harness still runs: `bench/run.py --smoke` (a few seconds, real probes, real collector).

Nothing here asserts a timing: the numbers depend on the machine; this only keeps the harness working."""

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
    churn = results["churn"]["ns_per_goroutine"]
    assert churn["none"] and churn["lifecycle"] and all(v > 0 for runs in churn.values() for v in runs)
    assert all(r["requests"] > 0 and r["errors"] == 0 for runs in results["server"]["runs"].values() for r in runs)
    for export in results["agent"]["export"]:
        assert export["received_by_collector"] == export["spans"] == export["exported"], export
    pinned = results["pinned"]["ns_per_goroutine"]
    assert pinned["none"] and pinned["lifecycle"] and pinned["bare_lifecycle"]
    for run in results["steady"]["runs"]["lifecycle file"] + results["rss"]["runs"]["defaults grpc"] + [results["rate"]]:
        assert run["loss_counters"] is not None and run["cpu_after_attach_s"] > 0 and run["maxrss_mb"] > 0, run
    assert results["rate"]["received"] >= results["rate"]["created"] > 0
    report = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## 1. Goroutine churn", "## 2. HTTP server under load", "## 3. The agent", "## Targets",
                    "### 4. Pinned churn", "### 5. Agent CPU per goroutine", "### 6. Agent memory", "### 7. Sustained rate",
                    "## Goals (issue 11)"):
        assert heading in report
