"""GoroutineSpans -> OTLP ExportTraceServiceRequest protobuf bytes, written directly.

The OpenTelemetry SDK's path (ReadableSpan, then encode_spans, then protobuf serialization)
tops out near 12,000 spans/s a core; this writes the same bytes field by field, with what
repeats from span to span (resource, scope, attribute keys, common string values, event
bodies) encoded once, and reaches several times that. The output is standard OTLP: it decodes to
the same ExportTraceServiceRequest the SDK builds (tests/unit/test_otlp_wire.py checks that),
so any collector takes it.

Field numbers follow opentelemetry/proto/{collector/trace,trace,common,resource}/v1/*.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Iterator

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .spans import GoroutineSpan

_MASK64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SMALL = [bytes([i]) for i in range(128)]
_Q = struct.Struct("<Q").pack
_D = struct.Struct("<d").pack
_SPAN_FLAGS = struct.pack("<I", 0x100)     # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK: the parent is local
_KIND_INTERNAL = b"\x30\x01"              # Span.kind = SPAN_KIND_INTERNAL
_STATUS_UNSET = b"\x7a\x00"               # Span.status = Status{} (the SDK always sets it)
_CACHE_MAX = 8192                          # cached encodings of attributes and events


def varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n] if n >= 0 else varint(n & _MASK64)
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    if n < 0x10000000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 0x80 else varint(n)) + payload


def any_value(value) -> bytes | None:
    """An AnyValue message, as the SDK's _encode_value builds it; None for what it cannot encode."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode("utf-8"))
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            return None
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _D(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if value is None:
        return b""
    if isinstance(value, Sequence):
        items = [any_value(v) for v in value]
        if any(i is None for i in items):
            return None
        return _field(b"\x2a", b"".join(_field(b"\x0a", i) for i in items))
    if isinstance(value, Mapping):
        kvs = [key_value(str(k), v) for k, v in value.items()]
        if any(kv is None for kv in kvs):
            return None
        return _field(b"\x32", b"".join(_field(b"\x0a", kv) for kv in kvs))
    return None


def key_value(key: str, value) -> bytes | None:
    """A KeyValue message (key 1, value 2)."""
    encoded = any_value(value)
    if encoded is None:
        return None
    return _field(b"\x0a", key.encode("utf-8")) + _field(b"\x12", encoded)


class SpanEncoder:
    """Encodes GoroutineSpans of one resource and scope; splits requests at max_request_bytes
    (Go-based receivers refuse gRPC messages over 4 MiB)."""

    def __init__(self, resource: Resource, scope: InstrumentationScope, max_request_bytes: int = 2 << 20):
        self.max_request_bytes = max_request_bytes
        resource_attrs = b"".join(_field(b"\x0a", kv) for k, v in resource.attributes.items()
                                  if (kv := key_value(k, v)) is not None)
        self._resource = _field(b"\x0a", resource_attrs)  # ResourceSpans.resource
        scope_body = b""
        if scope is not None:
            scope_body = (_field(b"\x0a", scope.name.encode()) if scope.name else b"") + \
                         (_field(b"\x12", scope.version.encode()) if scope.version else b"")
        self._scope = _field(b"\x0a", scope_body)           # ScopeSpans.scope
        self._resource_schema = _field(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b""
        self._scope_schema = _field(b"\x1a", scope.schema_url.encode()) if scope is not None and scope.schema_url else b""
        self._attr_caches: dict[bytes, dict[tuple[str, object], bytes]] = {}  # by tag: span, event, link
        self._key_cache: dict[str, bytes] = {}
        self._event_cache: dict[tuple, bytes] = {}

    # --- one span -------------------------------------------------------------------------
    def _attributes(self, attributes: Mapping, tag: bytes) -> list[bytes]:
        """Each attribute as a KeyValue field with the given tag. Integers (most values: ids,
        times) are written on a cached key prefix; other values are cached whole."""
        cache = self._attr_caches.get(tag)
        if cache is None:  # an encoding cached with its field's tag serves that field only
            cache = self._attr_caches[tag] = {}
        keys = self._key_cache
        out = []
        for item in attributes.items():
            value = item[1]
            if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
                prefix = keys.get(item[0])
                if prefix is None:
                    prefix = keys[item[0]] = _field(b"\x0a", item[0].encode("utf-8")) + b"\x12"
                number = varint(value)
                kv = prefix + _SMALL[len(number) + 1] + b"\x18" + number
                n = len(kv)
                out.append(tag + (_SMALL[n] if n < 0x80 else varint(n)) + kv)
                continue
            try:
                out.append(cache[item])
                continue
            except KeyError:
                hashable = True
            except TypeError:  # an unhashable value (a list)
                hashable = False
            kv = key_value(*item)
            if kv is None:
                continue  # the SDK logs and drops what it cannot encode
            encoded = _field(tag, kv)
            if hashable:
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[item] = encoded
            out.append(encoded)
        return out

    def _event(self, name: str, time_ns: int, attributes: Mapping) -> bytes:
        # Event: time_unix_nano 1 (fixed64), name 2, attributes 3. Everything but the time repeats.
        try:
            key = (name, *attributes.items()) if attributes else name
            body = self._event_cache.get(key)
        except TypeError:
            key, body = None, None
        if body is None:
            body = _field(b"\x12", name.encode("utf-8")) + b"".join(self._attributes(attributes, b"\x1a"))
            if key is not None:
                if len(self._event_cache) >= _CACHE_MAX:
                    self._event_cache.clear()
                self._event_cache[key] = body
        n = len(body) + 9
        return b"\x5a" + (_SMALL[n] if n < 0x80 else varint(n)) + b"\x09" + _Q(time_ns) + body

    def span(self, span: GoroutineSpan) -> bytes:
        """One Span message, with its ScopeSpans.spans tag and length."""
        parts = [b"\x0a\x10", span.trace_id.to_bytes(16, "big"), b"\x12\x08", span.span_id.to_bytes(8, "big")]
        if span.parent_span_id:
            parts += (b"\x22\x08", span.parent_span_id.to_bytes(8, "big"))
        parts += (_field(b"\x2a", span.name.encode("utf-8")), _KIND_INTERNAL,
                  b"\x39", _Q(span.start_ns), b"\x41", _Q(span.end_ns))
        parts += self._attributes(span.attributes, b"\x4a")
        event = self._event
        parts += [event(ev.name, ev.time_ns, ev.attributes) for ev in span.events]
        for link in span.links:
            # Link: trace_id 1, span_id 2, attributes 4, flags 6 (fixed32)
            body = b"".join([b"\x0a\x10", link.trace_id.to_bytes(16, "big"), b"\x12\x08", link.span_id.to_bytes(8, "big"),
                             *self._attributes(link.attributes, b"\x22"), b"\x35", _SPAN_FLAGS])
            parts.append(_field(b"\x6a", body))
        if span.error:
            parts.append(_field(b"\x7a", _field(b"\x12", span.error.encode("utf-8")) + b"\x18\x02"))  # STATUS_CODE_ERROR
        else:
            parts.append(_STATUS_UNSET)
        parts += (b"\x85\x01", _SPAN_FLAGS)
        return _field(b"\x12", b"".join(parts))

    # --- requests -------------------------------------------------------------------------
    def request(self, encoded_spans: Sequence[bytes]) -> bytes:
        """An ExportTraceServiceRequest holding already encoded spans (from span())."""
        scope_spans = _field(b"\x12", b"".join((self._scope, *encoded_spans, self._scope_schema)))
        return _field(b"\x0a", b"".join((self._resource, scope_spans, self._resource_schema)))

    def requests(self, spans: Sequence[GoroutineSpan]) -> Iterator[tuple[bytes, int]]:
        """(request bytes, span count) for spans, each request at most max_request_bytes
        (unless a single span is larger)."""
        return self.pack([self.span(s) for s in spans])

    def pack(self, encoded_spans: Sequence[bytes]) -> Iterator[tuple[bytes, int]]:
        """(request bytes, span count) for spans already encoded by span(), split as requests()."""
        batch: list[bytes] = []
        size = 0
        for encoded in encoded_spans:
            if batch and size + len(encoded) > self.max_request_bytes:
                yield self.request(batch), len(batch)
                batch, size = [], 0
            batch.append(encoded)
            size += len(encoded)
        if batch:
            yield self.request(batch), len(batch)
