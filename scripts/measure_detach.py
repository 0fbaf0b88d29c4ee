#!/usr/bin/env python3
"""What a uprobe detach costs the target and the agent: how long the detach call takes, when the
probe stops firing, and the target's goroutine rate around it.

    .venv/bin/python scripts/measure_detach.py [--rounds 3]

Runs bench/go/churn (built by `make bench` or `bench/run.py --only budget`) pinned to CPU 0 with
GOMAXPROCS=1, puts a counting probe on runtime.casgstatus (the one the overhead budget sheds
first) and another on runtime.gdestroy (one hit per goroutine exit: the rate meter), detaches the
first from this process pinned to CPU 1 and samples both counts every 2 ms. Prints the call's
duration, the time of the probe's last hit after the call began, and goroutine exits per ms in
10 ms steps from 40 ms before the call to 200 ms after.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run as bench  # noqa: E402

COUNTERS = """
BPF_ARRAY(hits, u64, 2);
static int bump(int k) { u64 *v = hits.lookup(&k); if (v) __sync_fetch_and_add(v, 1); return 0; }
int on_shed(struct pt_regs *ctx) { return bump(0); }
int on_meter(struct pt_regs *ctx) { return bump(1); }
"""


def one_round(churn: Path) -> None:
    from bcc import BPF
    prog = subprocess.Popen([str(churn), "-n", "50000000", "-warmup", "0", "-hold"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=dict(os.environ, GOMAXPROCS="1"),
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        b = BPF(text=COUNTERS)
        shed = {"name": str(churn), "sym": "runtime.casgstatus", "pid": prog.pid}
        b.attach_uprobe(fn_name="on_shed", **shed)
        b.attach_uprobe(name=str(churn), sym="runtime.gdestroy", fn_name="on_meter", pid=prog.pid)
        prog.stdin.write("go\n")
        prog.stdin.flush()
        time.sleep(1.0)
        hits, samples, done = b["hits"], [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append((time.perf_counter(), hits[ctypes.c_int(0)].value, hits[ctypes.c_int(1)].value))
                time.sleep(0.002)
        sampler = threading.Thread(target=sample)
        sampler.start()
        time.sleep(0.05)
        began = time.perf_counter()
        b.detach_uprobe(**shed)
        call_ms = 1e3 * (time.perf_counter() - began)
        time.sleep(0.2)
        done.set()
        sampler.join()
        last_hit = max(t for (t, v, _), (_, before, _) in zip(samples[1:], samples) if v != before)
        rates = []
        for t in range(-40, 200, 10):
            window = [s for s in samples if t <= 1e3 * (s[0] - began) < t + 10]
            if len(window) >= 2:
                rates.append(f"{t:+d}:{(window[-1][2] - window[0][2]) / (1e3 * (window[-1][0] - window[0][0])):.0f}")
        print(f"detach call {call_ms:.0f} ms; last hit {1e3 * (last_hit - began):.0f} ms after it began; "
              f"exits per ms from the call (ms:rate): {' '.join(rates)}")
    finally:
        prog.kill()
        prog.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    churn = bench.build_programs(bench.go_toolchain(), ("churn",))["churn"]
    for _ in range(args.rounds):
        one_round(churn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
