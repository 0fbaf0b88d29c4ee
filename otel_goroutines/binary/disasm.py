"""Choosing probe addresses by disassembly (capstone).

A uprobe on an instruction the kernel can emulate (PUSH, CALL, JMP, Jcc, NOP) costs one trap;
on any other instruction the kernel single-steps a copy of it out of line: two traps, about
5x the cost. Most Go functions open with the stack-bound check `CMP RSP, [R14+0x10]`, which
cannot be emulated, so their probes go just after that check.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import x86

_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True

# Instructions the x86 uprobe code emulates instead of single-stepping (arch/x86/kernel/uprobes.c).
_ONE_TRAP = {"push", "call", "jmp", "nop"}  # not ret: measured here, the kernel single-steps it (~20 us a hit)


@dataclass(frozen=True)
class Instruction:
    address: int
    mnemonic: str
    op_str: str

    @property
    def one_trap(self) -> bool:
        return self.mnemonic in _ONE_TRAP or (self.mnemonic.startswith("j") and self.mnemonic != "jmp")

    def __str__(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()


def _decode(code: bytes, address: int, limit: int = 0):
    return _md.disasm(code, address, limit)


def instruction_at(code: bytes, entry: int, address: int) -> Instruction:
    insn = next(_decode(code[address - entry:], address, 1))
    return Instruction(insn.address, insn.mnemonic, insn.op_str)


def _is_stack_check(insn) -> bool:
    # CMP <reg>, qword ptr [r14 + 0x10]: compare SP (or SP minus the frame, in R12) with g.stackguard0.
    if insn.mnemonic != "cmp" or len(insn.operands) != 2:
        return False
    mem = insn.operands[1]
    return mem.type == x86.X86_OP_MEM and mem.mem.base == x86.X86_REG_R14 and mem.mem.disp == 0x10


def after_stack_check(code: bytes, entry: int) -> int:
    """The first address after the function's stack-check prologue; the entry if it has none."""
    prologue = list(_decode(code[:64], entry))[:5]
    for i, insn in enumerate(prologue[:-1]):
        if _is_stack_check(insn) and prologue[i + 1].mnemonic in ("jbe", "jb", "jae", "ja"):
            return prologue[i + 1].address + prologue[i + 1].size
    return entry


def ret_sites(code: bytes, entry: int) -> list[int]:
    return [insn.address for insn in _decode(code, entry) if insn.mnemonic == "ret"]


def _direct_calls(code: bytes, entry: int):
    for insn in _decode(code, entry):
        if insn.mnemonic == "call" and insn.operands and insn.operands[0].type == x86.X86_OP_IMM:
            yield insn.address, insn.operands[0].imm


def call_sites(code: bytes, entry: int, target: int) -> list[int]:
    """Addresses of the direct calls to target."""
    return [site for site, callee in _direct_calls(code, entry) if callee == target]


def call_targets(code: bytes, entry: int) -> list[int]:
    """Targets of the direct calls, in code order."""
    return [callee for _, callee in _direct_calls(code, entry)]


_REG_FAMILY = {"al": "rax", "ah": "rax", "ax": "rax", "eax": "rax", "rax": "rax",
               "cl": "rcx", "ch": "rcx", "cx": "rcx", "ecx": "rcx", "rcx": "rcx",
               "r14b": "r14", "r14w": "r14", "r14d": "r14", "r14": "r14"}


def first_one_trap(code: bytes, entry: int, start: int, keep: tuple[str, ...], limit: int = 12) -> int:
    """From `start` (an address every call reaches), the first instruction that costs one trap,
    as long as no instruction before it branches or writes a register in `keep` (64-bit names:
    "rax", "rcx", "r14"), so a probe there reads the same arguments; `start` if there is none.
    Go before 1.21 opens its frame with SUB/MOV (single-stepped) after the stack check."""
    for insn in _decode(code[start - entry:], start, limit):
        if Instruction(insn.address, insn.mnemonic, insn.op_str).one_trap:
            return insn.address
        _, written = insn.regs_access()
        if any(_REG_FAMILY.get(insn.reg_name(r)) in keep for r in written):
            break
    return start


@dataclass(frozen=True)
class DataRef:
    address: int   # the instruction
    target: int    # the address of its RIP-relative memory operand (a global variable)
    size: int      # operand size in bytes
    written: bool


def data_refs(code: bytes, entry: int) -> list[DataRef]:
    """The function's RIP-relative memory operands, in code order: how a stripped binary's code
    names the runtime's global variables."""
    refs = []
    for insn in _decode(code, entry):
        for op in insn.operands:
            if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
                refs.append(DataRef(insn.address, insn.address + insn.size + op.mem.disp, op.size,
                                    bool(op.access & capstone.CS_AC_WRITE)))
    return refs


def register_stores(code: bytes, entry: int, source: str) -> list[tuple[str, int]]:
    """(base register, displacement) of each 8-byte store of register `source` ("rax") to memory,
    in code order: how a setter names the struct field it writes."""
    found = []
    for insn in _decode(code, entry):
        if insn.mnemonic != "mov" or len(insn.operands) != 2:
            continue
        dst, src = insn.operands
        if dst.type == x86.X86_OP_MEM and dst.size == 8 and src.type == x86.X86_OP_REG and insn.reg_name(src.reg) == source:
            found.append((insn.reg_name(dst.mem.base) if dst.mem.base else "", dst.mem.disp))
    return found
