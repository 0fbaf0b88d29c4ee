#!/usr/bin/env python3
"""What following application spans and reading pprof labels cost a traced program.

Builds tests/programs/appservice/appbench (OpenTelemetry Go SDK, newest release) and runs each of its
workloads bare and under `otel-goroutines run` with the features on and off; prints the median
nanoseconds per operation of ROUNDS runs, the setups taking turns. Needs root (eBPF).

    sudo .venv/bin/python scripts/measure_app_traces.py [N]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import AGENT, APPSERVICE, go_toolchain  # noqa: E402

ROUNDS = 9
AGENT_BASE = ["run", "--exporter", "file", "--allocs", "off", "--metrics-interval", "0", "-q"]
SETUPS = {
    "no agent": None,
    "agent, --app-traces off --no-pprof-labels": ["--app-traces", "off", "--no-pprof-labels"],
    "agent, defaults (app traces, labels)": [],
}
WORKLOADS = {"spans": "SDK span start+end", "goroutines": "goroutine, no span, no labels",
             "goroutines-span": "goroutine under an SDK span", "goroutines-labels": "goroutine with 2 pprof labels"}


def build() -> Path:
    out = ROOT / ".cache" / "appbench"
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=readonly", CGO_ENABLED="0")
    subprocess.run([go_toolchain(), "build", "-o", str(out), "./appbench"], cwd=APPSERVICE, env=env, check=True)
    return out


def once(binary: Path, workload: str, n: int, agent: list[str] | None, tmp: str) -> float:
    command = [str(binary), workload, str(n)]
    if agent is not None:
        command = AGENT + AGENT_BASE + ["-o", os.path.join(tmp, "spans.jsonl"), *agent, "--", *command]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.split()[0])


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    binary = build()
    print(f"ns per operation, median of {ROUNDS} runs of {n:,}")
    print(f"{'workload':<32}" + "".join(f"{name:>44}" for name in SETUPS))
    # Setups alternate within each round, so load from elsewhere on the machine falls on all of them alike.
    results = {(w, s): [] for w in WORKLOADS for s in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(ROUNDS):
            for workload in WORKLOADS:
                for setup, agent in SETUPS.items():
                    results[(workload, setup)].append(once(binary, workload, n, agent, tmp))
    for workload, text in WORKLOADS.items():
        print(f"{text:<32}" + "".join(f"{statistics.median(results[(workload, s)]):>44,.0f}" for s in SETUPS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
