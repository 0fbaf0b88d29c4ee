"""How GoroutineSpans leave the agent: OTLP (gRPC or HTTP/protobuf), OTLP/JSON file, console.

OTLP goes through the OpenTelemetry SDK's own OTLP exporters (endpoint, headers, TLS and
retry follow the standard OTEL_EXPORTER_OTLP_* variables), fed protobuf bytes that otlp_wire
and fastspans write directly (the SDK's ReadableSpan path is several times slower). The file sink
takes the same bytes and writes what the OpenTelemetry Collector's file exporter writes: one JSON
ExportTraceServiceRequest per line.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Protocol, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from . import __version__
from ._otlpjson import transcode
from .deadline import Deadline, bound_sdk_exporter
from .errors import AgentError
from .otlp_wire import SpanEncoder
from .spans import GoroutineSpan

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("otel-goroutines", __version__)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class SpanSink(Protocol):
    failure_hint: str  # what a failed export most likely means, for the log
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
    """OTLP over gRPC or HTTP/protobuf through the SDK's own exporters, which keep their
    configuration (OTEL_EXPORTER_OTLP_* endpoint, headers, timeout, compression, TLS) and their
    transport (channel or session, retries). Only the encoding is replaced: spans go out as
    protobuf bytes written by otlp_wire, several times faster than building SDK ReadableSpans.
    fast=False (OTEL_GOROUTINES_OTLP_ENCODER=sdk, read by the CLI) uses the SDK's own encoder, as
    does an installed SDK that does not offer the hooks used here."""

    failure_hint = "collector down or refusing?"

    def __init__(self, protocol: str, endpoint: str | None, resource: Resource, timeout_s: float = 5.0,
                 deadline: Deadline | None = None, fast: bool = True):
        self._resource = resource
        self._timeout_s = timeout_s
        self._deadline = deadline or Deadline()
        self._encoder = SpanEncoder(resource, SCOPE)
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            self._exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s)
            self._send = _grpc_sender(self._exporter) if fast else None
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            if endpoint:
                endpoint = endpoint.rstrip("/") + "/v1/traces"  # --endpoint is the base URL, as OTEL_EXPORTER_OTLP_ENDPOINT
            self._exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s)
            self._send = _http_sender(self._exporter) if fast else None
        else:
            raise AgentError(f"unknown OTLP protocol {protocol!r}; use grpc or http/protobuf")
        if fast and self._send is None:
            log.info("this OpenTelemetry SDK offers no way to send encoded spans; using its own (slower) encoder")

    @property
    def encoder(self) -> SpanEncoder | None:
        """The encoder whose bytes export() takes instead of GoroutineSpans (None: the SDK's encoder,
        which takes GoroutineSpans)."""
        return self._encoder if self._send is not None else None

    def export(self, spans: Sequence) -> bool:
        """Export spans: encoded by `encoder`, or GoroutineSpans when there is none."""
        if self._send is None:
            return self._bounded() and self._exporter.export([to_readable(s, self._resource) for s in spans]) is SpanExportResult.SUCCESS
        # A batch is one request unless it encodes to more than 2 MiB; if a later part then fails,
        # the whole batch is retried and the first part's spans reach the collector twice (never lost).
        return all(self._bounded() and self._send(payload, count) for payload, count in self._encoder.pack(spans))

    def _bounded(self) -> bool:
        """Each call to the SDK's transport ends by the flush deadline, retries included."""
        return bound_sdk_exporter(self._exporter, self._deadline, self._timeout_s)

    def shutdown(self) -> None:
        self._exporter.shutdown()


_TRACE_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class _EncodedBatch:
    """What the gRPC exporter's _export sees instead of a list of ReadableSpans."""
    __slots__ = ("payload", "count")

    def __init__(self, payload: bytes, count: int):
        self.payload, self.count = payload, count


def _grpc_sender(exporter):
    """Send request bytes through the SDK gRPC exporter: its channel (rebuilt on UNAVAILABLE),
    metadata (headers), deadline, compression and retries; only the serialization is ours."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

    if not all(hasattr(exporter, a) for a in ("_export", "_channel", "_stub", "_translate_data", "_count_data")):
        return None

    class RawTraceStub:
        def __init__(self, channel):
            # request_serializer=None: the request is already bytes
            self.Export = channel.unary_unary(_TRACE_EXPORT_METHOD, request_serializer=None,
                                              response_deserializer=ExportTraceServiceResponse.FromString)

    exporter._stub = RawTraceStub
    exporter._client = RawTraceStub(exporter._channel)
    exporter._translate_data = lambda batch: batch.payload
    exporter._count_data = lambda batch: batch.count
    return lambda payload, count: exporter._export(_EncodedBatch(payload, count)) is SpanExportResult.SUCCESS


def _http_sender(exporter):
    """Send request bytes through the SDK HTTP exporter's client: endpoint, headers, session
    (TLS), compression and retries as configured."""
    client = getattr(exporter, "_client", None)
    if client is None or not callable(getattr(client, "export", None)):
        return None
    return lambda payload, count: client.export(payload).success


def open_output(path: str, mode: str = "w", **kwargs) -> IO:
    """open() for writing, its failure the one-line error the user sees."""
    try:
        return open(path, mode, **kwargs)
    except OSError as exc:
        raise AgentError(f"cannot write {path}: {exc.strerror}") from None


class JsonLinesFile:
    """A file of whole lines: a write that fails part-way (disk full) is cut back to the end of
    the last whole line, so that a reader never meets a partial JSON line."""

    def __init__(self, path: str):
        self.path = path
        self._file = open_output(path, "wb", buffering=0)  # unbuffered: nothing left to flush later
        self._end = 0  # offset just past the last whole line
        self._failed = False

    def append(self, lines: bytes) -> bool:
        """Append whole lines (each ending in a newline)."""
        data = memoryview(lines)
        try:
            while data:
                data = data[self._file.write(data):]
        except OSError as exc:
            self._roll_back(exc)
            return False
        self._end = self._file.tell()
        if self._failed:
            log.warning("writing %s again", self.path)
        self._failed = False
        return True

    def _roll_back(self, exc: OSError) -> None:
        if not self._failed:
            log.warning("cannot write %s (%s): its last, partial line removed; what it held is retried, "
                        "then counted as lost", self.path, exc.strerror)
        self._failed = True
        try:
            self._file.truncate(self._end)
            self._file.seek(self._end)
        except OSError as again:
            log.warning("cannot remove the partial line at the end of %s (%s)", self.path, again.strerror)

    def close(self) -> None:
        self._file.close()


class FileSink:
    """What the Collector's file exporter writes: one JSON ExportTraceServiceRequest per line. Takes
    spans encoded by `encoder` as OtlpSink does (so the agent's fast path serves it too), packs them
    into requests and transcodes each request's protobuf bytes to OTLP/JSON in C (_otlpjson)."""

    failure_hint = "cannot write the file, see above"

    def __init__(self, path: str, resource: Resource):
        self._encoder = SpanEncoder(resource, SCOPE)
        self._file = JsonLinesFile(path)
        self.path = path

    @property
    def encoder(self) -> SpanEncoder:
        """The encoder whose span bytes export() takes."""
        return self._encoder

    def export(self, spans: Sequence[bytes]) -> bool:
        # All of a batch's lines in one append: written whole, or not at all (and then retried).
        return self._file.append(b"".join(transcode(request) + b"\n" for request, _ in self._encoder.pack(spans)))

    def shutdown(self) -> None:
        self._file.close()


class ConsoleSink:
    """One readable block per goroutine span."""

    failure_hint = "cannot write the output"

    def __init__(self, stream: IO[str] = sys.stdout):
        self._stream = stream

    def export(self, spans: Sequence[GoroutineSpan]) -> bool:
        lines = []
        for s in spans:
            a = s.attributes
            site = f"{a.get('code.file.path', '?')}:{a.get('code.line.number', '?')}"
            parent = f" parent={a['go.goroutine.parent_id']}" if a["go.goroutine.parent_id"] else " (root)"
            if "go.goroutine.trace_reason" in a:  # its span starts a trace (or joins an application's)
                parent += f" ({a['go.goroutine.trace_reason'].replace('_', ' ')})"
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
