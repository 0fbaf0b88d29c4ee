"""Go build info: real binaries and hand-made sections."""

import struct
import subprocess

import pytest

from helpers import build_program, go_toolchain
from otel_goroutines.binary import buildinfo
from otel_goroutines.binary.gobinary import GoBinary
from otel_goroutines.errors import UnsupportedTarget


def _inline(s: bytes) -> bytes:
    out, n = b"", len(s)
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out + s


def test_matches_go_version_m():
    binary = build_program("tree")
    reported = subprocess.run([go_toolchain(), "version", "-m", str(binary)], capture_output=True, text=True, check=True).stdout
    info = GoBinary(str(binary)).build_info
    assert reported.splitlines()[0].split()[-1] == info.go_version
    assert f"\tbuild\t-buildmode={info.settings['-buildmode']}" in reported
    assert info.main_module == "example.com/goroutine-fixtures"


def test_inline_strings_layout():
    modinfo = "0123456789abcdef" + "path\tx\nmod\tex.com/m\t(devel)\t\nbuild\tCGO_ENABLED=0\n" + "0123456789abcdef"
    section = buildinfo.MAGIC + bytes([8, 2]) + b"\0" * 16 + _inline(b"go1.22.10") + _inline(modinfo.encode())
    info = buildinfo.parse(section)
    assert info.go_version == "go1.22.10"
    assert info.settings == {"CGO_ENABLED": "0"} and info.main_module == "ex.com/m"


def test_pointer_layout_of_old_go():
    strings = {0x5000: "go1.17.13", 0x6000: ""}
    section = buildinfo.MAGIC + bytes([8, 0]) + struct.pack("<QQ", 0x5000, 0x6000)
    assert buildinfo.parse(section, strings.__getitem__).go_version == "go1.17.13"


@pytest.mark.parametrize("section", [b"", b"\xff Go buildinf:", b"not build info at all, no magic here",
                                     buildinfo.MAGIC + bytes([8, 2]) + b"\0" * 16 + b"\x85"])
def test_bad_sections(section):
    with pytest.raises(buildinfo.BuildInfoError):
        buildinfo.parse(section)


def test_non_go_and_non_elf_files(tmp_path):
    with pytest.raises(UnsupportedTarget, match="not a Go program"):
        GoBinary("/bin/true")
    text = tmp_path / "x"
    text.write_text("hello")
    with pytest.raises(UnsupportedTarget, match="not an ELF"):
        GoBinary(str(text))
