"""--allocs on real Go programs: tests/programs/allocs runs goroutines that allocate known, different
amounts (small objects, large slices, strings, maps, a little, next to nothing), one after another,
each also noting the runtime's own counts. Traced with real uprobes, every Go toolchain here.

- exact: each goroutine of 1 MiB or more within 2% of what it allocated; allocations made on a
  system stack are totalled apart in the summary, not lost.
- sampled: each goroutine of 64 MiB or more within 25%, ranked right, with the samples counted; the
  program never reads heap profiles, so the agent has to turn the runtime's sampling on.
- a goroutine that allocates next to nothing shows (close to) zero in both.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys

import pytest

from helpers import ROOT, build_program, by_goid, go_toolchain, run_agent, spans_from_otlp_json
from otel_goroutines import goruntime
from otel_goroutines.binary.gobinary import GoBinary

pytestmark = pytest.mark.ebpf

sys.path.insert(0, str(ROOT / "scripts"))
try:  # the version matrix's toolchains (scripts/go_toolchains.py): every Go release it covers
    import go_toolchains
    VERSIONS = list(go_toolchains.RELEASES)
except ImportError:  # without it: the tests' own toolchain and Debian's Go 1.19
    go_toolchains = None
    VERSIONS = ["default", "1.19"]

MIB = 1 << 20
BUILD_MODES = {"default": (), "stripped": ("-ldflags=-s -w",), "pie": ("-buildmode=pie",)}


def _go(version: str) -> str:
    if version == "default":
        return go_toolchain()
    if go_toolchains is not None:
        return str(go_toolchains.toolchain(version))
    go = f"/usr/lib/go-{version}/bin/go"
    if not os.path.exists(go):
        pytest.skip(f"no Go {version} toolchain here")
    return go


def _trace(version: str, allocs: str, tmp_path, build: str = "default"):
    binary = build_program("allocs", go=_go(version), flags=BUILD_MODES[build])
    manifest_path, spans_path = tmp_path / "manifest.json", tmp_path / "spans.jsonl"
    wait = ["wait-sampling"] if allocs == "sampled" else []  # allocations before the agent turns sampling on are not sampled
    run = run_agent(["run", "--allocs", allocs, "--exporter", "file", "--output", str(spans_path), "--quiet", "--",
                     str(binary), str(manifest_path), *wait], timeout=600)
    assert run.returncode == 0, run.stderr
    manifest = json.loads(manifest_path.read_text())
    spans = by_goid(spans_from_otlp_json(spans_path))
    return {a["func"]: a for a in manifest["allocs"]}, spans, run.stderr


def _truth(a: dict) -> int:
    """Bytes the goroutine requested, by construction; for the maps (whose internals the program cannot
    count) the runtime's own count, rounded to size classes (a fraction of a percent above)."""
    return a["bytes"] or a["heap_bytes"]


def _summary_line(stderr: str, name: str) -> tuple[str, int]:
    line = next(line for line in stderr.splitlines() if line.strip().startswith(name))
    return line, int(re.search(r"([\d,]+) allocations", line)[1].replace(",", ""))


def _check_exact(truth: dict, spans: dict, stderr: str) -> None:
    for func, a in truth.items():
        attrs = spans[a["goid"]].attributes
        assert spans[a["goid"]].name == func
        assert "go.goroutine.alloc.samples" not in attrs  # exact values, not estimates
        got, want = attrs["go.goroutine.alloc.bytes"], _truth(a)
        if want >= MIB:
            assert abs(got - want) <= 0.02 * want, (func, got, want)
            count = a["count"] or a["heap_count"]  # (+ a few of the fixture's own: its goroutine id, its records)
            assert abs(attrs["go.goroutine.alloc.count"] - count) <= 0.02 * count + 16, (func, attrs, a)
    assert spans[truth["main.idle"]["goid"]].attributes["go.goroutine.alloc.bytes"] < 64 * 1024
    # Allocations made on a system stack (g0: the scheduler's set-up, ...) belong to no goroutine: counted apart.
    assert "heap allocations (exact):" in stderr
    line, count = _summary_line(stderr, "system stack")
    assert count > 0, line


def _check_sampled(truth: dict, spans: dict, stderr: str) -> None:
    big = [a for a in truth.values() if _truth(a) >= 64 * MIB]
    assert len(big) == 4
    estimates = {}
    for a in big:
        attrs = spans[a["goid"]].attributes
        got, want = attrs["go.goroutine.alloc.bytes"], _truth(a)
        assert abs(got - want) <= 0.25 * want, (a["func"], got, want)
        # at most one sample per 512 KiB on average (fewer when objects are larger than that)
        assert 16 <= attrs["go.goroutine.alloc.samples"] < 1.5 * want / (512 * 1024), (a, attrs)
        assert attrs["go.goroutine.alloc.count"] > 0
        estimates[a["func"]] = got
    assert sorted(estimates, key=estimates.get) == [a["func"] for a in sorted(big, key=_truth)]
    idle = spans[truth["main.idle"]["goid"]].attributes
    assert idle["go.goroutine.alloc.bytes"] < MIB and idle["go.goroutine.alloc.samples"] <= 1
    # The program never reads heap profiles, so its sampling was off until the agent turned it on.
    assert "heap allocations (sampled at 1 per 524288 bytes, estimates):" in stderr


@pytest.mark.parametrize("version", VERSIONS)
def test_exact_counts_what_each_goroutine_allocated(version, tmp_path):
    _check_exact(*_trace(version, "exact", tmp_path))


@pytest.mark.parametrize("version", VERSIONS)
def test_sampled_estimates_rank_the_big_allocators(version, tmp_path):
    _check_sampled(*_trace(version, "sampled", tmp_path))


@pytest.mark.parametrize("version", VERSIONS)
def test_stripped_binaries_still_name_the_profile_rate(version):
    # No symbol table: runtime.MemProfileRate and runtime.disableMemoryProfiling found by disassembly.
    # The linker sets the flag (nothing here reads heap profiles); from Go 1.21 the rate is static data.
    binary = GoBinary(str(build_program("allocs", go=_go(version), flags=BUILD_MODES["stripped"])))
    support = goruntime.support_for(binary).allocs
    assert support.addresses_from.startswith("disassembly of runtime.")
    assert binary.read(support.profiling_disabled, 1) == b"\x01"
    if version == "default" or int(version.split(".")[1]) >= 21:
        assert struct.unpack("<q", binary.read(support.mem_profile_rate, 8))[0] == 512 * 1024


@pytest.mark.parametrize("build", ["stripped", "pie"])
def test_sampled_on_stripped_and_pie_binaries(build, tmp_path):
    # stripped: runtime.MemProfileRate found by disassembly; PIE: its address moved by the load bias
    _check_sampled(*_trace("default", "sampled", tmp_path, build))


def test_exact_on_a_pie_binary(tmp_path):
    _check_exact(*_trace("default", "exact", tmp_path, "pie"))


def test_off_adds_no_allocation_attributes(tmp_path):
    truth, spans, stderr = _trace("default", "off", tmp_path)
    assert not any(k.startswith("go.goroutine.alloc.") for s in spans.values() for k in s.attributes)
    assert "heap allocations" not in stderr
