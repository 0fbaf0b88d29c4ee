"""The C transcoder (_otlpjson) writes, byte for byte, the OTLP/JSON line the SDK path writes:
json.dumps(MessageToDict(request)) with hex ids. Differential over generated goroutine spans (the
fast encoder's bytes against the SDK's encoding of the reference spans), hand-made spans with every
value kind, and random messages setting every field of the schema; then what it refuses."""

import base64
import json
import math
import random

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource

from helpers import spans_from_otlp_json
from otel_goroutines._otlpjson import transcode
from otel_goroutines.agent import ExportSettings, make_sink
from otel_goroutines.allocs import AllocMode
from otel_goroutines.exporters import SCOPE, FileSink, to_readable
from otel_goroutines.fastspans import BatchSpanEncoder
from otel_goroutines.otlp_wire import SpanEncoder
from otel_goroutines.spans import GoroutineSpan, SpanEvent, SpanLink
from test_fastspans import INT64_MAX, builder, generate, records

RESOURCE = Resource({"service.name": "svc", "process.pid": 4242, "host.name": "hôte", "ratio": 0.5,
                     "tags": ("a", "b"), "on": True}, "https://opentelemetry.io/schemas/1.26.0")
INT64_MIN = -(1 << 63)


def reference_json(request: ExportTraceServiceRequest) -> str:
    """What the file exporter wrote through the SDK: MessageToDict, ids from base64 to hex, json.dumps."""
    message = MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in message.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                for item in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in item:
                            item[key] = base64.b64decode(item[key]).hex()
    return json.dumps(message, separators=(",", ":"))


def sdk_json(spans: list[GoroutineSpan], resource: Resource = RESOURCE) -> str:
    return reference_json(encode_spans([to_readable(s, resource) for s in spans]))


def assert_same_lines(spans: list[GoroutineSpan], encoded: list[bytes], resource: Resource = RESOURCE,
                      max_request_bytes: int = 2 << 20) -> None:
    """Each request packed from the encoded spans transcodes to the SDK's line for the same spans."""
    done = 0
    for request, count in SpanEncoder(resource, SCOPE, max_request_bytes).pack(encoded):
        assert transcode(request).decode() == sdk_json(spans[done:done + count], resource)
        done += count
    assert done == len(spans)


# --- goroutine spans, as the agent makes them ---------------------------------------------------
@pytest.mark.parametrize("states, allocs", [(False, AllocMode.OFF), (True, AllocMode.SAMPLED)])
def test_generated_spans_from_the_fast_encoder(states, allocs):
    b, encoder = builder(states, allocs), SpanEncoder(RESOURCE, SCOPE)
    cols, end_reason, changes = generate(np.random.default_rng(7 + states), 200, many=8)
    for name in ("goid", "parent_goid", "alloc_bytes", "alloc_count", "alloc_samples", "state_ns"):
        cols[name] &= np.uint64(INT64_MAX)  # ints the SDK keeps (both encoders drop larger ones)
    encoded = BatchSpanEncoder(b, encoder).encode(cols, end_reason, changes)
    spans = [b.build(rec) for rec in records(cols, end_reason, changes)]
    assert_same_lines(spans, encoded, max_request_bytes=64 << 10)  # several requests


def test_generated_spans_from_the_reference_encoder():
    b, encoder = builder(True, AllocMode.EXACT), SpanEncoder(RESOURCE, SCOPE)
    cols, end_reason, changes = generate(np.random.default_rng(3), 50, many=4)
    for name in ("goid", "parent_goid", "alloc_bytes", "alloc_count", "state_ns"):
        cols[name] &= np.uint64(INT64_MAX)
    spans = [b.build(rec) for rec in records(cols, end_reason, changes)]
    assert_same_lines(spans, [encoder.span(s) for s in spans])


# --- hand-made spans: every value kind SpanEncoder emits ---------------------------------------
TEXT = "plain \"quoted\" back\\slash /slash \x00\x01\x08\t\n\x0b\x0c\r\x1f\x7f\x80 é ü→✓ \u2028 \uffff 😀 \U0010ffff"
DOUBLES = [0.25, 0.0, -0.0, 1.0, 123.0, 1e16, 1.5e300, -2.5e-300, 5e-324, 1e-5, 1e-4, 1 / 3, math.pi * 1e15,
           1.7976931348623157e308, float("nan"), float("inf"), float("-inf")]
VALUES = {
    "str": TEXT, "empty.str": "", "true": True, "false": False,
    "int.zero": 0, "int.one": 1, "int.negative": -7, "int.max": INT64_MAX, "int.min": INT64_MIN,
    **{f"double.{i}": d for i, d in enumerate(DOUBLES)},
    "bytes": bytes(range(256)), "bytes.1": b"\xff", "bytes.2": b"\x00\xfe", "bytes.empty": b"",
    "array": ("a", 1, 2.5, True, b"\x01", None), "array.empty": (), "array.nested": [[1, [2, ["deep"]]], {"k": "v"}],
    "kvlist": {"a": 1, "b": {"c": [TEXT, -1.0]}, "": "empty key"}, "kvlist.empty": {}, "none": None,
    "ünï\n\"key\"": "keys are strings too",
}


def hand_made() -> list[GoroutineSpan]:
    t = 1_795_640_284_041_076_235
    return [
        GoroutineSpan(0xD3A5FE428592548DDA201D2B88409AAC, 0x2C7CEEFD390C8DBE, None, "runtime.main", t, t + 10, dict(VALUES),
                      [SpanEvent("running", t + 1, {}), SpanEvent(TEXT, t + 2, dict(VALUES))]),
        GoroutineSpan(1, 0xFFFFFFFFFFFFFFFF, 0x2C7CEEFD390C8DBE, "", 0, (1 << 64) - 1, {}, [],
                      [SpanLink(0xD3A5FE428592548DDA201D2B88409AAC, 0x16D2A846B5EE0FD8, {"go.goroutine.link": "creator"}),
                       SpanLink((1 << 128) - 1, 1, {})], error="goroutine leaked: " + TEXT),
        GoroutineSpan(2, 3, None, "ü" * 300, 5, 6, {"go.goroutine.id": 1 << 40}, [SpanEvent("x" * 200, 0, {})],
                      [SpanLink(4, 5, dict(VALUES))], error=""),
    ]


def test_hand_made_spans_with_every_value_kind():
    spans = hand_made()
    encoder = SpanEncoder(RESOURCE, SCOPE)
    assert_same_lines(spans, [encoder.span(s) for s in spans])
    for span in spans:  # one span a request, and other resources and scopes
        assert_same_lines([span], [encoder.span(span)])
    bare = Resource({})
    assert_same_lines(spans, [SpanEncoder(bare, SCOPE).span(s) for s in spans], bare)


def test_no_spans_and_an_empty_request():
    assert transcode(b"") == b"{}"
    empty = SpanEncoder(RESOURCE, SCOPE).request([])  # a resource and scope, no spans (the SDK's is empty)
    assert transcode(empty).decode() == reference_json(ExportTraceServiceRequest.FromString(empty))


# --- every field of the schema, on random messages -----------------------------------------------
SCHEMA = {m.DESCRIPTOR.full_name for m in (
    trace_pb2.ResourceSpans, trace_pb2.ScopeSpans, trace_pb2.Span, trace_pb2.Span.Event, trace_pb2.Span.Link,
    trace_pb2.Status, common_pb2.KeyValue, common_pb2.AnyValue, common_pb2.ArrayValue, common_pb2.KeyValueList,
    common_pb2.InstrumentationScope, ExportTraceServiceRequest)} | {"opentelemetry.proto.resource.v1.Resource"}


def scalar(rng: random.Random, field):
    t = field.type
    if t == field.TYPE_STRING:
        return rng.choice(["", "x", TEXT, "é" * rng.randint(1, 70)])
    if t == field.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 3, 8, 16, 200])))
    if t == field.TYPE_BOOL:
        return rng.random() < 0.5
    if t == field.TYPE_DOUBLE:
        return rng.choice(DOUBLES + [rng.uniform(-1e10, 1e10), rng.random() * 10 ** rng.randint(-300, 300)])
    if t == field.TYPE_ENUM:
        return rng.choice([0, 1, 2, 3, 99, -5])
    bits, signed = {field.TYPE_INT64: (64, True), field.TYPE_INT32: (32, True), field.TYPE_UINT32: (32, False),
                    field.TYPE_FIXED64: (64, False), field.TYPE_FIXED32: (32, False)}[t]
    low = -(1 << bits - 1) if signed else 0
    return rng.choice([0, 1, low, low + (1 << bits) - 1, rng.randint(low, low + (1 << bits) - 1)])


def fill(rng: random.Random, message, depth: int = 0) -> None:
    """Set every field of the schema (one member of a oneof), nested messages to a few levels."""
    oneofs = {o.name: rng.choice(o.fields) for o in message.DESCRIPTOR.oneofs}
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and oneofs[field.containing_oneof.name] is not field:
            continue
        if field.message_type is not None:
            if field.message_type.full_name not in SCHEMA or depth > 6:
                continue
            for _ in range(rng.choice([1, 2, 3]) if field.is_repeated else 1):
                child = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
                fill(rng, child, depth + 1)
                if not field.is_repeated:
                    child.SetInParent()  # an empty message is present too
        elif field.is_repeated:
            raise AssertionError(f"a repeated scalar in the schema: {field.full_name}")
        else:
            setattr(message, field.name, scalar(rng, field))


def test_random_messages_over_every_field():
    rng = random.Random(42)
    for _ in range(150):
        request = ExportTraceServiceRequest()
        fill(rng, request)
        assert transcode(request.SerializeToString()).decode() == reference_json(request)


# --- what it refuses --------------------------------------------------------------------------------
def _wrap_span(span_body: bytes) -> bytes:
    """A request holding one Span message with the given body."""
    return _field(0x0A, _field(0x12, _field(0x12, span_body)))


@pytest.mark.parametrize("span_body, error", [
    (b"\x88\x01\x01", "unknown field"),                   # field 17, varint
    (b"\x2a\x01x\x12\x08" + bytes(8), "out of order"),    # name, then span_id
    (b"\x2a\x01x\x2a\x01y", "singular field repeated"),
    (b"\x31" + bytes(8), "unexpected wire type"),         # kind as fixed64
    (b"\x2a\x05ab", "truncated value"),
    (b"\x30\x80", "truncated value"),
    (b"\x2a\x02\xc3\x28", "invalid UTF-8"),
    (b"\x2a\x03\xed\xa0\x80", "invalid UTF-8"),           # a surrogate
    (b"\x2a\x02\xc0\x80", "invalid UTF-8"),               # overlong
    (b"\x4a\x06\x12\x04\x0a\x01a\x10\x01", "second member of a oneof"),
])
def test_refuses_what_it_does_not_know(span_body, error):
    with pytest.raises(ValueError, match=error):
        transcode(_wrap_span(span_body))


def test_refuses_entity_refs_and_deep_nesting():
    with pytest.raises(ValueError, match="Resource: unknown field"):
        transcode(b"\x0a\x04\x0a\x02\x1a\x00")  # Resource.entity_refs: a message outside the schema
    value = b"\x0a\x01x"  # AnyValue{string_value: "x"}
    for _ in range(120):  # AnyValue{array_value: ArrayValue{values: [value]}}
        value = _field(0x2A, _field(0x0A, value))
    kv = _field(0x0A, b"k") + _field(0x12, value)
    with pytest.raises(ValueError, match="nested too deep"):
        transcode(_field(0x0A, _field(0x0A, _field(0x0A, kv))))  # Request.resource_spans.resource.attributes


def _field(tag: int, payload: bytes) -> bytes:
    n, length = len(payload), bytearray()
    while n >= 0x80:
        length.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([tag]) + bytes(length + bytes([n])) + payload


# --- the file sink ------------------------------------------------------------------------------------
def test_file_sink_takes_encoded_spans_and_the_agent_uses_its_encoder(tmp_path):
    path = tmp_path / "spans.jsonl"
    sink = make_sink(ExportSettings("file", str(path), None, "grpc"), RESOURCE)
    assert isinstance(sink, FileSink) and sink.encoder is not None  # agent._span_flow: the fast path
    spans = hand_made()
    assert sink.export([sink.encoder.span(s) for s in spans])
    assert sink.export([sink.encoder.span(spans[0])])
    sink.shutdown()
    assert path.read_text() == sdk_json(spans) + "\n" + sdk_json(spans[:1]) + "\n"
    back = spans_from_otlp_json(path)
    assert [s.span_id for s in back] == [f"{s.span_id:016x}" for s in spans + spans[:1]]
