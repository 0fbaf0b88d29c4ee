"""Pure logic behind the fault handling: the flush deadline, start-up validation, error messages,
whole-line files."""

import pytest

from otel_goroutines.deadline import Deadline, bound_sdk_exporter


def _sdk_exporters():
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans
    return [cls(endpoint="http://127.0.0.1:9", timeout=5) for cls in (GrpcSpans, GrpcMetrics, HttpSpans, HttpMetrics)]


def _timeout(exporter) -> float:
    client = getattr(exporter, "_client", None)
    return client._timeout if hasattr(client, "_timeout") else exporter._timeout


@pytest.mark.parametrize("exporter", _sdk_exporters(), ids=lambda e: type(e).__module__.split(".")[4] + " " + type(e).__name__)
def test_sdk_exporter_timeout_never_past_the_deadline(exporter):
    deadline = Deadline()
    assert bound_sdk_exporter(exporter, deadline, 5) and _timeout(exporter) == 5  # no deadline yet: its own
    deadline.start(1.0)
    assert bound_sdk_exporter(exporter, deadline, 5) and 0.5 < _timeout(exporter) <= 1.0
    deadline.start(0)
    assert not bound_sdk_exporter(exporter, deadline, 5)  # nothing left: no call at all
    exporter.shutdown()


def test_deadline_only_moves_closer():
    deadline = Deadline()
    deadline.start(1.0)
    deadline.start(100.0)
    assert deadline.remaining() <= 1.0
