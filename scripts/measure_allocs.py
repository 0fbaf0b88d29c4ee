#!/usr/bin/env python3
"""What --allocs costs the target: tests/programs/allocchurn (short goroutines, 50 heap
allocations each) run without the agent and under `otel-goroutines run` with --allocs off,
sampled and exact, side by side in one run, each mode several times, interleaved. The program
measures itself (CPU and wall time of its measured part); the table shows medians.

    sudo .venv/bin/python scripts/measure_allocs.py [--go /path/to/go] [--repeat 5] [-n 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import AGENT, build_program  # noqa: E402

MODES = ("no agent", "off", "sampled", "exact")


def measure(binary: Path, mode: str, args: list[str]) -> dict:
    command = [str(binary), *args]
    if mode != "no agent":
        command = AGENT + ["run", "--allocs", mode, "--exporter", "file", "--output", "/dev/null", "-q", "--", *command]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--go", help="Go toolchain to build the program with (default: the tests' toolchain)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("-n", type=int, default=20000, help="goroutines in the measured part")
    parser.add_argument("--allocs", type=int, default=50, help="heap allocations per goroutine")
    opts = parser.parse_args()
    binary = build_program("allocchurn", go=opts.go)
    args = ["-n", str(opts.n), "-allocs", str(opts.allocs)]
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(opts.repeat):
        for mode in MODES:
            runs[mode].append(measure(binary, mode, args))
    version = subprocess.run([opts.go or "go", "version"], capture_output=True, text=True).stdout.strip() if opts.go else ""
    print(f"allocchurn -n {opts.n} -allocs {opts.allocs}, median of {opts.repeat} runs {version}".rstrip())
    print("CPU time of the target (user + system: the kernel's uprobe handling is system time of the")
    print("thread that hit the probe), and wall time, per allocation:")
    print("| mode | CPU ns per allocation | added vs --allocs off | wall ns per allocation |")
    print("|---|---|---|---|")
    cpu = {mode: statistics.median(r["cpu_ns_per_alloc"] for r in rs) for mode, rs in runs.items()}
    for mode, rs in runs.items():
        wall = statistics.median(r["ns_per_alloc"] for r in rs)
        added = "" if mode in ("no agent", "off") else f"{cpu[mode] - cpu['off']:+,.0f}"
        print(f"| {mode} | {cpu[mode]:,.0f} | {added} | {wall:,.0f} |")
    print("CPU ns per allocation, every run: " +
          "; ".join(f"{m}: " + ", ".join(f"{r['cpu_ns_per_alloc']:.0f}" for r in rs) for m, rs in runs.items()))

if __name__ == "__main__":
    main()
