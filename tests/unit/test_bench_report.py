"""bench/RESULTS.md says when each section was measured when a run of other sections (--only)
kept it, or measured it alone: a figure is never shown under another run's date."""

import json

import pytest

from helpers import bench_module


@pytest.fixture(scope="module")
def bench():
    return bench_module()


def _run(date: str, **sections) -> dict:
    machine = {"cpu": f"CPU of {date}", "nproc": 2, "load_at_start": [1.0, 1.0, 1.0]}
    return {"date": date, "machine": machine, "go": "go1.26.8", "rounds": 5, **sections}


def test_a_section_measured_alone_carries_its_own_date(bench, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_run("2026-11-30T19:33:55+00:00", churn={"n": 1}, steady={"n": 1})))
    merged = bench.merged_results(path, _run("2026-12-01T01:55:06+00:00", steady={"n": 2}))
    assert merged["date"] == "2026-11-30T19:33:55+00:00" and merged["steady"] == {"n": 2}
    assert bench._measured(merged, "steady") == [
        "Measured 2026-12-01T01:55:06+00:00 on CPU of 2026-12-01T01:55:06+00:00 (nproc 2, load average "
        f"{bench._loads([1.0, 1.0, 1.0])} at start), Go go1.26.8, 5 rounds.", ""]
    assert bench._measured(merged, "churn") == []  # the report's own run
    assert bench._measured(merged, "churn", always=True)[0].startswith("Measured 2026-11-30T19:33:55+00:00 on CPU of 2026-11-30")
