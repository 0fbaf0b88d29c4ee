"""arm64, as far as an amd64 machine can prove it: `inspect` on GOARCH=arm64 cross-builds of every
toolchain of the matrix (default, stripped, PIE stripped), checked against what the Go toolchain
itself says of the same binary (`go version`, `go tool nm`, `go tool objdump`; stripped binaries
against the build with symbols and the same flags, whose code is laid out the same), and the BPF
program compiled for arm64 by bcc against Debian's arm64 kernel headers. Nothing here runs a probe.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, build_appservice, build_program, go_release, run_agent
from otel_goroutines import goruntime, gosdk
from otel_goroutines.binary.gobinary import GoBinary

sys.path.insert(0, str(ROOT / "scripts"))
from go_toolchains import RELEASES  # noqa: E402

STRIP = "-ldflags=-s -w"
MODES = {"default": (), "stripped": (STRIP,), "pie-stripped": ("-buildmode=pie", STRIP)}

# Go's arm64 assembler mnemonics (as `go tool objdump` prints them) of the instructions the kernel's
# uprobes simulate (arch/arm64/kernel/probes/decode-insn.c, simulate-insn.c): B, BL, B.cond,
# CBZ/CBNZ, TBZ/TBNZ, ADR/ADRP, BR/BLR/RET. Everything else is stepped out of line or refused.
SIMULATED = {"JMP", "CALL", "CBZ", "CBNZ", "CBZW", "CBNZW", "TBZ", "TBNZ", "ADR", "ADRP", "RET",
             *(f"B{cc}" for cc in ("EQ", "NE", "CS", "HS", "CC", "LO", "MI", "PL", "VS", "VC", "HI", "LS", "GE", "LT", "GT", "LE"))}

_PROBE = re.compile(r"^  (on_\w+)\s+(\S+)\+(\d+)\s+0x([0-9a-f]+)\s+(.+?)\s{2,}(.+)$", re.M)


def _go(minor: str, *args: str) -> str:
    return subprocess.run([go_release(minor), *args], check=True, capture_output=True, text=True,
                          env=dict(os.environ, GOTOOLCHAIN="local")).stdout


def _nm(minor: str, path: Path) -> dict[str, int]:
    table = {}
    for line in _go(minor, "tool", "nm", str(path)).splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "Tt":
            table.setdefault(parts[2], int(parts[0], 16))
    return table


def _objdump(minor: str, path: Path, func: str) -> dict[int, str]:
    """address -> instruction text, as Go prints it, of one function."""
    text = _go(minor, "tool", "objdump", "-s", f"^{re.escape(func)}$", str(path))
    return {int(m[1], 16): m[2].strip() for m in re.finditer(r"^\s+\S*:\d+\s+0x([0-9a-f]+)\s+[0-9a-f]{8}\s+(.+)$", text, re.M)}


def _inspect(path: Path) -> str:
    run = run_agent(["inspect", str(path)])
    assert run.returncode == 0, run.stderr
    return run.stdout


def _offsets(output: str) -> dict[str, int]:
    block = output.split("struct offsets:", 1)[1].split("wait reasons:", 1)[0]
    return {name: int(value) for name, value in re.findall(r"^  (\w+)\s+(\d+)$", block, re.M)}


def _check_probes(minor: str, output: str, reference: Path) -> list[str]:
    """Every probe line of `inspect` against `go tool nm` and `go tool objdump` of the reference
    binary: the function's address, the instruction there, and its cost said as the kernel decides it."""
    nm = _nm(minor, reference)
    handlers = []
    for handler, func, offset, address, insn, why in _PROBE.findall(output):
        address, offset = int(address, 16), int(offset)
        assert nm[func] == address - offset, (func, hex(nm[func]), hex(address))
        code = _objdump(minor, reference, func)
        go_insn = code[address]
        mnemonic = go_insn.split()[0]
        assert ("one trap" in why) == (mnemonic in SIMULATED), (handler, go_insn, why)
        if insn.startswith("bl "):  # a call site: the callee as Go's disassembler names it
            assert go_insn == f"CALL {insn.split()[1]}(SB)", (insn, go_insn)
        if insn == "ret":
            assert mnemonic == "RET"
        if "unchanged" in why:  # nothing between the entry and the probe writes the registers it reads
            kept = re.search(r"with (.+) unchanged", why)[1].split(", ")
            for pc in sorted(a for a in code if a < address):
                written = code[pc].split(", ")[-1] if "," in code[pc] else ""
                assert written not in kept, (func, hex(pc), code[pc], kept)
        handlers.append(handler)
    return handlers


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("minor", RELEASES)
def test_inspect_plan_matches_the_go_toolchain(minor, mode):
    go = go_release(minor)
    binary = build_program("tree", go=go, flags=MODES[mode], goarch="arm64")
    reference = build_program("tree", go=go, flags=tuple(f for f in MODES[mode] if f != STRIP), goarch="arm64")
    output = _inspect(binary)
    assert re.search(r"^Go version:\s+(\S+)$", output, re.M)[1] == _go(minor, "version", str(binary)).split()[-1]
    assert re.search(r"^architecture:\s+arm64 \(Go arguments in R0, R1, \.\.\.; g in R28\); inspect only", output, re.M)
    assert ("pie (PIE)" in output) == ("-buildmode=pie" in MODES[mode])
    handlers = _check_probes(minor, output, reference)
    assert {"on_goroutine_created", "on_goroutine_exit", "on_casgstatus", "on_mallocgc", "on_profilealloc"} <= set(handlers)
    # The probes the agent needs per goroutine all cost one trap on arm64 (RET and BL are simulated).
    for handler, _f, _o, _a, _i, why in _PROBE.findall(output):
        if handler != "on_runtime_initialised":  # once per process
            assert why.endswith("one trap"), (handler, why)


@pytest.mark.parametrize("minor", RELEASES)
def test_arm64_runtime_offsets_are_amd64s(minor):
    """runtime.g and runtime.m as DWARF describes them in an arm64 build are the table's, which was
    measured on amd64: the generated table needs no architecture key."""
    go = go_release(minor)
    dwarf = goruntime.support_for(GoBinary(str(build_program("tree", go=go, goarch="arm64"))))
    stripped = goruntime.support_for(GoBinary(str(build_program("tree", go=go, flags=(STRIP,), goarch="arm64"))))
    assert dwarf.offsets_source == "DWARF" and stripped.offsets_source.startswith("generated table")
    assert dwarf.offsets == stripped.offsets
    assert _offsets(_inspect(build_program("tree", go=go, flags=(STRIP,), goarch="arm64"))) == stripped.offsets
    assert dwarf.wait_reasons == stripped.wait_reasons


def test_sdk_and_labels_on_arm64():
    """The OpenTelemetry SDK's layout and probes and g.labels, stripped (table, disassembly) as with DWARF."""
    with_dwarf = build_appservice(goarch="arm64")
    stripped = build_appservice(flags=(STRIP,), goarch="arm64")
    dwarf_sdk, table_sdk = gosdk.sdk_status(GoBinary(str(with_dwarf))), gosdk.sdk_status(GoBinary(str(stripped)))
    assert dwarf_sdk.support.offsets == table_sdk.support.offsets
    dwarf_labels = goruntime.support_for(GoBinary(str(with_dwarf))).labels
    stripped_labels = goruntime.support_for(GoBinary(str(stripped))).labels
    assert dwarf_labels.offset == stripped_labels.offset and stripped_labels.source.startswith("disassembly")
    output = _inspect(stripped)
    handlers = _check_probes("1.26", output, with_dwarf)
    assert {"on_app_span_start", "on_app_span_end"} <= set(handlers)
    assert "bl context.WithValue" in output and "(R4, R5 = the span as an any); bl is simulated: one trap" in output


# --- the BPF program, compiled for arm64 ------------------------------------------------------------
_COMPILE = """
import sys
from bcc import BPF
from otel_goroutines import goruntime, gosdk, allocs
from otel_goroutines.binary.gobinary import GoBinary
from otel_goroutines.probes import BPF_SOURCE, GoroutineProbes, ProbeSettings
exe, mode = sys.argv[1], allocs.AllocMode(sys.argv[2])
binary = GoBinary(exe)
probes = GoroutineProbes(goruntime.support_for(binary), exe, 1, ProbeSettings(allocs=mode), gosdk.sdk_status(binary).support)
bpf = BPF(text=BPF_SOURCE.read_text(), cflags=probes.program.cflags())
for handler in sorted({p.handler for p in probes.probe_points} | set(sys.argv[3:])):
    code = bpf.dump_func(handler)
    # 64-bit loads (LDX DW) from the context: through r1 or a register it was copied to (MOV) or
    # reloaded to from its spill slot on the stack (STX DW to r10, LDX DW back), and not yet
    # overwritten (a load, an ALU result, a helper call's r0-r5), on any path through the code
    # (registers holding ctx propagated along jumps to a fixed point): the pt_regs offsets read
    insns = [(code[i], code[i + 1] & 0xF, code[i + 1] >> 4, int.from_bytes(code[i + 2:i + 4], "little", signed=True))
             for i in range(0, len(code), 8)]
    state, offsets, work = {0: (frozenset({1}), frozenset())}, set(), [0]
    while work:
        pc = work.pop()
        op, dst, src, off = insns[pc]
        ctx, spilled = set(state[pc][0]), set(state[pc][1])
        if op == 0xBF:
            (ctx.add if src in ctx else ctx.discard)(dst)
        elif op & 7 in (2, 3) and dst == 10:
            (spilled.add if op == 0x7B and src in ctx else spilled.discard)(off)
        elif op == 0x79 and src == 10 and off in spilled:
            ctx.add(dst)
        elif op == 0x79 and src in ctx:
            offsets.add(off)
            ctx.discard(dst)
        elif op & 7 in (0, 1, 4, 7):
            ctx.discard(dst)
        elif op == 0x85:
            ctx -= {0, 1, 2, 3, 4, 5}
        if op == 0x95:
            nexts = []
        elif op == 0x05:
            nexts = [pc + 1 + off]
        elif op & 7 in (5, 6) and op != 0x85:
            nexts = [pc + 1, pc + 1 + off]
        else:
            nexts = [pc + (2 if op == 0x18 else 1)]
        for n in nexts:
            old = state.get(n, (frozenset(), frozenset()))
            new = (old[0] | ctx, old[1] | spilled)
            if n not in state or new != old:
                state[n] = new
                work.append(n)
    print(handler, sorted(offsets))
"""


def _compile(exe: Path, allocs: str, env: dict[str, str]) -> dict[str, list[int]]:
    extra = ["on_goroutine_exit"] + (["on_mallocgc"] if allocs == "exact" else [])  # compiled, if not attached
    run = subprocess.run([sys.executable, "-c", _COMPILE, str(exe), allocs, *extra],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, **env), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return {line.split()[0]: eval(line.split(" ", 1)[1]) for line in run.stdout.splitlines()}


# Offsets in the kernel's struct pt_regs of what Go's ABI puts in registers: x86-64's
# (arch/x86/include/asm/ptrace.h: r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di,
# orig_ax, ip) and arm64's (it begins with struct user_pt_regs { regs[31]; sp; pc; pstate; }).
PT_REGS = {
    "amd64": {80: "arg1", 40: "arg2", 88: "arg3", 112: "arg4", 104: "arg5", 72: "arg6", 8: "g", 128: "ip", 152: "return"},
    "arm64": {**{8 * n: f"arg{n + 1}" for n in range(6)}, 224: "g", 256: "ip", 240: "return"},
}
# "return": where the caller resumes (the waker's call site): amd64's stack pointer, arm64's link register
READS = {"on_goroutine_exit": {"arg1", "arg3"}, "on_casgstatus": {"arg1", "arg2", "arg3", "g", "ip", "return"},
         "on_app_span_start": {"arg5", "arg6", "g"}, "on_app_span_end": {"arg1"}, "on_mallocgc": {"arg1", "g"},
         "on_profilealloc": {"arg3", "g", "ip"}}


@pytest.mark.parametrize("allocs", ["exact", "sampled"])
def test_bpf_program_compiles_for_arm64(allocs):
    """bcc, as the agent runs it on an arm64 machine, but told ARCH=arm64 and given Debian's arm64
    headers: every handler compiles (app spans and labels included), and reads the same Go registers
    as the amd64 build, each at its place in that architecture's struct pt_regs (PT_REGS). Not
    loaded: there is no arm64 kernel here."""
    headers = subprocess.run([str(ROOT / "scripts" / "arm64-kernel-headers.sh")], check=True, capture_output=True,
                             text=True).stdout.strip()
    builds = {"arm64": _compile(build_appservice(goarch="arm64"), allocs, {"ARCH": "arm64", "BCC_KERNEL_SOURCE": headers}),
              "amd64": _compile(build_appservice(), allocs, {})}
    assert set(builds["arm64"]) == set(builds["amd64"]) >= {"on_app_span_start", "on_app_span_end", "on_casgstatus"}
    for arch, handlers in builds.items():
        for handler, offsets in handlers.items():
            assert all(off in PT_REGS[arch] for off in offsets), (arch, handler, offsets)
            read = {PT_REGS[arch][off] for off in offsets}
            assert read == READS.get(handler, read), (arch, handler, read)
    for handler in builds["arm64"]:
        assert {PT_REGS["arm64"][o] for o in builds["arm64"][handler]} == {PT_REGS["amd64"][o] for o in builds["amd64"][handler]}
