"""An OTLP endpoint that takes no metrics (a tracing backend such as Jaeger): said once, not sent any
more, counted. gRPC's UNIMPLEMENTED against real Jaeger is in tests/e2e/test_pipeline.py; here an
HTTP endpoint answering 404 and one answering 503 (down for a while, not refusing: still tried)."""

from __future__ import annotations

import logging

from opentelemetry.sdk.metrics.export import MetricsData

from fake_collectors import HttpStatusCollector
from helpers import poll
from otel_goroutines.metrics import MetricsSender

EMPTY = MetricsData(resource_metrics=[])


def _send(sender: MetricsSender, times: int) -> None:
    for i in range(times):
        sender.send(EMPTY)
        assert poll(lambda: sender.not_sent + sender.failures > i, 20), "the export never ended"


def test_http_404_said_once_and_not_sent_again(caplog):
    caplog.set_level(logging.WARNING)
    with HttpStatusCollector(404) as collector:
        sender = MetricsSender("otlp", "http/protobuf", collector.endpoint, None)
        _send(sender, 3)
        sender.close(EMPTY, 10)
    assert sender.not_sent == 4 and sender.failures == 0
    said = [r for r in caplog.records if "takes no metrics" in r.getMessage()]
    assert len(said) == 1 and "HTTP 404" in said[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_other_failures_still_tried():
    with HttpStatusCollector(400) as collector:  # not retried by the SDK: fast
        sender = MetricsSender("otlp", "http/protobuf", collector.endpoint, None)
        _send(sender, 2)
        sender.close(None, 10)
    assert sender.failures == 2 and sender.not_sent == 0
