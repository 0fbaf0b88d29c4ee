"""The heap-sample estimate: the kernel's integer arithmetic against pprof's scaling, and its
unbiasedness on simulated runtime sampling."""

import math
import random

import pytest

from otel_goroutines import allocs
from otel_goroutines.allocs import COUNT_UNIT, DEFAULT_RATE, kernel_estimate, sample_weight, weight_table

TABLE = weight_table()


def scale_heap_sample(count: int, size: int, rate: int) -> tuple[int, int]:
    """runtime/pprof's scaleHeapSample (protomem.go), as Go writes it."""
    if count == 0 or size == 0:
        return 0, 0
    if rate <= 1:
        return count, size
    avg = size / count
    scale = 1 / (1 - math.exp(-avg / rate))
    return int(count * scale), int(size * scale)


def test_h_runs_from_one_half_to_one():
    assert allocs.h(0) == 0.5
    assert allocs.h(1e-9) == pytest.approx(0.5)
    assert allocs.h(1.0) == pytest.approx(1 / (1 - math.exp(-1)) - 1)
    assert allocs.h(30) == pytest.approx(1 - 1 / 30)
    values = [allocs.h(x / 10) for x in range(1, 200)]
    assert values == sorted(values)


@pytest.mark.parametrize("size", [8, 16, 48, 512, 4096, 32768, 200_000, 524288, 1 << 20, 7 << 20, 64 << 20])
@pytest.mark.parametrize("rate", [DEFAULT_RATE, 64 * 1024, 4096])
def test_kernel_arithmetic_matches_pprof_per_sample(size, rate):
    bytes_, count_q = kernel_estimate(size, rate, TABLE)
    want_count, want_bytes = scale_heap_sample(1, size, rate)
    exact_weight = sample_weight(size, rate)
    # pprof truncates to integers per bucket; compare with the real-valued weight, within 0.2%.
    assert bytes_ == pytest.approx(size * exact_weight, rel=2e-3)
    assert count_q / COUNT_UNIT == pytest.approx(exact_weight, rel=2e-3)
    assert bytes_ == pytest.approx(want_bytes, rel=2e-3, abs=1)
    # and on a bucket of 1000 equal samples, pprof's count matches ours summed
    assert 1000 * count_q / COUNT_UNIT == pytest.approx(scale_heap_sample(1000, 1000 * size, rate)[0], rel=2e-3)


def test_rate_one_or_unknown_means_no_scaling():
    assert kernel_estimate(100, 1, TABLE) == (100, COUNT_UNIT)
    assert kernel_estimate(100, 0, TABLE) == (100, COUNT_UNIT)


def test_huge_samples_count_as_themselves():
    assert kernel_estimate(16 * DEFAULT_RATE, DEFAULT_RATE, TABLE) == (16 * DEFAULT_RATE, COUNT_UNIT)


def test_rate_is_capped_like_fastexprand():
    assert kernel_estimate(1000, 1 << 40, TABLE) == kernel_estimate(1000, allocs.RATE_CAP, TABLE)


def _go_sampling(sizes, rate, rng):
    """The runtime's sampler: an exponential countdown of mean `rate`, reset after each sample
    (malloc.go: c.nextSample -= size; if c.nextSample < 0 { profilealloc }). Yields sampled sizes."""
    countdown = rng.expovariate(1 / rate)
    for size in sizes:
        countdown -= size
        if countdown < 0:
            yield size
            countdown = rng.expovariate(1 / rate)


@pytest.mark.parametrize("mix", ["small", "mixed", "large"])
def test_estimate_is_unbiased_on_simulated_sampling(mix):
    rng = random.Random(42)
    rate = DEFAULT_RATE
    pools = {"small": [16, 64, 128, 512], "mixed": [32, 4096, 65536, 1 << 20], "large": [1 << 20, 4 << 20]}[mix]
    sizes = [rng.choice(pools) for _ in range(200_000 if mix == "small" else 20_000)]
    true_bytes, true_count = sum(sizes), len(sizes)
    runs = []
    for _ in range(40):
        est_bytes = est_count = 0
        for s in _go_sampling(sizes, rate, rng):
            b, c = kernel_estimate(s, rate, TABLE)
            est_bytes += b
            est_count += c
        runs.append((est_bytes, est_count / COUNT_UNIT))
    mean_bytes = sum(b for b, _ in runs) / len(runs)
    mean_count = sum(c for _, c in runs) / len(runs)
    # The mean of 40 runs: within 3 standard errors of the truth (a few percent).
    sd = math.sqrt(sum((b - mean_bytes) ** 2 for b, _ in runs) / (len(runs) - 1))
    assert abs(mean_bytes - true_bytes) < 3 * sd / math.sqrt(len(runs)) + 0.002 * true_bytes
    assert mean_count == pytest.approx(true_count, rel=0.1)


def test_render_lists_what_no_span_holds():
    text = allocs.render(allocs.AllocMode.SAMPLED, allocs.AllocTotals(3 << 20, 1000, 6),
                         [allocs.AllocTotals(1024, 2, 1), allocs.AllocTotals()], " at 1 per 524288 bytes")
    assert "sampled at 1 per 524288 bytes, estimates" in text
    assert "goroutine spans" in text and "3.0 MiB" in text and "from 6 samples" in text
    assert "system stack" in text and "goroutines without a span" in text


# --- the span attributes ----------------------------------------------------------------------

def _builder(mode):
    from otel_goroutines.spans import SpanBuilder
    return SpanBuilder(salt=7, clock_offset_ns=0, function_name=lambda pc: "main.worker", creation_site=lambda pc: None,
                       wait_reason=str, states_traced=False, allocs=mode)


def _record(**kw):
    from otel_goroutines.records import GoroutineRecord
    return GoroutineRecord(pid=10, goid=5, parent_goid=1, parent_traced=True, create_ns=1_000, end_ns=11_000,
                           start_pc=0x1000, go_pc=0, state_ns=(0,) * 12, transitions=0, events_left_out=0, **kw)


def test_span_attributes_per_mode():
    rec = _record(alloc_bytes=3 << 20, alloc_count=1200, alloc_samples=6)
    exact = _builder(allocs.AllocMode.EXACT).build(rec).attributes
    assert exact["go.goroutine.alloc.bytes"] == 3 << 20 and exact["go.goroutine.alloc.count"] == 1200
    assert "go.goroutine.alloc.samples" not in exact
    sampled = _builder(allocs.AllocMode.SAMPLED).build(rec).attributes
    assert sampled["go.goroutine.alloc.samples"] == 6
    off = _builder(allocs.AllocMode.OFF).build(rec).attributes
    assert not any(k.startswith("go.goroutine.alloc.") for k in off)


def test_checkpoint_spans_count_what_was_allocated_since_the_last_one():
    from otel_goroutines.spans import Checkpointed
    before = Checkpointed(count=1, until_ns=5_000, state_ns=(0,) * 12, allocs=(1 << 20, 100, 2))
    rec = _record(alloc_bytes=3 << 20, alloc_count=300, alloc_samples=6)
    b = _builder(allocs.AllocMode.SAMPLED)
    attrs = b.checkpoint(rec, before, 9_000).attributes
    assert (attrs["go.goroutine.alloc.bytes"], attrs["go.goroutine.alloc.count"], attrs["go.goroutine.alloc.samples"]) == (2 << 20, 200, 4)
    final = b.build(rec, before).attributes  # the final span covers the whole life
    assert (final["go.goroutine.alloc.bytes"], final["go.goroutine.alloc.count"], final["go.goroutine.alloc.samples"]) == (3 << 20, 300, 6)
