"""Checkpoint and leak decisions, the span budget and metric building: pure logic."""

from opentelemetry.sdk.resources import Resource

from otel_goroutines.goruntime import G_LEAKED, G_RUNNING, G_WAITING
from otel_goroutines.longlived import LongLived, LongLivedSettings
from otel_goroutines.metrics import GoroutineMetrics
from otel_goroutines.records import GoroutineRecord
from otel_goroutines.sampling import SpanBudget
from otel_goroutines.spans import GoroutineSpan

S = 1_000_000_000


def rec(goid, status=G_RUNNING, since=0, create=0, start_pc=0x100):
    return GoroutineRecord(pid=1, goid=goid, parent_goid=0, parent_traced=False, create_ns=create, end_ns=0,
                           start_pc=start_pc, go_pc=0, state_ns=(0,) * 12, transitions=0, events_left_out=0,
                           status=status, since_ns=since)


def never_runtime(pc):
    return False


def test_leak_flagged_once_per_wait():
    ll = LongLived(LongLivedSettings(checkpoint_after_s=0, leak_after_s=5))
    blocked = rec(1, G_WAITING, since=0)
    assert ll.due([blocked], 4 * S, never_runtime) == []
    first = ll.due([blocked], 5 * S, never_runtime)
    assert [d.record.goid for d in first] == [1] and "blocked in one wait" in first[0].leak
    assert ll.due([blocked], 9 * S, never_runtime) == []          # same wait: flagged already
    assert ll.due([rec(1, G_WAITING, since=6 * S)], 12 * S, never_runtime)  # a new wait counts again
    assert ll.leaks_flagged == 2


def test_runtime_goroutines_are_not_suspects_but_runtime_leaks_are():
    ll = LongLived(LongLivedSettings(checkpoint_after_s=0, leak_after_s=1))
    assert ll.due([rec(1, G_WAITING)], 10 * S, lambda pc: True) == []
    leaked = ll.due([rec(2, G_LEAKED, since=9 * S)], 10 * S, never_runtime)
    assert leaked and leaked[0].leak == "the Go runtime marked it leaked"
    assert ll.finish(leaked[0].record)[1:] == (True, True)  # its final span: flagged, and an error


def test_checkpoints_come_every_interval():
    ll = LongLived(LongLivedSettings(checkpoint_after_s=2, leak_after_s=0))
    g = rec(1, create=0)
    assert ll.due([g], 1 * S, never_runtime) == []
    assert ll.due([g], 2 * S, never_runtime)
    assert ll.record_checkpoint(g, 2 * S) is None
    assert ll.due([g], 3 * S, never_runtime) == []
    assert ll.due([g], 4 * S, never_runtime)
    assert ll.record_checkpoint(g, 4 * S).count == 1
    before, flagged, marked = ll.finish(g)
    assert before.count == 2 and before.until_ns == 4 * S and not flagged and not marked


def test_scan_interval_follows_the_thresholds():
    assert LongLivedSettings(60, 300).scan_interval_s == 5.0
    assert LongLivedSettings(0.5, 1).scan_interval_s == 0.2
    assert LongLivedSettings(0, 0).scan_interval_s == 0.0


def span(ms, **attrs):
    return GoroutineSpan(1, 1, None, "f", 0, int(ms * 1e6), attrs)


def test_budget_keeps_the_interesting_and_counts_the_rest():
    budget = SpanBudget(spans_per_second=10)
    boring = [span(1) for _ in range(100)]
    interesting = [span(2000), span(1, **{"go.goroutine.alive_at_end": True}), span(1, **{"go.goroutine.waiting_ns": 5 * S})]
    kept = budget.select(boring + interesting)
    assert all(s in kept for s in interesting)
    assert len(kept) <= 10 + len(interesting)
    assert budget.sampled_out == 100 + len(interesting) - len(kept)


def test_no_budget_keeps_all():
    assert len(SpanBudget().select([span(1)] * 1000)) == 1000


def test_metrics_fold_rare_functions_and_count_live():
    names = {pc: f"main.f{pc}" for pc in range(100)}
    m = GoroutineMetrics(Resource({}), names.get, 0)
    m.existing_at_attach = 5
    counts = {pc: (pc + 1, pc) for pc in range(100)}  # one alive per function
    data = m.collect(10, counts, [0, 2, 3] + [0] * 37 + [50], leaks=1, spans={"exported": 7})
    metrics = {x.name: x for x in data.resource_metrics[0].scope_metrics[0].metrics}
    assert metrics["go.goroutine.count"].data.data_points[0].value == 105
    created = {dp.attributes["code.function.name"]: dp.value for dp in metrics["go.goroutine.created"].data.data_points}
    assert len(created) == 51 and created["main.f99"] == 100  # 50 busiest by name, the rest as "other"
    assert sum(created.values()) == sum(c for c, _ in counts.values())
    sched = metrics["go.schedule.duration"].data.data_points[0]
    assert sched.count == 5 and sched.sum == 50 / 1e9 and list(sched.bucket_counts[:3]) == [0, 2, 3]
    assert len(sched.explicit_bounds) == len(sched.bucket_counts) - 1
