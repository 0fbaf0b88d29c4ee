"""Everything that depends on the OpenTelemetry Go SDK the target links, in one place.

The agent puts a goroutine started while an application span is active on its creating goroutine
into that span's trace, as its child. It learns the application's spans from probes on the SDK
itself (go.opentelemetry.io/otel/sdk/trace): in (*tracer).Start, the call that puts the new span in
the context (a span begins, on the calling goroutine), and the entries of (*recordingSpan).End and
(*nonRecordingSpan).End (it ends). The rest of the agent never looks at an SDK version: it asks this
module for an SdkStatus. Struct offsets come from the binary's DWARF, or, stripped, from the table generated from every
SDK release the Go module proxy serves (layouts/otel_sdk.json, written by scripts/gen_sdk_layouts.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .binary.gobinary import DwarfError, GoBinary
from .goruntime import ARCHES, ProbePoint

SDK_MODULE = "go.opentelemetry.io/otel/sdk"
_PKG = "go.opentelemetry.io/otel/sdk/trace"
START = f"{_PKG}.(*tracer).Start"
RECORDING_END = f"{_PKG}.(*recordingSpan).End"
NON_RECORDING_END = f"{_PKG}.(*nonRecordingSpan).End"  # the pointer wrapper an interface call reaches

# Struct members the probes read, and the name each has in the per-process config (struct proc_config, bpf/records.h).
# Start's span is either a *recordingSpan (sampled, or recorded only) or a boxed nonRecordingSpan (dropped by
# the sampler): both hold a trace.SpanContext, at different offsets.
STRUCTS = {
    f"{_PKG}.recordingSpan": ("spanContext",),
    f"{_PKG}.nonRecordingSpan": ("sc",),
    "go.opentelemetry.io/otel/trace.SpanContext": ("traceID", "spanID", "traceFlags"),
}
_DEFINES = {
    (f"{_PKG}.recordingSpan", "spanContext"): "OFF_RSPAN_SC",
    (f"{_PKG}.nonRecordingSpan", "sc"): "OFF_NRSPAN_SC",
    ("go.opentelemetry.io/otel/trace.SpanContext", "traceID"): "OFF_SC_TRACEID",
    ("go.opentelemetry.io/otel/trace.SpanContext", "spanID"): "OFF_SC_SPANID",
    ("go.opentelemetry.io/otel/trace.SpanContext", "traceFlags"): "OFF_SC_FLAGS",
}

# Go's interface layout, the same in every Go release the agent supports (1.17 on; runtime.itab,
# then internal/abi.ITab and abi.Type): a non-empty interface is (itab, data); itab.Type at +8; the
# type's kind in the low 5 bits of the byte at +23. Start's span is a *recordingSpan (kind Pointer)
# or a nonRecordingSpan (kind Struct): the kind tells the probe which offset holds the SpanContext.
GO_ABI_DEFINES = ["-DOFF_ITAB_TYPE=8", "-DOFF_TYPE_KIND=23", "-DKIND_MASK=0x1f", "-DKIND_POINTER=22", "-DKIND_STRUCT=25"]

_VERSION = re.compile(r"v(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class SdkSupport:
    version: str                      # as linked: "v1.47.0"
    offsets: dict[str, int]           # "OFF_RSPAN_SC" -> 192, ...
    offsets_source: str               # "DWARF" or "generated table for v1.47.0"
    probes: tuple[ProbePoint, ...]


@dataclass(frozen=True)
class SdkStatus:
    """Whether the target links the SDK, which version, and whether its spans can be followed."""
    version: str | None               # None: the SDK module is not linked in
    support: SdkSupport | None        # None: no correlation (reason says why)
    reason: str

    @property
    def correlates(self) -> bool:
        return self.support is not None


def sdk_status(binary: GoBinary) -> SdkStatus:
    version = binary.build_info.deps.get(SDK_MODULE)
    if version is None:
        if binary.functions.by_name(START) is None:
            return SdkStatus(None, None, "the OpenTelemetry Go SDK is not linked in: goroutines keep traces of their own")
        version = "(unknown version)"  # linked without module information (GOPATH build, GOFLAGS=-buildvcs...)
    missing = [name for name in (START, RECORDING_END) if binary.functions.by_name(name) is None]
    if missing:
        return SdkStatus(version, None, f"{SDK_MODULE} {version} is linked in but its tracer is not ({', '.join(missing)} "
                                        "missing): the program starts no SDK spans")
    try:
        offsets, source = _offsets(binary, version)
        support = SdkSupport(version, offsets, source, tuple(_probes(binary)))
    except LookupError as exc:
        return SdkStatus(version, None, str(exc))
    return SdkStatus(version, support, f"goroutines started under an application span join its trace (offsets from {source})")


def _offsets(binary: GoBinary, version: str) -> tuple[dict[str, int], str]:
    try:
        found, source = binary.struct_offsets(STRUCTS), "DWARF"
    except DwarfError as exc:
        found, source = _generated_table(version, str(exc))
    offsets = {}
    for (struct_name, member), define in _DEFINES.items():
        value = found.get(struct_name, {}).get(member)
        if value is None:
            raise LookupError(f"{struct_name}.{member} not found in {source}: no correlation with application spans")
        offsets[define] = value
    return offsets, source


@lru_cache(maxsize=1)
def layout_table() -> dict:
    path = resources.files(__package__) / "layouts" / "otel_sdk.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _key(version: str) -> tuple[int, int, int] | None:
    match = _VERSION.match(version)
    return tuple(int(n) for n in match.groups()) if match else None


def _generated_table(version: str, why: str) -> tuple[dict, str]:
    """The measured layout of `version`, for a binary whose DWARF is missing or unreadable (why); for
    a release the proxy did not serve, the layout of the measured releases on both sides of it when
    they agree (the layout cannot have changed between)."""
    table = layout_table()
    if version in table:
        return table[version]["structs"], f"generated table for {version}"
    key = _key(version)
    measured = sorted((k, v) for v in table if (k := _key(v)) is not None)
    below = [v for k, v in measured if key is not None and k < key]
    above = [v for k, v in measured if key is not None and k > key]
    if below and above and table[below[-1]]["structs"] == table[above[0]]["structs"]:
        return table[below[-1]]["structs"], f"generated table: {below[-1]} and {above[0]} agree"
    span = f"{measured[0][1]} to {measured[-1][1]}" if measured else "no release"
    raise LookupError(f"{why} with {SDK_MODULE} {version}, and the generated table ({span}) cannot "
                      "vouch for its layout: build with DWARF to correlate goroutines with application spans")


def _probes(binary: GoBinary) -> list[ProbePoint]:
    # Start: its one call context.WithValue(ctx, currentSpanKey, span) (trace.ContextWithSpan, inlined
    # in every release measured), where RSI, R8 hold the new span as an `any`; CALL is emulated: one
    # trap. Otherwise its RETs, where RCX, RDI hold the returned trace.Span; RET is single-stepped.
    # (Go's argument registers: amd64 RSI, R8 and RCX, RDI; arm64 R4, R5 and R2, R3: goruntime.ARCHES.)
    start = binary.function(START)
    code = binary.code(start)
    arch, isa = ARCHES[binary.arch], binary.isa
    with_value = binary.functions.by_name("context.WithValue")
    calls = isa.call_sites(code, start.entry, with_value.entry) if with_value else []
    if len(calls) == 1:
        probes = [ProbePoint("on_app_span_start", START, calls[0], f"{isa.call} context.WithValue",
                             f"the call that puts the new span in the context ({arch.arg(5)}, {arch.arg(6)} = the span as an "
                             f"any); {isa.instruction_at(code, start.entry, calls[0]).cost}")]
    else:
        probes = [ProbePoint("on_app_span_start_ret", START, addr, "ret", f"return of Start ({arch.arg(3)}, {arch.arg(4)} = "
                             f"the span); {isa.instruction_at(code, start.entry, addr).cost}")
                  for addr in isa.ret_sites(code, start.entry)]
    if not probes:
        raise LookupError(f"no place to probe found in {START}")
    # End: after the stack check, on the first instruction that costs one trap with the receiver (the span) unchanged.
    for name in (RECORDING_END, NON_RECORDING_END):
        func = binary.functions.by_name(name)
        if func is None:  # no unsampled span can end through the interface: nothing to probe
            continue
        code = binary.code(func)
        checked = isa.after_stack_check(code, func.entry)
        address = isa.first_one_trap(code, func.entry, checked, (arch.args[0],))
        insn = isa.instruction_at(code, func.entry, address)
        where = "entry" if address == func.entry else f"+{address - func.entry}, after the stack check"
        probes.append(ProbePoint("on_app_span_end", name, address, str(insn), f"{where}: {arch.arg(1)} = the span; {insn.cost}"))
    return probes
