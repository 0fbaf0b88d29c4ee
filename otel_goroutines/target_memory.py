"""Reading the target's memory: the runtime's list of goroutines at attach time."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .binary.gobinary import GoBinary
from .goruntime import G_DEAD, G_IDLE, RuntimeSupport


@dataclass(frozen=True, slots=True)
class ExistingGoroutine:
    g_address: int
    goid: int
    status: int
    parent_goid: int
    start_pc: int
    go_pc: int
    wait_reason: int


class ProcessMemory:
    def __init__(self, pid: int):
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)

    def read(self, address: int, size: int) -> bytes:
        data = os.pread(self._fd, size, address)
        if len(data) != size:
            raise OSError(f"short read at {address:#x}")
        return data

    def close(self) -> None:
        os.close(self._fd)


def load_bias(pid: int, binary: GoBinary) -> int:
    """Runtime address minus link-time address of the executable's mapping (0 unless PIE)."""
    if not binary.is_pie:
        return 0
    first_load = min(seg["p_vaddr"] - seg["p_offset"] for seg in binary.elf.iter_segments("PT_LOAD"))
    exe_inode = os.stat(f"/proc/{pid}/exe").st_ino
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and int(fields[4]) == exe_inode and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16) - first_load
    raise OSError("executable mapping not found")


def live_goroutines(pid: int, support: RuntimeSupport, bias: int) -> list[ExistingGoroutine]:
    """Every goroutine in runtime.allgs that is not dead, read from the target's memory."""
    return all_goroutines(pid, support, bias)[0]


def all_goroutines(pid: int, support: RuntimeSupport, bias: int) -> tuple[list[ExistingGoroutine], int]:
    """The live goroutines of runtime.allgs, and the largest goroutine id any g there holds, dead
    ones included (a dead g keeps its last id): about how many goroutines the runtime has numbered."""
    off = support.offsets
    span = max(off.values()) + 8
    mem = ProcessMemory(pid)
    try:
        array, length, _ = struct.unpack("<QQQ", mem.read(support.allgs_address + bias, 24))
        pointers = struct.unpack(f"<{length}Q", mem.read(array, 8 * length)) if length else ()
        found, top = [], 0
        for g in pointers:
            try:
                raw = mem.read(g, span)
            except OSError:
                continue
            u64 = lambda field: struct.unpack_from("<Q", raw, off[field])[0]
            top = max(top, u64("g_goid"))
            status = struct.unpack_from("<I", raw, off["g_atomicstatus"])[0] & ~0x1000
            if status in (G_IDLE, G_DEAD) or status >= 11:  # 11: _Gdeadextra (Go 1.26), a parked cgo g
                continue
            found.append(ExistingGoroutine(
                g_address=g, goid=u64("g_goid"), status=status,
                parent_goid=u64("g_parentGoid") if "g_parentGoid" in off else 0,
                start_pc=u64("g_startpc"), go_pc=u64("g_gopc"), wait_reason=raw[off["g_waitreason"]]))
        return found, top
    finally:
        mem.close()


def still_alive(pid: int, support: RuntimeSupport, goroutines: list[ExistingGoroutine]) -> set[int]:
    """The goids among goroutines whose g still holds them, alive (for the race at import)."""
    off = support.offsets
    mem = ProcessMemory(pid)
    alive = set()
    try:
        for g in goroutines:
            try:
                goid = struct.unpack("<Q", mem.read(g.g_address + off["g_goid"], 8))[0]
                status = struct.unpack("<I", mem.read(g.g_address + off["g_atomicstatus"], 4))[0] & ~0x1000
            except OSError:
                continue
            if goid == g.goid and status not in (G_IDLE, G_DEAD):
                alive.add(goid)
    finally:
        mem.close()
    return alive
