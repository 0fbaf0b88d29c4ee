#!/usr/bin/env python3
"""Generate otel_goroutines/layouts/otel_sdk.json: the OpenTelemetry Go SDK struct offsets a stripped
binary no longer says.

For each SDK release below (every v1 release the Go module proxy serves), build a small program
that starts and ends sampled and unsampled spans, with DWARF, and read from it, with the agent's own
readers, the members the probes need (gosdk.STRUCTS) and whether the probed functions exist. The
layout does not depend on the Go toolchain (the members' types are the same in every Go release);
CROSS_CHECK builds a few releases with other toolchains too and fails if any offset differs.
For a new SDK release: add it to RELEASES and re-run.

    .venv/bin/python scripts/gen_sdk_layouts.py            # rewrite the table
    .venv/bin/python scripts/gen_sdk_layouts.py --check    # exit 1 if the table is not what the builds give
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import generated_table  # noqa: E402
from go_toolchains import toolchain, version_of  # noqa: E402
from otel_goroutines import gosdk  # noqa: E402
from otel_goroutines.binary.gobinary import GoBinary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "otel_goroutines" / "layouts" / "otel_sdk.json"
WORK = ROOT / ".cache" / "sdk-layouts"

# `go list -m -versions go.opentelemetry.io/otel/sdk`, v1 releases (no pre-releases).
RELEASES = ["v1.0.1", "v1.3.0", "v1.4.0", "v1.4.1", "v1.6.1", "v1.7.0", "v1.11.1", "v1.11.2", "v1.12.0", "v1.13.0",
            "v1.14.0", "v1.16.0", "v1.17.0", "v1.19.0", "v1.20.0", "v1.21.0", "v1.22.0", "v1.24.0", "v1.26.0", "v1.27.0",
            "v1.28.0", "v1.29.0", "v1.30.0", "v1.31.0", "v1.32.0", "v1.33.0", "v1.34.0", "v1.35.0", "v1.36.0", "v1.37.0",
            "v1.38.0", "v1.39.0", "v1.40.0", "v1.41.0", "v1.42.0", "v1.43.0", "v1.44.0", "v1.45.0", "v1.46.0", "v1.47.0"]
MAIN_GO = "1.26"
# Releases also built with another toolchain (the oldest each can use): the offsets must not change.
CROSS_CHECK = {"v1.0.1": "1.21", "v1.19.0": "1.21", "v1.20.0": "1.23", "v1.47.0": "1.27"}

# Sampled and unsampled spans, started and ended through the API, so every probed function is linked in.
PROGRAM = """package main

import (
	"context"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

func main() {
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.TraceIDRatioBased(0.5)))
	for i := 0; i < 4; i++ {
		ctx, span := tp.Tracer("probe").Start(context.Background(), "a")
		done := make(chan int)
		go func() {
			_, child := tp.Tracer("probe").Start(ctx, "b")
			child.End()
			done <- 1
		}()
		<-done
		span.End()
	}
}
"""


def measure(release: str, minor: str) -> dict:
    go = toolchain(minor)
    work = WORK / f"{release}-go{minor}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "main.go").write_text(PROGRAM)
    (work / "go.mod").write_text("module probe\n\ngo 1.21\n")
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod", CGO_ENABLED="0")
    subprocess.run([str(go), "get", f"{gosdk.SDK_MODULE}@{release}"], cwd=work, env=env, check=True, capture_output=True)
    subprocess.run([str(go), "build", "-o", "probe", "."], cwd=work, env=env, check=True)
    binary = GoBinary(str(work / "probe"))
    try:
        linked = binary.build_info.deps.get(gosdk.SDK_MODULE)
        if linked != release:
            raise SystemExit(f"{work}: built with {gosdk.SDK_MODULE} {linked}, not {release}")
        structs = binary.struct_offsets(gosdk.STRUCTS)
        functions = {name: binary.functions.by_name(name) is not None
                     for name in (gosdk.START, gosdk.RECORDING_END, gosdk.NON_RECORDING_END)}
    finally:
        binary.close()
    for name, members in gosdk.STRUCTS.items():
        missing = set(members) - set(structs.get(name, {}))
        if missing:
            raise SystemExit(f"{release}: {name} has no {', '.join(sorted(missing))}")
    if not all(functions.values()):
        raise SystemExit(f"{release}: functions missing from the probe program: {functions}")
    return {"source": f"measured: DWARF of a program built with {gosdk.SDK_MODULE} {release} by {version_of(go)}",
            "structs": {name: dict(sorted(members.items())) for name, members in sorted(structs.items())}}


def generate() -> dict:
    table = {}
    for release in RELEASES:
        table[release] = measure(release, MAIN_GO)
        print(f"{release}: {table[release]['structs']}", file=sys.stderr)
    for release, minor in CROSS_CHECK.items():
        other = measure(release, minor)
        if other["structs"] != table[release]["structs"]:
            raise SystemExit(f"{release}: Go {minor} gives {other['structs']}, Go {MAIN_GO} {table[release]['structs']}")
    return table


def main() -> int:
    return generated_table.main(__doc__.splitlines()[0], TABLE, generate, "the SDK releases", "scripts/gen_sdk_layouts.py")


if __name__ == "__main__":
    sys.exit(main())
