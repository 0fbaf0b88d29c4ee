"""The inline tree of the Go function table (GoBinary.inlined_call) on real binaries, against the Go
runtime's own traceback: tests/programs/inlined, built by the oldest and newest toolchains of the matrix
and the machine's, records the frames under a goroutine started by `go handle(...)` (runtime.CallersFrames,
which expands inlined calls and hides the go statement's wrapper)."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import build_program, go_release
from otel_goroutines.binary.gobinary import GoBinary
from otel_goroutines.binary.symbolize import Symbolizer

TOOLCHAINS = ("1.19", "1.26", "1.27")
MODES = {"default": (), "stripped": ("-ldflags=-s -w",), "pie-stripped": ("-buildmode=pie", "-ldflags=-s -w")}
CELLS = [(go, mode) for go in TOOLCHAINS for mode in MODES]
STARTED = {"main.handle", "main.holder", "main.drain"}  # the functions of the fixture's go statements


@pytest.fixture(scope="module", params=CELLS, ids=[f"go{go}-{mode}" for go, mode in CELLS])
def fixture(request, tmp_path_factory):
    go, mode = request.param
    path = build_program("inlined", go=go_release(go), flags=MODES[mode])
    manifest = tmp_path_factory.mktemp("inlined") / "manifest.json"
    subprocess.run([str(path), str(manifest)], check=True, timeout=60)
    binary = GoBinary(str(path))
    yield go, binary, json.loads(manifest.read_text())
    binary.close()


def _go_wrappers(binary: GoBinary) -> list:
    """The wrappers of main.main's go statements (main.main.funcN up to Go 1.21, gowrapN after)."""
    return [f for f in binary.functions.funcs() if f.name.startswith("main.main.") and binary.functions.is_wrapper(f)]


def test_wrappers_named_as_the_runtime_traceback_names_them(fixture):
    go, binary, manifest = fixture
    # The frame under runtime.goexit: what the go statement started (wrappers are hidden).
    assert manifest["traceback"][-2] == "main.handle"
    literal = manifest["literal_traceback"][-2]
    assert literal == "main.main.func1"
    symbolizer = Symbolizer(binary.functions, binary.code, 0, binary.isa, binary.inlined_call)
    wrappers = _go_wrappers(binary)
    assert len(wrappers) == 4
    assert {symbolizer.function(w.entry) for w in wrappers} == STARTED | {literal}


def test_inline_tree_names_what_the_wrapper_inlines(fixture):
    go, binary, _ = fixture
    inlined = {binary.inlined_call(w) for w in _go_wrappers(binary)}
    # Go 1.22 moved the go statement's wrapper before inlining (gowrapN): from then on it inlines f
    # (not the literal, which is too big to inline).
    assert inlined == (STARTED | {None} if go != "1.19" else {None})


def test_inline_tree_of_runtime_functions(fixture):
    """Both tree formats (20-byte entries up to Go 1.19, 16 after), read in their source: runtime.gopark
    starts with `mp := acquirem()`; the first call runtime.main inlines is lockOSThread() (before it,
    only systemstack, which is assembly)."""
    _, binary, _ = fixture
    assert binary.inlined_call(binary.function("runtime.gopark")) == "runtime.acquirem"
    assert binary.inlined_call(binary.function("runtime.main")) == "runtime.lockOSThread"
    assert binary.inlined_call(binary.function("runtime.goexit")) is None  # assembly: no tree
