#!/usr/bin/env python3
"""What turning finished goroutines into span bytes costs, per span: the reference path
(SpanBuilder.build then SpanEncoder.span, one record at a time) against the batch encoder
(fastspans.BatchSpanEncoder over numpy columns), on a churn-like batch: lifecycle rows, and rows
with state totals and 4 state changes each. Records and columns are made before the clock starts.
Then the file exporter's OTLP/JSON lines from the same spans: the SDK path it used to take
(ReadableSpans, encode_spans, MessageToDict, json.dumps: tests/unit/test_otlp_json.py's reference)
against packing the encoded spans into requests and transcoding them (_otlpjson), as FileSink does.

    .venv/bin/python scripts/measure_encoder.py [ROWS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from opentelemetry.sdk.resources import Resource

from otel_goroutines._otlpjson import transcode
from otel_goroutines.exporters import SCOPE
from otel_goroutines.fastspans import BatchSpanEncoder, Changes
from otel_goroutines.goruntime import N_STATES
from otel_goroutines.otlp_wire import SpanEncoder
from otel_goroutines.records import EndReason, GoroutineRecord, StateChange, TraceReason
from otel_goroutines.spans import SpanBuilder

TESTS = Path(__file__).resolve().parent.parent / "tests"
PCS = [0x4A0000 + 0x40 * i for i in range(40)]  # 40 goroutine functions and 40 go statements
OFFSET = 1_795_640_284_041_076_235


def builder(states: bool) -> SpanBuilder:
    return SpanBuilder(salt=0x1234_5678_9ABC_DEF0, clock_offset_ns=OFFSET, function_name=lambda pc: f"main.fn{pc:x}",
                       creation_site=lambda pc: ("main.spawn", "/src/app/main.go", pc & 0xFFF), states_traced=states,
                       wait_reason=lambda i: "chan receive")


def churn(n: int, changes_per_row: int) -> tuple[dict, np.ndarray, Changes]:
    """Goroutines 1000.. created by a few parents, each living 50 us, with its state totals."""
    rng = np.random.default_rng(1)
    goid = np.arange(1000, 1000 + n, dtype=np.uint64)
    create = np.uint64(10**12) + goid * np.uint64(10_000)
    cols = {"tgid": np.full(n, 4242, np.uint32), "goid": goid, "parent_goid": goid // np.uint64(64) + np.uint64(1),
            "create_ns": create, "end_ns": create + np.uint64(50_000),
            "start_pc": rng.choice(np.array(PCS, np.uint64), n), "go_pc": rng.choice(np.array(PCS, np.uint64) + np.uint64(5), n),
            "state_ns": np.zeros((n, N_STATES), np.uint64), "transitions": np.full(n, changes_per_row, np.uint32),
            "events_left_out": np.zeros(n, np.uint32), "root_goid": goid // np.uint64(64) + np.uint64(1),
            "parent_root_goid": np.ones(n, np.uint64), "trace_reason": np.zeros(n, np.uint32), "flags": np.zeros(n, np.uint32)}
    cols["state_ns"][:, 1:5] = rng.integers(100, 30_000, (n, 4), dtype=np.uint64)
    for name in ("alloc_bytes", "alloc_count", "alloc_samples"):
        cols[name] = np.zeros(n, np.uint64)
    m = n * changes_per_row
    times = np.repeat(create, changes_per_row) + np.tile(np.arange(changes_per_row, dtype=np.uint64) * np.uint64(9_000), n)
    states = np.tile(np.array([2, 4, 1, 2][:changes_per_row] or [0], np.uint32), n)[:m]
    offsets = np.arange(n + 1, dtype=np.int64) * changes_per_row
    changes = Changes(offsets, times, np.roll(states, 1), states, np.full(m, 3, np.uint32))
    return cols, np.zeros(n, np.uint8), changes


def records(cols: dict, changes: Changes) -> list[GoroutineRecord]:
    lists = {k: v.tolist() for k, v in cols.items()}
    moves = [StateChange(*c) for c in zip(*(np.asarray(a).tolist() for a in changes.with_wakes()[1:]))]
    offsets = changes.offsets.tolist()
    return [GoroutineRecord(pid=lists["tgid"][i], goid=lists["goid"][i], parent_goid=lists["parent_goid"][i],
                            parent_traced=True, create_ns=lists["create_ns"][i], end_ns=lists["end_ns"][i],
                            start_pc=lists["start_pc"][i], go_pc=lists["go_pc"][i], state_ns=tuple(lists["state_ns"][i]),
                            transitions=lists["transitions"][i], events_left_out=0, end_reason=EndReason.EXITED,
                            root_goid=lists["root_goid"][i], parent_root_goid=1, trace_reason=TraceReason.JOINS_PARENT,
                            changes=moves[offsets[i]:offsets[i + 1]])
            for i in range(len(lists["goid"]))]


def per_span_us(fn, n: int, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best / n * 1e6


def measure(n: int, states: bool) -> tuple[float, float, float]:
    cols, end_reason, changes = churn(n, 4 if states else 0)
    b = builder(states)
    encoder = SpanEncoder(Resource({"service.name": "bench"}), SCOPE)
    recs = records(cols, changes)
    reference = per_span_us(lambda: [encoder.span(b.build(r)) for r in recs], n, 1)
    fast = BatchSpanEncoder(b, encoder)
    first = per_span_us(lambda: fast.encode(cols, end_reason, changes), n, 1)  # interns names, sites, events
    warm = per_span_us(lambda: fast.encode(cols, end_reason, changes), n, 3)
    assert fast.encode(cols, end_reason, changes)[:50] == [encoder.span(b.build(r)) for r in recs[:50]]
    return reference, first, warm


def measure_json(n: int, states: bool) -> tuple[float, float]:
    """us per span of an OTLP/JSON line: the SDK path from GoroutineSpans, then pack + transcode."""
    sys.path[:0] = [str(TESTS), str(TESTS / "unit")]
    from test_otlp_json import sdk_json  # the reference the transcoder is tested against
    cols, _, changes = churn(n, 4 if states else 0)
    b, resource = builder(states), Resource({"service.name": "bench"})
    spans = [b.build(r) for r in records(cols, changes)]
    encoder = SpanEncoder(resource, SCOPE)
    encoded = [encoder.span(s) for s in spans]
    batches = [slice(i, i + 8192) for i in range(0, n, 8192)]  # the export pipeline's batches
    sdk = per_span_us(lambda: [sdk_json(spans[s], resource) for s in batches], n, 1)
    fast = per_span_us(lambda: [transcode(r) for s in batches for r, _ in encoder.pack(encoded[s])], n, 3)
    return sdk, fast


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"{n:,} spans, CPU us per span (process time; batch: first call, then best of 3)")
    print(f"{'rows':<28}{'reference':>10}{'batch 1st':>11}{'batch':>8}")
    for label, states in (("lifecycle", False), ("states, 4 changes each", True)):
        reference, first, warm = measure(n, states)
        print(f"{label:<28}{reference:>10.2f}{first:>11.2f}{warm:>8.2f}")
    json_n = min(n, 20_000)
    print(f"\n{json_n:,} spans as OTLP/JSON file lines, CPU us per span (transcoder: best of 3)")
    print(f"{'rows':<28}{'SDK JSON':>10}{'pack+transcode':>16}")
    for label, states in (("lifecycle", False), ("states, 4 changes each", True)):
        sdk, fast = measure_json(json_n, states)
        print(f"{label:<28}{sdk:>10.2f}{fast:>16.2f}")


if __name__ == "__main__":
    main()
