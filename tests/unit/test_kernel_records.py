"""bpf/records.h is the one definition of the kernel-to-user records: the generated Python side is
current, and gcc lays out every struct exactly as the generated numpy dtypes say."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from otel_goroutines import kernel_records

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gen_records  # noqa: E402


def test_generated_module_is_current():
    assert (ROOT / "otel_goroutines" / "kernel_records.py").read_text() == gen_records.render(), \
        "bpf/records.h changed: run scripts/gen_records.py"


def _dtypes() -> dict[str, np.dtype]:
    return {name.removesuffix("_DTYPE").lower(): value for name, value in vars(kernel_records).items()
            if name.endswith("_DTYPE")}


def test_gcc_agrees_with_every_offset_and_size(tmp_path):
    dtypes = _dtypes()
    lines = ["#include <stdio.h>", "#include <stddef.h>", "typedef unsigned char u8; typedef unsigned short u16;",
             "typedef unsigned int u32; typedef unsigned long long u64;", f'#include "{ROOT / "bpf" / "records.h"}"',
             "int main(void) {"]
    for struct, dtype in dtypes.items():
        lines.append(f'printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for field in dtype.names:
            lines.append(f'printf("{struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
    lines.append("return 0; }")
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(tmp_path / "layout"), str(source)], check=True)
    from_gcc = dict(line.rsplit(" ", 1) for line in subprocess.run([str(tmp_path / "layout")], capture_output=True,
                                                                     text=True, check=True).stdout.splitlines())
    expected = {}
    for struct, dtype in dtypes.items():
        expected[struct] = str(dtype.itemsize)
        for field in dtype.names:
            expected[f"{struct}.{field}"] = str(dtype.fields[field][1])
    assert from_gcc == expected


def test_enums_match_what_the_rest_of_the_agent_names():
    from otel_goroutines.records import TraceReason
    assert {r.name for r in TraceReason} == {m.name.removeprefix("TR_") for m in kernel_records.TraceReason}
    assert all(TraceReason[m.name.removeprefix("TR_")] == m.value for m in kernel_records.TraceReason)
