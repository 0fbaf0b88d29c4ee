"""Parser for the Go function table (``.gopclntab``) of Go ELF binaries (amd64, arm64).

Hand-written because no maintained Python library parses gopclntab. The layouts follow
Go's own readers and writers: ``src/debug/gosym/pclntab.go``, ``src/runtime/symtab.go``
(``pcHeader``, ``moduledata``), ``src/runtime/runtime2.go`` (``_func``) and
``src/cmd/link/internal/ld/pcln.go``. Supported generations (little-endian magic at offset 0):
0xfffffffa (Go 1.16-1.17), 0xfffffff0 (Go 1.18-1.19), 0xfffffff1 (Go 1.20 and later).

Layout, in short::

    header   magic u32, 0, 0, quantum u8, ptrsize u8, then uintptr words:
             nfunc, nfiles, [textStart: 1.18+ only], funcnametab, cutab, filetab, pctab, pclntab
             (the last five are offsets from the header start)
    functab  at pclntab: nfunc (entry, funcoff) pairs + one end entry; fields are uintptr
             absolute PCs in 1.16, uint32 offsets from textStart in 1.18+
    _func    at pclntab+funcoff: entry (uintptr in 1.16, u32 in 1.18+), then u32 fields
             nameOff, args, deferreturn, pcsp, pcfile, pcln, npcdata, cuOffset, ...
    pcvalue  tables in pctab: (zig-zag varint value delta, varint pc delta * quantum) pairs,
             ended by a zero value delta; pcfile values index cutab[cuOffset + n] -> filetab offset

Only the header and functab are decoded up front; names, files and lines are decoded on demand.
Malformed input raises PclntabError (or gives a None lookup result), never IndexError/struct.error.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from typing import NamedTuple

MAGIC_PRE116 = 0xFFFFFFFB
_FORMATS = {0xFFFFFFFA: "1.16", 0xFFFFFFF0: "1.18", 0xFFFFFFF1: "1.20"}
_NO_FILE = 0xFFFFFFFF  # cutab entry / cuOffset meaning "none"
_NO_FUNCDATA = 0xFFFFFFFF  # funcdata offset meaning "none"
# Indexes of the inline tree among a function's funcdata and pcdata (internal/abi/symtab.go).
FUNCDATA_INLTREE = 3
PCDATA_INLTREEINDEX = 2
_CACHE_MAX = 4096  # entries per on-demand cache (pc tables, file names)


class PclntabError(Exception):
    """Malformed, truncated or unsupported Go function table."""


@dataclass(frozen=True)
class Func:
    name: str  # as Go prints it, e.g. "main.worker", "net/http.(*conn).serve"
    entry: int  # link-time virtual address of the first instruction
    end: int  # address just past the function (the next function's entry)


class Inlining(NamedTuple):
    """Where a function's inline tree is: the functions the compiler inlined into it."""
    tree: int  # offset of the tree (an array of runtime.inlinedCall) from go:func.* (moduledata.gofunc)
    index_table: int  # pctab offset of the PC -> tree index table (-1: not inside inlined code)
    entry_size: int  # of an inlinedCall: 20 bytes up to Go 1.19, 16 from 1.20
    name_at: int  # offset of nameOff in an inlinedCall
    parent_pc_at: int  # offset of parentPc: an instruction of the caller at the call site, from the entry


class _Header(NamedTuple):
    go_format: str
    quantum: int
    ptrsize: int
    nfunc: int
    nfiles: int
    text_start: int  # 0 in 1.16 (absent) and in Go 1.26+ (no longer written)
    funcnametab: int
    cutab: int
    filetab: int
    pctab: int
    pclntab: int


def _parse_header(data: bytes) -> _Header:
    if len(data) < 8:
        raise PclntabError(f"Go function table too short for a header ({len(data)} bytes)")
    magic, pad1, pad2, quantum, ptrsize = struct.unpack_from("<IBBBB", data)
    if magic == MAGIC_PRE116:
        raise PclntabError("Go function table format from before Go 1.16 is not supported")
    go_format = _FORMATS.get(magic)
    if go_format is None:
        raise PclntabError(f"not a Go function table: bad magic 0x{magic:08x}")
    if pad1 or pad2 or quantum not in (1, 2, 4) or ptrsize not in (4, 8):
        raise PclntabError(f"bad Go function table header (pad {pad1},{pad2}, quantum {quantum}, ptrsize {ptrsize})")
    nwords = 7 if go_format == "1.16" else 8
    size = 8 + nwords * ptrsize
    if len(data) < size:
        raise PclntabError(f"Go function table header truncated ({len(data)} < {size} bytes)")
    words = list(struct.unpack_from("<%d%s" % (nwords, "Q" if ptrsize == 8 else "I"), data, 8))
    if nwords == 7:
        words.insert(2, 0)
    hdr = _Header(go_format, quantum, ptrsize, *words)
    for name in ("funcnametab", "cutab", "filetab", "pctab", "pclntab"):
        if not size <= getattr(hdr, name) <= len(data):
            raise PclntabError(f"Go function table header: {name} offset {getattr(hdr, name):#x} out of range")
    if hdr.nfunc == 0:
        raise PclntabError("Go function table has no functions")
    return hdr


def _uint_array(code: str, raw: bytes) -> array:
    arr = array(code, raw)
    if sys.byteorder == "big":  # the table is little-endian
        arr.byteswap()
    return arr


class FuncTable:
    go_format: str  # "1.16", "1.18" or "1.20"

    def __init__(self, data: bytes, hdr: _Header, base: int, entries: list[int], funcoffs: array):
        self._data = data
        self._hdr = hdr
        self._base = base  # added to 1.18+ entry offsets; 0 for 1.16
        self.go_format = hdr.go_format
        self._entries = entries  # nfunc + 1 absolute PCs; the last one is the end of the last function
        self._funcoffs = funcoffs  # offset of each _func record from hdr.pclntab
        self._names: list[str | None] = [None] * hdr.nfunc
        self._by_name: dict[str, int] | None = None
        self._all: list[Func] | None = None
        self._wrapper_id: int | None = None
        self._pctables: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        self._files: dict[int, str | None] = {}
        self.address: int | None = None  # link-time address of the table, when read from an ELF file

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes, text_start: int | None = None) -> "FuncTable":
        """Parse raw table bytes.

        text_start: link-time address of runtime.text. Functab entries of the 1.18+ formats are
        offsets from it; when None the header's textStart is used, which Go 1.26+ no longer
        writes (it is 0 there), so callers must pass it. The 1.16 format stores absolute entry
        PCs and ignores text_start.
        """
        data = bytes(data)
        hdr = _parse_header(data)
        field = 4 if hdr.go_format != "1.16" else hdr.ptrsize
        start, end = hdr.pclntab, hdr.pclntab + (2 * hdr.nfunc + 1) * field
        if end > len(data):
            raise PclntabError(f"Go function table truncated: functab for {hdr.nfunc} functions "
                               f"needs {end} bytes, have {len(data)}")
        table = _uint_array("I" if field == 4 else "Q", data[start:end])
        entries, funcoffs, base = table[0::2].tolist(), table[1::2], 0
        if hdr.go_format != "1.16":
            base = hdr.text_start if text_start is None else text_start
            if text_start is None and base == 0:
                raise PclntabError("Go function table has no textStart (Go 1.26+ leave it 0); pass text_start")
            entries = [base + e for e in entries]
        if any(a > b for a, b in zip(entries, entries[1:])):
            raise PclntabError("Go function table corrupt: function entries not sorted")
        return cls(data, hdr, base, entries, funcoffs)

    @classmethod
    def from_elf(cls, elf) -> "FuncTable":
        """Find and parse the table of an elftools ELFFile (see _candidates for the search order)."""
        first_error = None
        try:
            for authoritative, data, vaddr in _candidates(elf):
                try:
                    hdr = _parse_header(data)
                    text_start = None if hdr.go_format == "1.16" else _text_start(elf, data, vaddr, hdr)
                    table = cls.parse(data, text_start)
                    table.address = vaddr
                    return table
                except PclntabError as e:
                    if authoritative:
                        raise
                    first_error = first_error or e
        except PclntabError:
            raise
        except Exception as e:  # elftools raises assorted errors on corrupt ELF files
            raise PclntabError(f"cannot read ELF file: {type(e).__name__}: {e}") from e
        raise first_error or PclntabError("no Go function table (.gopclntab) found in ELF file")

    # ---- functions ----------------------------------------------------------------------------

    def funcs(self) -> list[Func]:
        """All functions, sorted by entry."""
        if self._all is None:
            self._all = [self._func(i) for i in range(self._hdr.nfunc)]
        return list(self._all)

    def lookup(self, pc: int) -> Func | None:
        """The function containing pc (entry <= pc < end), or None."""
        i = self._index(pc)
        return None if i is None else self._func(i)

    def is_wrapper(self, func: Func) -> bool:
        """Compiler-made code: method wrappers and the closures that carry a `go` statement's
        arguments (caller.funcN up to Go 1.21, caller.gowrapN after). Their funcID, FuncIDWrapper,
        is the enum's last value, so the highest in the table."""
        i = self._index(func.entry)
        if i is None:
            return False
        if self._wrapper_id is None:
            self._wrapper_id = max(self._funcid(j) for j in range(self._hdr.nfunc))
        return self._funcid(i) == self._wrapper_id

    def by_name(self, name: str) -> Func | None:
        """The function called name. Some runtime functions appear twice: the real one and its
        ABI0/ABIInternal wrapper (nm's "name.abi0"); the wrapper's funcID is FuncIDWrapper, the
        last value of the enum, so the lower funcID wins (e.g. the real runtime.newproc)."""
        if self._by_name is None:
            by_name: dict[str, int] = {}
            for i in range(self._hdr.nfunc):
                j = by_name.setdefault(self._name(i), i)
                if j != i and self._funcid(i) < self._funcid(j):
                    by_name[self._name(i)] = i
            self._by_name = by_name
        i = self._by_name.get(name)
        return None if i is None else self._func(i)

    def line(self, pc: int) -> tuple[str, int] | None:
        """Source file and line of the instruction at pc, decoded as debug/gosym does; None if unknown."""
        i = self._index(pc)
        if i is None or not self._record_ok(i):
            return None
        pcfile, pcln, cu = self._fields(i, 5, 6, 8)
        if cu is None or cu == _NO_FILE:
            return None
        entry, size = self._entries[i], self._entries[i + 1] - self._entries[i]
        line = self._pcvalue(pcln, size, pc - entry)
        fileno = self._pcvalue(pcfile, size, pc - entry)
        if line is None or fileno is None or line < 0 or fileno < 0:
            return None
        path = self._file((cu + fileno) * 4)
        return None if path is None else (path, line)

    def inlining(self, func: Func) -> Inlining | None:
        """func's inline tree, as the runtime's traceback finds it (runtime/symtabinl.go); None when
        nothing was inlined into func, and in the 1.16 format (whose funcdata are pointers)."""
        i = self._index(func.entry)
        if i is None or self.go_format == "1.16" or not self._record_ok(i):
            return None
        # After the u32 fields (and startLine from 1.20): funcID, flag, pad, nfuncdata; then
        # npcdata u32 pcdata offsets, then nfuncdata u32 funcdata offsets.
        flags = self._hdr.pclntab + self._funcoffs[i] + (40 if self.go_format == "1.20" else 36)
        (npcdata,) = self._fields(i, 7)
        if npcdata is None or flags + 4 > len(self._data):
            return None
        nfuncdata = self._data[flags + 3]
        tree_pos = flags + 4 + 4 * npcdata + 4 * FUNCDATA_INLTREE
        if npcdata <= PCDATA_INLTREEINDEX or nfuncdata <= FUNCDATA_INLTREE or tree_pos + 4 > len(self._data):
            return None
        (table,) = struct.unpack_from("<I", self._data, flags + 4 + 4 * PCDATA_INLTREEINDEX)
        (tree,) = struct.unpack_from("<I", self._data, tree_pos)
        if not table or tree == _NO_FUNCDATA:
            return None
        if self.go_format == "1.20":  # funcID u8, pad, nameOff, parentPc, startLine
            return Inlining(tree, table, 16, 4, 8)
        return Inlining(tree, table, 20, 12, 16)  # parent i16, funcID, pad, file, line, nameOff, parentPc

    def inline_indexes(self, func: Func, inlining: Inlining) -> list[tuple[int, int]]:
        """(first pc, tree index) runs over func's code, in pc order (index -1: func's own code)."""
        size = func.end - func.entry
        self._pcvalue(inlining.index_table, size, 0)  # decodes and caches the table
        ends, values = self._pctables[(inlining.index_table, size)]
        return [(func.entry + start, index) for start, index in zip([0, *ends], values)]

    def inline_index(self, func: Func, inlining: Inlining, pc: int) -> int:
        """Index in func's inline tree of the inlined call the instruction at pc belongs to; -1 if none."""
        value = self._pcvalue(inlining.index_table, func.end - func.entry, pc - func.entry)
        return -1 if value is None else value

    def name_at(self, name_off: int) -> str | None:
        """A function name by its offset in funcnametab (as inlinedCall.nameOff gives it)."""
        return self._cstring(self._hdr.funcnametab + name_off) if name_off >= 0 else None

    # ---- internals ----------------------------------------------------------------------------

    def _index(self, pc: int) -> int | None:
        i = bisect_right(self._entries, pc) - 1
        if 0 <= i < self._hdr.nfunc and pc < self._entries[i + 1]:
            return i
        return None

    def _func(self, i: int) -> Func:
        return Func(self._name(i), self._entries[i], self._entries[i + 1])

    def _fields(self, i: int, *ns: int) -> tuple:
        """uint32 fields n of the i-th _func record, None if out of range.

        n: 1 nameOff, 5 pcfile, 6 pcln, 8 cuOffset (field 0 is the entry, 4 or ptrsize bytes).
        """
        first = 4 if self.go_format != "1.16" else self._hdr.ptrsize  # size of the entry field
        base = self._hdr.pclntab + self._funcoffs[i] + first - 4
        out = []
        for n in ns:
            pos = base + 4 * n
            out.append(struct.unpack_from("<I", self._data, pos)[0] if pos + 4 <= len(self._data) else None)
        return tuple(out)

    def _funcid(self, i: int) -> int:
        # funcID is the byte after the entry and eight u32 fields (and startLine from Go 1.20 on).
        entry_size = 4 if self.go_format != "1.16" else self._hdr.ptrsize
        pos = self._hdr.pclntab + self._funcoffs[i] + entry_size + 32 + (4 if self.go_format == "1.20" else 0)
        return self._data[pos] if pos < len(self._data) else 0xFF

    def _name(self, i: int) -> str:
        name = self._names[i]
        if name is None:
            if not self._record_ok(i):
                raise PclntabError(f"Go function table corrupt: bad record of function #{i}")
            (off,) = self._fields(i, 1)
            name = None if off is None else self._cstring(self._hdr.funcnametab + off)
            if name is None:
                raise PclntabError(f"Go function table corrupt: bad name of function #{i}")
            self._names[i] = name
        return name

    def _record_ok(self, i: int) -> bool:
        """The _func record repeats the entry PC: a cheap check that funcoff points at a record."""
        pos = self._hdr.pclntab + self._funcoffs[i]
        size = 4 if self.go_format != "1.16" else self._hdr.ptrsize
        if pos + size > len(self._data):
            return False
        return self._base + int.from_bytes(self._data[pos : pos + size], "little") == self._entries[i]

    def _cstring(self, pos: int) -> str | None:
        end = self._data.find(b"\0", pos) if pos < len(self._data) else -1
        return None if end < 0 else self._data[pos:end].decode("utf-8", "replace")

    def _file(self, cutab_pos: int) -> str | None:
        if cutab_pos in self._files:
            return self._files[cutab_pos]
        pos = self._hdr.cutab + cutab_pos
        path = None
        if pos + 4 <= len(self._data):
            (off,) = struct.unpack_from("<I", self._data, pos)
            if off != _NO_FILE:
                path = self._cstring(self._hdr.filetab + off)
        if len(self._files) >= _CACHE_MAX:
            self._files.clear()
        self._files[cutab_pos] = path
        return path

    def _pcvalue(self, off: int | None, size: int, rel_pc: int) -> int | None:
        """Value of pc-value table `off` at rel_pc (offset from the function entry)."""
        if not off:  # offset 0 means "no table": pctab starts with a pad byte
            return None
        key = (off, size)
        runs = self._pctables.get(key)
        if runs is None:
            if len(self._pctables) >= _CACHE_MAX:
                self._pctables.clear()
            runs = self._pctables[key] = self._decode_pcvalue(self._hdr.pctab + off, size)
        ends, values = runs
        k = bisect_right(ends, rel_pc)
        return values[k] if k < len(ends) else None

    def _decode_pcvalue(self, pos: int, size: int) -> tuple[list[int], list[int]]:
        """Decode a table into runs: values[k] holds for rel pcs below ends[k] (and at or above ends[k-1]).

        Mirrors debug/gosym's step/pcvalue. Stops at the terminator, at the end of the data
        (truncation keeps the runs decoded so far) or once past the function's size. The linker
        emits a pair only at a real instruction boundary, so pc deltas are > 0 and a table needs
        at most size/quantum steps: the step limit stops corrupt tables of zero pc deltas early.
        """
        data, quantum = self._data, self._hdr.quantum
        ends: list[int] = []
        values: list[int] = []
        pc, val = 0, -1
        for _ in range(size // quantum + 16):
            if pc >= size:
                break
            uv, pos = _varint(data, pos)
            if uv is None or (uv == 0 and pc != 0):  # Go treats a zero delta as the end, except at entry
                break
            delta = ~(uv >> 1) if uv & 1 else uv >> 1
            pcdelta, pos = _varint(data, pos)
            if pcdelta is None:
                break
            pc += pcdelta * quantum
            val = (val + delta + 0x80000000) % 0x100000000 - 0x80000000  # int32 arithmetic, as in Go
            ends.append(pc)
            values.append(val)
        return ends, values


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    """Unsigned LEB128 uint32 like debug/gosym's readvarint; (None, pos) if cut off or longer than
    the 5 bytes a uint32 needs (Go would read on; only corrupt data gets there)."""
    value = 0
    for shift in range(0, 35, 7):
        if pos >= len(data):
            break
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value & 0xFFFFFFFF, pos
    return None, pos


# ---- locating the table inside an ELF file ------------------------------------------------------


def _candidates(elf):
    """Yield (authoritative, table bytes, link-time address) in order of preference.

    The named sections are authoritative (their errors propagate); the symbol and the scan are
    guesses, tried until one parses.
    """
    for name in (".gopclntab", ".data.rel.ro.gopclntab"):  # the latter: Go 1.19 PIE builds
        sec = elf.get_section_by_name(name)
        if sec is not None and sec["sh_type"] != "SHT_NOBITS":
            yield True, sec.data(), sec["sh_addr"]
            return
    syms = _symbols(elf, ("runtime.pclntab", "runtime.epclntab"))
    if "runtime.pclntab" in syms:
        start = syms["runtime.pclntab"]
        data = _read_vaddr(elf, start, syms.get("runtime.epclntab"))
        if data:
            yield False, data, start
    yield from _scan(elf)


def _scan(elf):
    """Find the table in the non-executable loaded segments by its magic and a sane header
    (instruction quantum 1 on amd64, 4 on arm64; 8-byte pointers)."""
    heads = [struct.pack("<IBBBB", m, 0, 0, q, 8) for m in (*_FORMATS, MAGIC_PRE116) for q in (1, 4)]
    for seg in _load_segments(elf, executable=False):
        data = seg.data()
        for head in heads:
            pos = data.find(head)
            while pos >= 0:
                if (seg["p_vaddr"] + pos) % 8 == 0:  # the header is pointer-aligned
                    yield False, data[pos:], seg["p_vaddr"] + pos
                pos = data.find(head, pos + 1)


def _load_segments(elf, executable: bool):
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and bool(seg["p_flags"] & 1) == executable:  # PF_X
            yield seg


def _read_vaddr(elf, start: int, end: int | None) -> bytes:
    """File bytes at link-time addresses [start, end) (end None: to the end of the segment)."""
    for seg in elf.iter_segments():
        lo = seg["p_vaddr"]
        if seg["p_type"] == "PT_LOAD" and lo <= start < lo + seg["p_filesz"]:
            hi = lo + seg["p_filesz"] if end is None else min(end, lo + seg["p_filesz"])
            return seg.data()[start - lo : hi - lo]
    return b""


def _symbols(elf, names) -> dict[str, int]:
    """Values of the named .symtab symbols. A raw scan: elftools' name lookup takes ~0.4 s on 20k symbols."""
    sec = elf.get_section_by_name(".symtab")
    if sec is None or sec["sh_type"] != "SHT_SYMTAB" or elf.elfclass != 64 or not elf.little_endian:
        return {}
    strtab = elf.get_section(sec["sh_link"]).data()
    syms = sec.data()
    syms = syms[: len(syms) - len(syms) % 24]  # Elf64_Sym is 24 bytes, st_name first, st_value at 8
    st_names = _uint_array("I", syms)[0::6].tolist()
    found = {}
    for name in names:
        needle = b"\0" + name.encode() + b"\0"
        pos = strtab.find(needle)
        while pos >= 0 and name not in found:
            try:
                found[name] = struct.unpack_from("<Q", syms, st_names.index(pos + 1) * 24 + 8)[0]
            except ValueError:  # string not used by any symbol; look for another copy
                pos = strtab.find(needle, pos + 1)
    return found


def _text_start(elf, data: bytes, vaddr: int, hdr: _Header) -> int | None:
    """Link-time address of runtime.text, the base of 1.18+ functab offsets.

    In order: the runtime.text symbol (what Go's objdump uses); runtime.firstmoduledata's text
    field, for stripped binaries; the header's textStart (Go 1.18-1.25 write it); the .text
    section. cgo (externally linked) binaries put C code before runtime.text, so .text alone
    is off by a few hundred bytes there.
    """
    syms = _symbols(elf, ("runtime.text",))
    if "runtime.text" in syms:
        return syms["runtime.text"]
    text = _moduledata_text(elf, data, vaddr, hdr)
    if text is not None:
        return text
    if hdr.text_start:
        return hdr.text_start
    sec = elf.get_section_by_name(".text")
    return None if sec is None else sec["sh_addr"]


def _moduledata_text(elf, data: bytes, vaddr: int, hdr: _Header) -> int | None:
    """runtime.moduledata's text field (see _moduledata)."""
    found = _moduledata(elf, data, vaddr, hdr)
    return None if found is None else struct.unpack_from("<Q", found[0], found[1] + 176)[0]


def moduledata_word(elf, table: FuncTable, offset: int) -> int | None:
    """The pointer-sized word at offset in the runtime.moduledata of table's module; None if not found."""
    if table.address is None:
        return None
    found = _moduledata(elf, table._data, table.address, table._hdr)
    if found is None or found[1] + offset + 8 > len(found[0]):
        return None
    return struct.unpack_from("<Q", found[0], found[1] + offset)[0]


def _moduledata(elf, data: bytes, vaddr: int, hdr: _Header) -> tuple[bytes, int] | None:
    """(segment bytes, position) of runtime.moduledata, which starts with pointers to the header and funcnametab.

    moduledata (runtime/symtab.go, same prefix Go 1.18-1.27): pcHeader *8, six slices *24,
    findfunctab 8, minpc @160, maxpc @168, text @176. Checked by minpc == text + first entry offset.
    """
    if hdr.pclntab + 4 > len(data):
        return None
    (first_off,) = struct.unpack_from("<I", data, hdr.pclntab)
    needle = struct.pack("<QQ", vaddr, vaddr + hdr.funcnametab)
    for seg in _load_segments(elf, executable=False):
        seg_data = seg.data()
        pos = seg_data.find(needle)
        while pos >= 0 and pos + 184 <= len(seg_data):
            minpc, maxpc, text = struct.unpack_from("<QQQ", seg_data, pos + 160)
            if text + first_off == minpc < maxpc:
                return seg_data, pos
            pos = seg_data.find(needle, pos + 1)
    return None
