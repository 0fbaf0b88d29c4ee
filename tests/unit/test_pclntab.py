"""Tests for otel_goroutines.binary.pclntab on real Go binaries and on damaged/synthetic tables.

Real binaries are built once per session with the project's toolchains (scripts/go_toolchains.py, which
`make setup` provides: Go 1.26 -> table format "1.20", Debian's Go 1.19 -> "1.18") and checked against
`go tool nm` / `go tool objdump`. A missing toolchain fails these tests; it never skips them.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import struct
import subprocess
import time

import pytest
from elftools.elf.elffile import ELFFile

from helpers import go_release
from otel_goroutines.binary.pclntab import Func, FuncTable, PclntabError, _candidates, _symbols

TOOLCHAINS = {"go1.26": "1.26", "go1.19": "1.19"}  # name -> Go minor release (scripts/go_toolchains.py)
EXPECTED_FORMAT = {"go1.26": "1.20", "go1.19": "1.18"}
MODES = {"default": [], "stripped": ["-ldflags=-s -w"], "pie": ["-buildmode=pie"]}

GO_MOD = "module example.com/pclntest\n\ngo 1.19\n"
MAIN_GO = """package main

import (
	"fmt"
	"sync"
)

type counter struct{ n int }

//go:noinline
func (c *counter) inc() { c.n++ }

//go:noinline
func worker(id int, wg *sync.WaitGroup, out chan<- int) {
	defer wg.Done()
	s := 0
	for i := 0; i < id*1000; i++ {
		s += i
	}
	out <- s
}

func main() {
	var wg sync.WaitGroup
	out := make(chan int, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go worker(i, &wg, out) // GO_STATEMENT
	}
	wg.Wait()
	close(out)
	c := &counter{}
	for v := range out {
		c.inc()
		fmt.Println(v)
	}
	defer func() { fmt.Println("closure", c.n) }() // a closure the compiler does not inline
}
"""
CGO_MAIN_GO = """package main

// int add(int a, int b) { return a + b; }
import "C"
import "fmt"

func main() { fmt.Println(C.add(1, 2)) }
"""
GO_STATEMENT_LINE = next(i for i, s in enumerate(MAIN_GO.splitlines(), 1) if "GO_STATEMENT" in s)


# ---- building and inspecting real binaries ------------------------------------------------------


def _go_env(tmp) -> dict[str, str]:
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod -buildvcs=false", CGO_ENABLED="0")
    if "HOME" not in env:  # the go command needs a cache and GOPATH somewhere
        env.setdefault("GOCACHE", str(tmp / "gocache"))
        env.setdefault("GOPATH", str(tmp / "gopath"))
    return env


@pytest.fixture(scope="session")
def go_build(tmp_path_factory):
    """build(toolchain, mode, cgo=False) -> path of the binary; each combination is built once."""
    root = tmp_path_factory.mktemp("gobuild")
    cache: dict[tuple, str] = {}

    def build(toolchain: str, mode: str, cgo: bool = False) -> str:
        key = (toolchain, mode, cgo)
        if key not in cache:
            go = go_release(TOOLCHAINS[toolchain])
            if cgo and not shutil.which("gcc"):
                pytest.fail("gcc not installed (needed for cgo; make setup's linux-headers-amd64 brings it)")
            src = root / ("src-cgo" if cgo else "src")
            if not src.exists():
                src.mkdir()
                (src / "go.mod").write_text(GO_MOD)
                (src / "main.go").write_text(CGO_MAIN_GO if cgo else MAIN_GO)
            out = root / f"{toolchain}-{mode}{'-cgo' if cgo else ''}"
            env = _go_env(root)
            if cgo:
                env["CGO_ENABLED"] = "1"
            res = subprocess.run([go, "build", *MODES[mode], "-o", str(out), "."], cwd=src, env=env,
                                 capture_output=True, text=True, timeout=300)
            if res.returncode:
                pytest.fail(f"{go} build {' '.join(MODES[mode])} failed:\n{res.stderr}")
            cache[key] = str(out)
        return cache[key]

    return build


def _go_tool(*args: str) -> str:
    # Always Go 1.26's nm/objdump: Go 1.19's objdump prints no lines for its own PIE builds (it only
    # looks for a .gopclntab section, which those lack).
    go = go_release(TOOLCHAINS["go1.26"])
    return subprocess.run([go, "tool", *args], env=dict(os.environ, GOTOOLCHAIN="local"), check=True,
                          capture_output=True, text=True, timeout=120).stdout


def nm_text_symbols(path: str) -> dict[str, int]:
    """Text symbols (T/t) of `go tool nm`: name -> address."""
    syms = {}
    for line in _go_tool("nm", path).splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in ("T", "t"):
            syms[parts[2]] = int(parts[0], 16)
    return syms


OBJDUMP_LINE = re.compile(r"^\s+(\S*):(-?\d+)\s+0x([0-9a-f]+)\s+\S+\s+(.*?)\s*$")


def objdump_lines(path: str, regexp: str) -> list[tuple[int, str, int, str]]:
    """(pc, file base name, line, instruction) for every instruction objdump prints."""
    rows = []
    for line in _go_tool("objdump", "-s", regexp, path).splitlines():
        m = OBJDUMP_LINE.match(line)
        if m:
            rows.append((int(m[3], 16), m[1], int(m[2]), m[4]))
    return rows


def load(path: str) -> FuncTable:
    with open(path, "rb") as f:
        return FuncTable.from_elf(ELFFile(f))


def load_bytes(data: bytes) -> FuncTable:
    return FuncTable.from_elf(ELFFile(io.BytesIO(data)))


BUILDS = [(tc, mode) for tc in TOOLCHAINS for mode in MODES]


@pytest.fixture(scope="session")
def tables(go_build):
    cache: dict[tuple, FuncTable] = {}

    def get(toolchain: str, mode: str) -> FuncTable:
        if (toolchain, mode) not in cache:
            cache[toolchain, mode] = load(go_build(toolchain, mode))
        return cache[toolchain, mode]

    return get


# ---- real binaries ----------------------------------------------------------------------------


@pytest.mark.parametrize("toolchain,mode", BUILDS)
def test_format_and_basic_shape(tables, toolchain, mode):
    tab = tables(toolchain, mode)
    assert tab.go_format == EXPECTED_FORMAT[toolchain]
    funcs = tab.funcs()
    assert len(funcs) > 1000
    assert [f.entry for f in funcs] == sorted(f.entry for f in funcs)
    assert all(f.entry < f.end for f in funcs)
    assert all(a.end == b.entry for a, b in zip(funcs, funcs[1:]))  # functab ends are the next entries
    for name in ("main.main", "main.worker", "main.(*counter).inc", "main.main.func1", "runtime.newproc",
                 "runtime.goexit1", "runtime.gopark"):
        assert tab.by_name(name) is not None, name
    assert tab.by_name("main.nosuchfunc") is None


@pytest.mark.parametrize("toolchain,mode", [(tc, m) for tc in TOOLCHAINS for m in ("default", "pie")])
def test_names_and_entries_match_go_tool_nm(go_build, tables, toolchain, mode):
    tab = tables(toolchain, mode)
    # The ELF symtab names assembly (ABI0) functions "x.abi0"; the function table says "x".
    nm = nm_text_symbols(go_build(toolchain, mode))
    by_addr: dict[int, set[str]] = {}
    for name, addr in nm.items():
        by_addr.setdefault(addr, set()).add(name.removesuffix(".abi0"))
    ours = {(f.name, f.entry) for f in tab.funcs()}
    mismatched = {(n, a) for n, a in ours if n not in by_addr.get(a, ())}
    # Only generated equality functions may be spelled differently: the table says "[...]" or "·"
    # where the symtab has "[2]" or ".".
    assert all(a in by_addr and re.match(r"type(\.\.|:\.)eq\.", n) for n, a in mismatched), mismatched
    assert len(mismatched) <= 3
    # Every nm text symbol is a function in the table, except the section markers.
    table_addrs = {a for _, a in ours}
    missing = {n for n, a in nm.items() if a not in table_addrs}
    assert missing <= {"runtime.text", "runtime.etext"}, missing
    assert len(ours) == len(tab.funcs())
    # Runtime functions with an ABI wrapper appear twice; by_name gives the real one.
    assert tab.by_name("runtime.newproc").entry == nm["runtime.newproc"] != nm["runtime.newproc.abi0"]
    assert tab.by_name("runtime.asmcgocall").entry == nm["runtime.asmcgocall.abi0"]  # asm body, Go wrapper
    assert tab.by_name("main.main").entry == nm["main.main"]


@pytest.mark.parametrize("toolchain,mode", BUILDS)
def test_lookup_at_entry_middle_and_end(tables, toolchain, mode):
    tab = tables(toolchain, mode)
    funcs = tab.funcs()
    for f in funcs:
        for pc in (f.entry, (f.entry + f.end) // 2, f.end - 1):
            assert tab.lookup(pc) == f
    assert tab.lookup(funcs[0].entry - 1) is None
    assert tab.lookup(funcs[-1].end) is None
    assert tab.lookup(0) is None
    assert tab.lookup(2**64) is None
    assert tab.line(funcs[0].entry - 1) is None
    assert tab.line(funcs[-1].end) is None


@pytest.mark.parametrize("toolchain,mode", BUILDS)
def test_lines_match_go_tool_objdump(go_build, tables, toolchain, mode):
    tab = tables(toolchain, mode)
    path = go_build(toolchain, mode if mode != "stripped" else "default")  # objdump needs symbols
    if mode == "stripped":
        assert tab.funcs() == tables(toolchain, "default").funcs()
    rows = objdump_lines(path, r"^(main\.|runtime\.newproc$|runtime\.gopark$|sync\.\(\*WaitGroup\)\.Wait$)")
    assert len(rows) > 200
    src = os.path.join(os.path.dirname(path), "src", "main.go")
    for pc, base, line, _ in rows:
        got = tab.line(pc)
        assert got is not None, hex(pc)
        assert (os.path.basename(got[0]), got[1]) == (base, line), hex(pc)
        if base == "main.go":
            assert got[0] == src
    # The go statement: its runtime.newproc call sits on the statement's line in main.main.
    newproc = [pc for pc, _, _, ins in rows
               if ins.startswith("CALL runtime.newproc(SB)") and tab.lookup(pc).name == "main.main"]
    assert newproc, "no newproc call in main.main"
    assert all(tab.line(pc) == (src, GO_STATEMENT_LINE) for pc in newproc)
    main = tab.by_name("main.main")
    assert tab.line(main.entry) == (src, MAIN_GO.splitlines().index("func main() {") + 1)


@pytest.mark.parametrize("toolchain,mode", BUILDS)
def test_is_wrapper(tables, toolchain, mode):
    tab = tables(toolchain, mode)
    # The closure carrying the go statement's arguments: main.main.func2 up to Go 1.21, gowrap1 after.
    go_wrapper = {"go1.19": "main.main.func2", "go1.26": "main.main.gowrap1"}[toolchain]
    wrappers = {f.name for f in tab.funcs() if f.name.startswith("main.") and tab.is_wrapper(f)}
    assert go_wrapper in wrappers
    assert not wrappers & {"main.main", "main.worker", "main.main.func1", "main.(*counter).inc"}
    newprocs = [f for f in tab.funcs() if f.name == "runtime.newproc"]
    assert [tab.is_wrapper(f) for f in newprocs if f != tab.by_name("runtime.newproc")] == [True]
    assert not tab.is_wrapper(tab.by_name("runtime.newproc"))
    assert not tab.is_wrapper(Func("nowhere", 0, 1))


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_stripped_build_gives_same_table(tables, toolchain):
    full, stripped = tables(toolchain, "default"), tables(toolchain, "stripped")
    assert stripped.funcs() == full.funcs()
    for f in full.funcs()[::7]:
        for pc in (f.entry, (f.entry + f.end) // 2, f.end - 1):
            assert stripped.line(pc) == full.line(pc)


def test_go_1_19_pie_table_is_in_data_rel_ro(go_build):
    # Go 1.19 PIE builds have no .gopclntab; the table lives in .data.rel.ro.gopclntab, which is
    # taken as directly as .gopclntab (not found through the symbol or a scan).
    with open(go_build("go1.19", "pie"), "rb") as f:
        elf = ELFFile(f)
        assert elf.get_section_by_name(".gopclntab") is None
        sec = elf.get_section_by_name(".data.rel.ro.gopclntab")
        authoritative, data, vaddr = next(_candidates(elf))
        assert (authoritative, vaddr, data) == (True, sec["sh_addr"], sec.data())


@pytest.mark.parametrize("toolchain,mode", [("go1.26", "default"), ("go1.19", "pie")])
def test_raw_symbol_lookup_matches_nm(go_build, toolchain, mode):
    path = go_build(toolchain, mode)
    nm = nm_text_symbols(path)
    with open(path, "rb") as f:
        found = _symbols(ELFFile(f), ("runtime.text", "main.main", "runtime.newproc.abi0", "main.nosuch"))
    assert found == {n: nm[n] for n in ("runtime.text", "main.main", "runtime.newproc.abi0")}


# ---- locating the table without its section ------------------------------------------------------


def rename_sections(data: bytes, renames: dict[bytes, bytes]) -> bytes:
    """Rename sections in place in .shstrtab (same length), hiding them from lookups by name."""
    elf = ELFFile(io.BytesIO(data))
    shstr = elf.get_section(elf["e_shstrndx"])
    lo, hi = shstr["sh_offset"], shstr["sh_offset"] + shstr["sh_size"]
    names = data[lo:hi]
    for old, new in renames.items():
        assert len(old) == len(new) and old + b"\0" in names, old
        names = names.replace(old + b"\0", new + b"\0")
    return data[:lo] + names + data[hi:]


HIDE_TABLE = {b"gopclntab": b"gopclntaX"}
HIDE_SYMTAB = {b".symtab": b".symtaX"}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("toolchain,mode,renames,path_used", [
    ("go1.26", "default", HIDE_TABLE, "runtime.pclntab symbol"),
    ("go1.19", "pie", HIDE_TABLE, "runtime.pclntab symbol"),
    ("go1.26", "default", {**HIDE_TABLE, **HIDE_SYMTAB}, "segment scan"),
    ("go1.19", "pie", {**HIDE_TABLE, **HIDE_SYMTAB}, "segment scan (RELRO segment)"),
    ("go1.26", "stripped", {**HIDE_TABLE, b".text": b".texX"}, "segment scan + moduledata text"),
])
def test_from_elf_fallbacks(go_build, tables, toolchain, mode, renames, path_used):
    data = rename_sections(_read(go_build(toolchain, mode)), renames)
    elf = ELFFile(io.BytesIO(data))
    assert elf.get_section_by_name(".gopclntab") is None
    assert elf.get_section_by_name(".data.rel.ro.gopclntab") is None
    tab = FuncTable.from_elf(elf)
    assert tab.funcs() == tables(toolchain, mode).funcs(), path_used
    main = tab.by_name("main.main")
    assert tab.line(main.entry) == tables(toolchain, mode).line(main.entry)


def test_cgo_stripped_binary_text_start_from_moduledata(go_build):
    # With external linking C code precedes runtime.text, so .text's address is not the base of
    # the 1.18+ entry offsets, and Go 1.26 no longer writes textStart in the header: stripped
    # binaries need runtime.firstmoduledata.text.
    full_path, stripped_path = go_build("go1.26", "default", cgo=True), go_build("go1.26", "stripped", cgo=True)
    nm = nm_text_symbols(full_path)
    with open(stripped_path, "rb") as f:
        assert ELFFile(f).get_section_by_name(".text")["sh_addr"] != nm["runtime.text"]
    full, stripped = load(full_path), load(stripped_path)
    assert full.by_name("main.main").entry == nm["main.main"]
    assert stripped.funcs() == full.funcs()


def test_from_elf_on_non_go_elf():
    path = shutil.which("true")  # coreutils: always there
    assert path is not None
    with pytest.raises(PclntabError, match="no Go function table"):
        load(os.path.realpath(path))


def test_from_elf_with_pre_116_magic(go_build):
    data = bytearray(_read(go_build("go1.26", "default")))
    sec = ELFFile(io.BytesIO(bytes(data))).get_section_by_name(".gopclntab")
    data[sec["sh_offset"]:sec["sh_offset"] + 4] = struct.pack("<I", 0xFFFFFFFB)
    with pytest.raises(PclntabError, match="^Go function table format from before Go 1.16 is not supported$"):
        load_bytes(bytes(data))


def test_from_elf_with_truncated_file(go_build):
    data = _read(go_build("go1.26", "default"))
    errors = 0
    for cut in range(0, len(data), len(data) // 60):
        try:
            elf = ELFFile(io.BytesIO(data[:cut]))
        except Exception:  # elftools reads the ELF header eagerly: not ours to wrap
            continue
        try:
            FuncTable.from_elf(elf).funcs()
        except PclntabError:
            errors += 1
    assert errors > 30  # section data cut off -> "cannot read ELF file: ..."


def test_from_elf_is_fast_on_the_go_command():
    path = os.path.realpath(go_release(TOOLCHAINS["go1.26"]))
    with open(path, "rb") as f:
        start = time.perf_counter()
        tab = FuncTable.from_elf(ELFFile(f))
        elapsed = time.perf_counter() - start
    assert len(tab.funcs()) > 10000
    assert elapsed < 0.5, elapsed
    main = tab.by_name("main.main")
    assert tab.line(main.entry)[0].endswith("cmd/go/main.go")


# ---- damaged tables ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def raw_table(go_build):
    """(table bytes, text start) of the Go 1.19 build: a real "1.18" table of ~350 kB."""
    with open(go_build("go1.19", "default"), "rb") as f:
        elf = ELFFile(f)
        return elf.get_section_by_name(".gopclntab").data(), elf.get_section_by_name(".text")["sh_addr"]


def exercise(data: bytes, text_start: int | None, pcs: list[int], names: list[str]) -> bool:
    """Use every entry point; only PclntabError may escape. True if the table parsed."""
    try:
        tab = FuncTable.parse(data, text_start)
    except PclntabError:
        return False
    for call in (tab.funcs, *[lambda pc=pc: (tab.lookup(pc), tab.line(pc)) for pc in pcs],
                 *[lambda n=n: tab.by_name(n) for n in names]):
        try:
            call()
        except PclntabError:
            pass
    return True


def sample(raw_table):
    data, text = raw_table
    tab = FuncTable.parse(data, text)
    funcs = tab.funcs()
    pcs = [f.entry + (f.end - f.entry) // 3 for f in funcs[:: max(1, len(funcs) // 40)]]
    return tab, pcs, ["main.main", "runtime.newproc", "main.worker"]


def test_parse_matches_from_elf_and_header_text_start(raw_table, tables):
    data, text = raw_table
    assert FuncTable.parse(data, text).funcs() == tables("go1.19", "default").funcs()
    # Go 1.18/1.19 still write textStart into the header.
    assert FuncTable.parse(data).funcs() == tables("go1.19", "default").funcs()
    shifted = FuncTable.parse(data, text + 0x1000)
    assert shifted.funcs()[0].entry == tables("go1.19", "default").funcs()[0].entry + 0x1000


def test_go_1_26_table_needs_text_start(go_build):
    with open(go_build("go1.26", "default"), "rb") as f:
        data = ELFFile(f).get_section_by_name(".gopclntab").data()
    with pytest.raises(PclntabError, match="pass text_start"):
        FuncTable.parse(data)
    assert FuncTable.parse(data, 0x401000).go_format == "1.20"


def test_truncated_at_many_cut_points(raw_table):
    data, text = raw_table
    tab, pcs, names = sample(raw_table)
    hdr = struct.unpack_from("<8Q", data, 8)
    functab_end = hdr[7] + (2 * hdr[0] + 1) * 4
    regions = list(hdr[3:]) + [functab_end, len(data)]
    cuts = set(range(0, 80)) | set(range(0, len(data), len(data) // 150))
    cuts |= {r + d for r in regions for d in (-1, 0, 1) if 0 <= r + d < len(data)}
    for cut in sorted(cuts):
        if cut < functab_end:  # the header or functab is incomplete: parsing itself must fail
            with pytest.raises(PclntabError):
                FuncTable.parse(data[:cut], text)
        else:
            exercise(data[:cut], text, pcs, names)
    # Cutting into the _func records makes some names unreadable: a clear error, not IndexError.
    with pytest.raises(PclntabError, match="function #"):
        FuncTable.parse(data[: functab_end + 100], text).funcs()


def test_random_bit_flips(raw_table):
    data, text = raw_table
    tab, pcs, names = sample(raw_table)
    rng = random.Random(1234)
    parsed = 0
    start = time.perf_counter()
    for _ in range(150):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        parsed += exercise(bytes(damaged), text, pcs, names)
    # Also flip bits only in the header and functab, where parse itself reacts.
    hdr_end = struct.unpack_from("<Q", data, 64)[0] + (2 * struct.unpack_from("<Q", data, 8)[0] + 1) * 4
    for _ in range(150):
        damaged = bytearray(data)
        pos = rng.choice([rng.randrange(72), rng.randrange(hdr_end - 4000, hdr_end)])
        damaged[pos] ^= 1 << rng.randrange(8)
        exercise(bytes(damaged), text, pcs, names)
    assert parsed > 50  # most random flips land in lazily decoded data
    assert time.perf_counter() - start < 30


def test_pcvalue_tables_that_never_end(raw_table):
    data, text = raw_table
    _, pcs, _ = sample(raw_table)
    for filler in (b"\xff", b"\x80", b"\x02\x00"):  # an endless varint; zero pc deltas forever
        # Point pctab at 2 MB of filler at the very end: every pc-value table runs off the data.
        damaged = bytearray(data + filler * (2_000_000 // len(filler)))
        struct.pack_into("<Q", damaged, 8 + 6 * 8, len(data))
        tab = FuncTable.parse(bytes(damaged), text)
        start = time.perf_counter()
        results = [tab.line(pc) for pc in pcs]
        # Varints stop after 5 bytes and decoding after size/quantum steps: ~10 ms, not a walk
        # over the 2 MB for each of the ~80 tables.
        assert time.perf_counter() - start < 1.0
        assert results == [None] * len(pcs)
        assert tab.lookup(pcs[0]) is not None  # the functab is intact


def test_func_offset_out_of_range(raw_table):
    data, text = raw_table
    nfunc, pclntab = struct.unpack_from("<Q", data, 8)[0], struct.unpack_from("<Q", data, 64)[0]
    damaged = bytearray(data)
    struct.pack_into("<I", damaged, pclntab + 4 * 11, 0xFFFFFFF0)  # funcoff of function #5
    tab = FuncTable.parse(bytes(damaged), text)
    entry5 = tab._entries[5]
    with pytest.raises(PclntabError, match="function #5"):
        tab.lookup(entry5)
    with pytest.raises(PclntabError, match="function #5"):
        tab.funcs()
    assert tab.line(entry5) is None
    assert tab.lookup(tab._entries[6]).entry == tab._entries[6]
    assert nfunc > 6


def test_func_offset_pointing_at_another_record(raw_table):
    data, text = raw_table
    pclntab = struct.unpack_from("<Q", data, 64)[0]
    damaged = bytearray(data)
    damaged[pclntab + 4 * 11 : pclntab + 4 * 12] = data[pclntab + 4 * 13 : pclntab + 4 * 14]  # #5 -> #6's
    tab = FuncTable.parse(bytes(damaged), text)
    with pytest.raises(PclntabError, match="bad record of function #5"):
        tab.lookup(tab._entries[5])
    assert tab.line(tab._entries[5]) is None


def test_unsorted_functab(raw_table):
    data, text = raw_table
    pclntab = struct.unpack_from("<Q", data, 64)[0]
    damaged = bytearray(data)
    struct.pack_into("<I", damaged, pclntab + 8 * 3, 0xFFFFFF)  # entry of function #3 beyond #4
    with pytest.raises(PclntabError, match="not sorted"):
        FuncTable.parse(bytes(damaged), text)


@pytest.mark.parametrize("patch,message", [
    (lambda d: d[:0], "too short"),
    (lambda d: d[:7], "too short"),
    (lambda d: d[:40], "header truncated"),
    (lambda d: b"\x7fELF" + d[4:], "bad magic 0x464c457f"),
    (lambda d: struct.pack("<I", 0xFFFFFFFB) + d[4:],
     "^Go function table format from before Go 1.16 is not supported$"),
    (lambda d: d[:4] + b"\x00\x01" + d[6:], "bad Go function table header"),
    (lambda d: d[:6] + b"\x03" + d[7:], "bad Go function table header"),
    (lambda d: d[:7] + b"\x02" + d[8:], "bad Go function table header"),
    (lambda d: d[:8] + struct.pack("<Q", 0) + d[16:], "no functions"),
    (lambda d: d[:8] + struct.pack("<Q", 2**62) + d[16:], "truncated"),
    (lambda d: d[:32] + struct.pack("<Q", 2**40) + d[40:], "funcnametab offset .* out of range"),
    (lambda d: d[:64] + struct.pack("<Q", 3) + d[72:], "pclntab offset 0x3 out of range"),
])
def test_bad_headers(raw_table, patch, message):
    data, text = raw_table
    with pytest.raises(PclntabError, match=message) as info:
        FuncTable.parse(patch(data), text)
    assert "\n" not in str(info.value)


# ---- synthetic tables: the 1.16 format, and known answers ----------------------------------------
# No toolchain here writes the Go 1.16-1.17 format (Go 1.17 cannot be installed), so it is tested on
# tables built below from the layout in debug/gosym/pclntab.go and runtime/runtime2.go (go1.16/1.17).
# The same builder also writes the 1.18 and 1.20 formats; that they parse like the real binaries do
# checks the builder itself.


def _uvarint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _pcvalue_table(runs: list[tuple[int, int]], quantum: int) -> bytes:
    """runs: (end offset from entry, value) pairs, as the linker's funcpctab emits them."""
    out, pc, val = bytearray(), 0, -1
    for end, value in runs:
        delta = value - val
        out += _uvarint(delta << 1 if delta >= 0 else ((-delta - 1) << 1) | 1)
        out += _uvarint((end - pc) // quantum)
        pc, val = end, value
    return bytes(out + b"\0")


def build_table(fmt: str, funcs: list[dict], files: list[str], text_start: int, quantum: int = 1) -> bytes:
    """funcs: dicts with name, off (from text_start), size, cu (cutab index), funcid, file_runs, line_runs."""
    nwords = 7 if fmt == "1.16" else 8
    magic = {"1.16": 0xFFFFFFFA, "1.18": 0xFFFFFFF0, "1.20": 0xFFFFFFF1}[fmt]
    names = bytearray()
    name_offs = []
    for f in funcs:
        name_offs.append(len(names))
        names += f["name"].encode() + b"\0"
    filetab, cutab = bytearray(), bytearray()
    for path in files:
        cutab += struct.pack("<I", len(filetab))
        filetab += path.encode() + b"\0"
    cutab += struct.pack("<I", 0xFFFFFFFF)  # a CU slot with no file
    pctab = bytearray(b"\0")  # offset 0 means "no table"
    tabs = []
    for f in funcs:
        offs = []
        for key in ("file_runs", "line_runs"):
            offs.append(len(pctab))
            pctab += _pcvalue_table(f[key], quantum)
        tabs.append(offs)
    sections = [bytes(names), bytes(cutab), bytes(filetab), bytes(pctab)]
    pos, offsets = 8 + nwords * 8, []
    for s in sections:
        offsets.append(pos)
        pos += len(s)
    pad = (-pos) % 8
    pclntab_off = pos + pad
    field = "Q" if fmt == "1.16" else "I"
    fsize = struct.calcsize(field)
    records, funcoffs = bytearray(), []
    rec_base = (2 * len(funcs) + 1) * fsize
    for f, nameoff, (pcfile, pcln) in zip(funcs, name_offs, tabs):
        funcoffs.append(rec_base + len(records))
        entry = text_start + f["off"] if fmt == "1.16" else f["off"]
        rec = struct.pack("<" + field, entry) + struct.pack("<iiIIIIII", nameoff, 0, 0, 0, pcfile, pcln, 0, f["cu"])
        if fmt == "1.20":
            rec += struct.pack("<i", 1)  # startLine
        rec += struct.pack("<BBBB", f["funcid"], 0, 0, 0)  # funcID, flag (1.18+) / pad, pad, nfuncdata
        records += rec
    functab = bytearray()
    for f, fo in zip(funcs, funcoffs):
        functab += struct.pack("<" + field * 2, text_start + f["off"] if fmt == "1.16" else f["off"], fo)
    last = funcs[-1]
    functab += struct.pack("<" + field, (text_start if fmt == "1.16" else 0) + last["off"] + last["size"])
    words = [len(funcs), len(files)] + ([] if fmt == "1.16" else [text_start]) + offsets + [pclntab_off]
    header = struct.pack("<IBBBB", magic, 0, 0, quantum, 8) + struct.pack("<%dQ" % nwords, *words)
    return header + b"".join(sections) + b"\0" * pad + bytes(functab) + bytes(records)


SYNTH_FUNCS = [
    dict(name="main.a", off=0x0, size=0x40, cu=0, funcid=0,
         file_runs=[(0x40, 0)], line_runs=[(0x10, 10), (0x18, 12), (0x40, 11)]),
    # An inlined call from another file in the middle (pcfile switches to file #1 of the CU).
    dict(name="main.b", off=0x40, size=0x20, cu=0, funcid=0,
         file_runs=[(0x8, 0), (0x10, 1), (0x20, 0)], line_runs=[(0x8, 20), (0x10, 300), (0x20, 21)]),
    # An ABI wrapper (FuncIDWrapper) placed before the function it wraps, which has the same name.
    # A CU starting at cutab slot 1: pcfile value 0 means files[1]. The zero value delta of the
    # second pcfile step is not the end of the table, because it comes at the entry pc.
    dict(name="runtime.newproc", off=0x60, size=0x10, cu=1, funcid=23,
         file_runs=[(0x0, 0), (0x10, 0)], line_runs=[(0, 7), (0x10, 8)]),
    dict(name="runtime.newproc", off=0x70, size=0x30, cu=1, funcid=0,
         file_runs=[(0x30, 0)], line_runs=[(0x30, 5000)]),
    # A linker-generated function with no compilation unit.
    dict(name="go:buildid", off=0xA0, size=0x8, cu=0xFFFFFFFF, funcid=0,
         file_runs=[(0x8, 0)], line_runs=[(0x8, 1)]),
]
SYNTH_FILES = ["/src/main.go", "/goroot/src/runtime/proc.go", "/goroot/src/runtime/asm.s"]


@pytest.mark.parametrize("fmt", ["1.16", "1.18", "1.20"])
@pytest.mark.parametrize("quantum", [1, 4])
def test_synthetic_table(fmt, quantum):
    text = 0x401000
    tab = FuncTable.parse(build_table(fmt, SYNTH_FUNCS, SYNTH_FILES, text, quantum), text)
    assert tab.go_format == fmt
    assert tab.funcs() == [Func(f["name"], text + f["off"], text + f["off"] + f["size"]) for f in SYNTH_FUNCS]
    assert tab.lookup(text + 0x3F).name == "main.a"
    assert tab.lookup(text + 0xA8) is None and tab.lookup(text - 1) is None
    assert tab.by_name("runtime.newproc").entry == text + 0x70  # not the wrapper at 0x60
    expect = {
        0x00: ("/src/main.go", 10), 0x0F: ("/src/main.go", 10), 0x10: ("/src/main.go", 12),
        0x17: ("/src/main.go", 12), 0x18: ("/src/main.go", 11), 0x3F: ("/src/main.go", 11),
        0x40: ("/src/main.go", 20), 0x48: ("/goroot/src/runtime/proc.go", 300),
        0x4F: ("/goroot/src/runtime/proc.go", 300), 0x50: ("/src/main.go", 21),
        0x60: ("/goroot/src/runtime/proc.go", 8), 0x6F: ("/goroot/src/runtime/proc.go", 8),
        0x70: ("/goroot/src/runtime/proc.go", 5000), 0x9F: ("/goroot/src/runtime/proc.go", 5000),
        0xA0: None, 0xA8: None,
    }
    assert {off: tab.line(text + off) for off in expect} == expect


def test_synthetic_116_ignores_text_start():
    # The 1.16 format stores absolute entry PCs; there is no textStart to rebase on.
    data = build_table("1.16", SYNTH_FUNCS, SYNTH_FILES, 0x401000)
    assert FuncTable.parse(data).funcs() == FuncTable.parse(data, 0x999000).funcs()
    assert FuncTable.parse(data).funcs()[0].entry == 0x401000


def test_synthetic_116_damage():
    data = build_table("1.16", SYNTH_FUNCS, SYNTH_FILES, 0x401000)
    for cut in range(len(data)):
        exercise(data[:cut], None, [0x401000 + o for o in range(0, 0xB0, 3)], ["main.b", "runtime.newproc"])
    rng = random.Random(7)
    for _ in range(300):
        damaged = bytearray(data)
        damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        exercise(bytes(damaged), None, [0x401000 + o for o in range(0, 0xB0, 3)], ["main.b"])
