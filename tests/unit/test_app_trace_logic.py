"""Goroutine spans in application traces, without a kernel: the SDK's build info and layouts, the span
builder's placement in application traces, pprof labels as the kernel sends them."""

import json
import sys

import pytest

from helpers import ROOT, SDK_NEWEST, build_appservice, build_program
import numpy as np

from otel_goroutines import goruntime, gosdk
from otel_goroutines.binary import buildinfo
from otel_goroutines.binary.gobinary import GoBinary
from otel_goroutines.kernel_records import LABELS_EVENT_DTYPE
from otel_goroutines.probes import labels_of
from otel_goroutines.records import GoroutineRecord, TraceReason
from otel_goroutines.spans import APP_IN_TRACE, APP_LINKED, APP_SAMPLED, SpanBuilder, app_unsampled, span_id_for, trace_id_for

sys.path.insert(0, str(ROOT / "scripts"))
import gen_sdk_layouts  # noqa: E402

APP_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
APP_SPAN = 0x00F067AA0BA902B7


def test_build_info_lists_dependencies_and_replacements():
    modinfo = ("0123456789abcdef" + "path\tex.com/m\nmod\tex.com/m\t(devel)\t\n"
               "dep\tgo.opentelemetry.io/otel/sdk\tv1.47.0\th1:x=\n"
               "dep\tgo.opentelemetry.io/otel\tv1.40.0\n=>\tgo.opentelemetry.io/otel\tv1.41.0\th1:y=\n"
               "dep\tex.com/local\tv0.0.0\n=>\t../local\t\t\n" + "0123456789abcdef")
    info = buildinfo._parse_modinfo(modinfo)
    assert info["deps"] == {"go.opentelemetry.io/otel/sdk": "v1.47.0", "go.opentelemetry.io/otel": "v1.41.0",
                            "ex.com/local": "(replaced by a local directory)"}


def test_generated_table_covers_the_releases_it_names():
    table = gosdk.layout_table()
    assert list(table) == gen_sdk_layouts.RELEASES
    for release, entry in table.items():
        assert entry["source"].startswith(f"measured: DWARF of a program built with {gosdk.SDK_MODULE} {release} by go1.")
        for name, members in gosdk.STRUCTS.items():
            assert set(members) <= set(entry["structs"][name]), release
    # Three layouts in the releases measured; the newest and v1.19.0 differ (the e2e tests trace both).
    assert len({json.dumps(e["structs"], sort_keys=True) for e in table.values()}) == 3
    assert table[SDK_NEWEST]["structs"] != table["v1.19.0"]["structs"]


def test_generated_table_lookup():
    structs, source = gosdk._generated_table("v1.19.0", "stripped binary (no DWARF)")
    assert structs[f"{gosdk._PKG}.recordingSpan"]["spanContext"] == 176 and source == "generated table for v1.19.0"
    # Not served by the proxy, between two measured releases that agree: their layout.
    structs, source = gosdk._generated_table("v1.18.0", "stripped binary (no DWARF)")
    assert structs == gosdk.layout_table()["v1.17.0"]["structs"] and "v1.17.0 and v1.19.0 agree" in source
    for version in ("v1.19.1", "v1.48.0", "v0.20.0", "v1.20.0-rc.1"):  # layouts differ around it, or nothing above
        with pytest.raises(LookupError, match="build with DWARF"):
            gosdk._generated_table(version, "stripped binary (no DWARF)")


def test_sdk_found_with_dwarf_and_stripped_alike():
    with_dwarf = gosdk.sdk_status(GoBinary(str(build_appservice())))
    stripped = gosdk.sdk_status(GoBinary(str(build_appservice(flags=("-ldflags=-s -w",)))))
    assert with_dwarf.version == stripped.version == SDK_NEWEST
    assert with_dwarf.support.offsets_source == "DWARF" and stripped.support.offsets_source == f"generated table for {SDK_NEWEST}"
    assert with_dwarf.support.offsets == stripped.support.offsets
    assert [p.handler for p in stripped.support.probes] == ["on_app_span_start", "on_app_span_end", "on_app_span_end"]
    assert all(p.instruction.startswith(("call", "push")) for p in stripped.support.probes)  # one trap each


def test_labels_offset_from_dwarf_and_disassembly_agree():
    with_dwarf = goruntime.support_for(GoBinary(str(build_appservice()))).labels
    stripped = goruntime.support_for(GoBinary(str(build_appservice(flags=("-ldflags=-s -w",))))).labels
    assert with_dwarf.source == "DWARF" and stripped.source.startswith("disassembly of runtime/pprof.runtime_setProfLabel")
    assert with_dwarf.offset == stripped.offset and with_dwarf.layout == stripped.layout == "slice"


def test_no_sdk_and_no_pprof():
    binary = GoBinary(str(build_program("tree")))
    status = gosdk.sdk_status(binary)
    assert status.version is None and status.support is None and not status.correlates
    assert goruntime.support_for(binary).labels is None


def builder():
    return SpanBuilder(salt=7, clock_offset_ns=0, function_name=lambda pc: "main.worker", creation_site=lambda pc: None,
                       wait_reason=str, states_traced=False)


def record(**kw):
    base = dict(pid=10, goid=5, parent_goid=1, parent_traced=True, create_ns=1_000, end_ns=11_000, start_pc=0x1000, go_pc=0,
                state_ns=(0,) * 12, transitions=0, events_left_out=0, root_goid=1 << 63 | 12345)
    base.update(kw)
    return GoroutineRecord(**base)


def test_goroutine_under_an_application_span():
    rec = record(trace_reason=TraceReason.APP_SPAN, app_trace_id=APP_TRACE, app_span_id=APP_SPAN, app_flags=APP_IN_TRACE | APP_SAMPLED)
    span = builder().build(rec)
    assert (span.trace_id, span.parent_span_id, span.span_id) == (APP_TRACE, APP_SPAN, span_id_for(7, 5))
    assert span.attributes["go.goroutine.trace_reason"] == "application_span" and not span.links
    assert not app_unsampled(rec)


def test_goroutine_following_its_creator_into_the_application_trace():
    rec = record(trace_reason=TraceReason.JOINS_PARENT, app_trace_id=APP_TRACE, app_flags=APP_IN_TRACE | APP_SAMPLED)
    span = builder().build(rec)
    assert (span.trace_id, span.parent_span_id) == (APP_TRACE, span_id_for(7, 1))
    assert "go.goroutine.trace_reason" not in span.attributes


def test_goroutine_cut_from_an_application_trace_links_to_its_place_there():
    # Its creator (in the application's trace) is a spawner: a trace of its own, linked to the creator's span.
    span = builder().build(record(root_goid=5, trace_reason=TraceReason.SPAWNER, app_trace_id=APP_TRACE, app_flags=APP_LINKED))
    assert span.trace_id == trace_id_for(7, 5) and span.parent_span_id is None
    assert [(link.trace_id, link.span_id) for link in span.links] == [(APP_TRACE, span_id_for(7, 1))]
    # The application's trace is full: linked to the application span it was created under.
    span = builder().build(record(root_goid=5, trace_reason=TraceReason.TRACE_FULL, app_trace_id=APP_TRACE,
                                  app_span_id=APP_SPAN, app_flags=APP_LINKED | APP_SAMPLED))
    assert [(link.trace_id, link.span_id) for link in span.links] == [(APP_TRACE, APP_SPAN)]


def test_unsampled_application_trace():
    assert app_unsampled(record(app_trace_id=APP_TRACE, app_span_id=APP_SPAN, app_flags=APP_IN_TRACE))
    assert not app_unsampled(record(app_trace_id=APP_TRACE, app_flags=APP_LINKED))  # in a trace of its own
    assert not app_unsampled(record())


def test_labels_as_the_kernel_sends_them():
    ev = np.zeros(1, LABELS_EVENT_DTYPE)[0]
    ev["count"] = ev["total"] = 2
    for label, key, value in ((ev["labels"][0], b"span_id", b"00f067aa0ba902b7"), (ev["labels"][1], b"k" * 40, b"v" * 70)):
        label["key_len"], label["value_len"] = len(key), len(value)
        label["key"][:min(len(key), 32)] = np.frombuffer(key[:32], np.uint8)
        label["value"][:min(len(value), 64)] = np.frombuffer(value[:64], np.uint8)
    assert labels_of(ev) == {"span_id": "00f067aa0ba902b7", "k" * 32 + "...": "v" * 64 + "..."}
    span = builder().build(record(labels=labels_of(ev)))
    assert span.attributes["go.goroutine.label.span_id"] == "00f067aa0ba902b7"
