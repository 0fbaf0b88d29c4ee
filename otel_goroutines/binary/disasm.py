"""Choosing probe addresses by disassembly (capstone), for amd64 and arm64 Go code.

A uprobe on an instruction the kernel emulates (x86: PUSH, CALL, JMP, Jcc, NOP) or simulates
(arm64: B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ, ADR/ADRP, BR/BLR/RET) costs one trap; on any other
instruction the kernel single-steps a copy of it out of line: two traps, about 5x the cost. Most
Go functions open with a stack-bound check (amd64 `CMP RSP, [R14+0x10]`, arm64 `LDR X16, [X28,
#0x10]; CMP SP, X16; B.LS`) whose compare is single-stepped, so their probes go after it.

One `Isa` per architecture; `for_arch(name)` gives it. The module-level functions are amd64's
(what the agent used before arm64, and what tests/unit/test_disasm.py calls).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import capstone
from capstone import arm64, x86

SIMULATED, STEPPED, REFUSED = 1, 2, 0  # traps per hit; REFUSED: the kernel will not place a uprobe there


@dataclass(frozen=True)
class Instruction:
    address: int
    mnemonic: str
    op_str: str
    traps: int = STEPPED
    cost: str = ""  # "push is emulated: one trap", as inspect prints it

    @property
    def one_trap(self) -> bool:
        return self.traps == SIMULATED

    def __str__(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()


@dataclass(frozen=True)
class DataRef:
    address: int   # the instruction
    target: int    # the address of its PC-relative memory operand (a global variable)
    size: int      # operand size in bytes
    written: bool


class Isa:
    """What the agent needs to know of one instruction set, and of how its kernel's uprobes treat it."""
    name = ""
    call = ""                       # the direct-call mnemonic, as inspect prints a call site
    frame_registers: tuple[str, ...] = ()
    one_trap_word = ""              # what the kernel does to a one-trap instruction: "emulated", "simulated"
    _words: dict[int, str] = {}     # traps -> how inspect says it

    def __init__(self, arch: int, mode: int):
        self._md = capstone.Cs(arch, mode)
        self._md.detail = True

    def _decode(self, code: bytes, address: int, limit: int = 0):
        return self._md.disasm(code, address, limit)

    def _traps(self, insn) -> int:
        raise NotImplementedError

    def _instruction(self, insn) -> Instruction:
        traps = self._traps(insn)
        return Instruction(insn.address, insn.mnemonic, insn.op_str, traps, f"{insn.mnemonic} {self._words[traps]}")

    def instruction_at(self, code: bytes, entry: int, address: int) -> Instruction:
        return self._instruction(next(self._decode(code[address - entry:], address, 1)))

    def after_stack_check(self, code: bytes, entry: int) -> int:
        """The first address after the function's stack-check prologue; the entry if it has none."""
        prologue = list(self._decode(code[:64], entry))[:6]
        for i, insn in enumerate(prologue):
            if self._is_stack_check(insn):
                branch = next((b for b in prologue[i + 1:i + 4] if self._is_bound_branch(b)), None)
                if branch is not None:
                    return branch.address + branch.size
        return entry

    def ret_sites(self, code: bytes, entry: int) -> list[int]:
        return [insn.address for insn in self._decode(code, entry) if insn.mnemonic == "ret"]

    def _direct_calls(self, code: bytes, entry: int):
        for insn in self._decode(code, entry):
            if insn.mnemonic == self.call and insn.operands and insn.operands[0].type == self._imm:
                yield insn.address, insn.operands[0].imm

    def call_sites(self, code: bytes, entry: int, target: int) -> list[int]:
        """Addresses of the direct calls to target."""
        return [site for site, callee in self._direct_calls(code, entry) if callee == target]

    def call_targets(self, code: bytes, entry: int) -> list[int]:
        """Targets of the direct calls, in code order."""
        return [callee for _, callee in self._direct_calls(code, entry)]

    def first_one_trap(self, code: bytes, entry: int, start: int, keep: tuple[str, ...], limit: int = 12) -> int:
        """From `start` (an address every call reaches), the first instruction that costs one trap,
        as long as no instruction before it writes a register in `keep` (64-bit names: amd64 "rax",
        arm64 "x0"), so a probe there reads the same arguments; `start` if there is none. Go before
        1.21 on amd64 opens its frame with SUB/MOV, and arm64 always with STR/STUR/SUB: all single-stepped."""
        targets = self._jump_targets(code, entry)
        for insn in self._decode(code[start - entry:], start, limit):
            if insn.address in targets and insn.address != start:
                break  # a loop or a join could reach it again: no longer once per call
            if self._traps(insn) == SIMULATED:
                return insn.address
            _, written = insn.regs_access()
            if any(self._family(insn.reg_name(r)) in keep for r in written):
                break
        return start

    def _family(self, reg: str) -> str:
        return reg

    def _jump_targets(self, code: bytes, entry: int) -> set[int]:
        """Where the function's direct jumps and conditional branches lead."""
        return {insn.operands[-1].imm for insn in self._decode(code, entry)
                if capstone.CS_GRP_JUMP in insn.groups and insn.operands and insn.operands[-1].type == self._imm}


class X86(Isa):
    name, call, frame_registers, one_trap_word = "amd64", "call", ("rsp", "rbp"), "emulated"
    _imm = x86.X86_OP_IMM
    # arch/x86/kernel/uprobes.c emulates these; not ret: measured here, the kernel single-steps it (~20 us a hit)
    _ONE_TRAP = {"push", "call", "jmp", "nop"}
    _words = {SIMULATED: "is emulated: one trap", STEPPED: "is single-stepped: two traps"}
    _REG_FAMILY = {**{f"{p}{r}{s}": f"r{r}x" for r in "abcd" for p, s in (("", "l"), ("", "h"), ("", "x"), ("e", "x"))},
                   **{f"{p}{r}{s}": f"r{r}" for r in ("si", "di") for p, s in (("", "l"), ("", ""), ("e", ""))},
                   **{f"r{n}{s}": f"r{n}" for n in range(8, 16) for s in "bwd"}}

    def __init__(self):
        super().__init__(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

    def _traps(self, insn) -> int:
        m = insn.mnemonic
        return SIMULATED if m in self._ONE_TRAP or (m.startswith("j") and m != "jmp") else STEPPED

    def _family(self, reg: str) -> str:
        return self._REG_FAMILY.get(reg, reg)

    def _is_stack_check(self, insn) -> bool:
        # CMP <reg>, qword ptr [r14 + 0x10]: compare SP (or SP minus the frame, in R12) with g.stackguard0.
        if insn.mnemonic != "cmp" or len(insn.operands) != 2:
            return False
        mem = insn.operands[1]
        return mem.type == x86.X86_OP_MEM and mem.mem.base == x86.X86_REG_R14 and mem.mem.disp == 0x10

    def _is_bound_branch(self, insn) -> bool:
        return insn.mnemonic in ("jbe", "jb", "jae", "ja")

    def after_stack_check(self, code: bytes, entry: int) -> int:
        # The check's jump must follow the compare directly (the amd64 rule since the first release).
        prologue = list(self._decode(code[:64], entry))[:5]
        for i, insn in enumerate(prologue[:-1]):
            if self._is_stack_check(insn) and self._is_bound_branch(prologue[i + 1]):
                return prologue[i + 1].address + prologue[i + 1].size
        return entry

    def data_refs(self, code: bytes, entry: int) -> list[DataRef]:
        """The function's RIP-relative memory operands, in code order: how a stripped binary's code
        names the runtime's global variables."""
        refs = []
        for insn in self._decode(code, entry):
            for op in insn.operands:
                if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
                    refs.append(DataRef(insn.address, insn.address + insn.size + op.mem.disp, op.size,
                                        bool(op.access & capstone.CS_AC_WRITE)))
        return refs

    def register_stores(self, code: bytes, entry: int, source: str) -> list[tuple[str, int]]:
        """(base register, displacement) of each 8-byte store of register `source` ("rax") to memory,
        in code order: how a setter names the struct field it writes."""
        found = []
        for insn in self._decode(code, entry):
            if insn.mnemonic != "mov" or len(insn.operands) != 2:
                continue
            dst, src = insn.operands
            if dst.type == x86.X86_OP_MEM and dst.size == 8 and src.type == x86.X86_OP_REG and insn.reg_name(src.reg) == source:
                found.append((insn.reg_name(dst.mem.base) if dst.mem.base else "", dst.mem.disp))
        return found


def _is(word: int, mask: int, value: int) -> bool:
    return word & mask == value


class Arm64(Isa):
    """arm64: the uprobe decoder is arm_probe_decode_insn() (arch/arm64/kernel/probes/decode-insn.c),
    the same as kprobes' but without their LDR-literal simulation. The masks are the kernel's
    (arch/arm64/include/asm/insn.h)."""
    name, call, frame_registers, one_trap_word = "arm64", "bl", ("sp", "x29", "fp"), "simulated"
    _imm = arm64.ARM64_OP_IMM
    _words = {SIMULATED: "is simulated: one trap", STEPPED: "is stepped out of line: two traps",
              REFUSED: "is refused by the kernel's uprobes: cannot be probed"}
    # simulate-insn.c: B.cond, CBZ/CBNZ, TBZ/TBNZ, ADR/ADRP, B/BL, BR/BLR/RET
    _SIMULATED = ((0xFF000010, 0x54000000), (0x7E000000, 0x34000000), (0x7E000000, 0x36000000),
                  (0x1F000000, 0x10000000), (0x7C000000, 0x14000000), (0xFF9FFC1F, 0xD61F0000))
    # not steppable, not simulated: literal loads (LDR, LDRSW, PRFM: only kprobes simulate the first
    # two), exclusives, exceptions (SVC, BRK), MSR (immediate, register), other branches (ERET,
    # authenticated ones); MRS and HINT in _refused_system
    _REFUSED = ((0x3F000000, 0x18000000), (0x3F800000, 0x08000000), (0xFF000000, 0xD4000000),
                (0xFFF8F01F, 0xD500401F), (0xFFF00000, 0xD5100000), (0xFE000000, 0xD6000000))

    def __init__(self):
        super().__init__(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)

    def _traps(self, insn) -> int:
        word = struct.unpack("<I", insn.bytes)[0]
        if any(_is(word, m, v) for m, v in self._SIMULATED):
            return SIMULATED
        if any(_is(word, m, v) for m, v in self._REFUSED) or self._refused_system(word):
            return REFUSED
        return STEPPED

    @staticmethod
    def _refused_system(word: int) -> bool:
        if _is(word, 0xFFF00000, 0xD5300000):  # MRS: only reading DAIF (op0=3, op1=3, CRn=4, CRm=2, op2=1) steps
            return (word & 0x1FFFE0) >> 5 != 0x5A11
        if _is(word, 0xFFFFF01F, 0xD503201F):  # HINT: NOP, PAC*, BTI step (aarch64_insn_is_steppable_hint)
            return (word & 0xFE0) not in (0x000, 0x0E0, 0x100, 0x140, 0x300, 0x320, 0x340, 0x360, 0x400, 0x440, 0x480, 0x4C0)
        return False

    def _family(self, reg: str) -> str:
        return "x" + reg[1:] if reg[:1] == "w" and reg[1:].isdigit() else reg

    def _is_stack_check(self, insn) -> bool:
        # LDR X16, [X28, #0x10]: g.stackguard0 (R28 holds g); the compare and B.LS follow.
        if insn.mnemonic != "ldr" or len(insn.operands) != 2:
            return False
        mem = insn.operands[1]
        return mem.type == arm64.ARM64_OP_MEM and insn.reg_name(mem.mem.base) == "x28" and mem.mem.disp == 0x10

    def _is_bound_branch(self, insn) -> bool:
        return insn.mnemonic in ("b.ls", "b.lo", "b.hs", "b.hi")

    def _accesses(self, code: bytes, entry: int):
        """(instruction, target) of each memory access through a register that an ADRP just set:
        how arm64 Go code names a global (ADRP R27, page; then LDR/STR/ADD with R27 and the offset)."""
        pages: dict[str, int] = {}
        for insn in self._decode(code, entry):
            if insn.mnemonic == "adrp":
                pages[insn.reg_name(insn.operands[0].reg)] = insn.operands[1].imm
                continue
            mem = next((op for op in insn.operands if op.type == arm64.ARM64_OP_MEM), None)
            if mem is not None and insn.reg_name(mem.mem.base) in pages:
                yield insn, pages[insn.reg_name(mem.mem.base)] + mem.mem.disp
            pages.clear()

    def data_refs(self, code: bytes, entry: int) -> list[DataRef]:
        """The function's ADRP-relative loads and stores, in code order (see _accesses)."""
        refs = []
        for insn, target in self._accesses(code, entry):
            m = insn.mnemonic
            if not m.startswith(("ld", "st")):
                continue
            size = 1 if m.endswith("b") else 2 if m.endswith("h") else 8 if insn.reg_name(insn.operands[0].reg)[0] in "xl" else 4
            refs.append(DataRef(insn.address, target, size, m.startswith("st")))
        return refs

    def register_stores(self, code: bytes, entry: int, source: str) -> list[tuple[str, int]]:
        """(base register, displacement) of each 8-byte store of register `source` ("x0") to memory."""
        found = []
        for insn in self._decode(code, entry):
            if insn.mnemonic not in ("str", "stur") or len(insn.operands) != 2:
                continue
            src, dst = insn.operands
            if src.type == arm64.ARM64_OP_REG and insn.reg_name(src.reg) == source and dst.type == arm64.ARM64_OP_MEM:
                found.append((insn.reg_name(dst.mem.base), dst.mem.disp))
        return found


AMD64, ARM64 = X86(), Arm64()
_ISAS = {isa.name: isa for isa in (AMD64, ARM64)}


def for_arch(name: str) -> Isa:
    return _ISAS[name]


instruction_at = AMD64.instruction_at
after_stack_check = AMD64.after_stack_check
ret_sites = AMD64.ret_sites
call_sites = AMD64.call_sites
call_targets = AMD64.call_targets
first_one_trap = AMD64.first_one_trap
data_refs = AMD64.data_refs
register_stores = AMD64.register_stores
