"""The span builder on generated records: pure, no kernel."""

from otel_goroutines.records import EndReason, GoroutineRecord, StateChange, TraceReason
from otel_goroutines.spans import Checkpointed, SpanBuilder, span_id_for, trace_id_for

OFFSET = 1_700_000_000_000_000_000
NAMES = {0x1000: "main.worker", 0x2000: "runtime.main"}
SITES = {0x3005: ("main.main", "/src/main.go", 42)}
WAIT_REASONS = ["", "GC assist marking", "IO wait", "chan receive"]


def builder(states=True):
    return SpanBuilder(salt=7, clock_offset_ns=OFFSET, function_name=NAMES.get,
                       creation_site=SITES.get, wait_reason=lambda i: WAIT_REASONS[i], states_traced=states)


def record(**kw):
    base = dict(pid=10, goid=5, parent_goid=1, parent_traced=True, create_ns=1_000, end_ns=11_000,
                start_pc=0x1000, go_pc=0x3005, state_ns=(0, 2_000, 3_000, 0, 5_000) + (0,) * 7,
                transitions=3, events_left_out=0, root_goid=1, trace_reason=TraceReason.JOINS_PARENT)
    base.update(kw)
    return GoroutineRecord(**base)


def test_span_fields_and_attributes():
    span = builder().build(record())
    assert span.name == "main.worker"
    assert (span.start_ns, span.end_ns) == (OFFSET + 1_000, OFFSET + 11_000)
    assert span.trace_id == trace_id_for(7, 1) and span.trace_id >> 64  # the trace of root goroutine 1, 128 bits
    assert span.span_id == span_id_for(7, 5)
    assert span.parent_span_id == span_id_for(7, 1)
    assert span.attributes == {
        "go.goroutine.id": 5, "go.goroutine.parent_id": 1, "code.function.name": "main.worker",
        "go.goroutine.end_reason": "exited", "go.goroutine.created_by": "main.main",
        "code.file.path": "/src/main.go", "code.line.number": 42,
        "go.goroutine.runnable_ns": 2_000, "go.goroutine.running_ns": 3_000, "go.goroutine.waiting_ns": 5_000,
        "go.goroutine.transitions": 3, "go.goroutine.events_left_out": 0,
    }


def test_untraced_parent_gives_a_root_span_that_still_names_its_parent():
    span = builder().build(record(parent_traced=False, parent_goid=99, root_goid=5, trace_reason=TraceReason.UNTRACED_PARENT))
    assert span.parent_span_id is None and not span.links
    assert span.trace_id == trace_id_for(7, 5)
    assert span.attributes["go.goroutine.parent_id"] == 99
    assert span.attributes["go.goroutine.trace_reason"] == "untraced_parent"


def test_child_of_a_spawner_starts_a_trace_linked_to_its_creator():
    for reason, text in ((TraceReason.SPAWNER, "spawner"), (TraceReason.TRACE_FULL, "trace_full")):
        span = builder().build(record(root_goid=5, parent_root_goid=1, trace_reason=reason))
        assert span.parent_span_id is None and span.trace_id == trace_id_for(7, 5)
        assert [(l.trace_id, l.span_id) for l in span.links] == [(trace_id_for(7, 1), span_id_for(7, 1))]
        assert span.attributes["go.goroutine.trace_reason"] == text


def test_checkpoints_chain_and_split_the_totals():
    b = builder()
    first = b.checkpoint(record(end_ns=0, state_ns=(0, 100, 200, 0, 300) + (0,) * 7), None, 5_000)
    assert (first.start_ns - OFFSET, first.end_ns - OFFSET) == (1_000, 5_000)
    assert first.attributes["go.goroutine.checkpoint"] == 1 and first.attributes["go.goroutine.partial"] is True
    assert first.attributes["go.goroutine.waiting_ns"] == 300
    before = Checkpointed(1, 5_000, (0, 100, 200, 0, 300) + (0,) * 7)
    second = b.checkpoint(record(end_ns=0), before, 9_000)
    assert (second.trace_id, second.start_ns - OFFSET, second.attributes["go.goroutine.checkpoint"]) == (first.trace_id, 5_000, 2)
    assert not first.links and not second.links  # within one trace, a link would be a parent to Jaeger
    final = b.build(record(), before)
    # The final span covers the whole life (its children never start before it), with whole-life totals.
    assert (final.start_ns - OFFSET, final.end_ns - OFFSET) == (1_000, 11_000)
    assert final.span_id == span_id_for(7, 5)  # the goroutine's own span id stays for its children
    assert final.attributes["go.goroutine.checkpoints"] == 1
    assert final.attributes["go.goroutine.waiting_ns"] == 5_000 and final.attributes["go.goroutine.running_ns"] == 3_000
    assert [(l.trace_id, l.span_id) for l in final.links] == [(first.trace_id, first.span_id)]
    assert first.trace_id != final.trace_id  # checkpoints live in the goroutine's own history trace


def test_state_changes_become_events_with_wait_reasons():
    changes = [StateChange(2_000, 1, 2, 0), StateChange(3_000, 2, 4, 3), StateChange(8_000, 4, 1, 0)]
    span = builder().build(record(changes=changes))
    assert [(e.name, e.time_ns - OFFSET) for e in span.events] == [
        ("running", 2_000), ("waiting", 3_000), ("runnable", 8_000), ("exited", 11_000)]
    assert span.events[1].attributes == {"go.goroutine.state.previous": "running", "go.goroutine.wait_reason": "chan receive"}
    assert "go.goroutine.wait_reason" not in span.events[0].attributes


def test_alive_at_end_is_marked():
    for reason in (EndReason.PROCESS_EXITED, EndReason.AGENT_STOPPED):
        span = builder().build(record(end_reason=reason))
        assert span.attributes["go.goroutine.alive_at_end"] is True
        assert span.attributes["go.goroutine.end_reason"] == reason.value
        assert span.events[-1].name == reason.value
    assert "go.goroutine.alive_at_end" not in builder().build(record()).attributes


def test_lifecycle_detail_has_no_state_totals():
    attrs = builder(states=False).build(record()).attributes
    assert not any(k.endswith("_ns") for k in attrs) and "go.goroutine.transitions" not in attrs


def test_unknown_creation_site_and_function():
    span = builder().build(record(start_pc=0x9999, go_pc=0x7777))
    assert "code.file.path" not in span.attributes and "go.goroutine.created_by" not in span.attributes


def test_span_ids_are_unique_and_never_zero():
    ids = {span_id_for(0xDEADBEEF, goid) for goid in range(200_000)}
    assert len(ids) == 200_000 and 0 not in ids
    assert span_id_for(1, 5) != span_id_for(2, 5)
