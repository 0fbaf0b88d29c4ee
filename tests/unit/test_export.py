"""OTLP/JSON encoding and the bounded retry buffer, without a network."""

import json
import threading
import time

from opentelemetry.sdk.resources import Resource

from helpers import spans_from_otlp_json
from otel_goroutines.exporters import ConsoleSink, FileSink
from otel_goroutines.pipeline import ExportPipeline
from otel_goroutines.spans import GoroutineSpan, SpanEvent


def span(goid, parent=None):
    return GoroutineSpan(trace_id=0x0123456789ABCDEF0123456789ABCDEF, span_id=0x1000 + goid, parent_span_id=parent,
                         name="main.worker", start_ns=10, end_ns=20, attributes={"go.goroutine.id": goid},
                         events=[SpanEvent("waiting", 15, {"go.goroutine.wait_reason": "sleep"})])


def test_otlp_json_round_trip(tmp_path):
    path = tmp_path / "s.jsonl"
    sink = FileSink(str(path), Resource({"service.name": "svc"}))
    assert sink.export([sink.encoder.span(s) for s in (span(1), span(2, parent=0x1001))])
    sink.shutdown()
    raw = json.loads(path.read_text())["resourceSpans"][0]["scopeSpans"][0]["spans"][1]
    assert raw["traceId"] == "0123456789abcdef0123456789abcdef"  # OTLP/JSON: hex ids, not base64
    assert raw["parentSpanId"] == "0000000000001001"
    assert raw["kind"] == 1  # enums as integers
    back = spans_from_otlp_json(path)
    assert [(s.span_id, s.parent_span_id, s.attributes["go.goroutine.id"]) for s in back] == [
        ("0000000000001001", "", 1), ("0000000000001002", "0000000000001001", 2)]
    assert back[0].events == [("waiting", 15, {"go.goroutine.wait_reason": "sleep"})]
    assert back[0].resource["service.name"] == "svc"


def test_console_names_the_parent_of_a_span_that_starts_a_trace():
    """A goroutine whose span starts a trace of its own still has a parent goroutine: only one
    created by no goroutine (runtime.main) is the root."""
    import io
    out = io.StringIO()
    main, dispatched, child = span(1), span(2), span(3, parent=0x1002)
    main.attributes["go.goroutine.parent_id"] = 0
    dispatched.attributes.update({"go.goroutine.parent_id": 1, "go.goroutine.trace_reason": "spawner"})
    child.attributes["go.goroutine.parent_id"] = 2
    ConsoleSink(out).export([main, dispatched, child])
    lines = [line for line in out.getvalue().splitlines() if line.startswith("goroutine")]
    assert [line.split(" main.worker")[0] for line in lines] == [
        "goroutine 1 (root)", "goroutine 2 parent=1 (spawner)", "goroutine 3 parent=2"]


class FlakySink:
    """Fails until told to recover; records what it accepted."""

    failure_hint = "told to fail"

    def __init__(self):
        self.healthy = threading.Event()
        self.accepted = []
        self.attempts = 0

    def export(self, spans):
        self.attempts += 1
        if not self.healthy.is_set():
            return False
        self.accepted += spans
        return True

    def shutdown(self):
        pass


def test_outage_is_retried_then_delivered_in_order():
    sink = FlakySink()
    pipeline = ExportPipeline(sink, max_buffered=1000, batch_size=10, max_backoff_s=0.05)
    pipeline.submit([span(i) for i in range(100)])
    while sink.attempts < 3:
        time.sleep(0.01)
    sink.healthy.set()
    stats = pipeline.close(timeout_s=5)
    assert [s.attributes["go.goroutine.id"] for s in sink.accepted] == list(range(100))
    assert stats.exported == 100 and stats.dropped == 0 and stats.failed_attempts >= 3


def test_overflow_drops_oldest_and_counts():
    sink = FlakySink()
    pipeline = ExportPipeline(sink, max_buffered=50, batch_size=10, max_backoff_s=0.05)
    pipeline.submit([span(i) for i in range(200)])
    sink.healthy.set()
    stats = pipeline.close(timeout_s=5)
    assert stats.exported + stats.dropped == 200
    assert stats.dropped >= 150
    assert sink.accepted[-1].attributes["go.goroutine.id"] == 199  # the newest survive


class GateSink(FlakySink):
    """Fails, but each call first waits until the test lets it return."""

    def __init__(self):
        super().__init__()
        self.in_call, self.release = threading.Event(), threading.Event()

    def export(self, spans):
        self.in_call.set()
        self.release.wait()
        return super().export(spans)


def test_the_bound_counts_the_batch_in_an_export_call():
    """Spans submitted while a batch is out in an export call make room for it: the pipeline never
    holds more than max_buffered, and a failed batch put back does not push it over."""
    sink = GateSink()
    pipeline = ExportPipeline(sink, max_buffered=50, batch_size=10, max_backoff_s=0.05)
    pipeline.submit([span(i) for i in range(10)])
    assert sink.in_call.wait(5)  # the first 10 are out, in a call that will fail
    pipeline.submit([span(i) for i in range(10, 60)])
    assert pipeline.buffered == 40 and pipeline.stats.dropped == 10  # 10 to 19, the oldest waiting
    sink.release.set()
    while sink.attempts < 2:
        time.sleep(0.01)
    sink.healthy.set()
    stats = pipeline.close(timeout_s=5)
    assert stats.exported == 50 and stats.dropped == 10
    assert [s.attributes["go.goroutine.id"] for s in sink.accepted] == [*range(10), *range(20, 60)]


def test_unsent_at_shutdown_is_counted_within_the_deadline():
    sink = FlakySink()  # never recovers
    pipeline = ExportPipeline(sink, max_buffered=1000, batch_size=10, max_backoff_s=0.05)
    pipeline.submit([span(i) for i in range(30)])
    stats = pipeline.close(timeout_s=0.3)
    assert stats.exported == 0 and stats.dropped == 30


class RaisingSink(FlakySink):
    def export(self, spans):
        raise RuntimeError("boom")


def test_a_raising_sink_does_not_kill_the_pipeline():
    pipeline = ExportPipeline(RaisingSink(), max_buffered=100, batch_size=10, max_backoff_s=0.05)
    pipeline.submit([span(1)])
    assert pipeline.close(timeout_s=0.3).dropped == 1


class HangingSink(FlakySink):
    """An export call that does not return in time (a collector that accepts but never answers)."""

    def export(self, spans):
        time.sleep(2)
        return True


def test_a_batch_still_in_flight_at_shutdown_is_counted():
    pipeline = ExportPipeline(HangingSink(), max_buffered=100, batch_size=10, max_backoff_s=0.05)
    pipeline.submit([span(i) for i in range(25)])
    time.sleep(0.1)
    stats = pipeline.close(timeout_s=0.1)
    assert stats.exported == 0 and stats.dropped == 25
