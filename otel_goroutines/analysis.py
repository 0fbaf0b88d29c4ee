"""Binary analysis shared by the processes of one binary: a node-wide `watch` that sees twenty
copies of one service start reads its executable (symbols, DWARF offsets, probe addresses) once."""

from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

from elftools.common.exceptions import ELFError

from . import goruntime, gosdk
from .binary.buildinfo import BuildInfoError
from .binary.gobinary import GoBinary
from .binary.pclntab import PclntabError
from .errors import UnsupportedTarget


@dataclass(frozen=True)
class BinaryAnalysis:
    binary: GoBinary
    support: goruntime.RuntimeSupport  # UnsupportedTarget is raised, not cached
    sdk: gosdk.SdkStatus


@contextmanager
def reading_binary(path: str):
    """A corrupt or truncated binary, wherever its parsers trip over it, said as such."""
    try:
        yield
    except ELFError as exc:
        raise UnsupportedTarget(f"{path}: not a readable ELF file, truncated or corrupt ({exc})") from None
    except PclntabError as exc:
        raise UnsupportedTarget(f"{path}: corrupt Go function table ({exc})") from None
    except BuildInfoError as exc:
        raise UnsupportedTarget(f"{path}: unreadable Go build info ({exc})") from None


def analyse(exe_path: str, placement: str = "cheap") -> BinaryAnalysis:
    with reading_binary(exe_path):
        binary = GoBinary(exe_path)
        goruntime.require_traceable(binary)
        return BinaryAnalysis(binary, goruntime.support_for(binary, placement), gosdk.sdk_status(binary))


class AnalysisCache:
    """Analyses by file identity (device, inode, size, modification time: a rebuilt binary is
    another) and probe placement (it picks the probe points), the `size` most recently used kept."""

    def __init__(self, size: int = 16):
        self.size = size
        self._entries: OrderedDict[tuple, BinaryAnalysis] = OrderedDict()

    def get(self, exe_path: str, placement: str = "cheap") -> BinaryAnalysis:
        st = os.stat(exe_path)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, placement)
        found = self._entries.get(identity)
        if found is None:
            found = self._entries[identity] = analyse(exe_path, placement)
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)[1].binary.close()
        self._entries.move_to_end(identity)
        return found
