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
