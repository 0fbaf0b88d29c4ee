"""Reading the target's memory: the runtime's list of goroutines at attach time."""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

import numpy as np

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


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_IOV_MAX = 1024


class ProcessMemory:
    def __init__(self, pid: int):
        self._pid = pid
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)

    def read(self, address: int, size: int) -> bytes:
        data = os.pread(self._fd, size, address)
        if len(data) != size:
            raise OSError(f"short read at {address:#x}")
        return data

    def read_many(self, addresses: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """size bytes at each address, as rows of a uint8 array, and which rows were readable;
        IOV_MAX addresses a system call (process_vm_readv: a pread each cost a runtime with many
        goroutines milliseconds; Python's os has no process_vm_readv)."""
        rows, readable = np.zeros((len(addresses), size), np.uint8), np.zeros(len(addresses), bool)
        remote = np.empty((len(addresses), 2), np.uint64)  # struct iovec: base, length
        remote[:, 0], remote[:, 1] = addresses, size
        done = 0
        while done < len(addresses):
            n = min(len(addresses) - done, _IOV_MAX)
            local = _IoVec(rows[done:].ctypes.data, size * n)
            got = _libc.process_vm_readv(self._pid, ctypes.byref(local), 1, ctypes.c_void_p(remote[done:].ctypes.data), n, 0)
            whole = max(got, 0) // size  # the kernel stops at the first address it cannot read
            readable[done:done + whole] = True
            done += whole if whole == n else whole + 1
        return rows, readable

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
        pointers = np.frombuffer(mem.read(array, 8 * length), "<u8") if length else np.zeros(0, "<u8")
        rows, readable = mem.read_many(pointers, span)
        rows, pointers = rows[readable], pointers[readable]
        field = lambda name, dtype: rows[:, off[name]:off[name] + np.dtype(dtype).itemsize].copy().view(dtype).ravel()
        goid, status = field("g_goid", "<u8"), field("g_atomicstatus", "<u4") & np.uint32(~0x1000 & 0xFFFFFFFF)
        top = int(goid.max()) if len(goid) else 0
        # 11: _Gdeadextra (Go 1.26), a parked cgo g
        live = np.flatnonzero(~np.isin(status, (G_IDLE, G_DEAD)) & (status < 11))
        parent = field("g_parentGoid", "<u8") if "g_parentGoid" in off else np.zeros(len(rows), "<u8")
        start_pc, go_pc, wait_reason = field("g_startpc", "<u8"), field("g_gopc", "<u8"), rows[:, off["g_waitreason"]]
        columns = (pointers, goid, status, parent, start_pc, go_pc, wait_reason)
        found = [ExistingGoroutine(*values) for values in zip(*(c[live].tolist() for c in columns))]
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
