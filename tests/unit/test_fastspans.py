"""The batch span encoder writes, row by row, the bytes of the reference path:
SpanEncoder.span(SpanBuilder.build(record)). Generated rows, seeded, with the edges of every field."""

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from otel_goroutines import spans
from otel_goroutines.allocs import AllocMode
from otel_goroutines.exporters import SCOPE, to_readable
from otel_goroutines.fastspans import BatchSpanEncoder, Changes, mix64
from otel_goroutines.goruntime import N_STATES
from otel_goroutines.otlp_wire import SpanEncoder
from otel_goroutines.records import EndReason, GoroutineRecord, StateChange, TraceReason

RESOURCE = Resource({"service.name": "svc", "process.pid": 4242})
OFFSET = 1_795_640_284_041_076_235  # wall clock - kernel clock
SALT = 0xC0FFEE_1234_5678_9ABC
NAMES = {0x401000: "main.worker", 0x402000: "runtime.main", 0x403000: "pkg.(*T).ünïcode-" + "x" * 150,
         0x404000: "runtime.ready", 0x405000: "runtime.injectglist", 0x406000: "runtime.gcBgMarkWorker",
         0x407000: "runtime.runFinalizers"}
SITES = {0x501005: ("main.main", "/src/main.go", 42), 0x502005: ("f", "", 0), 0x503005: ("main.spawn", "/s/x.go", 1 << 40)}
WAIT_REASONS = ["", "GC assist marking", "IO wait", "chan receive", "select", "sleep"]
INT64_MAX = (1 << 63) - 1
U64_MAX = (1 << 64) - 1
COLUMNS = {"tgid": np.uint32, "goid": np.uint64, "parent_goid": np.uint64, "create_ns": np.uint64,
           "end_ns": np.uint64, "start_pc": np.uint64, "go_pc": np.uint64, "transitions": np.uint32,
           "events_left_out": np.uint32, "root_goid": np.uint64, "parent_root_goid": np.uint64,
           "trace_reason": np.uint32, "flags": np.uint32, "alloc_bytes": np.uint64, "alloc_count": np.uint64,
           "alloc_samples": np.uint64}


def builder(states: bool, allocs: AllocMode = AllocMode.OFF, wakers: bool = True) -> spans.SpanBuilder:
    return spans.SpanBuilder(salt=SALT, clock_offset_ns=OFFSET, function_name=lambda pc: NAMES.get(pc, f"{pc:#x}"),
                             creation_site=SITES.get, states_traced=states, allocs=allocs, wakers=wakers,
                             wait_reason=lambda i: WAIT_REASONS[i] if i < len(WAIT_REASONS) else f"waitreason({i})")


def unmix(salt: int, z: int) -> int:
    """The n whose splitmix64 is z: a goroutine id whose span id would be 0 without the `or 1`."""
    def unshift(x, s):
        y = x
        for _ in range(64 // s + 1):
            y = x ^ (y >> s)
        return y
    z = unshift(z, 31)
    z = unshift(z * pow(0x94D049BB133111EB, -1, 1 << 64) & U64_MAX, 27)
    z = unshift(z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64) & U64_MAX, 30)
    return (z - salt) * pow(0x9E3779B97F4A7C15, -1, 1 << 64) & U64_MAX


def values(rng, n: int, top: int) -> np.ndarray:
    """Zero, varint length edges, random sizes, and the largest values below top."""
    edges = np.array([0, 0, 1, 127, 128, 16383, 16384, top, top - 1], np.uint64)
    sized = rng.integers(0, 1 << 62, n, dtype=np.uint64) >> rng.integers(0, 62, n, dtype=np.uint64)
    pick = rng.random(n) < 0.3
    return np.where(pick, rng.choice(edges[edges <= top], n), sized % np.uint64(top))


def generate(rng, n: int, many: int = 40) -> tuple[dict, np.ndarray, Changes]:
    cols = {name: values(rng, n, U64_MAX if dtype is np.uint64 else 0xFFFFFFFF).astype(dtype)
            for name, dtype in COLUMNS.items()}
    cols["create_ns"] = values(rng, n, INT64_MAX)
    cols["end_ns"] = values(rng, n, INT64_MAX)
    cols["start_pc"] = rng.choice(np.array([*NAMES, 0, 0x4ABCDE, U64_MAX], np.uint64), n)
    cols["go_pc"] = rng.choice(np.array([*SITES, 0, 0x5ABCDE], np.uint64), n)
    cols["trace_reason"] = rng.integers(0, len(TraceReason), n, dtype=np.uint32)
    cols["flags"] = rng.integers(0, 4, n, dtype=np.uint32)
    cols["state_ns"] = np.where(rng.random((n, N_STATES)) < 0.5, 0, values(rng, n * N_STATES, U64_MAX).reshape(n, N_STATES))
    cols["goid"][:2] = cols["root_goid"][:2] = unmix(SALT, 0)  # span id and trace id 0 -> 1
    counts = rng.choice([0, 0, 1, 4, many], n)
    counts[-1] = 500  # a span over 16 KiB: a three-byte length
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m = int(offsets[-1])
    before, to = (rng.integers(0, N_STATES + 2, m, dtype=np.uint32) for _ in range(2))
    wake = rng.random(m) < 0.5  # waiting -> runnable
    before[wake], to[wake] = 4, 1
    woken = np.repeat(cols["goid"], counts)
    # Wakers: a few goroutines (more than a span links in the long rows), edges, the woken one itself.
    parent = np.repeat(cols["parent_goid"], counts)
    waker_goid = np.where(rng.random(m) < 0.1, woken, np.where(rng.random(m) < 0.1, parent, rng.choice(np.array([0, 7, 8, INT64_MAX, U64_MAX, *range(100, 112)],
                                                                           np.uint64), m)))
    changes = Changes(offsets, values(rng, m, INT64_MAX), before, to, rng.integers(0, 7, m, dtype=np.uint32),
                      np.where(wake, rng.integers(0, 8, m, dtype=np.uint32), 0), waker_goid, values(rng, m, U64_MAX),
                      rng.choice(np.array([*NAMES, 0], np.uint64), m), rng.choice(np.array([*NAMES, 0, 0x4ABCDE], np.uint64), m))
    return cols, rng.integers(0, len(EndReason), n, dtype=np.uint8), changes


def records(cols: dict, end_reason: np.ndarray, changes: Changes) -> list[GoroutineRecord]:
    rows = [dict(zip(cols, values)) for values in zip(*(c.tolist() for c in cols.values()))]
    moves = list(zip(*(np.asarray(c).tolist() for c in changes.with_wakes()[1:])))
    offsets = changes.offsets.tolist()
    return [GoroutineRecord(
        pid=r["tgid"], goid=r["goid"], parent_goid=r["parent_goid"], parent_traced=True, create_ns=r["create_ns"],
        end_ns=r["end_ns"], start_pc=r["start_pc"], go_pc=r["go_pc"], state_ns=tuple(r["state_ns"]),
        transitions=r["transitions"], events_left_out=r["events_left_out"], end_reason=list(EndReason)[end],
        root_goid=r["root_goid"], parent_root_goid=r["parent_root_goid"], trace_reason=TraceReason(r["trace_reason"]),
        existed_at_attach=bool(r["flags"] & 1), alloc_bytes=r["alloc_bytes"], alloc_count=r["alloc_count"],
        alloc_samples=r["alloc_samples"], changes=[StateChange(*m) for m in moves[offsets[i]:offsets[i + 1]]])
        for i, (r, end) in enumerate(zip(rows, end_reason.tolist()))]


@pytest.mark.parametrize("allocs,wakers", [(a, True) for a in AllocMode] + [(AllocMode.OFF, False)])
@pytest.mark.parametrize("states", [False, True])
def test_same_bytes_as_the_reference_for_every_row(states, allocs, wakers):
    b, encoder = builder(states, allocs, wakers), SpanEncoder(RESOURCE, SCOPE)
    fast = BatchSpanEncoder(b, encoder)
    rng = np.random.default_rng(11 + states * 3 + list(AllocMode).index(allocs))
    for _ in range(2):  # a second batch reuses what the first interned
        cols, end_reason, changes = generate(rng, 400)
        if not states:
            changes = Changes.none(400)
        got = fast.encode(cols, end_reason, changes)
        want = [encoder.span(b.build(rec)) for rec in records(cols, end_reason, changes)]
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"row {i}"


def test_a_request_decodes_to_what_the_sdk_builds():
    b, encoder = builder(True, AllocMode.SAMPLED), SpanEncoder(RESOURCE, SCOPE)
    cols, end_reason, changes = generate(np.random.default_rng(5), 60, many=8)
    for name in ("goid", "parent_goid", "alloc_bytes", "alloc_count", "alloc_samples"):  # ints the SDK keeps
        cols[name] &= np.uint64(INT64_MAX)
    cols["state_ns"] &= np.uint64(INT64_MAX)
    req = ExportTraceServiceRequest()
    req.ParseFromString(encoder.request(BatchSpanEncoder(b, encoder).encode(cols, end_reason, changes)))
    sdk = encode_spans([to_readable(b.build(rec), RESOURCE) for rec in records(cols, end_reason, changes)])
    assert req == sdk


def test_ids_match_the_reference_mix():
    goids = np.array([0, 1, 5, INT64_MAX, U64_MAX, unmix(SALT, 0), unmix(SALT ^ 77, 0)], np.uint64)
    for salt in (SALT, SALT ^ 77, -3, 1 << 70):
        assert mix64(salt, goids).tolist() == [spans.mix64(salt, g) for g in goids.tolist()]
    assert mix64(SALT, goids)[5] == 1


def test_empty_batch_and_bad_reasons():
    fast = BatchSpanEncoder(builder(True), SpanEncoder(RESOURCE, SCOPE))
    cols, end_reason, changes = generate(np.random.default_rng(1), 3, many=2)
    assert fast.encode({k: v[:0] for k, v in cols.items()}, end_reason[:0], Changes.none(0)) == []
    with pytest.raises(ValueError):
        fast.encode(cols, end_reason + 3, changes)
    cols["trace_reason"][0] = max(TraceReason) + 1
    with pytest.raises(ValueError):
        fast.encode(cols, end_reason, changes)


def test_traced_in_full_same_bytes_as_the_reference():
    """Under an overhead budget every span says whether it was traced in full, beside existed_at_attach."""
    b, encoder = builder(True), SpanEncoder(RESOURCE, SCOPE)
    rng = np.random.default_rng(5)
    cols, end_reason, changes = generate(rng, 200)
    cols["traced_in_full"] = rng.random(200) < 0.5
    got = BatchSpanEncoder(b, encoder).encode(cols, end_reason, changes)
    recs = records(cols, end_reason, changes)
    for rec, full in zip(recs, cols["traced_in_full"].tolist()):
        rec.traced_in_full = full
    want = [encoder.span(b.build(rec)) for rec in recs]
    assert got == want
    assert b.build(recs[0]).attributes["go.goroutine.traced_in_full"] is bool(cols["traced_in_full"][0])
