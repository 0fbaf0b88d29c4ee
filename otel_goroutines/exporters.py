"""How GoroutineSpans leave the agent: OTLP (gRPC or HTTP/protobuf), OTLP/JSON file, console.

Spans are handed to the OpenTelemetry SDK's own OTLP exporters (endpoint, headers, TLS and
retry follow the standard OTEL_EXPORTER_OTLP_* variables) as ReadableSpans. The file sink
writes what the OpenTelemetry Collector's file exporter writes: one JSON
ExportTraceServiceRequest per line.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
from typing import IO, Protocol, Sequence

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from . import __version__
from .errors import AgentError
from .spans import GoroutineSpan

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("otel-goroutines", __version__)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class SpanSink(Protocol):
    def export(self, spans: Sequence[GoroutineSpan]) -> bool: ...
    def shutdown(self) -> None: ...


def to_readable(span: GoroutineSpan, resource: Resource) -> ReadableSpan:
    parent = SpanContext(span.trace_id, span.parent_span_id, False, _SAMPLED) if span.parent_span_id else None
    return ReadableSpan(
        name=span.name,
        context=SpanContext(span.trace_id, span.span_id, False, _SAMPLED),
        parent=parent,
        resource=resource,
        attributes=span.attributes,
        events=[Event(ev.name, ev.attributes, ev.time_ns) for ev in span.events],
        links=[Link(SpanContext(link.trace_id, link.span_id, False, _SAMPLED), link.attributes) for link in span.links],
        kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, span.error) if span.error else Status(StatusCode.UNSET),
        start_time=span.start_ns,
        end_time=span.end_ns,
        instrumentation_scope=SCOPE,
    )


class OtlpSink:
    def __init__(self, protocol: str, endpoint: str | None, resource: Resource, timeout_s: float = 5.0):
        self._resource = resource
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            self._exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s)
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            if endpoint and not os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
                endpoint = endpoint.rstrip("/") + "/v1/traces"  # --endpoint is the base URL, as OTEL_EXPORTER_OTLP_ENDPOINT
            self._exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s)
        else:
            raise AgentError(f"unknown OTLP protocol {protocol!r}; use grpc or http/protobuf")

    def export(self, spans: Sequence[GoroutineSpan]) -> bool:
        return self._exporter.export([to_readable(s, self._resource) for s in spans]) is SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._exporter.shutdown()


def otlp_json(spans: Sequence[GoroutineSpan], resource: Resource) -> str:
    """One ExportTraceServiceRequest as OTLP/JSON (ids in hex, enums as integers)."""
    message = MessageToDict(encode_spans([to_readable(s, resource) for s in spans]), use_integers_for_enums=True)
    for resource_spans in message.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                for item in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in item:
                            item[key] = base64.b64decode(item[key]).hex()
    return json.dumps(message, separators=(",", ":"))


class FileSink:
    def __init__(self, path: str, resource: Resource):
        self._resource = resource
        try:
            self._file: IO[str] = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise AgentError(f"cannot write {path}: {exc.strerror}") from None
        self.path = path

    def export(self, spans: Sequence[GoroutineSpan]) -> bool:
        self._file.write(otlp_json(spans, self._resource) + "\n")
        self._file.flush()
        return True

    def shutdown(self) -> None:
        self._file.close()


class ConsoleSink:
    """One readable block per goroutine span."""

    def __init__(self, stream: IO[str] = sys.stdout):
        self._stream = stream

    def export(self, spans: Sequence[GoroutineSpan]) -> bool:
        lines = []
        for s in spans:
            a = s.attributes
            site = f"{a.get('code.file.path', '?')}:{a.get('code.line.number', '?')}"
            parent = f" parent={a['go.goroutine.parent_id']}" if s.parent_span_id else " (root)"
            outcome = a.get("go.goroutine.end_reason") or f"checkpoint {a.get('go.goroutine.checkpoint')}, still running"
            lines.append(f"goroutine {a['go.goroutine.id']}{parent} {s.name} {(s.end_ns - s.start_ns) / 1e6:.3f} ms, "
                         f"created at {site}, {outcome}{', ERROR: ' + s.error if s.error else ''}")
            for ev in s.events:
                reason = ev.attributes.get("go.goroutine.wait_reason")
                lines.append(f"    +{(ev.time_ns - s.start_ns) / 1e6:9.3f} ms  {ev.name}{f' ({reason})' if reason else ''}")
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()
        return True

    def shutdown(self) -> None:
        pass
