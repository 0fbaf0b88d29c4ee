#!/usr/bin/env python3
"""What each BPF handler costs per run, from the kernel's own accounting (kernel.bpf_stats_enabled:
run count and run time per program, read from /proc/self/fdinfo of each program).

    .venv/bin/python scripts/measure_bpf_handlers.py [--n 100000] [--rounds 3] [--workload wakes]

Runs bench/go/churn (built by `make bench`) pinned to CPU 0 with GOMAXPROCS=1, the probes of
each detail level attached from this process pinned to CPU 1, and prints ns per run and per
goroutine for each handler. --workload wakes runs bench/go/wakes instead (pairs of goroutines
waking each other, HOPS wakes a pair) at the states detail with and without --wakers, and also
prints ns per wake. Turns bpf_stats on for the measurement (it adds ~20 ns a run) and
back off after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from otel_goroutines import goruntime  # noqa: E402
from otel_goroutines.binary.gobinary import GoBinary  # noqa: E402
from otel_goroutines.probes import GoroutineProbes, ProbeSettings, run_stats  # noqa: E402

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


HOPS = 8  # bench/go/wakes' default: wakes per pair of goroutines
WORKLOADS = {  # workload -> what is measured: label -> probe settings
    "churn": {"lifecycle": ProbeSettings(states=False), "states": ProbeSettings(states=True),
              "states, built for --max-overhead (hits counted per process)": ProbeSettings(states=True, budget=True)},
    "wakes": {"states --no-wakers": ProbeSettings(wakers=False), "states": ProbeSettings()},
}


def bench_binary(name: str) -> Path:
    found = sorted((ROOT / ".cache" / "bench").glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no bench/go/{name} build in .cache/bench: run `make bench` (or bench/run.py --smoke) first")
    return found[-1]


def measure(exe: Path, settings: ProbeSettings, n: int) -> dict[str, tuple[float, float]]:
    """handler -> (ns per run, ns per goroutine) for one run of n goroutines or wakes (plus its warm-up)."""
    target = subprocess.Popen(["taskset", "-c", "0", str(exe), "-n", str(n), "-hold"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=dict(os.environ, GOMAXPROCS="1"))
    probes = GoroutineProbes(goruntime.support_for(GoBinary(str(exe))), str(exe), target.pid, settings)
    probes.attach()
    try:
        target.stdin.write(b"\n")
        target.stdin.flush()
        while target.poll() is None:
            probes.poll(50)
        probes.drain()
        goroutines = probes.counters()["goroutines_created"]
        out = {}
        for name, fd in probes.program.handler_fds().items():
            runs, ns = run_stats(fd)
            if runs and name.startswith("on_"):
                out[name] = (ns / runs, ns / goroutines)
        return out
    finally:
        probes.close()
        target.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="churn")
    args = ap.parse_args()
    exe = bench_binary(args.workload)
    os.sched_setaffinity(0, {1})
    before = STATS.read_text().strip()
    STATS.write_text("1")
    try:
        details = WORKLOADS[args.workload]
        rounds = {detail: [] for detail in details}
        for _ in range(args.rounds):  # details interleaved: the machine is shared
            for detail, settings in details.items():
                rounds[detail].append(measure(exe, settings, args.n))
        for detail, runs in rounds.items():
            for handler in runs[0]:
                per_run = statistics.median(r[handler][0] for r in runs)
                per_goroutine = statistics.median(r[handler][1] for r in runs)
                per_wake = f"  {per_goroutine * 2 / HOPS:6.0f} ns a wake" if args.workload == "wakes" else ""
                print(f"{detail:18s} {handler:24s} {per_run:6.0f} ns a run  {per_goroutine:6.0f} ns a goroutine{per_wake}")
    finally:
        STATS.write_text(before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
