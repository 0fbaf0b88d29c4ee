"""Everything that depends on the target's Go version, in one place.

The rest of the agent never looks at a version number: it asks this module for a
RuntimeSupport (struct offsets, probe points, state and wait-reason names) chosen once from
the binary. Offsets come from the binary's DWARF, or, for stripped binaries, from the table
generated from real toolchains (layouts/, written by scripts/gen_layouts.py).
"""

from __future__ import annotations

import json
import logging
import platform
import re
import struct
from dataclasses import dataclass
from importlib import resources

from .binary.gobinary import DwarfError, GoBinary
from .errors import UnsupportedTarget

log = logging.getLogger("otel_goroutines")

MIN_GO = (1, 17)

# runtime/runtime2.go: goroutine status values (stable across versions; 10 and 11 from Go 1.26).
G_IDLE, G_RUNNABLE, G_RUNNING, G_SYSCALL, G_WAITING, G_DEAD, G_LEAKED = 0, 1, 2, 3, 4, 6, 10
STATE_NAMES = {
    0: "idle", 1: "runnable", 2: "running", 3: "syscall", 4: "waiting", 5: "moribund",
    6: "dead", 7: "enqueue", 8: "copystack", 9: "preempted", 10: "leaked", 11: "deadextra",
}
N_STATES = 12

# Struct members the probes read; the BPF program gets them in its per-process config (probes.process_config).
FIELDS = {
    "runtime.g": ("goid", "parentGoid", "gopc", "startpc", "waitreason", "atomicstatus", "m"),
    "runtime.m": ("curg",),
}
OPTIONAL_FIELDS = {("runtime.g", "parentGoid")}  # from Go 1.21; older versions find the creator through m.curg


@dataclass(frozen=True)
class GoArch:
    """Go's register ABI (ABIInternal, Go 1.17 on amd64, 1.18 on arm64) on one architecture: where a
    probe finds a function's arguments and the current goroutine (capstone's 64-bit register names)."""
    name: str                # GOARCH
    args: tuple[str, ...]    # integer argument and result registers, in order
    g: str                   # holds the running goroutine's *g
    bpf_target: str          # bcc's ARCH / clang's __TARGET_ARCH_<name>: selects bpf/arch.h's registers
    frame_setup_stepped: bool  # every frame opens with single-stepped instructions, even nosplit ones
    min_go: tuple[int, int]  # the first Go release that passes arguments in registers there

    def show(self, reg: str) -> str:
        """A register as Go's assembler names it: RAX, R14; R0, R28."""
        return reg.upper() if self.name == "amd64" else f"R{reg[1:]}"

    def arg(self, n: int) -> str:
        return self.show(self.args[n - 1])


# amd64: src/cmd/compile/abi-internal.md; casgstatus opens with an emulated PUSH RBP (from Go 1.21).
# arm64: R0-R15, g in R28; every frame opens with STR X30, [SP, #-N]! (stepped out of line), so a
# probe moves to the first simulated instruction that still sees its arguments.
ARCHES = {
    "amd64": GoArch("amd64", ("rax", "rbx", "rcx", "rdi", "rsi", "r8", "r9", "r10", "r11"), "r14", "x86", False, MIN_GO),
    "arm64": GoArch("arm64", tuple(f"x{n}" for n in range(16)), "x28", "arm64", True, (1, 18)),
}
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def require_traceable(binary: GoBinary) -> None:
    """Probes run only on a program of this machine's architecture; `inspect` reads any it knows."""
    if binary.arch != HOST_ARCH:
        raise UnsupportedTarget(f"{binary.path} is built for {binary.arch}; this machine is {HOST_ARCH}: "
                                f"`otel-goroutines inspect` can read it here, tracing it needs an {binary.arch} machine")


@dataclass(frozen=True, order=True)
class GoVersion:
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> "GoVersion":
        match = re.search(r"go(\d+)\.(\d+)(?:\.(\d+))?", text)
        if not match:
            raise UnsupportedTarget(f"unrecognised Go version {text!r}")
        return cls(int(match[1]), int(match[2]), int(match[3] or 0))

    def __str__(self) -> str:
        return f"go{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class ProbePoint:
    handler: str    # the BPF function (bpf/goroutines.bpf.c) run at this address
    function: str   # the Go function the address lies in
    address: int    # link-time virtual address of the probed instruction
    instruction: str
    why: str


@dataclass(frozen=True)
class RuntimeSupport:
    version: GoVersion
    arch: GoArch
    offsets: dict[str, int]          # "g_goid" -> 152, ...
    offsets_source: str              # "DWARF" or "generated table for go1.xx"
    lifecycle_probes: tuple[ProbePoint, ...]
    state_probes: tuple[ProbePoint, ...]
    wait_reasons: tuple[str, ...]
    allgs_address: int | None        # runtime.allgs ([]*g), to list goroutines at attach; None if stripped
    allocs: "AllocSupport | None" = None  # heap-allocation probes (--allocs)
    labels: "LabelSupport | None" = None  # runtime/pprof goroutine labels; None: the program cannot set any
    # The casgstatus probe can also see creations and exits (the goid is set before the new g turns
    # runnable from Go 1.24): with state events on, no lifecycle probes are needed.
    states_cover_lifecycle: bool = False

    def wait_reason(self, index: int) -> str:
        return self.wait_reasons[index] if 0 <= index < len(self.wait_reasons) and self.wait_reasons[index] else f"waitreason({index})"


def support_for(binary: GoBinary, placement: str = "cheap") -> RuntimeSupport:
    """placement: "cheap" (the addresses chosen below) or "entry" (see PROBE_PLACEMENTS)."""
    naive = placement == "entry"
    version = GoVersion.parse(binary.go_version)
    if (version.major, version.minor) < MIN_GO:
        raise UnsupportedTarget(f"{binary.path} was built with {binary.go_version}; Go 1.17 or later is required")
    if (version.major, version.minor) < ARCHES[binary.arch].min_go:
        raise UnsupportedTarget(f"{binary.path} was built with {binary.go_version} for {binary.arch}, which passes "
                                f"arguments in registers from Go {'.'.join(map(str, ARCHES[binary.arch].min_go))}")
    offsets, source = _offsets(binary, version)
    return RuntimeSupport(
        version=version,
        arch=ARCHES[binary.arch],
        offsets=offsets,
        offsets_source=source,
        lifecycle_probes=tuple(_lifecycle_probes(binary, naive)),
        state_probes=(_state_probe(binary, naive),),
        wait_reasons=_wait_reasons(binary, version),
        allgs_address=sym.address if (sym := binary.symbol("runtime.allgs")) else None,
        allocs=_alloc_support(binary, version, naive),
        labels=_label_support(binary, version),
        states_cover_lifecycle=version >= GoVersion(1, 24) and not naive,
    )


def _offsets(binary: GoBinary, version: GoVersion) -> tuple[dict[str, int], str]:
    try:
        found, source = binary.struct_offsets(FIELDS), "DWARF"
    except DwarfError as exc:
        found, source = _generated_table(version, str(exc))
        if str(exc).startswith("unreadable"):
            log.warning("%s: %s; struct offsets from the generated table for %s instead", binary.path, exc, version)
    offsets = {}
    for struct_name, fields in FIELDS.items():
        for field in fields:
            value = found.get(struct_name, {}).get(field)
            if value is None:
                if (struct_name, field) in OPTIONAL_FIELDS:
                    continue
                raise UnsupportedTarget(f"{binary.path}: {struct_name}.{field} not found in {source}")
            offsets[f"{struct_name.split('.')[1]}_{field}"] = value
    return offsets, source


def _layout_tables() -> dict:
    path = resources.files(__package__) / "layouts" / "offsets.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _generated_table(version: GoVersion, why: str) -> tuple[dict, str]:
    """The offsets of version's table, for a binary whose DWARF is missing or unreadable (why)."""
    key = f"go{version.major}.{version.minor}"
    table = _layout_tables().get(key)
    if table is None:
        raise UnsupportedTarget(f"{why}, built with {version}, and no generated offset table for {key}")
    untested = ", derived from the runtime's source, untested" if table["source"].startswith("derived") else ""
    unreadable = f"; {why}" if why.startswith("unreadable") else ""
    return table["structs"], f"generated table for {key}{untested}{unreadable}"


# "entry" (the hidden --probe-placement, for bench/run.py only) puts every probe on its function's
# first instruction (the naive placement) to measure what choosing addresses is worth. The creation
# and exit handlers then read registers that hold something else: spans are meaningless.
PROBE_PLACEMENTS = ("cheap", "entry")


def _first_instruction(binary: GoBinary, name: str, handler: str) -> ProbePoint:
    func = binary.function(name)
    insn = binary.isa.instruction_at(binary.code(func), func.entry, func.entry)
    return ProbePoint(handler, name, func.entry, str(insn), "first instruction (--probe-placement entry, for benchmarks only)")


def _entry_probe(binary: GoBinary, name: str, handler: str, naive: bool) -> ProbePoint:
    if naive:
        return _first_instruction(binary, name, handler)
    func = binary.function(name)
    code = binary.code(func)
    address = binary.isa.after_stack_check(code, func.entry)
    insn = binary.isa.instruction_at(code, func.entry, address)
    why = "entry" if address == func.entry else f"after the stack check at +{address - func.entry}"
    return ProbePoint(handler, name, address, str(insn), f"{why}; {insn.cost}")


def _state_probe(binary: GoBinary, naive: bool) -> ProbePoint:
    # casgstatus(gp, oldval, newval): nosplit, no stack check. amd64 probes its entry (PUSH RBP from
    # Go 1.21; Go 1.19's SUB RSP costs two traps); arm64 the first simulated instruction with the arguments intact.
    arch = ARCHES[binary.arch]
    if arch.frame_setup_stepped and not naive:
        return _cheap_probe(binary, "runtime.casgstatus", "on_casgstatus", (*arch.args[:3], arch.g), naive)
    return _entry_probe(binary, "runtime.casgstatus", "on_casgstatus", naive)


def _lifecycle_probes(binary: GoBinary, naive: bool) -> list[ProbePoint]:
    # Creation: newproc1's RET, where RAX holds the new g with goid, startpc, gopc (and parentGoid) all set.
    # (Up to Go 1.23 the goid is assigned after the g turns runnable, so casgstatus is too early.)
    newproc1 = binary.function("runtime.newproc1")
    arch, isa = ARCHES[binary.arch], binary.isa
    # From Go 1.24 the goid is assigned before newproc1's casgstatus(newg, _Gdead, _Grunnable or
    # _Gwaiting): at that call RAX = the new g, complete, and RCX its first status. The kernel emulates
    # CALL (one trap) but single-steps RET (two traps: measured ~10x the cost here, bench/RESULTS.md).
    code = binary.code(newproc1)
    calls = isa.call_sites(code, newproc1.entry, binary.function("runtime.casgstatus").entry) \
        if GoVersion.parse(binary.go_version) >= GoVersion(1, 24) else []
    if calls and not naive:  # the probe ignores the other call, casgstatus(fresh g, _Gidle, _Gdead)
        probes = [ProbePoint("on_goroutine_created", newproc1.name, addr, f"{isa.call} runtime.casgstatus",
                             f"the call that makes the new g runnable ({arch.arg(1)} = g, complete; {arch.arg(3)} = status); "
                             f"{isa.instruction_at(code, newproc1.entry, addr).cost}")
                  for addr in calls]
    else:
        probes = [ProbePoint("on_goroutine_created", newproc1.name, addr, "ret", "return of newproc1: the new g is complete; "
                             f"{isa.instruction_at(code, newproc1.entry, addr).cost}")
                  for addr in isa.ret_sites(code, newproc1.entry)]
    if not probes:
        raise UnsupportedTarget(f"{binary.path}: no return instruction found in runtime.newproc1")
    # Exit: the call casgstatus(gp, _Grunning, _Gdead) in gdestroy (Go 1.22+) or goexit0 (earlier).
    # Every goroutine end passes there, including runtime.Goexit and coroutine exits.
    exit_func = binary.functions.by_name("runtime.gdestroy") or binary.function("runtime.goexit0")
    if naive:
        return [_first_instruction(binary, newproc1.name, "on_goroutine_created"),
                _first_instruction(binary, exit_func.name, "on_goroutine_exit")]
    casgstatus = binary.function("runtime.casgstatus")
    code = binary.code(exit_func)
    sites = isa.call_sites(code, exit_func.entry, casgstatus.entry)
    if not sites:
        raise UnsupportedTarget(f"{binary.path}: no call to casgstatus found in {exit_func.name}")
    probes += [ProbePoint("on_goroutine_exit", exit_func.name, addr, f"{isa.call} runtime.casgstatus",
                          f"the call that marks the g dead ({arch.arg(1)} = g); {isa.instruction_at(code, exit_func.entry, addr).cost}")
               for addr in sites]
    return probes


def wait_reasons_in(binary: GoBinary) -> tuple[str, ...]:
    """The texts of runtime.waitReasonStrings, a [N]string in the binary's data; () without a symbol table."""
    sym = binary.symbol("runtime.waitReasonStrings")
    if sym is None or not sym.size:
        return ()
    raw = binary.read(sym.address, sym.size)
    return tuple(binary.read(ptr, length).decode("utf-8", "replace") if length else ""
                 for ptr, length in struct.iter_unpack("<QQ", raw))


def _wait_reasons(binary: GoBinary, version: GoVersion) -> tuple[str, ...]:
    # The version's own texts from the binary; stripped, those of the generated table.
    found = wait_reasons_in(binary)
    if found:
        return found
    table = _layout_tables().get(f"go{version.major}.{version.minor}")
    return tuple(table["wait_reasons"]) if table else ()


# --- heap allocations (--allocs; the estimate math is in allocs.py) ---------------------------
# Every heap object comes from mallocgc(size, typ, needzero), size in RAX, on the allocating g
# (R14; g0 or gsignal when on a system stack). From Go 1.27 (1.26 with
# GOEXPERIMENT=sizespecializedmalloc) compiled code calls size-specialized entries directly for
# small objects, and mallocgc hands those sizes to the same entries. Every heap-profile sample
# passes profilealloc(mp, x, size), size in RCX, in all versions (mProf_Malloc's arguments moved
# in 1.23). runtime.gcenable runs once, after the runtime's package init and before the program's.
_SPECIALIZED_MALLOC = re.compile(r"runtime\.mallocgc(?:SmallNoScanSC|SmallScanNoHeaderSC|TinySize|TinySC)\d+")


@dataclass(frozen=True)
class AllocSupport:
    exact_probes: tuple[ProbePoint, ...]
    specialized_max: int             # mallocgc leaves sizes 1..this to the size-specialized entries (0: none)
    sampled_probes: tuple[ProbePoint, ...]
    mem_profile_rate: int | None     # link-time address of runtime.MemProfileRate (None: not found)
    profiling_disabled: int | None   # of runtime.disableMemoryProfiling, the linker's "nothing reads heap profiles"
    addresses_from: str


def _cheap_probe(binary: GoBinary, name: str, handler: str, keep: tuple[str, ...], naive: bool) -> ProbePoint:
    """After the stack check, on the first instruction that costs one trap while the registers in
    `keep` still hold the arguments (amd64 Go before 1.21, and arm64 always, open the frame with
    single-stepped instructions)."""
    point = _entry_probe(binary, name, handler, naive)
    func = binary.function(name)
    code = binary.code(func)
    address = binary.isa.first_one_trap(code, func.entry, point.address, keep)
    if address == point.address:
        return point
    insn = binary.isa.instruction_at(code, func.entry, address)
    shown = ", ".join(ARCHES[binary.arch].show(r) for r in keep)
    return ProbePoint(handler, name, address, str(insn), f"+{address - func.entry}, the first {binary.isa.one_trap_word} "
                      f"instruction after the stack check with {shown} unchanged: one trap")


def _alloc_support(binary: GoBinary, version: GoVersion, naive: bool) -> AllocSupport | None:
    try:
        return _find_alloc_support(binary, version, naive)
    except UnsupportedTarget:  # a function missing: goroutines are still traced, without --allocs
        return None


def _find_alloc_support(binary: GoBinary, version: GoVersion, naive: bool) -> AllocSupport:
    specialized = sorted((f for f in binary.functions.funcs() if _SPECIALIZED_MALLOC.fullmatch(f.name)), key=lambda f: f.entry)
    specialized_max = 0
    if specialized:
        table = binary.symbol("runtime.mallocScanTable")  # [N+1]func: one entry per size 0..N
        specialized_max = table.size // 8 - 1 if table and table.size else (512 if (version.major, version.minor) < (1, 27) else 80)
    arch = ARCHES[binary.arch]
    size_first, size_third = (arch.args[0], arch.g), (arch.args[2], arch.g)  # mallocgc's size; profilealloc's
    exact = [_cheap_probe(binary, "runtime.mallocgc", "on_mallocgc", size_first, naive)]
    exact += [_cheap_probe(binary, f.name, "on_malloc_specialized", size_first, naive) for f in specialized]
    sampled = [_cheap_probe(binary, "runtime.profilealloc", "on_profilealloc", size_third, naive),
               _entry_probe(binary, "runtime.gcenable", "on_runtime_initialised", naive)]
    rate, disabled, source = _profile_rate_addresses(binary)
    return AllocSupport(tuple(exact), specialized_max, tuple(sampled), rate, disabled, source)


def _profile_rate_addresses(binary: GoBinary) -> tuple[int | None, int | None, str]:
    rate, disabled = binary.symbol("runtime.MemProfileRate"), binary.symbol("runtime.disableMemoryProfiling")
    if rate and disabled:
        return rate.address, disabled.address, "symbol table"
    # Stripped: `if disableMemoryProfiling { MemProfileRate = 0 }` in schedinit (Go 1.21+), or
    # `MemProfileRate = defaultMemProfileRate(512 * 1024)` in the runtime's package init (older):
    # a byte read, then within a few instructions a quadword store to the variable profilealloc reads.
    profilealloc = binary.function("runtime.profilealloc")
    read_there = {r.target for r in binary.isa.data_refs(binary.code(profilealloc), profilealloc.entry) if r.size == 8 and not r.written}
    for name in ("runtime.schedinit", "runtime.init"):
        func = binary.functions.by_name(name)
        refs = binary.isa.data_refs(binary.code(func), func.entry) if func else []
        for i, flag in enumerate(refs):
            if flag.size != 1 or flag.written:
                continue
            for store in refs[i + 1:]:
                if store.address - flag.address > 40:
                    break
                if store.size == 8 and store.written and store.target in read_there:
                    return store.target, flag.target, f"disassembly of {name}"
    return None, None, "not found"


# --- runtime/pprof goroutine labels (g.labels) --------------------------------------------------
# pprof.SetGoroutineLabels and pprof.Do store, through runtime/pprof.runtime_setProfLabel, a pointer
# to a labelMap in g.labels (nil: no labels); a new goroutine inherits its creator's. The labelMap is a
# map[string]string up to Go 1.23 (g.labels points to the map variable), and from Go 1.24 a
# struct{ list []struct{ key, value string } }. Without runtime/pprof linked in, no label can be set.
_SET_PROF_LABEL = "runtime/pprof.runtime_setProfLabel"


@dataclass(frozen=True)
class LabelSupport:
    offset: int       # of g.labels
    layout: str       # "map" (Go <= 1.23) or "slice" (Go 1.24+)
    source: str       # where the offset comes from


def _label_support(binary: GoBinary, version: GoVersion) -> LabelSupport | None:
    setter = binary.functions.by_name(_SET_PROF_LABEL)
    if setter is None:
        return None
    layout = "map" if (version.major, version.minor) < (1, 24) else "slice"
    try:
        offset = binary.struct_offsets({"runtime.g": ("labels",)}).get("runtime.g", {}).get("labels")
    except DwarfError:  # said with the struct offsets
        offset = None
    if offset is not None:
        return LabelSupport(offset, layout, "DWARF")
    # Stripped: the setter's `getg().labels = labels` stores its argument (RAX, R0) at the field, through
    # the g register or a copy of it (the write-barrier buffer and the stack are other stores of it).
    for base, disp in binary.isa.register_stores(binary.code(setter), setter.entry, ARCHES[binary.arch].args[0]):
        if base not in binary.isa.frame_registers and disp >= 64:
            return LabelSupport(disp, layout, f"disassembly of {_SET_PROF_LABEL}")
    return None
