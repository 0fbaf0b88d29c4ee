"""One Go executable, read from its file: version, functions, symbols, DWARF types, data."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..errors import UnsupportedTarget
from . import buildinfo, disasm
from .pclntab import Func, FuncTable, PclntabError, moduledata_word


class DwarfError(Exception):
    """The binary's DWARF is missing or cannot be read (a program runs with its DWARF corrupt); its
    text says which, for a message."""


# ELF machine -> Go's GOARCH name, for the architectures whose Go code the agent reads.
ARCHES = {"EM_X86_64": "amd64", "EM_AARCH64": "arm64"}


@dataclass(frozen=True)
class Symbol:
    address: int
    size: int


class GoBinary:
    """Read-only view of a Go ELF binary. Addresses are link-time virtual addresses."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as exc:
            raise UnsupportedTarget(f"cannot read {path}: {exc.strerror}") from None
        try:
            self.elf = ELFFile(self._file)
        except ELFError:
            self._file.close()
            raise UnsupportedTarget(f"{path} is not an ELF executable") from None
        self.arch = ARCHES.get(self.elf["e_machine"])
        if self.arch is None:
            raise UnsupportedTarget(f"{path} is built for {self.elf['e_machine']}; only amd64 (x86-64) and arm64 are supported")
        self.isa = disasm.for_arch(self.arch)  # how its code disassembles and what its probes cost
        self.build_info = self._read_build_info()

    def close(self) -> None:
        self._file.close()

    @property
    def go_version(self) -> str:
        return self.build_info.go_version

    @property
    def is_pie(self) -> bool:
        return self.elf["e_type"] == "ET_DYN"

    @property
    def build_mode(self) -> str:
        return self.build_info.settings.get("-buildmode", "pie" if self.is_pie else "exe")

    @cached_property
    def uses_cgo(self) -> bool:
        """runtime/cgo is linked in (CGO_ENABLED=1 alone is not enough: a program needs a cgo package).
        _cgo_topofstack is its assembly, in every Go version."""
        return self.functions.by_name("_cgo_topofstack") is not None

    @cached_property
    def has_symtab(self) -> bool:
        return self.elf.get_section_by_name(".symtab") is not None

    @cached_property
    def has_dwarf(self) -> bool:
        return self.elf.get_section_by_name(".debug_info") is not None or self.elf.get_section_by_name(".zdebug_info") is not None

    @cached_property
    def functions(self) -> FuncTable:
        try:
            return FuncTable.from_elf(self.elf)
        except PclntabError as exc:
            raise UnsupportedTarget(f"{self.path}: cannot read the Go function table: {exc}") from None

    @cached_property
    def _gofunc(self) -> int | None:
        """Address of go:func.*, the base of funcdata offsets: its symbol, or stripped, moduledata.gofunc
        (a field that moved: Go 1.18-1.19 at 304, 1.20-1.26 at 320 after covctrs, 1.27 at 344)."""
        symbol = self.symbol("go:func.*") or self.symbol("go.func.*")
        if symbol is not None:
            return symbol.address
        minor = int(self.go_version.split(".")[1]) if self.go_version.startswith("go1.") else 0
        return moduledata_word(self.elf, self.functions, 304 if minor < 20 else 320 if minor < 27 else 344)

    def inlined_call(self, func: Func) -> str | None:
        """The function the compiler inlined first into func's own body (the outermost of the
        first inlined code in func, as the runtime's traceback unwinds it); None if none."""
        inlining = self.functions.inlining(func)
        if inlining is None or self._gofunc is None:
            return None
        for _pc, index in self.functions.inline_indexes(func, inlining):
            for _ in range(64):  # the depth of inlining; a longer chain is a corrupt table
                if index < 0:
                    break
                try:
                    call = self.read(self._gofunc + inlining.tree + index * inlining.entry_size, inlining.entry_size)
                except ValueError:
                    return None
                name_off, parent_pc = struct.unpack_from("<ii", call, inlining.name_at)[0], \
                    struct.unpack_from("<i", call, inlining.parent_pc_at)[0]
                parent = self.functions.inline_index(func, inlining, func.entry + parent_pc)
                if parent < 0:
                    return self.functions.name_at(name_off)
                index = parent
        return None

    def function(self, name: str) -> Func:
        func = self.functions.by_name(name)
        if func is None:
            raise UnsupportedTarget(f"{self.path} has no function {name}; is it a Go program?")
        return func

    @cached_property
    def _symbols(self) -> dict[str, Symbol]:
        symtab = self.elf.get_section_by_name(".symtab")
        if symtab is None:
            return {}
        # Read the table directly (ELF64 little-endian, as amd64 and arm64 Linux are): pyelftools' symbol objects
        # take seconds for the ~100k symbols of a large binary, this takes milliseconds.
        names = self.elf.get_section(symtab["sh_link"]).data()
        table = {}
        for st_name, _info, _other, _shndx, value, size in struct.iter_unpack("<IBBHQQ", symtab.data()):
            if st_name:
                table[names[st_name:names.index(b"\0", st_name)].decode("utf-8", "replace")] = Symbol(value, size)
        return table

    def symbol(self, name: str) -> Symbol | None:
        return self._symbols.get(name)

    def read(self, address: int, size: int) -> bytes:
        """Bytes of the file image at a virtual address (from the PT_LOAD segment holding it)."""
        for seg in self.elf.iter_segments("PT_LOAD"):
            start = seg["p_vaddr"]
            if start <= address and address + size <= start + seg["p_filesz"]:
                self._file.seek(seg["p_offset"] + address - start)
                return self._file.read(size)
        raise ValueError(f"address {address:#x} is not in the file image")

    def read_go_string(self, header_address: int) -> str:
        data_ptr, length = struct.unpack("<QQ", self.read(header_address, 16))
        return self.read(data_ptr, length).decode("utf-8", "replace") if length else ""

    def code(self, func: Func) -> bytes:
        return self.read(func.entry, func.end - func.entry)

    def struct_offsets(self, wanted: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:
        """Member offsets of Go structs from DWARF: {"runtime.g": ("goid", ...)} -> {"runtime.g": {"goid": 152}}.
        DwarfError when there is none or it cannot be read.

        Go's linker puts all type DIEs at the top level of a few units, so scanning top-level
        children is enough; members missing in this Go version are simply absent from the result.
        """
        if not self.has_dwarf:
            raise DwarfError("stripped binary (no DWARF)")
        try:
            return self._struct_offsets(wanted)
        except Exception as exc:  # pyelftools on corrupt DWARF: its own errors, construct's, OverflowError, KeyError...
            raise DwarfError(f"unreadable DWARF ({type(exc).__name__}: {exc})") from None

    def _struct_offsets(self, wanted: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        dwarf = self.elf.get_dwarf_info()
        targets = {name.encode(): name for name in wanted}
        # Fast path: Go writes type names inline (DW_FORM_string), so a struct's DIE starts at its
        # abbreviation code just before its name; parse only there (the full walk below takes
        # seconds on a 20 MB binary, this milliseconds), and walk only for what is not found so.
        for raw in list(targets):
            die = _struct_die_by_name(dwarf, raw)
            if die is not None:
                struct_name = targets.pop(raw)
                found[struct_name] = _member_offsets(die, wanted[struct_name])
        if not targets:
            return found
        for cu in dwarf.iter_CUs():
            for die in cu.get_top_DIE().iter_children():
                if die.tag != "DW_TAG_structure_type":
                    continue
                name_attr = die.attributes.get("DW_AT_name")
                if name_attr is None or name_attr.value not in targets:
                    continue
                struct_name = targets.pop(name_attr.value)
                members = {}
                for member in die.iter_children():
                    loc = member.attributes.get("DW_AT_data_member_location")
                    mname = member.attributes.get("DW_AT_name")
                    if loc is not None and mname is not None and mname.value.decode() in wanted[struct_name]:
                        members[mname.value.decode()] = loc.value
                found[struct_name] = members
                if not targets:
                    return found
        return found

    def _read_build_info(self) -> buildinfo.BuildInfo:
        section = self.elf.get_section_by_name(".go.buildinfo")
        data = section.data() if section is not None else self._scan_for_build_info()
        if data is None:
            if self.elf.get_section_by_name(".go_export") is not None or self.symbol("__go_init_main") is not None:
                raise UnsupportedTarget(f"{self.path} was built by gccgo; only the gc toolchain is supported")
            raise UnsupportedTarget(f"{self.path} is not a Go program (no Go build info)")
        try:
            return buildinfo.parse(data, self.read_go_string)
        except (buildinfo.BuildInfoError, ValueError, struct.error) as exc:
            raise UnsupportedTarget(f"{self.path}: unreadable Go build info ({exc})") from None

    def _scan_for_build_info(self) -> bytes | None:
        # Some external linkers merge .go.buildinfo into another section; the magic is 16-byte aligned.
        for seg in self.elf.iter_segments("PT_LOAD"):
            if seg["p_flags"] & 0x1:  # executable: code, not data
                continue
            data = seg.data()
            pos = data.find(buildinfo.MAGIC)
            while pos != -1 and pos % 16:
                pos = data.find(buildinfo.MAGIC, pos + 1)
            if pos != -1:
                return data[pos:pos + 64 * 1024]
        return None


def _struct_die_by_name(dwarf, name: bytes):
    """The DW_TAG_structure_type DIE named name, found by its inline name; None if not found so."""
    data = dwarf.debug_info_sec.stream.getvalue()
    pos = data.find(name + b"\0")
    while pos != -1:
        for code_len in (1, 2):  # ULEB128 abbreviation code: 1 byte below 128, else 2
            try:
                die = dwarf.get_CU_containing(pos - code_len).get_DIE_from_refaddr(pos - code_len)
            except Exception:  # not a DIE start: part of another name, or data
                continue
            attr = die.attributes.get("DW_AT_name")
            if die.tag == "DW_TAG_structure_type" and attr is not None and attr.value == name:
                return die
        pos = data.find(name + b"\0", pos + 1)
    return None


def _member_offsets(die, fields: tuple[str, ...]) -> dict[str, int]:
    members = {}
    for member in die.iter_children():
        loc = member.attributes.get("DW_AT_data_member_location")
        mname = member.attributes.get("DW_AT_name")
        if loc is not None and mname is not None and mname.value.decode() in fields:
            members[mname.value.decode()] = loc.value
    return members
