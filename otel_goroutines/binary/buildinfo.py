"""The Go version and build settings a Go binary records in its .go.buildinfo section."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = b"\xff Go buildinf:"
_HEADER_SIZE = 32
_FLAG_BIG_ENDIAN = 0x1
_FLAG_INLINE_STRINGS = 0x2  # Go 1.18+: version and module info follow the header as varint-prefixed strings


class BuildInfoError(Exception):
    pass


@dataclass(frozen=True)
class BuildInfo:
    go_version: str  # as the toolchain printed it: "go1.26.8"
    settings: dict[str, str] = field(default_factory=dict)  # "-buildmode", "CGO_ENABLED", "-trimpath", ...
    main_module: str = ""
    deps: dict[str, str] = field(default_factory=dict)  # module path -> version linked in (after any replace)


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise BuildInfoError("truncated varint in Go build info")


def _inline_string(data: bytes, pos: int) -> tuple[str, int]:
    length, pos = _uvarint(data, pos)
    if pos + length > len(data):
        raise BuildInfoError("truncated string in Go build info")
    return data[pos:pos + length].decode("utf-8", "replace"), pos + length


def parse(section: bytes, read_pointer_string=None) -> BuildInfo:
    """Parse the .go.buildinfo section.

    read_pointer_string(addr) reads a Go string header at a virtual address; it is needed only
    for binaries from before Go 1.18, which store pointers instead of the strings themselves.
    """
    if len(section) < _HEADER_SIZE or not section.startswith(MAGIC):
        raise BuildInfoError("no Go build info")
    ptr_size, flags = section[14], section[15]
    if flags & _FLAG_INLINE_STRINGS:
        version, pos = _inline_string(section, _HEADER_SIZE)
        modinfo, _ = _inline_string(section, pos)
    else:
        if read_pointer_string is None or ptr_size != 8 or flags & _FLAG_BIG_ENDIAN:
            raise BuildInfoError("unsupported Go build info layout")
        version_addr, modinfo_addr = struct.unpack_from("<QQ", section, 16)
        version = read_pointer_string(version_addr)
        modinfo = read_pointer_string(modinfo_addr)
    return BuildInfo(go_version=version, **_parse_modinfo(modinfo))


def _parse_modinfo(modinfo: str) -> dict:
    # The module info is framed by 16-byte sentinels; its lines are tab-separated ("build\tKEY=VALUE").
    if len(modinfo) >= 33 and modinfo[-17] == "\n":
        modinfo = modinfo[16:-16]
    settings: dict[str, str] = {}
    deps: dict[str, str] = {}
    main_module = ""
    last_dep = None
    for line in modinfo.splitlines():
        parts = line.split("\t")
        if parts[0] == "mod" and len(parts) > 1:
            main_module = parts[1]
        elif parts[0] == "dep" and len(parts) > 2:
            last_dep = parts[1]
            deps[last_dep] = parts[2]
        elif parts[0] == "=>" and len(parts) > 2 and last_dep:  # "=> path version sum": the dep above is replaced
            deps[last_dep] = parts[2] if parts[2].startswith("v") else "(replaced by a local directory)"
        elif parts[0] == "build" and len(parts) > 1 and "=" in parts[1]:
            key, value = parts[1].split("=", 1)
            settings[key] = value
    return {"settings": settings, "main_module": main_module, "deps": deps}
