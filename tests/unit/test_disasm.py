"""Probe placement by disassembly, on bytes from real Go functions."""

from otel_goroutines.binary import disasm

# runtime.goexit1 (Go 1.26): CMPQ SP, 0x10(R14); JBE; PUSHQ BP; MOVQ SP, BP
GOEXIT1 = bytes.fromhex("493b6610" "0f868c000000" "55" "4889e5")
# runtime.casgstatus: nosplit, starts with PUSHQ BP
CASGSTATUS = bytes.fromhex("55" "4889e5" "4883ec58")
# a large frame: LEAQ -0x88(SP), R12; CMPQ R12, 0x10(R14); JBE; PUSHQ BP
LARGE_FRAME = bytes.fromhex("4c8da42478ffffff" "4d3b6610" "0f8600010000" "55")
# main.main.gowrap1: ... CALL main.worker ... RET ... CALL runtime.morestack
GOWRAP = bytes.fromhex("493b6610761b554889e54883ec10488b5a10488b4208e805feffff4883c4105dc3e8faf0fdffebd8")


def test_after_stack_check():
    assert disasm.after_stack_check(GOEXIT1, 0x451A00) == 0x451A0A
    assert disasm.instruction_at(GOEXIT1, 0x451A00, 0x451A0A).one_trap  # push rbp
    assert disasm.after_stack_check(LARGE_FRAME, 0x1000) == 0x1000 + 18


def test_no_stack_check_means_entry():
    assert disasm.after_stack_check(CASGSTATUS, 0x44B640) == 0x44B640


def test_stack_check_is_two_traps():
    assert not disasm.instruction_at(GOEXIT1, 0x451A00, 0x451A00).one_trap  # cmp is single-stepped


def test_calls_and_returns():
    entry = 0x49EE20
    assert disasm.call_targets(GOWRAP, entry) == [0x49EC40, 0x47DF40]
    assert disasm.call_sites(GOWRAP, entry, 0x49EC40) == [0x49EE36]
    assert disasm.ret_sites(GOWRAP, entry) == [0x49EE40]


# runtime.mallocgc (Go 1.19): stack check; SUBQ $0x70, SP; MOVQ BP, 0x68(SP); LEAQ 0x68(SP), BP;
# CMPL runtime.gcphase(SB), $2; NOP; JE ...; TESTQ AX, AX (RAX = size all along)
MALLOCGC_119 = bytes.fromhex("493b6610" "0f86be080000" "4883ec70" "48896c2468" "488d6c2468" "833d45cb140002" "90" "0f8490080000" "4885c0")


def test_first_one_trap_skips_a_single_stepped_frame_setup():
    entry = 0x40B4E0
    start = disasm.after_stack_check(MALLOCGC_119, entry)
    assert not disasm.instruction_at(MALLOCGC_119, entry, start).one_trap  # sub rsp: two traps
    assert disasm.first_one_trap(MALLOCGC_119, entry, start, ("rax", "r14")) == entry + 31  # the nop
    # but not past an instruction that overwrites an argument the probe reads
    writes_rax = bytes.fromhex("4883ec70" "31c0" "90")  # SUBQ; XORL AX, AX; NOP
    assert disasm.first_one_trap(writes_rax, 0x1000, 0x1000, ("rax",)) == 0x1000
    assert disasm.first_one_trap(writes_rax, 0x1000, 0x1000, ("rcx",)) == 0x1006


def test_data_refs_name_rip_relative_globals():
    # CMPB runtime.disableMemoryProfiling(SB), $0; JE; MOVQ $0, runtime.MemProfileRate(SB)  (Go 1.26 schedinit)
    code = bytes.fromhex("803dc0f0120000" "740b" "48c705f9f0120000000000")
    refs = disasm.data_refs(code, 0x44A55B)
    assert [(r.target, r.size, r.written) for r in refs] == [(0x579622, 1, False), (0x579668, 8, True)]
