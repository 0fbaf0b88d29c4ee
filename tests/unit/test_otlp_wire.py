"""The fast OTLP encoder writes what the OpenTelemetry SDK's encoder builds, byte for byte decodable."""

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from otel_goroutines.exporters import SCOPE, to_readable
from otel_goroutines.otlp_wire import SpanEncoder
from otel_goroutines.spans import GoroutineSpan, SpanEvent, SpanLink

RESOURCE = Resource({"service.name": "svc", "process.pid": 4242, "process.runtime.name": "go",
                     "host.name": "hôte", "telemetry.sdk.version": "0.1.0"})


def _spans() -> list[GoroutineSpan]:
    t = 1_795_640_284_041_076_235
    root = GoroutineSpan(0xD3A5FE428592548DDA201D2B88409AAC, 0x2C7CEEFD390C8DBE, None, "runtime.main", t, t + 10_000_000,
                         {"go.goroutine.id": 1, "go.goroutine.parent_id": 0, "code.function.name": "runtime.main",
                          "go.goroutine.end_reason": "process_exited", "go.goroutine.alive_at_end": True},
                         [SpanEvent("process_exited", t + 10_000_000, {})])
    worker = GoroutineSpan(0xD3A5FE428592548DDA201D2B88409AAC, 0x16D2A846B5EE0FD8, 0x2C7CEEFD390C8DBE, "main.worker",
                           t + 1000, t + 5_000_000,
                           {"go.goroutine.id": 5, "go.goroutine.parent_id": 1, "code.function.name": "main.worker",
                            "code.file.path": "/tmp/spike/main.go", "code.line.number": 18, "go.goroutine.running_ns": 4788,
                            "go.goroutine.transitions": 300, "go.goroutine.negative": -7, "go.goroutine.big": (1 << 63) - 1,
                            "go.goroutine.ratio": 0.25, "go.goroutine.tags": ("a", "b"), "go.goroutine.unicode": "ü→✓"},
                           [SpanEvent("running", t + 2000, {"go.goroutine.state.previous": "runnable"}),
                            SpanEvent("waiting", t + 3000, {"go.goroutine.state.previous": "running",
                                                            "go.goroutine.wait_reason": "chan receive"}),
                            SpanEvent("running", t + 4000, {"go.goroutine.state.previous": "waiting"}),
                            SpanEvent("exited", t + 5_000_000, {})])
    linked = GoroutineSpan(0x1, 0xFFFFFFFFFFFFFFFF, None, "main.handler" + "x" * 200, t, t + 1,
                           {"go.goroutine.id": 1 << 40, "go.goroutine.trace_reason": "spawner"},
                           [], [SpanLink(0xD3A5FE428592548DDA201D2B88409AAC, 0x16D2A846B5EE0FD8, {"go.goroutine.link": "creator"})],
                           error="goroutine leaked")
    return [root, worker, linked]


def _sdk(spans) -> ExportTraceServiceRequest:
    return encode_spans([to_readable(s, RESOURCE) for s in spans])


def _fast(spans, **kwargs) -> list[ExportTraceServiceRequest]:
    out = []
    for payload, count in SpanEncoder(RESOURCE, SCOPE, **kwargs).requests(spans):
        req = ExportTraceServiceRequest()
        req.ParseFromString(payload)
        assert sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans) == count
        out.append(req)
    return out


def test_decodes_to_what_the_sdk_encoder_builds():
    spans = _spans()
    [fast] = _fast(spans)
    assert fast == _sdk(spans)


def test_same_bytes_as_the_sdk_serialization():
    spans = _spans()
    [(payload, _)] = list(SpanEncoder(RESOURCE, SCOPE).requests(spans))
    assert payload == _sdk(spans).SerializeToString()


def test_an_attribute_shared_by_a_span_its_events_and_links():
    # Encodings are cached with their field's tag: a span attribute's must not serve an event's.
    shared = {"go.goroutine.state.previous": "running", "flag": True}
    span = GoroutineSpan(0x1, 0x2, None, "f", 1, 2, dict(shared), [SpanEvent("waiting", 1, dict(shared))],
                         [SpanLink(0x1, 0x3, dict(shared))])
    [fast] = _fast([span, span])
    assert fast == _sdk([span, span])


def test_caches_do_not_leak_between_spans():
    # The same encoder twice, spans sharing attribute values and event bodies with different times.
    spans = _spans()
    encoder = SpanEncoder(RESOURCE, SCOPE)
    first = [encoder.span(s) for s in spans]
    again = [encoder.span(s) for s in spans]
    assert first == again
    req = ExportTraceServiceRequest()
    req.ParseFromString(encoder.request(first + again))
    assert req == _sdk(spans + spans)


def test_requests_split_by_size_and_keep_every_span():
    spans = _spans() * 50
    requests = _fast(spans, max_request_bytes=4096)
    assert len(requests) > 5
    got = [s for req in requests for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert got == [s for rs in _sdk(spans).resource_spans for ss in rs.scope_spans for s in ss.spans]
    for req in requests:
        assert req.resource_spans[0].resource == _sdk(spans[:1]).resource_spans[0].resource


def test_otlp_sink_takes_spans_its_encoder_encoded():
    from otel_goroutines.exporters import OtlpSink
    sink = OtlpSink("http/protobuf", "http://127.0.0.1:9", RESOURCE)  # nothing is sent here
    sent = []
    sink._send = lambda payload, count: sent.append((payload, count)) or True
    spans = _spans()
    assert sink.export([sink.encoder.span(s) for s in spans])
    assert sent == [next(iter(SpanEncoder(RESOURCE, SCOPE).requests(spans)))]
    sink.shutdown()
